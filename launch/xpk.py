r"""Run instructrl on TPU slices in a GKE cluster with xpk (https://github.com/AI-Hypercomputer/xpk).

  python launch/xpk.py --cluster=my-cluster --workload=irl-6b --tpu-type=v5p-128 --num-slices=1 \
      --image=us-docker.pkg.dev/PROJECT/REPO/instructrl:latest --workdir=/mnt/shared/runs/6b \
      --config=configs/instructgpt.py:6b --dry-run

Steps: build and push an image of this checkout (launch/Dockerfile, the `tpu` extra) unless
--no-build; `xpk workload create` runs the same command in one container per TPU host (JAX finds the
other hosts from the TPU environment); the logs of every pod of the workload are collected with kubectl
when it ends. --workdir must be storage every pod mounts (a Filestore / GCS FUSE volume of the cluster).
"""

from __future__ import annotations

import argparse

from _common import add_run_flags, execute, show, train_command


def steps(args) -> list[tuple]:
  out = []
  if not args.no_build:
    out.append(("build the image of this checkout", ["docker", "build", "-f", "launch/Dockerfile", "-t", args.image, "."]))
    out.append(("push it", ["docker", "push", args.image]))
  create = ["xpk", "workload", "create", f"--cluster={args.cluster}", f"--workload={args.workload}",
            f"--tpu-type={args.tpu_type}", f"--num-slices={args.num_slices}", f"--docker-image={args.image}",
            f"--command={show(train_command(args))}"]
  if args.project:
    create.append(f"--project={args.project}")
  if args.zone:
    create.append(f"--zone={args.zone}")
  out.append(("create the workload (one container per TPU host)", create))
  out.append(("wait for it to finish", ["xpk", "workload", "list", f"--cluster={args.cluster}",
                                        f"--wait-for-job-completion={args.workload}"]
              + ([f"--project={args.project}"] if args.project else []) + ([f"--zone={args.zone}"] if args.zone else []),
              True))
  out.append(("local log folder", ["mkdir", "-p", args.log_dir]))
  out.append(("collect every pod's log", f"kubectl logs --selector=jobset.sigs.k8s.io/jobset-name={args.workload} "
                                         f"--all-containers --prefix --tail=-1 > {args.log_dir}/{args.workload}.log"))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cluster", required=True)
  p.add_argument("--workload", required=True)
  p.add_argument("--tpu-type", required=True, help="e.g. v5p-128, v5litepod-256, v6e-64")
  p.add_argument("--num-slices", type=int, default=1)
  p.add_argument("--image", required=True, help="container image to build/push and run")
  p.add_argument("--no-build", action="store_true", help="the image exists already")
  p.add_argument("--project", default=None)
  p.add_argument("--zone", default=None)
  p.add_argument("--log-dir", default="logs")
  add_run_flags(p)
  args = p.parse_args(argv)
  execute(steps(args), args.dry_run)


if __name__ == "__main__":
  main()
