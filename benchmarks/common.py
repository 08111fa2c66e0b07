"""Shared bits of the benchmarks: a measured matmul peak, a compile counter, environment facts."""

from __future__ import annotations

import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Counts XLA backend compilations through jax.monitoring (public API)."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **kw):
    if event == COMPILE_EVENT:
      self.count += 1


def matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 5, inner: int = 10) -> float:
  """Best-of-`repeats` FLOP/s of `inner` back-to-back jitted n x n matmuls, measured now.

  Back-to-back calls hide dispatch latency (which otherwise halves an H100's figure at n=4096);
  measure in the same run as the step you quote MFU for, since peaks drift with machine load.
  """
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()

  def burst():
    outs = [f(a, b) for _ in range(inner)]
    jax.block_until_ready(outs)

  best = min(_timed(burst) for _ in range(repeats))
  return 2 * n ** 3 * inner / best


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def lm_flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6 x (matmul params incl. the unembedding) + attention scores/values."""
  matmul_params = cfg.num_params(include_embeddings=False) + cfg.d_model * cfg.vocab_size
  attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
  return 6 * matmul_params + attention


def environment() -> dict:
  d = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": getattr(d, "device_kind", str(d)),
          "n_devices": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
          "machine": platform.machine(), "numpy": np.__version__}
