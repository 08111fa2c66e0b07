"""What XLA made of a train step: compiled cost analysis, op census of the optimized HLO, optional trace.

  python benchmarks/profile_step.py --shape=llama8x512
  python benchmarks/profile_step.py --shape=tiny --hlo_dir=runs/hlo --trace_dir=runs/trace --steps=5

Load-independent evidence (the machine is shared, timings are not): XLA's own FLOP count against the
model's 6*N*tokens + attention, bytes accessed, and how many dots / fusions / copies / scatters /
transposes the optimized program runs. --trace_dir writes a jax.profiler trace (TensorBoard/Perfetto)
of --steps steps. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from benchmarks import train_step as train_step_bench
from benchmarks.common import SHAPES, CompileCounter, environment, lm_flops_per_token, model_summary
from instructrl import parallel

OPS = ("dot", "fusion", "copy", "transpose", "scatter", "gather", "custom-call", "while", "reduce", "sort")


def op_census(hlo_text: str) -> dict:
  """Instruction counts by opcode over every computation of the optimized module (fusion bodies included)."""
  counts = collections.Counter()
  for m in re.finditer(r"=\s*[^\s]+\s+([a-z\-]+)\(", hlo_text):
    counts[m.group(1)] += 1
  return {op: counts.get(op, 0) for op in OPS}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  ap.add_argument("--batch_size", type=int, default=None)
  ap.add_argument("--dtype", default=None)
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--hlo_dir", default=None, help="write the optimized HLO text here")
  ap.add_argument("--trace_dir", default=None, help="write a jax.profiler trace of --steps steps here")
  ap.add_argument("--steps", type=int, default=3)
  args = ap.parse_args()
  counter = CompileCounter()
  s = train_step_bench.build(args.shape, batch_size=args.batch_size, dtype=args.dtype, remat=args.remat)
  with parallel.activate(s.mesh, s.rules):
    compiled = s.train_step.lower(s.state, s.batch, s.key).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  hlo = compiled.as_text()
  model_flops = lm_flops_per_token(s.cfg, s.T) * s.B * s.T
  out = {"benchmark": "profile_step", "shape": args.shape, **environment(), "model": model_summary(s.cfg),
         "batch_size": s.B, "seq_len": s.T, "model_flops_per_step": model_flops,
         "xla_flops_per_step": cost.get("flops"), "xla_flops_over_model_flops": (cost.get("flops") or 0) / model_flops,
         "xla_bytes_accessed_per_step": cost.get("bytes accessed"),
         "xla_transcendentals": cost.get("transcendentals"), "hlo_op_census": op_census(hlo),
         "compiles": counter.count}
  if args.hlo_dir:
    Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.hlo_dir) / f"train_step_{args.shape}.txt").write_text(hlo)
  if args.trace_dir:
    state = s.state
    with parallel.activate(s.mesh, s.rules), jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        state, m = s.train_step(state, s.batch, s.key)
      jax.block_until_ready(m)
    out["trace_dir"] = args.trace_dir
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
