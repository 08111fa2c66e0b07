"""Orbax checkpoints, one CheckpointManager per stage under `workdir/<stage>/`.

A checkpoint holds two items: "state" (params, optimizer state, step — arrays, restored
straight into their shardings) and "meta" (JSON: step, seed-derived RNG, data position, the
model config, and `complete` on a stage's last save). Orbax commits each step atomically: a
SIGKILL mid-save leaves a tmp folder that `latest_step()` ignores.

Beyond Orbax's atomic commit, each save gets a manifest (size and sha256 of every file, written
by process 0 once the step is committed); the newest step whose files no longer match it, or
whose restore fails, is moved to `<stage>/corrupt/` with a warning naming it, and the previous
complete step is used instead. A restore reads the step's meta first and hands it to a `check`
(model, world, settings): a checkpoint of another config is refused with CheckpointMismatch before
its arrays are read, so a shape change never looks like damage. A step without a manifest (killed
between Orbax's commit and the manifest, or written before manifests existed) is committed and so
accepted; its restore is the check.
A save that fails (disk full) raises CheckpointSaveError and leaves earlier steps untouched.

The hand-off between stages is `load_params(workdir/"pretrain", ...)`: it refuses a checkpoint
whose model config differs from the one asked for, naming the field.

Layers saved per layer restore into a run with `model.scan_layers` and back: the recorded model
config says which layout the step holds, that tree is read, and it is converted (models/layout.py)
into the layout and shardings asked for. The digests are of the per-layer layout, so an id does not
depend on it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from instructrl import array_digest
from instructrl.errors import UserError
from instructrl.models import layout
from instructrl.models.config import mismatched_fields


class CheckpointMismatch(UserError, ValueError):
  """A checkpoint recorded under another model, world or settings than the config asks for: refused
  (never quarantined: its files are good, they belong to another run)."""


class StageMissing(UserError, FileNotFoundError):
  """A stage this one reads has no finished checkpoint: run it first."""


class CheckpointSaveError(OSError):
  pass


MANIFEST = "instructrl_manifest.json"
DIGESTED = ("params", "ema")   # the state entries load_params reads
QUARANTINE = "corrupt"


def file_digests(step_dir: Path) -> dict[str, list]:
  """{relative path: [size, sha256]} of every file under a committed step (the manifest excluded)."""
  out = {}
  for path in sorted(p for p in step_dir.rglob("*") if p.is_file() and not p.name.startswith(MANIFEST)):
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    out[str(path.relative_to(step_dir))] = [path.stat().st_size, h.hexdigest()]
  return out


def manifest_problem(step_dir: Path) -> str | None:
  """Why a committed step's files differ from its manifest (None: they match, or there is no manifest)."""
  path = step_dir / MANIFEST
  if not path.exists():
    return None
  try:
    want = json.loads(path.read_text())["files"]
  except (OSError, ValueError, KeyError) as e:
    return f"unreadable manifest ({e})"
  have = file_digests(step_dir)
  missing = sorted(set(want) - set(have))
  changed = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  if missing or changed:
    first = (missing or changed)[0]
    detail = (f"size {have[first][0]} instead of {want[first][0]}" if first in have and have[first][0] !=
              want[first][0] else "content hash differs" if first in have else "missing")
    return (f"{len(missing)} file(s) missing, {len(changed)} changed (first: {first}: {detail})")
  return None


