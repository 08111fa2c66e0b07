"""A/B of the SFT step: transformer.linear's written-out backward vs autodiff of the same einsums.

  python benchmarks/linear_ab.py --shape=llama8x512 --steps=2 --repeats=8
  python benchmarks/linear_ab.py --shape=tiny --steps=20 --repeats=7

Both steps are built in one process from the same params and batch; they differ only in
`instructrl.models.transformer.linear` (the "autodiff" contender swaps in a plain jnp.einsum).
Timings are interleaved (a, b, a, b, ...) so load hits both alike; prints one JSON object with the
per-step seconds, the speedup of medians and minima, and the first losses/grad norms of both
(equal up to rounding: same math, other summation order).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from benchmarks.common import SHAPES, CompileCounter, environment, interleaved, model_summary, summary
from benchmarks.train_step import build
from instructrl.models import transformer


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  ap.add_argument("--steps", type=int, default=10, help="steps per timing")
  ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  ap.add_argument("--dtype", default=None)
  args = ap.parse_args()

  counter = CompileCounter()
  written = transformer.linear
  contenders = {"written": written, "autodiff": lambda spec, x, w: jnp.einsum(spec, x, w)}
  runs, first = {}, {}
  try:
    for name, fn in contenders.items():
      transformer.linear = fn          # read at trace time, so each contender's step keeps its own
      s = build(args.shape, dtype=args.dtype, steps=args.steps * args.repeats + 1)
      state, metrics = s.train_step(s.state, s.batch, s.key)
      first[name] = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}
      runs[name] = {"s": s, "state": state}
  finally:
    transformer.linear = written
  compiles_warmup = counter.count

  def steps(name):
    def fn():
      r = runs[name]
      for _ in range(args.steps):
        r["state"], m = r["s"].train_step(r["state"], r["s"].batch, r["s"].key)
      jax.block_until_ready(m["loss"])
    return fn

  times = interleaved({name: steps(name) for name in contenders}, args.repeats)
  per_step = {name: [t / args.steps for t in ts] for name, ts in times.items()}
  stats = {name: summary(ts) for name, ts in per_step.items()}
  s = runs["written"]["s"]
  print(json.dumps({
      "benchmark": "linear_ab", "shape": args.shape, **environment(), "model": model_summary(s.cfg),
      "batch_size": s.B, "seq_len": s.T, "steps": args.steps, "repeats": args.repeats,
      "step_s": stats, "step_times_s": per_step,
      "speedup_median": stats["autodiff"]["median_s"] / stats["written"]["median_s"],
      "speedup_min": stats["autodiff"]["min_s"] / stats["written"]["min_s"],
      "first_step": first, "compiles_warmup": compiles_warmup,
      "compiles_after_warmup": counter.count - compiles_warmup,
  }, indent=1))


if __name__ == "__main__":
  main()
