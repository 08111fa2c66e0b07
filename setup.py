"""instructrl: InstructGPT (SFT -> reward model -> PPO-ptx) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="instructrl",
    version="0.1.0",
    description="InstructGPT (Ouyang et al. 2022) in JAX/Flax: SFT, K-way reward model, PPO-ptx; CPU to TPU pod.",
    python_requires=">=3.10",
    packages=find_packages(include=["instructrl", "instructrl.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8,<0.13",      # logical-axis API spelled in one helper; pin the minor
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "sentencepiece>=0.2.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "numpy>=1.26",
        "safetensors>=0.4",        # HF checkpoint import/export (numpy backend: no torch)
        "matplotlib>=3.8",         # the eval stage's plots (Agg backend, no display needed)
    ],
    extras_require={
        # nbclient/nbformat/ipykernel: tests/test_notebooks.py executes notebooks/*.ipynb
        "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],
        # HF parity tests and tokenizer.json; install torch==2.13.0 (CPU) first, see .ci/run
        "hf": ["transformers>=4.45", "tokenizers>=0.20"],
        # TFDS-prepared datasets (array_record), read without TensorFlow
        "tfds": ["tensorflow-datasets>=4.9.6", "array-record>=0.5", "importlib_resources"],
        "tpu": ["jax[tpu]>=0.10.2"],
        "gpu": ["jax[cuda12]>=0.10.2"],
    },
    entry_points={"console_scripts": ["instructrl=instructrl.main:run"]},
)
