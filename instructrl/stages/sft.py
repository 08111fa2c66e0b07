"""The `sft` stage: supervised fine-tuning on labeler demonstrations, loss on the response only.

Starts from pretrain's final checkpoint (refused if its model config differs). The paper's
SFT (appendix C.1): 16 epochs, cosine decay to 10% with no warm-up, residual dropout 0.2.
With `sft.pretrain_mix` > 0 a fraction of the training examples are pretraining windows (loss on
every token): the paper's PPO init (appendix C.3) is an SFT model trained with 10% pretraining
data mixed in, which keeps it close to the pretraining distribution that PPO-ptx pulls towards.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

from instructrl import checkpoints, measures
import numpy as np

from instructrl.data.batching import TokenExamples, pack_texts, prompt_response_examples
from instructrl.data.records import load_jsonl
from instructrl.models.config import ModelConfig
from instructrl.stages import costs, lm
from instructrl.stages.source import open_source
from instructrl.stages.world import world_fingerprint


def run(config, workdir: Path, mesh, rules, progress=None):
  """progress(done, total): called after each step (main.py: the pipeline's bar)."""
  cfg = config.sft
  src = open_source(config, workdir)   # the task world, or public files (stages/source.py)
  world_dir, tokenizer, world = src.dir, src.tokenizer, src.world
  model_cfg = ModelConfig.from_dict(config.model)

  # ------------------------------------------------------------------ data
  def demos(f):
    records = load_jsonl(Path(cfg.get("demos_dir") or world_dir) / f, "demo")
    return prompt_response_examples(tokenizer, [src.format_prompt(r["prompt"]) for r in records],
                                    [r["response"] for r in records], cfg.seq_len, what=f)
  train, valid = demos("demos_train.jsonl"), demos("demos_valid.jsonl")
  if cfg.get("pretrain_mix", 0.0) > 0:
    train = mix_pretraining(train, tokenizer, world_dir, cfg.pretrain_mix, config.seed)
  logging.info("sft: %d train demos, %d valid demos; %d steps = %.1f epochs", len(train), len(valid), cfg.steps,
               cfg.steps * cfg.batch_size / len(train))

  # ------------------------------------------------------------------ init: pretrain's final params
  def initial_params(shardings, abstract):
    params, _ = checkpoints.load_params(Path(workdir) / "pretrain", abstract, model_cfg.to_dict(),
                                        world_fingerprint(workdir))
    return params

  # ------------------------------------------------------------------ end-of-stage eval
  def after_training(params):
    records = load_jsonl(world_dir / "prompts_dev.jsonl", "eval")[:config.eval.n_prompts]   # monitoring reads dev, never test
    out = measures.gold_eval(params, model_cfg, tokenizer, world, records, rng=jax.random.key(config.seed + 102),
                               eval_cfg=config.eval)
    logging.info("sft: gold %.3f (acceptable %.1f%%, correct %.1f%%)", out["gold_score"],
                 100 * out["acceptable_rate"], 100 * out["correct_rate"])
    return out

  return lm.run("sft", config, workdir, train, valid, initial_params, mesh, rules,
                after_training if config.eval.n_prompts and src.has_gold else None, progress)


def mix_pretraining(demos: TokenExamples, tokenizer, world_dir: Path, fraction: float, seed: int) -> TokenExamples:
  """Demos plus pretraining windows of the same length, the windows `fraction` of the examples.

  The windows are a seeded sample of the packed training corpus (the text pretrain saw), so
  every batch holds `fraction` pretraining rows in expectation; their loss covers every token.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"sft.pretrain_mix={fraction}: expected a fraction in [0, 1)")
  corpus = pack_texts(tokenizer.encode_batch([r["text"] for r in load_jsonl(world_dir / "corpus_train.jsonl", "text")]),
                      demos.tokens.shape[1] - 1, tokenizer)
  n = int(round(len(demos) * fraction / (1.0 - fraction)))
  if n > len(corpus):
    raise ValueError(f"sft.pretrain_mix={fraction} needs {n} pretraining windows; the corpus has {len(corpus)}")
  pick = np.sort(np.random.default_rng(seed + 23).choice(len(corpus), size=n, replace=False))
  logging.info("sft: %d pretraining windows mixed into %d demos (%.0f%%)", n, len(demos), 100 * fraction)
  return TokenExamples(np.concatenate([demos.tokens, corpus.tokens[pick]]),
                       np.concatenate([demos.loss_mask, corpus.loss_mask[pick]]))


def steps(config) -> int:
  """The training loop's step count (the pipeline's ETA counts them)."""
  return int(config.sft.steps)


def cost(config) -> tuple[float, float, float]:
  """(before, during, after the loop) in token passes (stages/costs.py): training, then the judged samples,
  counted as two decodings (the stage decodes once: a small overestimate, kept so that the stages'
  calibrated weights do not move)."""
  s = config.sft
  return 0.0, costs.TRAIN_COST * s.steps * s.batch_size * s.seq_len, costs.gold_eval(config, 2)
