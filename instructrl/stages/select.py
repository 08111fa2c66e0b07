"""SFT model selection by RM score (paper 3.5 / C.1: the final SFT model is chosen by the reward
model's score on a validation set, which predicted human preference better than validation loss).

The SFT stage keeps candidate checkpoints (`sft.keep_period`); once the RM is trained, every
candidate answers the RM's validation prompts (never trained on by the RM) at the PPO sampling
temperature, the RM scores the answers, and the best mean score wins. The choice and every
candidate's score go to workdir/sft_selection.json, which PPO reads for its policy and reference.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np

from instructrl import checkpoints, measures, parallel
from instructrl.data import world as world_lib
from instructrl.data.batching import prompt_response_examples
from instructrl.data.records import load_jsonl
from instructrl.models.config import ModelConfig
from instructrl.models.transformer import Decoder
from instructrl.stages import reward, rm_models
from instructrl.stages.world import load_tokenizer, world_fingerprint

SELECTION = "sft_selection.json"


def select_sft(config, workdir: Path, mesh, rules, lm_abstract, rm_abstract, rm_root: Path | None = None) -> int:
  """The SFT step PPO starts from (cached in workdir/sft_selection.json for the same candidates). rm_root: the
  directory of the RM that scores them and of its cache, instead of the workdir (W/round1 for round one)."""
  workdir = Path(workdir)
  rm_root = Path(rm_root) if rm_root is not None else workdir
  cfg = config.ppo
  model_cfg = ModelConfig.from_dict(config.model)
  model_dict, world_id = model_cfg.to_dict(), world_fingerprint(workdir)
  steps = checkpoints.kept_steps(workdir / "sft")
  path = rm_root / SELECTION
  rm_meta = checkpoints.StageCheckpoints(rm_root / "rm")
  try:
    rm_step = rm_meta.latest_step()
  finally:
    rm_meta.close()
  key = {"candidates": steps, "rm_step": rm_step, "prompts": cfg.select_prompts, "seed": config.seed,
         "temperature": cfg.temperature}
  if path.exists():
    saved = json.loads(path.read_text())
    if saved.get("key") == key:
      return int(saved["chosen"])

  world = world_lib.World.load(workdir / "world")
  tokenizer = load_tokenizer(workdir)
  # The RM's validation prompts: the first rm.valid_fraction of the ranked prompts, never trained on.
  records = load_jsonl(workdir / "world" / "prompts_rm.jsonl", "eval")[:config.rm.n_prompts]
  records = records[:min(cfg.select_prompts, int(round(config.rm.valid_fraction * len(records))))]
  rm_dict = rm_models.trained_rm_model(config, rm_root)
  rm_params, _ = checkpoints.load_params(rm_root / "rm", rm_abstract, rm_dict, world_id)
  rm_cfg = ModelConfig.from_dict({**rm_dict, **config.rm.get("model_overrides", {})})
  score = jax.jit(lambda p, t, l: rm_models.rm_scores(Decoder(rm_cfg, head="scalar"), p, t, l))
  scores = {}
  with parallel.activate(mesh, rules):
    for step in steps:
      params, _ = checkpoints.load_params(workdir / "sft", lm_abstract, model_dict, world_id, step=step)
      answers = measures.answer(params, model_cfg, tokenizer, world, records, rng=jax.random.key(config.seed + 120),
                                  eval_cfg=config.eval, temperature=cfg.temperature)
      kept = [(r, a) for r, a in zip(records, answers) if a is not None]
      ex = prompt_response_examples(tokenizer, [world.format_prompt(r["prompt"]) for r, _ in kept],
                                    [a for _, a in kept], config.rm.seq_len - 1, what="sft selection")
      last = (ex.loss_mask.shape[1] - 1 - np.argmax(ex.loss_mask[:, ::-1], axis=1)).astype(np.int32)   # the EOS
      scores[step] = reward.mean_score(score, rm_params, ex.tokens, last, config.rm.eval_batch_size, mesh, rules)
      logging.info("select: SFT step %d scores %.4f under the RM", step, scores[step])
  chosen = max(scores, key=scores.get)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps({"key": key, "scores": {str(k): v for k, v in scores.items()}, "chosen": chosen},
                            indent=1, sort_keys=True) + "\n")
  tmp.replace(path)
  logging.info("select: SFT step %d chosen (RM score %.4f) from %s", chosen, scores[chosen], steps)
  return chosen
