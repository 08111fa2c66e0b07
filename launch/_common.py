"""Shared by the launchers: the instructrl command every host runs, and printing/running steps.

A launcher is a list of steps (what, argv). `--dry-run` prints each as a shell line and runs
nothing; otherwise each step runs in order and the first failure stops the launch.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys


def add_run_flags(p: argparse.ArgumentParser) -> None:
  """The flags of the training command itself (the same on every host)."""
  g = p.add_argument_group("the run")
  g.add_argument("--config", default="configs/instructgpt.py:1.3b", help="--config of instructrl.main")
  g.add_argument("--workdir", required=True, help="run directory; must be one filesystem all hosts share")
  g.add_argument("--stages", default=None, help="--stages of instructrl.main (default: config.stages)")
  g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="config override, repeatable: --set ppo.ptx_coef=0 -> --config.ppo.ptx_coef=0")
  g.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def train_command(args, python: str = "python", extra: tuple = ()) -> list[str]:
  """`python -m instructrl.main ...` with multi-host start-up on (every launcher runs >= 1 host this way)."""
  cmd = [python, "-m", "instructrl.main", f"--config={args.config}", f"--workdir={args.workdir}", "--distributed=on"]
  if args.stages:
    cmd.append(f"--stages={args.stages}")
  for item in args.set:
    if "=" not in item:
      raise SystemExit(f"--set {item!r}: expected FIELD=VALUE, e.g. --set ppo.ptx_coef=0")
    cmd.append(f"--config.{item}")
  return cmd + list(extra)


def show(argv) -> str:
  return argv if isinstance(argv, str) else shlex.join(argv)


def execute(steps: list[tuple], dry_run: bool) -> None:
  """steps: (description, argv list or shell string[, keep_going]). Prints every step; runs them unless
  dry_run. A failed step stops the launch, except a keep_going one (the run itself: its logs are still
  collected), whose failure is reported at the end."""
  failed = None
  for what, argv, *keep_going in steps:
    print(f"# {what}")
    print(show(argv), flush=True)
    if not dry_run:
      rc = subprocess.run(argv, shell=isinstance(argv, str)).returncode
      if rc and keep_going and keep_going[0]:
        failed = failed or f"step failed ({what}), exit status {rc}"
      elif rc:
        sys.exit(f"step failed ({what}), exit status {rc}")
  if failed:
    sys.exit(failed)
