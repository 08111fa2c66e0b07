"""The `rm` stage on public rankings (data.source="files"): the policy's RM, then the judge RM.

Both are trained by the world RM's steps and loop (`reward.make_steps`, `loop.run`): the K-way
per-prompt loss, a scalar head on the trunk of `rm.init_stage` ("" = rm.policy, the SFT model),
the score bias set so that held-out demonstrations score 0 on average.
- W/rm: on rankings_train (validation: rankings_valid). PPO's reward, and its value function's init.
- W/rm_judge: the same recipe on the disjoint rankings_judge_* prompts (stages/data_import.py). It
  never scores a PPO rollout used for training: it is the proxy gold of the report
  (stages/proxy_eval.py), as in Gao et al. 2022's synthetic setup, where a gold RM trained on other
  data judges the policies optimised against a proxy RM.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import jax
import ml_collections
import numpy as np

from instructrl.data.batching import batch_indices, prompt_response_examples
from instructrl.data.rankings import load_ranked, ranked_examples
from instructrl.data.records import load_jsonl
from instructrl.models.config import ModelConfig
from instructrl.stages import loop
from instructrl.stages.reward import evaluate, make_steps, mean_score
from instructrl.stages.rm_models import eos_index, initial_rm_params, rm_model, row_scores
from instructrl.stages.source import open_source
from instructrl.stages.train_state import abstract_state, make_optimizer, process_batch, state_shardings
from instructrl.stages.world import world_fingerprint

# stage name -> the ranking files it trains and validates on
MODELS = {"rm": ("rankings_train", "rankings_valid"), "rm_judge": ("rankings_judge_train", "rankings_judge_valid")}


def ranked(data_dir: Path, name: str) -> list[dict]:
  return load_ranked(Path(data_dir) / f"{name}.jsonl", allow_empty_response=True)


def n_steps(cfg, n_train: int) -> int:
  """rm.steps when set, else rm.epochs over the training prompts (paper C.2: one epoch)."""
  return int(cfg.steps) if cfg.get("steps", 0) else max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))


def settings(config, steps: int) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(config.rm.to_dict())
  out.steps = steps
  return out


def validation_examples(as_examples, records: list[dict], name: str):
  """The validation rankings that fit rm.seq_len, or None (with a warning) when none does: a small
  public split of long conversations can hold none, and the RM still trains."""
  try:
    return as_examples(records, f"{name} valid")
  except ValueError as e:
    logging.warning("%s: no validation (%s)", name, e)
    return None


def run(config, workdir: Path, mesh, rules, progress=None):
  cfg = config.rm
  if cfg.formulation != "per_prompt":
    raise ValueError(f"rm.formulation={cfg.formulation!r}: public rankings train the per-prompt K-way loss "
                     f"only (expected 'per_prompt')")
  workdir = Path(workdir)
  src = open_source(config, workdir)
  model_dict = rm_model(config)
  model_cfg = ModelConfig.from_dict({**model_dict, **cfg.get("model_overrides", {})})
  data = {name: [ranked(src.dir, f) for f in files] for name, files in MODELS.items()}
  k_max = max(len(r["responses"]) for recs in data.values() for split in recs for r in split)
  as_examples = lambda recs, what: ranked_examples(src.tokenizer, recs, cfg.seq_len, k_max, src.format_prompt,
                                                   what=what)
  demos = load_jsonl(src.dir / "demos_valid.jsonl", "demo")
  demo_ex = prompt_response_examples(src.tokenizer, [src.format_prompt(r["prompt"]) for r in demos],
                                     [r["response"] for r in demos], cfg.seq_len - 1, what="rm bias demos")
  demo_last = eos_index(demo_ex)
  trains = {name: as_examples(recs[0], f"{name} train") for name, recs in data.items()}   # tokenised once
  steps = {name: n_steps(cfg, len(train)) for name, train in trains.items()}
  total = sum(steps.values())
  done_before = 0
  result = None
  for i, (name, (_, valid_recs)) in enumerate(data.items()):
    train = trains[name]
    valid = validation_examples(as_examples, valid_recs, name)
    stage_cfg = settings(config, steps[name])
    tx, schedule = make_optimizer(stage_cfg, stage_cfg.steps)
    shardings = state_shardings(model_cfg, tx, mesh, rules, head="scalar")
    train_step, eval_step, score_step = make_steps(model_cfg, "per_prompt", tx, schedule, shardings, mesh, rules,
                                                   microbatches=int(cfg.get("microbatches", 1)))
    logging.info("%s: %d train / %d valid rankings (K <= %d), %d steps", name, len(train),
                 0 if valid is None else len(valid), k_max, stage_cfg.steps)
    report = None if progress is None else (
        lambda done, _total, base=done_before: progress(base + done, total))
    stage = loop.Stage(name=name, cfg=stage_cfg, workdir=workdir, model_dict=model_dict,
                       world_id=world_fingerprint(workdir), rng=jax.random.fold_in(jax.random.key(config.seed + 4), i),
                       tx=tx, shardings=shardings, abstract=abstract_state(model_cfg, tx, shardings, head="scalar"),
                       progress=report)
    seed = config.seed + 6 + 1000 * i

    def normalise(params, score_step=score_step, name=name):
      bias = mean_score(score_step, params, demo_ex.tokens, demo_last, cfg.eval_batch_size, mesh, rules)
      logging.info("%s: demonstrations score %.4f on average; subtracting it", name, bias)
      return {**params, "score_bias": params["score_bias"] - bias}

    def after_training(params, score_step=score_step):
      scores = row_scores(score_step, params, demo_ex.tokens, demo_last, cfg.eval_batch_size, mesh, rules)
      return {"demo_mean_score": float(np.mean(scores))}

    params = loop.run(
        stage, mesh, rules,
        initial_params=lambda i=i, shardings=shardings: initial_rm_params(
            config, workdir, mesh, rules, model_cfg, shardings, jax.random.fold_in(jax.random.key(config.seed + 5), i)),
        train_step=train_step,
        batch_at=lambda step, train=train, seed=seed: process_batch(
            train.batch, batch_indices(len(train), cfg.batch_size, step, seed), mesh, rules),
        evaluate=None if valid is None else (
            lambda p, eval_step=eval_step, valid=valid: evaluate(eval_step, p, valid, cfg.eval_batch_size, mesh, rules)),
        finalize=normalise, after_training=after_training, items_per_step=cfg.batch_size, item_name="prompts",
        extra_meta={"seed": seed, "formulation": "per_prompt", "rankings": MODELS[name][0]})
    result = params if name == "rm" else result
    done_before += steps[name]
  return result
