"""The training loop every stage shares: skip if complete, resume if interrupted, step, guard,
log, evaluate, checkpoint. Stages pass in their step and their data; nothing else is hidden here.

The data position of a run is its step (batches are a pure function of the step), and the step's
RNG is folded from one seed-derived key, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from instructrl import checkpoints, parallel
from instructrl.metrics import MetricWriter, logged_final
from instructrl.stages.train_state import NonFiniteError, new_state


@dataclasses.dataclass
class Stage:
  name: str                     # "pretrain", "sft", "rm", ...
  cfg: Any                      # the stage's config block (steps, log_every, eval_every, checkpoint_every)
  workdir: Path
  model_dict: dict              # model config checked against checkpoints
  world_id: str | None          # fingerprint of the world/tokenizer the stage trains on
  rng: jax.Array                # base key; the step's key is fold_in(rng, step) inside the step
  tx: Any
  shardings: dict
  abstract: dict                # abstract state with shardings (restore target)
  settings_section: str = ""    # config section named in a settings-mismatch error (default: the name)
  progress: Callable[[int, int], None] | None = None   # (done, total) after each step: the pipeline's bar


def check_meta(stage: Stage, meta: dict, where: str) -> None:
  """Refuse (CheckpointMismatch) a checkpoint of `stage` saved under another model, world or settings."""
  if "model" in meta:
    checkpoints.check_model(meta["model"], stage.model_dict, where)
  checkpoints.check_world(meta, stage.world_id, where)
  checkpoints.check_settings(meta, stage.cfg, where, stage.settings_section or stage.name)


def run(stage: Stage, mesh, rules, *, initial_params: Callable[[], Any] | None = None,
        initial_state: Callable[[], dict] | None = None, train_step, batch_at: Callable[[int], dict],
        evaluate: Callable[[Any], dict] | None = None, finalize: Callable[[Any], Any] | None = None,
        after_training: Callable[[Any], dict] | None = None,
        items_per_step: int = 0, item_name: str = "tokens", extra_meta: dict | None = None,
        result: str = "params"):
  """Train `stage` to cfg.steps (or skip/resume); returns the final params (state["params"]).

  The state is {"step", "params", "opt_state"} built from initial_params() — or any dict with a
  "step" and a "params" entry built by initial_state() (PPO keeps more models in it).

  batch_at(step) -> device batch; evaluate(params) -> metrics (every eval_every steps and at the
  end); finalize(params) -> params once before the final save (the RM's bias);
  after_training(params) -> metrics once, after the final checkpoint is on disk. `result` names
  the state entry returned and handed to after_training (PPO: "ema", the model the paper evaluates).
  """
  cfg, name = stage.cfg, stage.name
  total = int(cfg.steps)
  ckpt = checkpoints.StageCheckpoints(Path(stage.workdir) / name, max_to_keep=cfg.get("keep_checkpoints", 2),
                                      keep_period=cfg.get("keep_period", 0))
  try:
    # The recorded config is compared before any array is read: a checkpoint of another model fails
    # Orbax's restore with a shape error, which must be refused, not taken for damage and set aside.
    restored = ckpt.restore(stage.abstract, check=lambda meta: check_meta(stage, meta, str(ckpt.directory))) \
        if ckpt.latest_step() is not None else None
    if restored is not None:
      state, meta = restored
      if meta.get("complete"):
        logging.info("%s: complete checkpoint at step %d, skipping", name, meta["step"])
        if after_training and not logged_final(stage.workdir, name, total):
          # Killed during the end-of-stage evaluation (after the final save): finish it now.
          writer = MetricWriter(stage.workdir, name, resume_step=total)
          writer.write(total, after_training(state[result]), prefix="final/")
          writer.close()
        return state[result]
      logging.info("%s: resuming from step %d", name, meta["step"])
    else:
      state = initial_state() if initial_state else new_state(initial_params(), stage.tx, stage.shardings, mesh)
    start = int(state["step"])

    writer = MetricWriter(stage.workdir, name, resume_step=start)
    meta = lambda step, complete=False: {
        "model": stage.model_dict, "world": stage.world_id, "data_position": step, "complete": complete,
        "rng": np.asarray(jax.random.key_data(stage.rng)).tolist(), "settings": checkpoints.settings_of(cfg),
        **(extra_meta or {})}
    t_last, step_last = time.perf_counter(), start
    policy, max_skips, skips = cfg.get("on_nonfinite", "stop"), int(cfg.get("max_nonfinite_skips", 0)), 0
    with parallel.activate(mesh, rules), tqdm(total=total, initial=start, desc=name, unit="step",
                                              disable=jax.process_index() != 0) as bar:
      for step in range(start, total):
        state, metrics = train_step(state, batch_at(step), stage.rng)
        if not bool(metrics["finite"]):
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0 and k != "finite"}
          bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
          skips += 1
          if policy == "stop" or skips > max_skips:
            why = "" if policy == "stop" else f" ({skips} in a row, more than {name}.max_nonfinite_skips={max_skips})"
            raise NonFiniteError(
                f"{name}: step {step} produced non-finite values{why}: {bad or scalars}; the update was not "
                f"applied and the last good checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is intact")
          # on_nonfinite="skip": the batch is consumed, the params and optimizer state stay as they were.
          logging.warning("%s: step %d non-finite %s; skipped (%d in a row, at most %d)", name, step, bad, skips,
                          max_skips)
          state = {**state, "step": jax.device_put(state["step"] + 1, stage.shardings["step"])}
          writer.write(step + 1, {"nonfinite_skipped": 1.0, **{f"nonfinite/{k}": v for k, v in bad.items()}},
                       prefix="train/")
        else:
          skips = 0
        bar.update(1)
        done = step + 1
        if stage.progress:   # the whole pipeline's bar (main.py passes it through the stage's run)
          stage.progress(done, total)
        if done % cfg.log_every == 0 or done == total:
          m = jax.device_get(metrics)
          now = time.perf_counter()
          if items_per_step:
            m[f"{item_name}_per_sec"] = items_per_step * (done - step_last) / max(now - t_last, 1e-9)
          t_last, step_last = now, done
          shown = next((k for k in ("loss", "objective/score") if k in m), None)
          if shown:
            bar.set_postfix({shown: f"{float(m[shown]):.3f}"})
          writer.write(done, {k: v for k, v in m.items() if k != "finite"}, prefix="train/")
        if evaluate and (done % cfg.eval_every == 0 or done == total):
          writer.write(done, evaluate(state["params"]), prefix="valid/")
        if done == total:
          if finalize:
            state = {**state, "params": finalize(state["params"])}
          # Save first: a failure in the end-of-stage evaluation must not cost the training.
          ckpt.save(done, state, meta(done, complete=True))
          if after_training:
            writer.write(done, after_training(state[result]), prefix="final/")
        elif done % cfg.checkpoint_every == 0:
          ckpt.save(done, state, meta(done))
    writer.close()
    return state[result]
  finally:
    ckpt.close()
