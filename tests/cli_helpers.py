"""Helpers shared by the CLI end-to-end tests."""

from pathlib import Path

import jax
import numpy as np


def final_params(stage_dir):
  """The latest checkpoint's step and params as numpy, read with orbax directly (not our restore path)."""
  import orbax.checkpoint as ocp
  step = max(int(p.name) for p in Path(stage_dir).iterdir() if p.name.isdigit())
  with ocp.CheckpointManager(Path(stage_dir).absolute(), item_names=("state", "meta")) as m:
    state = m.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
  return step, jax.tree.map(np.asarray, state["params"])


def cli_env() -> dict:
  """Environment for CLI subprocesses: the persistent compile cache of the test processes (conftest.py),
  so a run does not recompile what an earlier one compiled (minutes on a loaded 2-core machine)."""
  import os
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.environ.get("INSTRUCTRL_JAX_CACHE",
                                                                    "/tmp/instructrl-jax-cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


EIGHT_DEVICES_ENV = {"JAX_PLATFORMS": "cpu",
                     # Low XLA CPU optimisation: compile time dominates, and both sides of a comparison share it.
                     "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                  "--xla_llvm_disable_expensive_passes=true"}


def run_worker_on_8_devices(test_file: str, timeout: int = 300) -> dict:
  """Run `_worker()` of `test_file` in a fresh process with 8 simulated CPU devices (so they do not
  leak into this one) and return the JSON it prints after "RESULT "."""
  import json
  import os
  import subprocess
  import sys
  import textwrap
  root = Path(__file__).resolve().parents[1]
  code = textwrap.dedent(f"""
      import importlib.util, sys
      sys.path.insert(0, {str(root)!r})
      import conftest  # the shared compile cache and full-precision matmuls
      spec = importlib.util.spec_from_file_location("_worker_module", {os.path.abspath(test_file)!r})
      mod = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(mod)
      mod._worker()
  """)
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, env={**os.environ, **EIGHT_DEVICES_ENV},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, f"worker failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
  line = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  assert line, stdout[-3000:]
  return json.loads(line[-1][len("RESULT "):])


def sigkill_when(cmd: list, ready, *, cwd, env=None, timeout: float = 240, poll: float = 0.002, delay: float = 0.0,
                 log: Path | None = None) -> bool:
  """Start `cmd`, SIGKILL it `delay` seconds after `ready()` first returns true, wait for it.

  Returns whether the kill landed (False: the process ended first, before `ready()` or during the
  delay). Output goes to `log` (appended) or nowhere.
  """
  import signal
  import subprocess
  import time
  out = open(log, "ab") if log else subprocess.DEVNULL
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=out)
  try:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready():
      time.sleep(poll)
    if proc.poll() is None and time.time() < deadline:
      time.sleep(delay)
    if proc.poll() is not None:
      return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return True
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    if log:
      out.close()


def sigkill_when_exists(cmd: list, marker: Path, *, cwd, env=None, timeout: float = 240, poll: float = 0.002):
  """Start `cmd`, SIGKILL it as soon as `marker` exists (e.g. a checkpoint folder), wait for it.

  Fails if the process ends on its own before the marker appears (the kill point was missed).
  """
  killed = sigkill_when(cmd, marker.exists, cwd=cwd, env=env, timeout=timeout, poll=poll)
  assert killed, f"run ended (or failed) before the kill point {marker}"
