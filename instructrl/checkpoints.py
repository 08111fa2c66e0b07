"""Orbax checkpoints, one CheckpointManager per stage under `workdir/<stage>/`.

A checkpoint holds two items: "state" (params, optimizer state, step — arrays, restored
straight into their shardings) and "meta" (JSON: step, seed-derived RNG, data position, the
model config, and `complete` on a stage's last save). Orbax commits each step atomically: a
SIGKILL mid-save leaves a tmp folder that `latest_step()` ignores.

The hand-off between stages is `load_params(workdir/"pretrain", ...)`: it refuses a checkpoint
whose model config differs from the one asked for, naming the field.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from instructrl.models.config import mismatched_fields


class CheckpointMismatch(ValueError):
  pass


class StageCheckpoints:
  """Save/restore of one stage's train state; `max_to_keep` newest steps are kept."""

  def __init__(self, directory: str | Path, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(dict(meta, step=step))), force=True)
    self.manager.wait_until_finished()

  def meta(self, step: int | None = None) -> dict | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restore into `abstract_state` (a tree of jax.ShapeDtypeStruct with shardings)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                           meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def is_complete(self) -> bool:
    meta = self.meta()
    return bool(meta and meta.get("complete"))

  def close(self):
    self.manager.close()


def check_model(saved: dict, expected: dict, where: str) -> None:
  bad = mismatched_fields(saved, expected)
  if bad:
    details = ", ".join(f"{k}: checkpoint has {saved.get(k)!r}, config has {expected.get(k)!r}" for k in bad)
    raise CheckpointMismatch(f"{where}: model config does not match ({details})")


def check_world(meta: dict, world_id: str | None, where: str) -> None:
  """A checkpoint trained on another world/tokenizer would be silently wrong: refuse it."""
  if world_id is not None and meta.get("world") not in (None, world_id):
    raise CheckpointMismatch(f"{where}: trained on world/tokenizer {meta['world']}, but workdir/world is now "
                             f"{world_id}; the world was regenerated — rerun this stage in a new workdir")


def load_params(directory: str | Path, abstract_params: Any, model_dict: dict,
                world_id: str | None = None) -> tuple[Any, dict]:
  """The params of a completed stage, checked against `model_dict` (the config asked for) and the world."""
  ckpt = StageCheckpoints(directory)
  try:
    meta = ckpt.meta()
    if meta is None:
      raise FileNotFoundError(f"{ckpt.directory}: no checkpoint; run that stage first")
    if not meta.get("complete"):
      raise FileNotFoundError(f"{ckpt.directory}: stage did not finish (latest step {meta['step']}); rerun it")
    check_model(meta["model"], model_dict, str(ckpt.directory))
    check_world(meta, world_id, str(ckpt.directory))
    # Restore only the params: a partial abstract tree restores a subset of the saved state.
    abstract = {"params": abstract_params}
    out = ckpt.manager.restore(meta["step"], args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(abstract, restore_args=jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract),
        partial_restore=True)))
    logging.info("loaded params from %s step %d", ckpt.directory, meta["step"])
    return out["state"]["params"], meta
  finally:
    ckpt.close()
