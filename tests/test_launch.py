"""The launchers in launch/: each prints, with --dry-run, the commands it would run (checked here
line by line), runs nothing, and refuses bad arguments; the step runner stops at a failed step."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import _common  # noqa: E402


def dry(script: str, *args: str, ok: bool = True) -> str:
  proc = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args, "--dry-run"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert (proc.returncode == 0) == ok, proc.stderr
  return proc.stdout if ok else proc.stderr


def commands(out: str) -> list[str]:
  return [l for l in out.splitlines() if l and not l.startswith("#")]


def test_tpu_vm_queued_pod_slice():
  out = dry("tpu_vm.py", "--name=irl", "--zone=us-east5-a", "--project=p", "--accelerator=v5p-32", "--queued",
            "--spot", "--bucket=gs://bkt", "--workdir=/mnt/instructrl/r1", "--config=configs/instructgpt.py:6b",
            "--stages=sft,rm", "--set", "rm.epochs=2", "--set", "mesh.shape=(1,-1,1)", "--delete")
  cmds = commands(out)
  where = "--zone=us-east5-a --project=p"
  assert cmds[0] == (f"gcloud compute tpus queued-resources create irl --node-id=irl {where} "
                     f"--accelerator-type=v5p-32 --runtime-version=v2-alpha-tpuv5 --spot")
  assert "queued-resources describe irl" in cmds[1] and "ACTIVE" in cmds[1] and "FAILED" in cmds[1]
  assert cmds[2] == "git archive --format=tar.gz --prefix=instructrl/ -o /tmp/instructrl.tar.gz HEAD"
  assert cmds[3] == f"gcloud compute tpus tpu-vm scp /tmp/instructrl.tar.gz 'irl:~/' {where} --worker=all"
  install, mount, run = (shlex.split(c) for c in cmds[4:7])
  assert install[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in install
  assert "pip install -q -e '.[tpu]'" in install[-1]
  assert "gcsfuse --implicit-dirs bkt /mnt/instructrl" in mount[-1]
  assert "--worker=all" in run and run[-1] == (
      "--command=set -o pipefail; cd instructrl && .venv/bin/python -m instructrl.main "
      "--config=configs/instructgpt.py:6b --workdir=/mnt/instructrl/r1 --distributed=on --stages=sft,rm "
      "--config.rm.epochs=2 '--config.mesh.shape=(1,-1,1)' 2>&1 | tee ~/instructrl.log")
  logs = [c for c in cmds if "instructrl.log' logs/" in c]
  assert len(logs) == 4       # v5p-32: 16 chips, 4 hosts
  assert logs[3].endswith(f"logs/irl-worker3.log {where} --worker=3")
  assert cmds[-1] == f"gcloud compute tpus queued-resources delete irl --force {where} --quiet"


def test_tpu_vm_single_host_direct_create_and_bad_input():
  cmds = commands(dry("tpu_vm.py", "--name=t", "--zone=z", "--accelerator=v4-8", "--workdir=/w"))
  assert cmds[0] == "gcloud compute tpus tpu-vm create t --zone=z --accelerator-type=v4-8 --version=tpu-ubuntu2204-base"
  assert sum("instructrl.log' logs/" in c for c in cmds) == 1 and not any("delete" in c for c in cmds)
  assert "v5p-64" in dry("tpu_vm.py", "--name=t", "--zone=z", "--accelerator=v9-8", "--workdir=/w", ok=False)
  err = dry("tpu_vm.py", "--name=t", "--zone=z", "--accelerator=v4-32", "--bucket=gs://b", "--workdir=/home/u/run", ok=False)
  assert "not under the bucket mount" in err


def test_slurm_script_auto_and_explicit_coordinator():
  out = dry("slurm.py", "--nodes=4", "--gpus-per-node=8", "--partition=a3", "--workdir=/shared/r", "--repo=/shared/irl",
            "--config=configs/instructgpt.py:6b")
  assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=8" in out
  assert "#SBATCH --partition=a3" in out
  assert ("srun --kill-on-bad-exit=1 --output=logs/%x-%j-task%t.log /shared/irl/.venv/bin/python -m instructrl.main "
          "--config=configs/instructgpt.py:6b --workdir=/shared/r --distributed=on") in out
  assert commands(out)[-1] == "sbatch instructrl.sbatch"
  out = dry("slurm.py", "--nodes=2", "--workdir=/shared/r", "--repo=/shared/irl", "--coordinator=explicit", "--port=2222")
  assert 'export INSTRUCTRL_COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in out
  # single-quoted: each task expands its own $SLURM_PROCID
  assert ("bash -c '/shared/irl/.venv/bin/python -m instructrl.main --config=configs/instructgpt.py:1.3b "
          "--workdir=/shared/r --distributed=on --coordinator_address=$INSTRUCTRL_COORDINATOR:2222 "
          "--num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID'") in out
  assert not (ROOT / "instructrl.sbatch").exists()    # a dry run writes nothing


def test_ssh_gpu_explicit_coordinator_per_host():
  cmds = commands(dry("ssh_gpu.py", "--hosts=g0,g1,g2", "--repo=/s/irl", "--workdir=/s/r", "--port=4000"))
  assert len(cmds) == 3
  for i, c in enumerate(cmds):
    argv = shlex.split(c)
    assert argv[:2] == ["ssh", f"g{i}"]
    assert (f"--coordinator_address=g0:4000 --num_processes=3 --process_id={i} > ~/instructrl-{i}.log 2>&1 &"
            in argv[2]) and argv[2].startswith("cd /s/irl && nohup /s/irl/.venv/bin/python -m instructrl.main")
  collect = commands(dry("ssh_gpu.py", "--hosts=g0,g1", "--repo=/s/irl", "--workdir=/s/r", "--collect"))
  assert collect == ["mkdir -p logs", "scp g0:instructrl-0.log logs/instructrl-0.log",
                     "scp g1:instructrl-1.log logs/instructrl-1.log"]


def test_xpk_workload():
  cmds = commands(dry("xpk.py", "--cluster=c", "--workload=w", "--tpu-type=v5p-128", "--num-slices=2",
                      "--image=gcr.io/p/irl:1", "--workdir=/mnt/r", "--project=p", "--zone=z"))
  assert cmds[:2] == ["docker build -f launch/Dockerfile -t gcr.io/p/irl:1 .", "docker push gcr.io/p/irl:1"]
  assert cmds[2] == ("xpk workload create --cluster=c --workload=w --tpu-type=v5p-128 --num-slices=2 "
                     "--docker-image=gcr.io/p/irl:1 '--command=python -m instructrl.main "
                     "--config=configs/instructgpt.py:1.3b --workdir=/mnt/r --distributed=on' --project=p --zone=z")
  assert cmds[3] == "xpk workload list --cluster=c --wait-for-job-completion=w --project=p --zone=z"
  assert cmds[-1].startswith("kubectl logs --selector=jobset.sigs.k8s.io/jobset-name=w")
  assert not commands(dry("xpk.py", "--cluster=c", "--workload=w", "--tpu-type=v5p-8", "--image=i",
                          "--workdir=/w", "--no-build"))[0].startswith("docker")


def test_execute_runs_steps_and_stops_at_a_failure(tmp_path, capsys):
  marker = tmp_path / "ran"
  _common.execute([("touch", ["touch", str(marker)])], dry_run=True)
  assert not marker.exists()                       # dry run: printed only
  _common.execute([("touch", ["touch", str(marker)])], dry_run=False)
  assert marker.exists()
  after = tmp_path / "after"
  with pytest.raises(SystemExit, match="step failed \\(run\\)"):
    _common.execute([("run", ["false"], True), ("collect logs", ["touch", str(after)])], dry_run=False)
  assert after.exists()                            # a keep_going step's failure still collects the logs
  with pytest.raises(SystemExit, match="step failed \\(create\\)"):
    _common.execute([("create", "exit 3"), ("never", ["touch", str(tmp_path / "never")])], dry_run=False)
  assert not (tmp_path / "never").exists()
  with pytest.raises(SystemExit, match="--set 'x': expected FIELD=VALUE"):
    _common.train_command(type("Args", (), {"config": "c", "workdir": "w", "stages": None, "set": ["x"]}))
