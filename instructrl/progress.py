"""Whole-pipeline progress: one outer bar over the stages with an ETA, and one line per stage
saying whether it is skipped (complete), resumed (from which step) or run from the start. Each
stage keeps its own inner bar (loop.py, the RM's sampling, the eval's models).

How the ETA is estimated. Every stage module gives its loop's step count, `steps(config)`, and its
cost from the config alone, `cost(config)`: (before its loop, the loop, after it) in token passes,
the unit stages/costs.py defines and calibrates. The outer bar's total is the cost still to do
(complete stages 0, a resumed stage the part after its checkpoint); it advances with the inner
loops' steps (each stage's `run(..., progress=Pipeline.reporter(stage))` hands the callback to
loop.run) and when a stage ends. tqdm's ETA is then (time so far / cost done) x cost left, averaged
over the whole run (smoothing=0): it is unknown ("?") until the first step of a running stage, and
only as good as the stages' relative weights; `finish` logs each stage's measured seconds beside
its estimated share so the model can be checked (README, "One command").
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from instructrl.checkpoints import MANIFEST
from instructrl.stages import evaluate, ppo, pretrain, reward, rm_ensemble, rounds, sft, source

_CHECKPOINTED = ("pretrain", "sft", "rm", "ppo", "ppo_noptx", "ppo_round1")


# ----------------------------------------------------------------------------- each stage's work

def stage_steps(stage: str, config) -> int:
  """The loop's step count as the stage will derive it (0: a stage without a training loop)."""
  # Round one's stages count as the rm and ppo stages they run, under their round's config (round two's RM
  # trains on both rounds' comparisons); the paths in it change no count.
  config, stage = rounds.stage_config(config, stage), rounds.base_stage(stage)
  steps = {"pretrain": pretrain.steps, "sft": sft.steps, "rm": reward.steps, "ppo": ppo.steps,
           "ppo_noptx": ppo.steps}.get(stage)
  return steps(config) if steps else 0


def stage_cost(stage: str, config, n_models: int = 0) -> tuple[float, float, float]:
  """(before the loop, the loop, after the loop) in token passes; n_models: the eval stage's answer sets."""
  # Under its round's config (round two's RM samples more sources); the paths in it change no cost.
  config, stage = rounds.stage_config(config, stage), rounds.base_stage(stage)
  if stage in ("ppo", "ppo_noptx"):
    return ppo.cost(config, stage)
  if stage == "eval":
    return evaluate.cost(config, n_models)
  cost = {"pretrain": pretrain.cost, "sft": sft.cost, "rm": reward.cost}.get(stage)
  return cost(config) if cost else (0.0, 0.0, 0.0)   # world: seconds, not counted


# ----------------------------------------------------------------------------- what is on disk

def checkpoint_state(stage_dir: Path) -> tuple[str, int]:
  """("complete" | "resume" | "new", step) from the newest committed checkpoint's meta.

  Read-only and approximate (the stage itself decides, and may fall back past a damaged step):
  it only chooses the line printed and the work counted as left.
  """
  steps = sorted((int(p.name) for p in Path(stage_dir).glob("[0-9]*") if p.name.isdigit()
                  and (p / MANIFEST).exists()), reverse=True) if Path(stage_dir).is_dir() else []
  for step in steps:
    try:
      meta = json.loads((Path(stage_dir) / str(step) / "meta" / "metadata").read_text())
    except (OSError, ValueError):
      continue
    return ("complete" if meta.get("complete") else "resume"), step
  return "new", 0


def stage_state(stage: str, workdir: Path, upstream_runs: bool, config) -> tuple[str, int]:
  workdir = Path(workdir)
  if stage in ("world", "import"):
    done = (workdir / ("world" if stage == "world" else "data") / "COMPLETE").exists()
    if stage == "import":
      done = done and checkpoint_state(workdir / "pretrain")[0] == "complete"
    return ("complete" if done else "new"), 0
  if stage in ("rm", "rm_round1"):   # the RM ensemble's members (or the policy RM and the judge RM) train in turn
    dirs = ([workdir / "rm", workdir / "rm_judge"] if source.kind(config) == "files"
            else rm_ensemble.trained_member_dirs(config, rounds.out_root(workdir, stage)))
    states = [checkpoint_state(d) for d in dirs]
    if all(st == "complete" for st, _ in states):
      return "complete", sum(step for _, step in states)
    return ("new", 0) if all(st == "new" for st, _ in states) else ("resume", sum(step for _, step in states))
  if stage in _CHECKPOINTED:
    return checkpoint_state(rounds.stage_dir(workdir, stage))
  if stage == "eval":
    if upstream_runs:
      return "new", 0
    return ("complete" if evaluate.is_judged(config, workdir) else "new"), 0
  return "new", 0


