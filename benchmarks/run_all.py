"""Run every benchmark, each in its own process, and write their JSON objects into one file.

  python benchmarks/run_all.py --quick                      # smoke-sized; < 5 min on a 2-core CPU
  python benchmarks/run_all.py --out=benchmarks/results.json
  python benchmarks/run_all.py --only=train_step_tiny,sampler --extra=--dtype=bfloat16   # on an accelerator

A fresh process per benchmark keeps compile counts and memory peaks separate. A benchmark that fails
is recorded with its exit code and the tail of its stderr (the others still run); the exit code of
run_all is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, full args, --quick args). Quick runs the smallest shapes that still exercise each path.
BENCHMARKS = {
    "matmul_peak": ("matmul_peak.py", [], ["--quick"]),
    "train_step_tiny": ("train_step.py", ["--shape=tiny"], ["--shape=tiny", "--quick"]),
    "train_step_small": ("train_step.py", ["--shape=small"], ["--shape=small", "--quick", "--batch_size=8"]),
    "train_step_llama8x512": ("train_step.py", ["--shape=llama8x512", "--steps=5"],
                              ["--shape=llama8x512", "--quick", "--batch_size=1", "--steps=2"]),
    "sampler": ("sampler.py", [], ["--quick", "--batches=1,16"]),
    "rm_step": ("rm_step.py", [], ["--quick"]),
    "ppo_iteration": ("ppo_iteration.py", [], ["--quick"]),
    "compare_torch": ("compare_torch.py", [], ["--quick"]),
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results[_quick].json)")
  ap.add_argument("--only", default="", help="comma-separated names of BENCHMARKS")
  ap.add_argument("--extra", action="append", default=[], help="an argument passed to every script")
  args = ap.parse_args()
  names = args.only.split(",") if args.only else list(BENCHMARKS)
  unknown = sorted(set(names) - set(BENCHMARKS))
  if unknown:
    raise SystemExit(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}")
  out_path = Path(args.out or HERE / ("results_quick.json" if args.quick else "results.json"))
  results, failed, t_all = {}, [], time.perf_counter()
  for name in names:
    script, full, quick = BENCHMARKS[name]
    cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full), *args.extra]
    if name == "compare_torch" and any("dtype" in e for e in args.extra):
      cmd = [c for c in cmd if "dtype" not in c]      # the torch side stays f32 on CPU
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    wall = time.perf_counter() - t0
    if p.returncode == 0:
      try:
        results[name] = {**json.loads(p.stdout), "wall_s_incl_startup": wall, "command": " ".join(cmd[1:])}
      except json.JSONDecodeError as e:
        results[name] = {"error": f"stdout is not one JSON object: {e}", "stdout_tail": p.stdout[-2000:]}
        failed.append(name)
    else:
      results[name] = {"error": f"exit code {p.returncode}", "stderr_tail": p.stderr[-3000:], "command": " ".join(cmd[1:])}
      failed.append(name)
    print(f"{name}: {'FAILED' if name in failed else 'ok'} in {wall:.1f} s", file=sys.stderr, flush=True)
  doc = {"quick": args.quick, "wall_s": time.perf_counter() - t_all, "loadavg_end": list(os.getloadavg()),
         "failed": failed, "results": results}
  out_path.write_text(json.dumps(doc, indent=1))
  print(json.dumps(doc, indent=1))
  print(f"wrote {out_path}", file=sys.stderr)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