class StageCheckpoints:
  """Save/restore of one stage's train state; `max_to_keep` newest steps are kept."""

  def __init__(self, directory: str | Path, max_to_keep: int = 2, keep_period: int | None = None):
    self.directory = Path(directory).absolute()
    # keep_period: steps divisible by it are kept beyond max_to_keep (SFT's candidate checkpoints).
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_period or None, create=True,
                                             enable_async_checkpointing=False),
        item_names=("state", "meta"))
    self._checked: set[int] = set()   # steps whose manifest matched
    self._bad: set[int] = set()       # steps found unusable

  def latest_step(self) -> int | None:
    """The newest usable step: unusable ones are moved aside (see `quarantine`) as they are found."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      if step in self._bad:
        continue
      if step not in self._checked:
        problem = manifest_problem(self.directory / str(step))
        if problem:
          self.quarantine(step, problem)
          continue
        self._checked.add(step)
      return step
    return None

  def quarantine(self, step: int, problem: str) -> None:
    """Skip `step` from now on and move it to <stage>/corrupt/ (kept for inspection, out of Orbax's way)."""
    self._bad.add(step)
    src, dest = self.directory / str(step), self.directory / QUARANTINE / str(step)
    if jax.process_index() == 0 and src.exists():
      n = 0
      while dest.exists():
        n += 1
        dest = self.directory / QUARANTINE / f"{step}.{n}"
      dest.parent.mkdir(exist_ok=True)
      src.rename(dest)
    self.manager.reload()
    older = [s for s in self.manager.all_steps() if s < step and s not in self._bad]
    logging.warning("checkpoint %s is unusable (%s): skipped it (moved to %s); falling back to %s", src, problem,
                    dest, f"step {max(older)}" if older else "no checkpoint (the stage starts over)")

  def save(self, step: int, state: Any, meta: dict) -> None:
    # Content digests of the params the next stage and the eval read: an id of the values, not of Orbax's
    # (randomly named) files, so a resumed run and an uninterrupted one record the same (evaluate.checkpoint_id).
    meta = dict(meta, digests={k: array_digest.digest(layout.unstack_layers(state[k])) for k in DIGESTED
                               if k in state})
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(dict(meta, step=step))), force=True)
      self.manager.wait_until_finished()
      if jax.process_index() == 0:
        step_dir = self.directory / str(step)
        tmp = step_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"step": step, "files": file_digests(step_dir)}, sort_keys=True))
        os.replace(tmp, step_dir / MANIFEST)
    except (OSError, ValueError, RuntimeError) as e:   # TensorStore reports a full disk as a ValueError
      for junk in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):   # free what the failed save took
        shutil.rmtree(junk, ignore_errors=True)
      (self.directory / str(step) / (MANIFEST + ".tmp")).unlink(missing_ok=True)
      earlier = [s for s in self.manager.all_steps() if s != step and s not in self._bad]
      full = getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)
      why = "the disk is full" if full else f"{type(e).__name__}: {str(e)[:500]}"
      raise CheckpointSaveError(
          errno.ENOSPC if full else getattr(e, "errno", None), f"saving step {step} to {self.directory} failed ({why}); the previous checkpoint "
          f"({f'step {max(earlier)}' if earlier else 'none'}) is intact; free space (or fix the cause) and rerun the "
          f"same command to resume from it") from e
    self._bad.discard(step)   # a fresh save of a step found damaged earlier
    self._checked.add(step)

  def meta(self, step: int | None = None) -> dict | None:
    latest = step is None
    while True:
      step = self.latest_step() if latest else step
      if step is None:
        return None
      try:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:   # noqa: BLE001 -- see restore()
        if not latest:
          raise
        self.quarantine(step, f"meta unreadable: {type(e).__name__}: {str(e)[:300]}")

  def restore(self, abstract_state: Any, step: int | None = None,
              check: Callable[[dict], None] | None = None) -> tuple[Any, dict] | None:
    """Restore into `abstract_state` (a tree of jax.ShapeDtypeStruct with shardings).

    Without `step`: the newest step that restores (one that fails is quarantined, the next older
    tried), or None when no usable step is left.
    check(meta) runs on each step's meta before its arrays are read and raises CheckpointMismatch
    for a checkpoint of another config: that is passed on, the step left where it is. Only a step
    whose files fail their manifest, whose meta is unreadable, or whose restore fails although its
    meta matches is quarantined.
    """
    latest = step is None
    while True:
      step = self.latest_step() if latest else step
      if step is None:
        if latest:
          return None
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      if check is not None or layout.tree_layout(abstract_state) is not None:
        meta = self.meta(step) if not latest else self._meta_or_quarantine(step)
        if meta is None:
          continue
        if check is not None:
          check(meta)
        saved_abstract, convert = in_saved_layout(abstract_state, meta)
      else:
        saved_abstract, convert = abstract_state, None
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(saved_abstract),
                                                                 meta=ocp.args.JsonRestore()))
      except Exception as e:   # noqa: BLE001 -- any failure to read a committed step means it is damaged
        if not latest or isinstance(e, CheckpointMismatch):
          raise
        self.quarantine(step, f"restore failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      return (convert(out["state"]) if convert else out["state"]), out["meta"]

  def _meta_or_quarantine(self, step: int) -> dict | None:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:   # noqa: BLE001 -- see restore()
      self.quarantine(step, f"meta unreadable: {type(e).__name__}: {str(e)[:300]}")
      return None

  def is_complete(self) -> bool:
    meta = self.meta()
    return bool(meta and meta.get("complete"))

  def close(self):
    self.manager.close()


def in_saved_layout(abstract: Any, meta: dict) -> tuple[Any, Callable[[Any], Any] | None]:
  """(the abstract tree in the layer layout the step was saved in, a function taking the restored tree to
  `abstract`'s layout and shardings, or None when the layouts agree)."""
  want = layout.tree_layout(abstract)
  saved = layout.saved_layout(meta)
  if want is None or want == saved:
    return abstract, None
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  convert = jax.jit(lambda tree: layout.to_layout(tree, want), out_shardings=shardings, donate_argnums=0)
  logging.info("checkpoint saved with model.scan_layers=%s: converting its layers to scan_layers=%s", saved, want)
  return layout.to_layout(abstract, saved), convert


def check_model(saved: dict, expected: dict, where: str) -> None:
  bad = mismatched_fields(saved, expected)
  if bad:
    details = ", ".join(f"model.{k}: checkpoint has {saved.get(k)!r}, config has {expected.get(k)!r}" for k in bad)
    original = " ".join(f"--config.model.{k}={saved.get(k)!r}" for k in bad if k in saved)
    raise CheckpointMismatch(f"{where}: model config does not match ({details}); use a new --workdir for the new "
                             f"model, or the checkpoint's values{f' ({original})' if original else ''}")


# Stage settings that change how a run is logged, evaluated or saved, not what it computes: these may
# differ between the run that saved a checkpoint and the one that restores it.
CADENCE_FIELDS = frozenset({"log_every", "eval_every", "eval_batch_size", "checkpoint_every", "keep_checkpoints",
                            "keep_period", "sample_every", "on_nonfinite", "max_nonfinite_skips",
                            "gold_probe_prompts",
                            # micro-batches change how a step's gradient is computed, not which: the update
                            # is the whole batch's (dropout aside), so a run may resume on a pod that needs more
                            "microbatches",
                            # packing (rm.packing) computes the same scores from fewer rows, up to float rounding
                            "packing"})


# Settings added after checkpoints began recording theirs: a checkpoint without one was trained as with
# this value (so older runs still resume and skip under the default, and are refused under any other).
# A dict value lists keys added inside a nested block (a new rm.source_mix source, at weight 0).
LATER_FIELDS = {"rm_uncertainty_coef": 0.0, "rm_ensemble_size": 1, "extra_comparisons": "", "reward": "rm",
                "rm_runs": "", "keep_empty": False, "source_mix": {"mismatched": 0.0}, "policy_pair_weight": 1.0,
                "init_stage": "", "model_shape": {}}
# Settings renamed since checkpoints began recording theirs (old name -> new): a checkpoint's value under the
# old name is compared with the config's under the new one (ppo.gamma, the GAE discount, is ppo.discount).
RENAMED_FIELDS = {"gamma": "discount"}


def current_names(saved: dict, asked: dict) -> dict:
  """A checkpoint's recorded settings with each renamed field under the name the config now asks for."""
  saved = dict(saved)
  for old, new in RENAMED_FIELDS.items():
    if old in saved and new in asked and old not in asked:
      saved.setdefault(new, saved.pop(old))
  return saved


def settings_of(cfg) -> dict:
  """A stage config block as plain JSON (what the checkpoint meta stores)."""
  return json.loads(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg), default=str))


