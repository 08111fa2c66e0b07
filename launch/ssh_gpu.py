r"""Run instructrl on GPU hosts reachable by ssh, without a scheduler: an explicit coordinator.

  python launch/ssh_gpu.py --hosts=gpu-a,gpu-b --repo=/shared/instructrl --workdir=/shared/runs/r1 \
      --config=configs/instructgpt.py:1.3b --dry-run

Process i runs on host i with `--coordinator_address=<first host>:<port> --num_processes=<hosts>
--process_id=i`, in the background, its output in ~/instructrl-<i>.log on that host; the logs are
copied back to --log-dir afterwards with `--collect`. The checkout (with `pip install -e ".[gpu]"`) and
--workdir must be at the same paths on every host (a shared filesystem).
"""

from __future__ import annotations

import argparse
import os
import shlex

from _common import add_run_flags, execute, train_command


def steps(args) -> list[tuple]:
  hosts = [h for h in args.hosts.split(",") if h]
  if args.collect:
    return [("local log folder", ["mkdir", "-p", args.log_dir])] + [
        (f"collect process {i}'s log", ["scp", f"{h}:instructrl-{i}.log", f"{args.log_dir}/instructrl-{i}.log"])
        for i, h in enumerate(hosts)]
  python = os.path.join(args.repo, ".venv", "bin", "python")
  out = []
  for i, h in enumerate(hosts):
    cmd = train_command(args, python=python, extra=(f"--coordinator_address={hosts[0]}:{args.port}",
                                                     f"--num_processes={len(hosts)}", f"--process_id={i}"))
    remote = f"cd {shlex.quote(args.repo)} && nohup {shlex.join(cmd)} > ~/instructrl-{i}.log 2>&1 &"
    out.append((f"start process {i} of {len(hosts)} on {h}", ["ssh", h, remote]))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--hosts", required=True, help="comma-separated; the first is the coordinator")
  p.add_argument("--port", type=int, default=12355)
  p.add_argument("--repo", required=True, help="the checkout's path on every host")
  p.add_argument("--log-dir", default="logs")
  p.add_argument("--collect", action="store_true", help="copy the hosts' logs back instead of starting the run")
  add_run_flags(p)
  args = p.parse_args(argv)
  if not [h for h in args.hosts.split(",") if h]:
    p.error("--hosts: give at least one host")
  execute(steps(args), args.dry_run)


if __name__ == "__main__":
  main()
