r"""Run instructrl on a Cloud TPU VM slice (one host or a pod slice) with gcloud.

  python launch/tpu_vm.py --name=irl-6b --zone=us-east5-a --accelerator=v5p-64 --queued --spot \
      --bucket=gs://my-bucket --config=configs/instructgpt.py:6b --stages=sft,rm,ppo --dry-run

Steps: create the TPU VM (directly, or as a queued resource and wait until it is ACTIVE); pack this
checkout (`git archive HEAD`) and copy it to every worker; install it with the `tpu` extra; mount the
bucket with gcsfuse on every worker (the run directory must be shared: every process writes its own
checkpoint shards into it); run the same command on all workers at once (`--worker=all`; JAX finds
the other hosts from the TPU metadata); copy each worker's log back to `--log_dir`; optionally delete.
"""

from __future__ import annotations

import argparse
import re
import shlex

from _common import add_run_flags, execute, train_command

# Software versions the TPU VMs boot (Cloud TPU "runtime versions" pages).
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
           "v6e": "v2-alpha-tpuv6e"}
# TensorCores (v4, v5p) or chips (v5e, v6e) per host, as counted in the accelerator type's suffix.
PER_HOST = {"v4": 8, "v5p": 8, "v5litepod": 4, "v6e": 4}
SINGLE_HOST_MAX = {"v4": 8, "v5p": 8, "v5litepod": 8, "v6e": 8}
LOG = "instructrl.log"


def parse_accelerator(acc: str) -> tuple[str, int]:
  m = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", acc)
  if not m:
    raise SystemExit(f"--accelerator={acc!r}: expected e.g. v4-32, v5p-64, v5litepod-16, v6e-32")
  return m.group(1), int(m.group(2))


def num_workers(acc: str) -> int:
  gen, n = parse_accelerator(acc)
  return 1 if n <= SINGLE_HOST_MAX[gen] else n // PER_HOST[gen]


def steps(args) -> list[tuple[str, object]]:
  gen, _ = parse_accelerator(args.accelerator)
  runtime = args.runtime_version or RUNTIME[gen]
  where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  tpu = ["gcloud", "compute", "tpus"]
  out = []
  if args.queued:
    create = tpu + ["queued-resources", "create", args.name, f"--node-id={args.name}", *where,
                    f"--accelerator-type={args.accelerator}", f"--runtime-version={runtime}"]
    if args.spot:
      create.append("--spot")
    out.append(("request the slice as a queued resource", create))
    state = " ".join(tpu + ["queued-resources", "describe", args.name, *where, "--format='value(state.state)'"])
    out.append(("wait until the queued resource is ACTIVE (FAILED/SUSPENDED stop the launch)",
                f"until s=$({state}); [ \"$s\" = ACTIVE ]; do case \"$s\" in FAILED|SUSPENDED) "
                f"echo \"queued resource $s\" >&2; exit 1;; esac; sleep 30; done"))
  else:
    create = tpu + ["tpu-vm", "create", args.name, *where, f"--accelerator-type={args.accelerator}",
                    f"--version={runtime}"]
    if args.spot:
      create.append("--spot")
    out.append(("create the TPU VM slice", create))
  ssh = lambda command, worker="all": tpu + ["tpu-vm", "ssh", args.name, *where, f"--worker={worker}",
                                            f"--command={command}"]
  out.append(("pack this checkout", ["git", "archive", "--format=tar.gz", "--prefix=instructrl/", "-o",
                                     "/tmp/instructrl.tar.gz", "HEAD"]))
  out.append(("copy it to every worker", tpu + ["tpu-vm", "scp", "/tmp/instructrl.tar.gz", f"{args.name}:~/",
                                                *where, "--worker=all"]))
  out.append(("install it on every worker (the tpu extra: jax[tpu])",
               ssh("rm -rf instructrl && tar xzf instructrl.tar.gz && cd instructrl && python3 -m venv .venv && "
                   ".venv/bin/pip install -q -e '.[tpu]'")))
  if args.bucket:
    mount = args.bucket.removeprefix("gs://").rstrip("/")
    out.append(("mount the bucket on every worker (a shared run directory)",
                ssh(f"sudo mkdir -p {args.mount} && sudo chown $USER {args.mount} && "
                    f"gcsfuse --implicit-dirs {mount} {args.mount}")))
  run = shlex.join(train_command(args, python=".venv/bin/python"))   # overrides like mesh.shape=(1,-1,1) need quotes
  out.append((f"run on all {num_workers(args.accelerator)} workers at once",
              ssh(f"set -o pipefail; cd instructrl && {run} 2>&1 | tee ~/{LOG}"), True))
  out.append(("local log folder", ["mkdir", "-p", args.log_dir]))
  for w in range(num_workers(args.accelerator)):
    out.append((f"collect worker {w}'s log", tpu + ["tpu-vm", "scp", f"{args.name}:~/{LOG}",
                                                    f"{args.log_dir}/{args.name}-worker{w}.log", *where,
                                                    f"--worker={w}"]))
  if args.delete:
    what = ["queued-resources", "delete", args.name, "--force"] if args.queued else ["tpu-vm", "delete", args.name]
    out.append(("delete the slice", tpu + what + [*where, "--quiet"]))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default=None, help="default: gcloud's configured project")
  p.add_argument("--accelerator", required=True, help="e.g. v4-32, v5p-64, v5litepod-16, v6e-32")
  p.add_argument("--runtime-version", default=None, help="default by generation: " + ", ".join(
      f"{k}: {v}" for k, v in RUNTIME.items()))
  p.add_argument("--queued", action="store_true", help="request through queued resources and wait for ACTIVE")
  p.add_argument("--spot", action="store_true", help="Spot capacity (preemptible: the run resumes from checkpoints)")
  p.add_argument("--bucket", default=None, help="gs://bucket mounted with gcsfuse at --mount on every worker")
  p.add_argument("--mount", default="/mnt/instructrl")
  p.add_argument("--log-dir", default="logs")
  p.add_argument("--delete", action="store_true", help="delete the slice when the run ends")
  add_run_flags(p)
  args = p.parse_args(argv)
  if args.bucket and not args.workdir.startswith(args.mount):
    p.error(f"--workdir={args.workdir} is not under the bucket mount --mount={args.mount}: "
            f"the hosts would not share checkpoints")
  execute(steps(args), args.dry_run)


if __name__ == "__main__":
  main()
