"""Which XLA:CPU flags make a benchmark faster: runs it under each flag set in turn, alternating, medians.

  python benchmarks/xla_flags.py --bench="matmul_peak.py --quick" --metric=float32_flops_per_s --rounds=3
  python benchmarks/xla_flags.py --bench="train_step.py --shape=tiny --steps=10 --repeats=1" --metric=tokens_per_s

XLA reads XLA_FLAGS once per process, so each (flag set, round) is a fresh process; the sets are
alternated round by round so the shared machine's load drifts over all of them alike. Prints one
JSON object: per flag set, the metric of each round, its median, and the ratio to the baseline (no
flags). Flag sets are the ones this jaxlib build knows (`strings libjax_common.so | grep xla_cpu_`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    # Library fusions of jaxlib 0.10 (help text in libjax_common.so: "Available fusion types: dot, eltwise,
    # and reduce"): dots to oneDNN, XNNPACK or YNNPACK. On an AMX Xeon none reached AMX-bf16: XLA upcasts
    # bf16 dots to f32 before the library sees them (BENCHMARKS.md).
    "onednn_dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    # Without YNNPACK's dot fusion the dots fall back to XLA's own (Eigen) kernels, or to XNNPACK / oneDNN.
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "no_ynn_xnn_dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot",
    "no_ynn_onednn_dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_fusion_type=dot",
    "vector_512": "--xla_cpu_prefer_vector_width=512",   # LLVM-emitted fusions in 512-bit vectors (AVX-512)
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "one_thread": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--bench", required=True, help="script and its args, relative to benchmarks/")
  ap.add_argument("--metric", required=True, help="top-level JSON key to compare (higher is better)")
  ap.add_argument("--sets", default=",".join(FLAG_SETS), help=f"comma-separated names of {sorted(FLAG_SETS)}")
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args()
  sets = args.sets.split(",")
  values = {name: [] for name in sets}
  errors = {}
  script, *rest = args.bench.split()
  for _ in range(args.rounds):
    for name in sets:
      env = {**os.environ, "XLA_FLAGS": FLAG_SETS[name], "PYTHONPATH": str(HERE.parent)}
      p = subprocess.run([sys.executable, str(HERE / script), *rest], capture_output=True, text=True, env=env)
      if p.returncode:
        errors[name] = p.stderr[-1500:]
        continue
      values[name].append(json.loads(p.stdout)[args.metric])
  base = statistics.median(values["default"]) if values.get("default") else None
  out = {"benchmark": "xla_flags", "bench": args.bench, "metric": args.metric, "rounds": args.rounds,
         "loadavg_end": list(os.getloadavg()), "errors": errors, "results": {}}
  for name, vs in values.items():
    med = statistics.median(vs) if vs else None
    out["results"][name] = {"xla_flags": FLAG_SETS[name], "values": vs, "median": med,
                            "ratio_to_default": med / base if (med and base) else None}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
