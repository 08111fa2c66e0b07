"""Matmul peak probe: FLOP/s of jitted n x n matmuls in float32 and bfloat16; prints one JSON object.

  python benchmarks/matmul_peak.py            # n = 2048 on CPU, 8192 on accelerators
  python benchmarks/matmul_peak.py --n=4096 --repeats=5

This is the denominator of every MFU the benchmarks quote (each also re-measures it in its own run,
since the shared machine's load moves it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from benchmarks.common import CompileCounter, environment, matmul_peak


def main():
  ap = argparse.ArgumentParser()
  on_cpu = jax.default_backend() == "cpu"
  ap.add_argument("--n", type=int, default=2048 if on_cpu else 8192)
  ap.add_argument("--repeats", type=int, default=5, help="bursts; the best is reported (a peak)")
  ap.add_argument("--inner", type=int, default=2 if on_cpu else 10, help="back-to-back matmuls per burst")
  ap.add_argument("--quick", action="store_true", help="3 bursts of 1")
  args = ap.parse_args()
  if args.quick:
    args.repeats, args.inner = 3, 1
  counter = CompileCounter()
  out = {"benchmark": "matmul_peak", **environment(), "n": args.n, "repeats": args.repeats, "inner": args.inner}
  for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    out[f"{name}_flops_per_s"] = matmul_peak(dt, n=args.n, repeats=args.repeats, inner=args.inner)
  out["compiles"] = counter.count
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
