"""Run every benchmark, each in its own process, and write their JSON objects into one file.

  python benchmarks/run_all.py --quick                      # smoke-sized; < 5 min on a 2-core CPU
  python benchmarks/run_all.py --smoke                      # the fewest rounds: checks every script runs
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

# name -> (script, full args, --quick args, --smoke args). Quick runs the smallest shapes that still exercise each
# path, with timings worth quoting; smoke runs each path once after its warm-up (one timed round, one step,
# smaller batches), which is what the test suite needs to know every script and its JSON still work.
ONCE = ["--steps=1", "--repeats=1"]
BENCHMARKS = {
    "matmul_peak": ("matmul_peak.py", [], ["--quick"], ["--repeats=1", "--inner=1", "--n=512"]),
    "train_step_tiny": ("train_step.py", ["--shape=tiny"], ["--shape=tiny", "--quick"], ["--shape=tiny", *ONCE]),
    "train_step_small": ("train_step.py", ["--shape=small"], ["--shape=small", "--quick", "--batch_size=8"],
                         ["--shape=small", "--batch_size=8", *ONCE]),
    "train_step_llama8x512": ("train_step.py", ["--shape=llama8x512", "--steps=5"],
                              ["--shape=llama8x512", "--quick", "--batch_size=1", "--steps=2"],
                              ["--shape=llama8x512", "--batch_size=1", *ONCE]),
    "sampler": ("sampler.py", [], ["--quick", "--batches=1,16"], ["--repeats=1", "--batches=1,16"]),
    "rm_step": ("rm_step.py", [], ["--quick"], ["--batch_prompts=2", *ONCE]),
    "rm_packing": ("rm_packing.py", [], ["--quick"], ["--quick"]),
    "ppo_iteration": ("ppo_iteration.py", [], ["--quick"],
                      ["--batch_size=8", "--minibatch_size=4", "--iterations=1", "--repeats=1"]),
    "compare_torch": ("compare_torch.py", [], ["--quick"],
                      ["--rounds=1", "--matmul_n=256", "--sft_shapes=tiny", "--gen_batches=4", "--prompt_len=16",
                       "--max_new_tokens=8", "--rm_prompts=2", "--rm_ks=4", "--ppo_batch=8", "--ppo_minibatch=4",
                       *ONCE]),
}


def main():
  ap = argparse.ArgumentParser()
  tier = ap.add_mutually_exclusive_group()
  tier.add_argument("--quick", action="store_true")
  tier.add_argument("--smoke", action="store_true", help="one timed round of each: a check, not a measurement")
  ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results[_quick].json)")
  ap.add_argument("--only", default="", help="comma-separated names of BENCHMARKS")
  ap.add_argument("--extra", action="append", default=[], help="an argument passed to every script")
  args = ap.parse_args()
  names = args.only.split(",") if args.only else list(BENCHMARKS)
  unknown = sorted(set(names) - set(BENCHMARKS))
  if unknown:
    raise SystemExit(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}")
  tier = "smoke" if args.smoke else "quick" if args.quick else "full"
  out_path = Path(args.out or HERE / {"smoke": "results_smoke.json", "quick": "results_quick.json",
                                      "full": "results.json"}[tier])
  results, failed, t_all = {}, [], time.perf_counter()
  for name in names:
    script, *args_of_tier = BENCHMARKS[name]
    cmd = [sys.executable, str(HERE / script), *dict(zip(("full", "quick", "smoke"), args_of_tier))[tier],
           *args.extra]
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
  doc = {"quick": args.quick, "smoke": args.smoke, "wall_s": time.perf_counter() - t_all, "loadavg_end": list(os.getloadavg()),
         "failed": failed, "results": results}
  out_path.write_text(json.dumps(doc, indent=1))
  print(json.dumps(doc, indent=1))
  print(f"wrote {out_path}", file=sys.stderr)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
