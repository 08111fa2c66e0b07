r"""Run instructrl on a multi-node GPU cluster with SLURM: one process per node, all its GPUs.

  python launch/slurm.py --nodes=4 --gpus-per-node=8 --partition=a3 --time=24:00:00 \
      --workdir=/shared/runs/6b --config=configs/instructgpt.py:6b --dry-run

Writes an sbatch script to --script (printed with --dry-run) and submits it. Inside, `srun` starts one
task per node; JAX finds the coordinator and the process ids from SLURM's environment
(`--coordinator=slurm`, the default) or, with `--coordinator=explicit`, from the first node of the
allocation passed as --coordinator_address / --num_processes / --process_id (for clusters where JAX's
SLURM detection is not wanted). Each task's output goes to --log-dir/<job>-<id>-task<N>.log.
The checkout and its virtual environment (`pip install -e ".[gpu]"`) must be on a filesystem every
node mounts, as must --workdir.
"""

from __future__ import annotations

import argparse
import os
import shlex

from _common import add_run_flags, execute, train_command


def script(args) -> str:
  repo = os.path.abspath(args.repo)
  python = os.path.join(repo, ".venv", "bin", "python") if args.python is None else args.python
  extra = ()
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={args.job_name}",
           f"#SBATCH --nodes={args.nodes}",
           "#SBATCH --ntasks-per-node=1",
           f"#SBATCH --gpus-per-node={args.gpus_per_node}",
           f"#SBATCH --cpus-per-task={args.cpus_per_task}",
           f"#SBATCH --time={args.time}",
           f"#SBATCH --output={args.log_dir}/%x-%j.out"]
  if args.partition:
    lines.append(f"#SBATCH --partition={args.partition}")
  if args.account:
    lines.append(f"#SBATCH --account={args.account}")
  lines += ["set -euo pipefail", f"cd {shlex.quote(repo)}",
            "# One process per node sees all of the node's GPUs; XLA may use most of their memory.",
            "export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"]
  if args.coordinator == "explicit":
    lines.append("export INSTRUCTRL_COORDINATOR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)")
    extra = (f"--coordinator_address=$INSTRUCTRL_COORDINATOR:{args.port}", "--num_processes=$SLURM_NTASKS",
             "--process_id=$SLURM_PROCID")
  cmd = " ".join(shlex.quote(c) for c in train_command(args, python=python)) + "".join(f" {e}" for e in extra)
  srun = f"srun --kill-on-bad-exit=1 --output={args.log_dir}/%x-%j-task%t.log"
  # $SLURM_PROCID differs per task: expand it inside each task, not once in the batch script.
  lines.append(f"{srun} bash -c {shlex.quote(cmd)}" if extra else f"{srun} {cmd}")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nodes", type=int, required=True)
  p.add_argument("--gpus-per-node", type=int, default=8)
  p.add_argument("--cpus-per-task", type=int, default=32)
  p.add_argument("--time", default="24:00:00")
  p.add_argument("--partition", default=None)
  p.add_argument("--account", default=None)
  p.add_argument("--job-name", default="instructrl")
  p.add_argument("--coordinator", choices=("slurm", "explicit"), default="slurm",
                 help="slurm: JAX reads SLURM's environment; explicit: first node of the allocation, --port")
  p.add_argument("--port", type=int, default=12355)
  p.add_argument("--repo", default=".", help="this checkout, as every node sees it")
  p.add_argument("--python", default=None, help="default: <repo>/.venv/bin/python")
  p.add_argument("--log-dir", default="logs")
  p.add_argument("--script", default="instructrl.sbatch")
  add_run_flags(p)
  args = p.parse_args(argv)
  if args.nodes < 1 or args.gpus_per_node < 1:
    p.error("--nodes and --gpus-per-node must be >= 1")
  text = script(args)
  if args.dry_run:
    print(f"# {args.script}")
    print(text, end="")
  else:
    os.makedirs(args.log_dir, exist_ok=True)
    with open(args.script, "w") as f:
      f.write(text)
  execute([("submit", ["sbatch", args.script])], args.dry_run)


if __name__ == "__main__":
  main()
