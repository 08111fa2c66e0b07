"""LM (pretrain/SFT) train-step throughput and MFU; prints one JSON object.

  python benchmarks/train_step.py --preset=tiny
  python benchmarks/train_step.py --preset=small --dtype=bfloat16 --steps=50   # on an accelerator

MFU = model FLOPs per second (6*N*tokens + attention) / a matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import CompileCounter, environment, lm_flops_per_token, matmul_peak
from configs import instructgpt
from instructrl import parallel
from instructrl.models.config import ModelConfig
from instructrl.stages import lm, train_state


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--batch_size", type=int, default=None)
  ap.add_argument("--seq_len", type=int, default=None)
  ap.add_argument("--dtype", default=None, help="compute dtype override (float32/bfloat16)")
  ap.add_argument("--layers", type=int, default=None)
  ap.add_argument("--width", type=int, default=None, help="d_model (heads of 64, d_ff = 4 x width)")
  args = ap.parse_args()

  counter = CompileCounter()
  config = instructgpt.get_config(args.preset)
  stage = config.sft
  B = args.batch_size or stage.batch_size
  T = args.seq_len or stage.seq_len
  m = dict(config.model)
  if args.dtype:
    m["dtype"] = args.dtype
  if args.layers:
    m["n_layers"] = args.layers
  if args.width:
    m.update(d_model=args.width, n_heads=args.width // 64, n_kv_heads=args.width // 64, head_dim=64,
             d_ff=4 * args.width)
  m["max_len"] = max(m["max_len"], T)
  cfg = ModelConfig.from_dict(m)

  peak_dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
  peak = matmul_peak(peak_dtype, n=8192 if jax.default_backend() != "cpu" else 2048,
                     inner=10 if jax.default_backend() != "cpu" else 1)

  mesh = parallel.make_mesh(config.mesh.shape)
  rules = parallel.rules_from_config(config.mesh.rules)
  tx, schedule = train_state.make_optimizer(stage, args.steps + 10)
  shardings = train_state.state_shardings(cfg, tx, mesh, rules)
  state = train_state.new_state(train_state.init_params(cfg, jax.random.key(0), shardings["params"], mesh, rules), tx, shardings, mesh)
  train_step, _ = lm.make_steps(cfg, tx, schedule, shardings, mesh, rules)
  rng = np.random.default_rng(0)
  toks = rng.integers(4, cfg.vocab_size, (B, T + 1)).astype(np.int32)
  batch = train_state.device_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": np.ones((B, T), bool)},
                          mesh, rules)
  key = jax.random.key(1)
  with parallel.activate(mesh, rules):
    t0 = time.perf_counter()
    state, metrics = train_step(state, batch, key)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    compiles_warmup = counter.count
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = train_step(state, batch, key)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t0) / args.steps
  tokens_per_s = B * T / dt
  flops = lm_flops_per_token(cfg, T) * B * T / dt
  print(json.dumps({
      "benchmark": "train_step", "preset": args.preset, **environment(),
      "model": {"style": cfg.style, "layers": cfg.n_layers, "d_model": cfg.d_model, "params": cfg.num_params(),
                "dtype": cfg.dtype},
      "batch_size": B, "seq_len": T, "steps": args.steps,
      "step_time_s": dt, "tokens_per_s": tokens_per_s, "model_flops_per_s": flops,
      "peak_matmul_flops_per_s": peak, "mfu": flops / peak,
      "first_step_s_incl_compile": compile_s, "compiles_warmup": compiles_warmup,
      "compiles_after_warmup": counter.count - compiles_warmup,
      "final_loss": float(metrics["loss"]),
  }, indent=1))


if __name__ == "__main__":
  main()
