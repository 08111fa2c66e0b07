"""Metric writing: one JSONL line per logged step (workdir/metrics/<stage>.jsonl) and TensorBoard.

Only process 0 writes. On resume, lines past the restored step are dropped first, so a killed
and resumed run leaves the same file as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np


def _plain(v):
  v = np.asarray(v).item() if hasattr(v, "shape") or isinstance(v, (np.generic,)) else v
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricWriter:

  def __init__(self, workdir: str | Path, stage: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = Path(workdir) / "metrics" / f"{stage}.jsonl"
    self.tb = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      text = self.path.read_text()
      # Up to the last newline: a run killed mid-append leaves a partial last line, never a complete row.
      lines = text.split("\n")[:-1]
      kept = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= resume_step]
      # Replaced atomically (a kill here loses no line), and through a symlink: a sweep member's metrics
      # file is a link into the sweep's shared stage dir, which must stay a link.
      real = self.path.resolve()
      tmp = real.with_name(real.name + ".tmp")
      tmp.write_text("".join(l + "\n" for l in kept))
      tmp.replace(real)
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(str(Path(workdir) / "tensorboard" / stage))

  def write(self, step: int, metrics: dict, prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{prefix + k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
  """Every row of a stage's metrics file ([] if there is none yet); a run killed mid-append leaves a
  partial last line, which is not a row."""
  path = Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue
  return rows


def logged_final(workdir: str | Path, stage: str, step: int, prefix: str = "final/") -> bool:
  """Whether the stage's metrics hold its end-of-stage row for `step` (a key starting with `prefix`)."""
  path = Path(workdir) / "metrics" / f"{stage}.jsonl"
  if not path.exists():
    return False
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if row.get("step") == step and any(k.startswith(prefix) for k in row):
      return True
  return False
