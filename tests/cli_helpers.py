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
