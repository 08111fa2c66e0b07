"""One whole-pipeline smoke run per test session, shared by tests/test_pipeline.py and
tests/test_notebooks.py (and across pytest-xdist workers: built once under a file lock).

`python -m instructrl.main --config=configs/instructgpt.py:smoke --workdir=W` with no --stages:
the default stages are the whole pipeline (world -> pretrain -> sft -> rm -> ppo -> ppo_noptx -> eval).
"""

import fcntl
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli_env() -> dict:
  """The CLI shares the persistent compile cache of the test processes (conftest.py)."""
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.environ.get("INSTRUCTRL_JAX_CACHE", "/tmp/instructrl-jax-cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def _children_cpu() -> float:
  """CPU seconds of this process's finished children: unlike wall time, barely moved by other jobs
  sharing the cores (the CI machine runs two test workers, and people run experiments beside it)."""
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def command(workdir: Path) -> list[str]:
  return [sys.executable, "-m", "instructrl.main", "--config=configs/instructgpt.py:smoke", f"--workdir={workdir}"]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, worker_id) -> dict:
  """{"workdir", "seconds", "cpu_seconds", "stderr"} of the first (timed) run; later users wait for it and reuse it."""
  base = tmp_path_factory.getbasetemp()
  base = base.parent if worker_id != "master" else base   # xdist: one folder all workers of this session see
  workdir, info = base / "smoke_pipeline", base / "smoke_pipeline.json"
  with open(base / "smoke_pipeline.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not info.exists():
      t0, cpu0 = time.perf_counter(), _children_cpu()
      out = subprocess.run(command(workdir), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=900)
      if out.returncode:
        raise AssertionError(f"{' '.join(command(workdir))} failed:\n{out.stderr[-4000:]}")
      info.write_text(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": _children_cpu() - cpu0,
                                  "stderr": out.stderr}))
  return {"workdir": workdir, **json.loads(info.read_text())}
