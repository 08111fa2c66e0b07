r"""Labeler-group cross-validation of the reward model (paper section 3.5 / table: 5-fold over groups).

Trains one RM per labeler group held out, on the same collected comparisons, and reports the
validation accuracy against training-group labelers and against the held-out group, fold by fold
and as mean +- standard error:

  python -m instructrl.tools.rm_cv --config=configs/instructgpt.py:tiny --workdir=runs/tiny

Needs a workdir whose world, pretrain, sft (and comparisons, else they are collected) stages are
done. Folds live in workdir/rm_cv/fold<g>/ (world, sft and comparisons are linked, not copied);
each fold is an ordinary `rm` stage run, so an interrupted sweep resumes fold by fold. The
aggregate is written to workdir/rm_cv/summary.json.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from instructrl import cli_flags
from absl import flags
from ml_collections import config_flags

_CONFIG = cli_flags.define(config_flags.DEFINE_config_file, "config", None, "Config file, e.g. configs/instructgpt.py:tiny.")
_WORKDIR = cli_flags.define(flags.DEFINE_string, "workdir", None, "A run directory with world, pretrain and sft done.")
flags.mark_flags_as_required(["config", "workdir"])


def summarise(folds: dict[int, dict]) -> dict:
  """Mean and standard error over folds of each accuracy."""
  out = {"folds": folds}
  for key in ("valid/accuracy", "valid/heldout_group/accuracy"):
    vals = np.array([f[key] for f in folds.values()], float)
    out[key] = {"mean": float(vals.mean()),
                "stderr": float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0}
  return out


def main(argv):
  del argv
  from instructrl import parallel
  from instructrl.data import world as world_lib
  from instructrl.stages import reward, rm_collect

  config = _CONFIG.value
  workdir = Path(_WORKDIR.value)
  mesh = parallel.make_mesh(config.mesh.shape)
  rules = parallel.rules_from_config(config.mesh.rules)
  rm_collect.collect(config, workdir, mesh, rules)       # shared by every fold
  groups = sorted({l.group for l in world_lib.World.load(workdir / "world").labelers})
  folds = {}
  for g in groups:
    fold = workdir / "rm_cv" / f"fold{g}"
    fold.mkdir(parents=True, exist_ok=True)
    for shared in ("world", config.rm.policy, rm_collect.COMPARISONS):
      if not (fold / shared).exists():
        os.symlink((workdir / shared).absolute(), fold / shared)
    reward.run(config, fold, mesh, rules, heldout_group=g)
    rows = [json.loads(l) for l in (fold / "metrics" / "rm.jsonl").read_text().splitlines()]
    final = next(r for r in reversed(rows) if "final/valid/accuracy" in r)
    folds[g] = {"valid/accuracy": final["final/valid/accuracy"],
                "valid/heldout_group/accuracy": final["final/valid/heldout_group/accuracy"]}
    logging.info("rm_cv: fold %d: train groups %.3f, held-out group %.3f", g, *folds[g].values())
  summary = summarise(folds)
  (workdir / "rm_cv" / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
  print(json.dumps(summary, indent=1, sort_keys=True))


if __name__ == "__main__":
  from instructrl import errors
  errors.run_app(main)   # a bad config, file or checkpoint: one `error:` line, exit 2