def check_settings(meta: dict, cfg, where: str, section: str) -> None:
  """A stage restored under other training settings would silently mix two runs (a resume) or ignore
  the new ones (a finished stage is skipped): refuse it, naming each field. Checkpoints saved before
  settings were recorded are not checked."""
  saved = meta.get("settings")
  if saved is None:
    return
  asked = settings_of(cfg)
  saved = current_names(saved, asked)
  from instructrl.stages import rounds   # round one's outputs as round two names them (rounds.WORKDIR)
  saved = rounds.portable(saved, asked)
  for k, v in LATER_FIELDS.items():
    if k in asked and isinstance(v, dict) and isinstance(saved.get(k), dict):
      saved[k] = {**v, **saved[k]}
    elif k in asked and k not in saved:
      saved[k] = v
  bad = sorted(k for k in set(saved) | set(asked) if k not in CADENCE_FIELDS and saved.get(k) != asked.get(k))
  if bad:
    details = ", ".join(f"{section}.{k}: checkpoint has {saved.get(k)!r}, config has {asked.get(k)!r}" for k in bad)
    state = "finished" if meta.get("complete") else "was interrupted"
    raise CheckpointMismatch(f"{where} {state} under other training settings ({details}); use a new --workdir, "
                             f"or delete {where} (and the stages after it) to retrain it with these settings")


