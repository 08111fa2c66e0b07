"""Whole-pipeline progress: one outer bar over the stages with an ETA, and one line per stage
saying whether it is skipped (complete), resumed (from which step) or run from the start. Each
stage keeps its own inner bar (loop.py, the RM's sampling, the eval's models).

How the ETA is estimated. Every stage gets a cost from the config alone, in "token passes" (one
token through the model forward once; the stages share one model shape, so the unit is the same
for all of them):
- a training token costs 3 (forward + backward);
- a sampled token costs SAMPLE_COST: decoding is one small forward per new token, latency-bound at
  these batch sizes, but the sampler stops once every row has ended and tiny's answers are short.
  6 is calibrated on a whole tiny run (session 4, seed 0: pretrain 1,670 s, sft 366, rm 876, ppo 491,
  ppo_noptx 325, eval 96; shares 44/10/23/13/9/3%, estimated 39/9/19/18/12/4% with this value and
  22/6/28/19/16/11% with the earlier 40). PPO is still overestimated by ~1.4x. On an accelerator
  decoding is relatively dearer or cheaper; the *rate* adapts to the machine, the relative weights
  of the stages do not;
- compilation is not modelled: on the smoke preset it is most of the time, so early ETAs there are
  far off (README, "One command");
- the world stage (seconds) and small evaluation passes inside training are not counted.
The outer bar's total is the cost still to do (complete stages 0, a resumed stage the part after
its checkpoint); it advances with the inner loops' steps (`step`, called by loop.run) and when a
stage ends. tqdm's ETA is then (time so far / cost done) x cost left, averaged over the whole run
(smoothing=0): it is unknown ("?") until the first step of a running stage, and only as good as
the relative weights above; `finish` logs each stage's measured seconds beside its estimated
share so the model can be checked (README, "One command").
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

SAMPLE_COST = 6.0    # token passes per sampled token (see the module docstring)
_CHECKPOINTED = ("pretrain", "sft", "rm", "ppo", "ppo_noptx")
_ACTIVE = None       # the running Pipeline, if any: loop.run reports its steps to it


# ----------------------------------------------------------------------------- cost model

def _gold_eval(config, runs: int) -> float:
  """The end-of-stage judged samples of pretrain/sft/ppo (eval.n_prompts prompts, `runs` decodings)."""
  e = config.eval
  return runs * e.n_prompts * e.max_new_tokens * SAMPLE_COST


def stage_steps(stage: str, config) -> int:
  """The loop's step count as the stage will derive it (RM: from its prompts and epochs)."""
  if stage in ("pretrain", "sft"):
    return int(config[stage].steps)
  if stage == "rm":
    rm = config.rm
    n = min(rm.n_prompts, config.world.n_rm_prompts)   # reward.py: the world's RM prompts, cut to rm.n_prompts
    train = n - int(round(rm.valid_fraction * n))
    per = rm.batch_size if rm.formulation == "per_prompt" else rm.pair_batch_size
    if rm.formulation != "per_prompt":   # shuffled pairs: every comparison of every prompt, C(K, 2) of them
      k = sum(rm.k_choices) / len(rm.k_choices)
      train = train * k * (k - 1) / 2
    return max(1, math.ceil(rm.epochs * train / per)) * int(rm.get("ensemble_size", 1))   # members in turn
  if stage in ("ppo", "ppo_noptx"):
    return max(1, int(config.ppo.total_episodes) // int(config.ppo.batch_size))
  return 0


def stage_cost(stage: str, config, n_models: int = 0) -> tuple[float, float, float]:
  """(before the loop, the loop, after the loop) in token passes; see the module docstring."""
  if stage in ("pretrain", "sft"):
    s = config[stage]
    # pretrain judges bare and few-shot samples at the end, sft samples at T=1 and greedily
    return 0.0, 3.0 * s.steps * s.batch_size * s.seq_len, _gold_eval(config, 2) if config.eval.n_prompts else 0.0
  if stage == "rm":
    rm = config.rm
    k = sum(rm.k_choices) / len(rm.k_choices)
    # each source samples its share of the K responses plus rm_collect.SPARE spares per prompt
    from instructrl.stages import rm_collect
    sources = sum(1 for w in dict(rm.get("source_mix", {"policy": 1.0})).values() if w > 0)
    sampling = rm.n_prompts * (k + rm_collect.SPARE * sources) * rm.max_new_tokens * SAMPLE_COST
    members = int(rm.get("ensemble_size", 1))
    return sampling, 3.0 * members * rm.epochs * rm.n_prompts * (1 - rm.valid_fraction) * k * rm.seq_len, 0.0
  if stage in ("ppo", "ppo_noptx"):
    from instructrl.stages.rm_ensemble import rm_run_names
    p = config.ppo
    seq = p.prompt_len + p.max_new_tokens
    rms = int(config.rm.get("ensemble_size", 1)) + len(rm_run_names(config))
    per_iter = (p.batch_size * p.max_new_tokens * SAMPLE_COST   # rollout
                + (3.0 + rms) * p.batch_size * seq               # policy, ref, value, RMs
                + 6.0 * p.ppo_epochs * p.batch_size * seq)      # policy and value updates
    if stage == "ppo" and p.ptx_coef > 0:                       # a ptx batch per minibatch
      per_iter += 3.0 * p.ppo_epochs * (p.batch_size // p.minibatch_size) * p.ptx_batch_size * p.ptx_seq_len
    normalize = p.normalize_batches * p.batch_size * p.max_new_tokens * SAMPLE_COST if p.normalize_score else 0.0
    post = _gold_eval(config, 1) if config.eval.n_prompts else 0.0
    return normalize, per_iter * stage_steps(stage, config), post
  if stage == "eval":
    e, w = config.eval, config.world
    prompts = sum(min(e.report_prompts, n) for n in (w.n_eval_prompts, w.n_truthful, w.n_toxicity))
    cloze = w.n_cloze * 4 * e.cloze_seq_len
    return 0.0, n_models * (prompts * e.max_new_tokens * SAMPLE_COST + cloze), 0.0
  return 0.0, 0.0, 0.0   # world: seconds, not counted


def eval_models(stages: list[str], workdir: Path, config) -> int:
  """Answer sets the eval stage will sample: GPT, GPT prompted (twice with
  eval.prompted_at_policy_temperature), SFT, its resample (and SFT at the baselines' temperature with
  eval.sft_at_baseline_temperature), each PPO stage."""
  from instructrl.stages import evaluate
  have = lambda s: s in stages or (Path(workdir) / s).is_dir()
  return ((2 + evaluate.prompted_twice(config.eval)) * have("pretrain") + 2 + evaluate.sft_twice(config.eval)
          + sum(have(s) for s in ("ppo", "ppo_noptx")))


# ----------------------------------------------------------------------------- what is on disk

def checkpoint_state(stage_dir: Path) -> tuple[str, int]:
  """("complete" | "resume" | "new", step) from the newest committed checkpoint's meta.

  Read-only and approximate (the stage itself decides, and may fall back past a damaged step):
  it only chooses the line printed and the work counted as left.
  """
  from instructrl.checkpoints import MANIFEST
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
  if stage == "world":
    return ("complete" if (workdir / "world" / "COMPLETE").exists() else "new"), 0
  if stage == "rm":   # the RM ensemble's members train in turn: its step is theirs summed
    from instructrl.stages import rm_ensemble
    states = [checkpoint_state(d) for d in rm_ensemble.trained_member_dirs(config, workdir)]
    if all(st == "complete" for st, _ in states):
      return "complete", sum(step for _, step in states)
    return ("new", 0) if all(st == "new" for st, _ in states) else ("resume", sum(step for _, step in states))
  if stage in _CHECKPOINTED:
    return checkpoint_state(workdir / stage)
  if stage == "eval":
    if upstream_runs:
      return "new", 0
    from instructrl.stages import evaluate
    return ("complete" if evaluate.is_judged(config, workdir) else "new"), 0
  return "new", 0


# ----------------------------------------------------------------------------- the outer bar

class Pipeline:
  """with Pipeline(config, workdir, stages, enabled=process_index == 0) as p:
       for s in stages: p.start(s); run(s); p.finish(s)"""

  def __init__(self, config, workdir: Path, stages: list[str], enabled: bool = True):
    self.config, self.workdir, self.stages, self.enabled = config, Path(workdir), list(stages), enabled
    n_models = eval_models(self.stages, self.workdir, self.config)
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
    global _ACTIVE
    total = sum(self.left.values())
    self.bar = tqdm(total=total or None, desc="pipeline", smoothing=0, disable=not self.enabled,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]" if total else
                    "{desc}: [{elapsed}, ETA unknown: no stage left with a cost estimate]")
    _ACTIVE = self
    return self

  def __exit__(self, *exc):
    global _ACTIVE
    _ACTIVE = None
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

  def step(self, stage: str, done: int, total: int) -> None:
    """An inner loop's progress: credit the stage's cost in proportion to its steps."""
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


def step(stage: str, done: int, total: int) -> None:
  """Called by loop.run after each step; a no-op outside `python -m instructrl.main`."""
  if _ACTIVE is not None:
    _ACTIVE.step(stage, done, total)
