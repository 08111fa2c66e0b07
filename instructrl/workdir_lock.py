"""One writer per run directory: `workdir/LOCK`, held with an OS file lock, names its holder.

Two runs on one workdir would interleave checkpoints and metrics. The lock is `fcntl.flock` on
`workdir/LOCK`: the kernel drops it when the holder exits, however it dies (SIGKILL included),
so a lock left by a dead run is never mistaken for a live one. The file's contents (pid, host,
start time, command) only serve the error message and the stale-lock warning.

Limits: on network filesystems without working flock (some NFS setups) two hosts could both get
the lock. Multi-host runs take it on process 0 only (the other processes write through Orbax's
coordinated commit).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from instructrl.errors import UserError

LOCK_FILE = "LOCK"


class WorkdirLocked(UserError, RuntimeError):
  pass


class BadWorkdir(UserError, OSError):
  """--workdir (or its LOCK) is not what a run directory holds: a file where a folder belongs, or the reverse."""


def check_workdir(workdir: str | Path) -> None:
  """Refuse a --workdir that is a regular file, or whose LOCK is a folder, before anything is written."""
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise BadWorkdir(f"--workdir={workdir} is a file; expected a run directory (or a path that does not exist yet)")
  for parent in workdir.absolute().parents:
    if parent.exists():
      if not parent.is_dir():
        raise BadWorkdir(f"--workdir={workdir}: {parent} is a file; expected a directory there")
      break
  lock = workdir / LOCK_FILE
  if lock.exists() and not lock.is_file():
    raise BadWorkdir(f"{lock} is a directory; expected the workdir's lock file (remove {lock}, or use another "
                     f"--workdir)")


class WorkdirLock:
  """Context manager: `with WorkdirLock(workdir): ...` or acquire()/release()."""

  def __init__(self, workdir: str | Path):
    self.path = Path(workdir) / LOCK_FILE
    self._fd: int | None = None
    self._before: bytes | None = None   # the file's bytes before acquire() (None: there was none)

  def holder(self) -> dict:
    try:
      return json.loads(self.path.read_text() or "{}")
    except (OSError, ValueError):
      return {}

  def acquire(self) -> "WorkdirLock":
    check_workdir(self.path.parent)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    try:
      self._before = self.path.read_bytes()
    except FileNotFoundError:
      self._before = None
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      h = self.holder()
      raise WorkdirLocked(
          f"{self.path.parent} is in use by another run (pid {h.get('pid', '?')} on host {h.get('host', '?')}, "
          f"started {h.get('started', '?')}: {h.get('command', '?')}); wait for it to finish, stop it, or use "
          f"another --workdir") from None
    old = self.holder()
    if old.get("pid") is not None:
      # The flock was free, so the run named in the file has ended without releasing (killed):
      # say so. (Its pid may since belong to an unrelated process; the flock is what counts.)
      logging.warning("%s: stale lock left by pid %s on host %s (started %s), which is no longer running; "
                      "taking it over", self.path, old.get("pid"), old.get("host"), old.get("started"))
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    # Empty the file before unlocking: a later run then sees no stale holder.
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def abandon(self) -> None:
    """Release, leaving LOCK as it was before acquire() (absent, or its old bytes): for a run refused
    after taking the lock, which must leave the workdir unchanged."""
    if self._fd is None:
      return
    if self._before is None:
      self.path.unlink(missing_ok=True)   # still under the flock: no other run can have taken it
    else:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, self._before, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
