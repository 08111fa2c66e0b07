"""One writer per workdir: a second run is refused naming the holder; a lock left by a killed run is
taken over with a warning; the CLI refuses a second process on a busy workdir."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instructrl.workdir_lock import WorkdirLock, WorkdirLocked
from tests.reliability.kill_harness import cli_cmd, cli_env

ROOT = Path(__file__).resolve().parents[2]
HOLD = ("import sys, time; sys.path.insert(0, {root!r}); from instructrl.workdir_lock import WorkdirLock; "
        "WorkdirLock({w!r}).acquire(); print('held', flush=True); time.sleep(120)")


def hold_in_subprocess(w: Path) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), w=str(w))], stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_second_holder_is_refused_with_pid_and_host(tmp_path):
  with WorkdirLock(tmp_path):
    with pytest.raises(WorkdirLocked) as e:
      WorkdirLock(tmp_path).acquire()
  msg = str(e.value)
  assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and str(tmp_path) in msg
  # Released: the next run gets it, and no stale-lock warning is due (the file was emptied).
  with WorkdirLock(tmp_path) as lock:
    assert lock.holder()["pid"] == os.getpid()


def test_lock_of_a_killed_run_is_stale_and_taken_over(tmp_path, caplog):
  proc = hold_in_subprocess(tmp_path)
  with pytest.raises(WorkdirLocked, match=f"pid {proc.pid} "):
    WorkdirLock(tmp_path).acquire()
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert json.loads((tmp_path / "LOCK").read_text())["pid"] == proc.pid   # the file still names it
  with caplog.at_level(logging.WARNING):
    lock = WorkdirLock(tmp_path).acquire()
  lock.release()
  assert any(f"stale lock left by pid {proc.pid}" in r.getMessage() for r in caplog.records)


def test_cli_refuses_a_second_run_on_the_same_workdir(tmp_path):
  first = subprocess.Popen(cli_cmd(tmp_path, "world,pretrain"), cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (tmp_path / "world").exists():
      time.sleep(0.01)   # the first run holds the lock before it writes anything
    assert first.poll() is None, "the first run ended before the second one started"
    out = subprocess.run(cli_cmd(tmp_path, "world,pretrain"), cwd=ROOT, env=cli_env(), capture_output=True,
                         text=True, timeout=120)
    assert first.poll() is None, "the first run ended while the second one started: no overlap was tested"
  finally:
    first.kill()
    first.wait()
  assert out.returncode != 0
  assert f"is in use by another run (pid {first.pid} on host {socket.gethostname()}" in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
