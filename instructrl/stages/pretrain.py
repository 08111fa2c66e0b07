"""The `pretrain` stage: next-token prediction on the world's "internet" (packed text).

A model pretrained here is misaligned the way GPT-3 is: it knows the facts and is fluent,
but given a bare instruction it mostly continues with another instruction. The end-of-stage
evaluation measures exactly that, bare and with a few-shot prefix.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np

from instructrl import measures
from instructrl.data import world as world_lib
from instructrl.data.batching import pack_texts
from instructrl.data.records import load_jsonl
from instructrl.models.config import ModelConfig
from instructrl.stages import costs, lm, train_state
from instructrl.stages.world import load_tokenizer


def run(config, workdir: Path, mesh, rules, progress=None):
  """progress(done, total): called after each step (main.py: the pipeline's bar)."""
  cfg = config.pretrain
  world_dir = Path(workdir) / "world"
  tokenizer = load_tokenizer(workdir)
  model_cfg = ModelConfig.from_dict(config.model)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size={model_cfg.vocab_size}")

  # ------------------------------------------------------------------ data
  docs = lambda f: tokenizer.encode_batch([r["text"] for r in load_jsonl(world_dir / f, "text")])
  train = pack_texts(docs("corpus_train.jsonl"), cfg.seq_len)
  valid = pack_texts(docs("corpus_valid.jsonl"), cfg.seq_len)
  logging.info("pretrain: %d train windows, %d valid windows of %d tokens", len(train), len(valid), cfg.seq_len)

  # ------------------------------------------------------------------ init
  def initial_params(shardings, abstract):
    return train_state.init_params(model_cfg, jax.random.key(config.seed), shardings, mesh, rules)

  # ------------------------------------------------------------------ end-of-stage eval
  def after_training(params):
    world = world_lib.World.load(world_dir)
    records = load_jsonl(world_dir / "prompts_dev.jsonl", "eval")[:config.eval.n_prompts]   # monitoring reads dev, never test
    rng = jax.random.key(config.seed + 101)
    bare = measures.gold_eval(params, model_cfg, tokenizer, world, records, rng=rng, eval_cfg=config.eval,
                                temperature=config.eval.baseline_temperature)
    prefix = world.few_shot_prefix(np.random.default_rng(config.seed), k=config.eval.few_shot)
    shots = measures.gold_eval(params, model_cfg, tokenizer, world, records, rng=rng, eval_cfg=config.eval,
                                 prefix=prefix, stop_at_newline=True,
                                 temperature=config.eval.baseline_temperature)
    logging.info("pretrain: bare-prompt gold %.3f (acceptable %.1f%%), few-shot gold %.3f (acceptable %.1f%%)",
                 bare["gold_score"], 100 * bare["acceptable_rate"], shots["gold_score"],
                 100 * shots["acceptable_rate"])
    return {**{f"bare/{k}": v for k, v in bare.items()}, **{f"few_shot/{k}": v for k, v in shots.items()}}

  return lm.run("pretrain", config, workdir, train, valid, initial_params, mesh, rules,
                after_training if config.eval.n_prompts else None, progress)


def steps(config) -> int:
  """The training loop's step count (the pipeline's ETA counts them)."""
  return int(config.pretrain.steps)


def cost(config) -> tuple[float, float, float]:
  """(before, during, after the loop) in token passes (stages/costs.py): training, then the judged bare
  and few-shot samples."""
  s = config.pretrain
  return 0.0, costs.TRAIN_COST * s.steps * s.batch_size * s.seq_len, costs.gold_eval(config, 2)