def check_world(meta: dict, world_id: str | None, where: str) -> None:
  """A checkpoint trained on another world/tokenizer would be silently wrong: refuse it."""
  if world_id is not None and meta.get("world") not in (None, world_id):
    raise CheckpointMismatch(f"{where}: trained on world/tokenizer {meta['world']}, but workdir/world is now "
                             f"{world_id}; the world was regenerated — rerun this stage in a new workdir")


def recorded_meta(directory: str | Path) -> dict | None:
  """The meta of a stage's newest step whose meta reads, straight from its JSON file: no Orbax manager,
  so nothing is created, checked by hash or moved (the pre-flight of main.py reads a workdir without
  changing it). None: no step. A damaged step is left for the stage's own restore to set aside."""
  directory = Path(directory)
  if not directory.is_dir():
    return None
  for step in sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True):
    try:
      meta = json.loads((directory / str(step) / "meta" / "metadata").read_text())
    except (OSError, ValueError):
      continue
    if isinstance(meta, dict):
      return {"step": step, **meta}
  return None


def kept_steps(directory: str | Path) -> list[int]:
  """The steps on disk of a stage (committed ones; the candidates SFT kept with keep_period)."""
  ckpt = StageCheckpoints(directory)
  try:
    return sorted(ckpt.manager.all_steps())
  finally:
    ckpt.close()


def load_params(directory: str | Path, abstract_params: Any, model_dict: dict,
                world_id: str | None = None, entry: str = "params", step: int | None = None) -> tuple[Any, dict]:
  """The params of a completed stage, checked against `model_dict` (the config asked for) and the world.

  entry: which params of the saved state ("params"; PPO also saves "ema", the model it evaluates).
  step: an earlier kept step of the finished stage instead of its final one (SFT model selection).
  """
  ckpt = StageCheckpoints(directory)
  try:
    while True:
      meta = ckpt.meta()
      if meta is None:
        raise StageMissing(f"{ckpt.directory}: no checkpoint; run that stage first")
      if not meta.get("complete"):
        raise StageMissing(f"{ckpt.directory}: stage did not finish (latest step {meta['step']}); rerun it")
      if step is not None and step != meta["step"]:
        kept = sorted(s for s in ckpt.manager.all_steps() if s not in ckpt._bad)
        if step not in kept:
          raise StageMissing(f"{ckpt.directory}: no usable kept checkpoint at step {step} (kept: {kept})")
        problem = manifest_problem(ckpt.directory / str(step))   # latest_step() checked only the final one
        if problem:
          ckpt.quarantine(step, problem)
          continue
        meta = ckpt.meta(step)
      check_model(meta["model"], model_dict, str(ckpt.directory))
      check_world(meta, world_id, str(ckpt.directory))
      # Restore only the params: a partial abstract tree restores a subset of the saved state.
      abstract, convert = in_saved_layout({entry: abstract_params}, meta)
      try:
        out = ckpt.manager.restore(meta["step"], args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract, restore_args=jax.tree.map(
                lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract),
            partial_restore=True)))
      except Exception as e:   # noqa: BLE001 -- a damaged step: fall back (to an incomplete one: "rerun it")
        ckpt.quarantine(meta["step"], f"restore failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      logging.info("loaded params from %s step %d", ckpt.directory, meta["step"])
      state = convert(out["state"]) if convert else out["state"]
      return state[entry], meta
  finally:
    ckpt.close()
