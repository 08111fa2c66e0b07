"""LM (pretrain/SFT) train-step throughput and MFU; prints one JSON object.

  python benchmarks/train_step.py --shape=tiny            # also: small, llama8x512 (8 x 512 LLaMA, seq 256)
  python benchmarks/train_step.py --shape=small --dtype=bfloat16 --steps=50   # on an accelerator
  python benchmarks/train_step.py --preset=small --batch_size=16 --seq_len=1024 --layers=24 --width=2048

MFU = model FLOPs per second (6*N*tokens + attention) / a matmul peak measured in the same run.
The step is the stage's own jitted step (instructrl/stages/lm.py: params donated, guarded AdamW).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from benchmarks.common import (SHAPES, CompileCounter, default_peak, environment, lm_flops_per_token,
                               model_summary, peak_memory_bytes, setup)
from instructrl import parallel
from instructrl.stages import lm, train_state


def build(shape: str, *, preset=None, batch_size=None, seq_len=None, dtype=None, layers=None, width=None,
          remat=False, steps: int = 30):
  """The SFT step of a shape (see common.SHAPES) with its state and a random batch; returns a namespace."""
  base_preset, model, B, T = SHAPES[shape]
  if preset:                         # a preset's own model and SFT batch
    base_preset, model = preset, {}
    from configs import instructgpt
    sft = instructgpt.get_config(preset).sft
    B, T = sft.batch_size, sft.seq_len
  B, T = batch_size or B, seq_len or T
  model = dict(model)
  if layers:
    model["n_layers"] = layers
  if width:
    model.update(d_model=width, n_heads=width // 64, n_kv_heads=width // 64, head_dim=64, d_ff=4 * width)
  if remat:
    model["remat"] = True
  s = setup(base_preset, dtype=dtype, min_len=T, model=model)
  cfg, mesh, rules = s.cfg, s.mesh, s.rules
  tx, schedule = train_state.make_optimizer(s.config.sft, steps + 10)
  shardings = train_state.state_shardings(cfg, tx, mesh, rules)
  params = train_state.init_params(cfg, jax.random.key(0), shardings["params"], mesh, rules)
  state = train_state.new_state(params, tx, shardings, mesh)
  train_step, _ = lm.make_steps(cfg, tx, schedule, shardings, mesh, rules)
  toks = np.random.default_rng(0).integers(4, cfg.vocab_size, (B, T + 1)).astype(np.int32)
  batch = train_state.device_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": np.ones((B, T), bool)},
                                   mesh, rules)
  s.__dict__.update(B=B, T=T, state=state, train_step=train_step, batch=batch, key=jax.random.key(1),
                    preset=base_preset)
  return s


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  ap.add_argument("--preset", default=None, help="use this preset's model and SFT batch instead of --shape")
  ap.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
  ap.add_argument("--repeats", type=int, default=3, help="timing rounds; the median is reported")
  ap.add_argument("--batch_size", type=int, default=None)
  ap.add_argument("--seq_len", type=int, default=None)
  ap.add_argument("--dtype", default=None, help="compute dtype override (float32/bfloat16)")
  ap.add_argument("--layers", type=int, default=None)
  ap.add_argument("--width", type=int, default=None, help="d_model (heads of 64, d_ff = 4 x width)")
  ap.add_argument("--remat", action="store_true", help="recompute each block in the backward pass")
  ap.add_argument("--quick", action="store_true", help="3 steps, 1 round, matmul peak still measured")
  args = ap.parse_args()
  if args.quick:
    args.steps, args.repeats = 3, 1

  counter = CompileCounter()
  s = build(args.shape, preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
            layers=args.layers, width=args.width, remat=args.remat, steps=args.steps * args.repeats)
  cfg, B, T = s.cfg, s.B, s.T
  peak = default_peak(cfg.dtype)
  state = s.state
  with parallel.activate(s.mesh, s.rules):
    t0 = time.perf_counter()
    state, metrics = s.train_step(state, s.batch, s.key)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    compiles_warmup = counter.count
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = s.train_step(state, s.batch, s.key)
      jax.block_until_ready(metrics)
      times.append((time.perf_counter() - t0) / args.steps)
  dt = statistics.median(times)
  tokens_per_s = B * T / dt
  flops = lm_flops_per_token(cfg, T) * B * T / dt
  print(json.dumps({
      "benchmark": "train_step", "shape": args.shape, "preset": s.preset, **environment(),
      "model": model_summary(cfg), "batch_size": B, "seq_len": T, "steps": args.steps, "repeats": args.repeats,
      "step_time_s": dt, "step_times_s": times, "tokens_per_s": tokens_per_s, "model_flops_per_s": flops,
      "flops_per_token": lm_flops_per_token(cfg, T),
      "peak_matmul_flops_per_s": peak, "mfu": flops / peak, "peak_memory_bytes": peak_memory_bytes(),
      "first_step_s_incl_compile": compile_s, "compiles_warmup": compiles_warmup,
      "compiles_after_warmup": counter.count - compiles_warmup,
      "final_loss": float(metrics["loss"]),
  }, indent=1))


if __name__ == "__main__":
  main()
