"""Repo-root conftest: makes `configs` and `benchmarks` importable in tests; a shared compile cache."""

import os

import jax

# Later test processes (and subprocess tests) reuse compiled executables.
jax.config.update("jax_compilation_cache_dir", os.environ.get("INSTRUCTRL_JAX_CACHE", "/tmp/instructrl-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# Reference comparisons (NumPy forward, padding invariance) need full-precision matmuls; this is
# already the CPU default and stops GPUs from using TF32 when the suite runs there.
jax.config.update("jax_default_matmul_precision", "highest")