# ----------------------------------------------------------------------------- the outer bar

class Pipeline:
  """with Pipeline(config, workdir, stages, enabled=process_index == 0) as p:
       for s in stages: p.start(s); run(s); p.finish(s)"""

  def __init__(self, config, workdir: Path, stages: list[str], enabled: bool = True):
    self.config, self.workdir, self.stages, self.enabled = config, Path(workdir), list(stages), enabled
    n_models = evaluate.answer_sets(self.config, self.workdir, self.stages)
    self.cost = {s: stage_cost(s, config, n_models) for s in self.stages}
    self.left = {}
    will_run = False
    for s in self.stages:
      state, step = stage_state(s, self.workdir, upstream_runs=will_run, config=self.config)
      self.left[s] = self._left(s, state, step)
      will_run = will_run or state != "complete"
    self.bar = None
    self.done = 0.0          # cost of finished stages (this invocation)
    self.current = None
    self.t_stage = {}
    self.seconds = {}

  def _left(self, stage, state, step) -> float:
    pre, loop, post = self.cost[stage]
    if state == "complete":
      return 0.0
    if state == "resume":   # the RM's comparisons and PPO's score gain were saved before the first checkpoint
      total = stage_steps(stage, self.config)
      return loop * max(0.0, 1 - step / total) + post if total else pre + loop + post
    return pre + loop + post

  def __enter__(self):
    total = sum(self.left.values())
    self.bar = tqdm(total=total or None, desc="pipeline", smoothing=0, disable=not self.enabled,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]" if total else
                    "{desc}: [{elapsed}, ETA unknown: no stage left with a cost estimate]")
    return self

  def __exit__(self, *exc):
    self.bar.close()
    if self.enabled and not exc[0] and self.seconds:
      total = sum(self.left.values()) or 1.0
      logging.info("pipeline: done in %.0f s; per stage, measured seconds / estimated share of the work: %s",
                   sum(self.seconds.values()), ", ".join(f"{s} {self.seconds[s]:.1f} s / {self.left[s] / total:.0%}"
                                                         for s in self.seconds))
    return False

  def _say(self, text: str) -> None:
    if self.enabled:
      tqdm.write(text, file=sys.stderr)   # above the bars, not through them

  def start(self, stage: str) -> None:
    i = self.stages.index(stage) + 1
    # Probed again now that the stages before it have run (the eval stage's models are known now).
    state, step = stage_state(stage, self.workdir, upstream_runs=False, config=self.config)
    what = {"complete": "complete, skipping", "new": "running",
            "resume": f"resuming from step {step} of {stage_steps(stage, self.config)}"}[state]
    if stage == "world" and state == "new":
      what = "generating"
    if stage == "eval" and state == "new" and (self.workdir / "eval" / "report.json").exists():
      what = "running (the set of finished models changed since the last report)"
    self._say(f"pipeline [{i}/{len(self.stages)}] {stage}: {what}")
    self.bar.set_description_str(f"pipeline [{i}/{len(self.stages)}] {stage}")
    self.current, self.first_step = stage, None
    self.t_stage[stage] = time.perf_counter()

  def reporter(self, stage: str):
    """The (done, total) callback a stage's run hands to loop.run: its steps move this bar."""
    return lambda done, total: self.step(stage, done, total)

  def step(self, stage: str, done: int, total: int) -> None:
    """An inner loop's progress: credit the stage's cost in proportion to its steps (a report from a
    stage that is not the running one, or after the pipeline, is ignored)."""
    if stage != self.current or not self.left[stage] or total <= 0:
      return
    if self.first_step is None:
      self.first_step = done - 1
    pre, loop, post = self.cost[stage]
    loop_left = max(0.0, self.left[stage] - post - (pre if self.first_step == 0 else 0.0))
    frac = (done - self.first_step) / max(total - self.first_step, 1)
    credited = min(self.left[stage], self.left[stage] - loop_left - post + loop_left * frac)
    self._move_to(self.done + credited)

  def finish(self, stage: str) -> None:
    self.seconds[stage] = time.perf_counter() - self.t_stage[stage]
    self.done += self.left[stage]
    self._move_to(self.done)
    self.current = None

  def _move_to(self, n: float) -> None:
    if self.bar.total and n > self.bar.n:
      self.bar.update(n - self.bar.n)
