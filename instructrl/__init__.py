"""instructrl: InstructGPT (SFT -> RM -> PPO-ptx) in JAX/Flax, from a laptop CPU to a TPU pod."""

__version__ = "0.1.0"
