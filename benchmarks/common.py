"""Shared bits of the benchmarks: measured peaks, a compile counter, environment facts, shapes, timing.

Every benchmark prints one JSON object; `environment()` puts the device, the versions, the XLA flags and
the load average in it (the machine is shared: a number without its load average cannot be judged).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# The LM shapes the benchmarks time: (preset whose model/mesh/optimizer is used, model overrides, batch, seq).
# "llama8x512" is an 8-layer x 512-wide LLaMA (heads of 64, SwiGLU d_ff 1408 ~ 8/3 x 512) at seq 256.
SHAPES = {
    "tiny": ("tiny", {}, 32, 40),                       # the tiny preset's SFT batch
    "small": ("small", {}, 64, 96),                     # the small preset's SFT batch
    "llama8x512": ("tiny", dict(style="llama", n_layers=8, d_model=512, n_heads=8, n_kv_heads=8, head_dim=64,
                                d_ff=1408, max_len=256, tie_embeddings=False), 8, 256),
}


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

  best = min(timed(burst) for _ in range(repeats))
  return 2 * n ** 3 * inner / best


def default_peak(dtype: str) -> float:
  """The matmul peak an MFU is quoted against: bf16 peak for bf16 compute, else f32; sized per backend."""
  on_cpu = jax.default_backend() == "cpu"
  return matmul_peak(jnp.bfloat16 if dtype == "bfloat16" else jnp.float32, n=2048 if on_cpu else 8192,
                     inner=1 if on_cpu else 10, repeats=3 if on_cpu else 5)


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
  """Seconds of each `fns[name]()` call, called round-robin `repeats` times (a, b, a, b, ...).

  Machine load then hits every contender alike; report the medians (`summary`).
  """
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(timed(fn))
  return times


def summary(ts: list[float]) -> dict:
  return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}


def lm_flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6 x (matmul params incl. the unembedding) + attention scores/values.

  Attention: 2 matmuls (QK^T, PV) x 2 FLOPs x T keys x H x heads per token forward, x3 for the backward;
  causal masking is not discounted (the dense kernels compute the masked half too).
  """
  matmul_params = cfg.num_params(include_embeddings=False) + cfg.d_model * cfg.vocab_size
  attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
  return 6 * matmul_params + attention


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on device 0 where the backend reports it (GPU/TPU); None on CPU."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:          # backends without allocator stats raise or return None
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def environment() -> dict:
  import flax
  import optax
  d = jax.devices()[0]
  env = {"backend": jax.default_backend(), "device": getattr(d, "device_kind", str(d)),
         "n_devices": jax.device_count(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
         "flax": flax.__version__, "optax": optax.__version__, "python": platform.python_version(),
         "machine": platform.machine(), "numpy": np.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "loadavg": list(os.getloadavg())}
  if "torch" in sys.modules:
    torch = sys.modules["torch"]
    env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
  if "transformers" in sys.modules:
    env["transformers"] = sys.modules["transformers"].__version__
  return env


def model_summary(cfg) -> dict:
  return {"style": cfg.style, "layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads,
          "d_ff": cfg.d_ff, "vocab": cfg.vocab_size, "params": cfg.num_params(), "dtype": cfg.dtype,
          "remat": cfg.remat}


# ----------------------------------------------------------------------------- setup shared by the stage benchmarks

def setup(preset: str, *, dtype: str | None = None, min_len: int = 0, model: dict | None = None,
          stage_overrides: dict | None = None):
  """The preset's config, its model config (with overrides), mesh and rules.

  model: ModelConfig field overrides (shape, style, remat); stage_overrides: the stage's
  `model_overrides` (RM: the RM's own fields). min_len raises max_len to fit the sequences.
  """
  from configs import instructgpt
  from instructrl import parallel
  from instructrl.models.config import ModelConfig
  config = instructgpt.get_config(preset)
  m = {**config.model, **(stage_overrides or {}), **(model or {})}
  if dtype:
    m["dtype"] = dtype
  m["max_len"] = max(m["max_len"], min_len)
  cfg = ModelConfig.from_dict(m)
  mesh = parallel.make_mesh(config.mesh.shape)
  rules = parallel.rules_from_config(config.mesh.rules)
  n_batch_shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  return types.SimpleNamespace(config=config, cfg=cfg, mesh=mesh, rules=rules, n_batch_shards=n_batch_shards)


def lm_params(s, seed: int = 0):
  """Random-init LM params of setup `s`'s model, sharded on its mesh (sampling benchmarks need no optimizer)."""
  from instructrl.stages import train_state
  tx, _ = train_state.make_optimizer(s.config.sft, 10)
  shardings = train_state.state_shardings(s.cfg, tx, s.mesh, s.rules)
  return train_state.init_params(s.cfg, jax.random.key(seed), shardings["params"], s.mesh, s.rules)


def check_batch(n: int, what: str, s) -> None:
  if n % s.n_batch_shards:
    raise ValueError(f"{what}={n} must be a multiple of the {s.n_batch_shards} batch shards")


def ppo_setup(s, pc, eos_id: int | None = None):
  """PPO's programs and state as ppo.run makes them (ppo.build), the models random-initialised; pc is the
  ppo config block, the RM (one member) the policy's model. eos_id: default the tokenizer's EOS."""
  import ml_collections
  from instructrl import parallel
  from instructrl.data.tokenizer import EOS_ID, PAD_ID
  from instructrl.stages import ppo, train_state
  cfg, mesh, rules = s.cfg, s.mesh, s.rules
  config = ml_collections.ConfigDict(s.config.to_dict())
  config.model, config.ppo = cfg.to_dict(), ml_collections.ConfigDict(pc.to_dict())
  programs = ppo.build(config, mesh, rules, eos_id=EOS_ID if eos_id is None else eos_id, pad_id=PAD_ID,
                       rm_model=cfg.to_dict(), n_rm=1)
  sh, repl = programs.shardings, parallel.replicated(mesh)
  policy = train_state.init_params(cfg, jax.random.key(0), sh["params"], mesh, rules, "lm")
  rm = train_state.init_params(cfg, jax.random.key(1), sh["value"], mesh, rules, "scalar")
  with jax.set_mesh(mesh):
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
    ref, ema = copy(policy), copy(policy)
    value = copy(rm)
    popt = jax.jit(programs.policy_tx.init, out_shardings=sh["opt_state"])(policy)
    vopt = jax.jit(programs.value_tx.init, out_shardings=sh["value_opt"])(value)
  state = {"step": jax.device_put(jnp.int32(0), repl), "params": policy, "opt_state": popt, "value": value,
           "value_opt": vopt, "ema": ema, "kl_coef": jax.device_put(jnp.float32(pc.kl_coef), repl),
           "score_gain": jax.device_put(jnp.float32(1.0), repl)}
  return types.SimpleNamespace(state=state, ref=ref, rm=(rm,), programs=programs, rollout=programs.rollout,
                               update=programs.update, n_mb=programs.updates_per_iter, repl=repl)


def ppo_data(s, pc, rng, programs):
  """Random left-padded prompts [B, P] and ptx windows [epochs x B // mb, ptx_bs, L] (a stub of 1 when ptx is off),
  placed as ppo.run places them."""
  from instructrl import parallel
  from instructrl.data.tokenizer import PAD_ID
  from instructrl.stages import ppo, train_state
  B, P, L = pc.batch_size, pc.prompt_len, pc.ptx_seq_len
  lengths = rng.integers(P // 2, P + 1, B)
  prompt_mask = np.arange(P)[None, :] >= (P - lengths)[:, None]
  prompts = np.where(prompt_mask, rng.integers(4, s.cfg.vocab_size, (B, P)), PAD_ID).astype(np.int32)
  ptx_on = ppo.ptx_enabled(pc)
  ptx_bs = pc.ptx_batch_size if ptx_on else 1
  n_ptx = ppo.ptx_minibatches(pc)
  ptx_toks = rng.integers(4, s.cfg.vocab_size, (n_ptx, ptx_bs, L + 1)).astype(np.int32)
  ptx = jax.device_put({"inputs": ptx_toks[..., :-1], "targets": ptx_toks[..., 1:],
                        "mask": np.ones((n_ptx, ptx_bs, L), bool)},
                       programs.ptx_sharding if ptx_on else parallel.replicated(s.mesh))
  batch = train_state.device_batch({"prompt": prompts, "prompt_mask": prompt_mask}, s.mesh, s.rules)
  return batch, ptx, ptx_bs


def ranked_batch(rng, B: int, K: int, T: int, vocab: int):
  """B prompts x K responses of random tokens, each ending in an EOS somewhere in the second half."""
  from instructrl.data.rankings import RankedExamples
  toks = rng.integers(4, vocab, (B, K, T)).astype(np.int32)
  last = rng.integers(T // 2, T, (B, K)).astype(np.int32)
  toks[np.arange(T)[None, None, :] > last[..., None]] = 0          # PAD after the EOS
  np.put_along_axis(toks, last[..., None], 3, axis=2)
  ranks = np.stack([rng.permutation(K) for _ in range(B)]).astype(np.int32)
  return RankedExamples(toks, last, ranks, np.ones((B, K), bool), np.arange(B))


def finite_or_none(x: float):
  return x if math.isfinite(x) else None
