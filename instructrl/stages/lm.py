"""Language-model training shared by the `pretrain` and `sft` stages.

The step is a pure function `train_step(state, batch, rng) -> (state, metrics)` jitted with
in/out shardings; `pretrain.py` and `sft.py` differ only in their data (packed text vs.
prompt/response with the loss on the response) and where the params start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from instructrl import objectives, parallel
from instructrl.data.batching import TokenExamples, batch_indices
from instructrl.models.config import ModelConfig
from instructrl.models.transformer import Decoder
from instructrl.stages import loop, microbatch
from instructrl.stages.train_state import (abstract_state, device_batch, guarded_update, make_optimizer,
                                           process_batch, state_shardings)
from instructrl.stages.world import world_fingerprint


# ----------------------------------------------------------------------------- steps

def make_steps(model_cfg: ModelConfig, tx, schedule, shardings, mesh, rules, microbatches: int = 1):
  """Jitted (train_step, eval_step) over the mesh; params donated, batch sharded over 'batch'.

  microbatches (pretrain/sft.microbatches): the train step accumulates the gradient over that many
  micro-batches of the batch (stages/microbatch.py), then makes one update; 1: the whole batch at once."""
  model = Decoder(model_cfg, head="lm")
  per_token = lambda total, count: total / jnp.maximum(count, 1.0)   # the batch's token mean

  def sums(params, batch, rng, deterministic):
    logits, _ = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                            rngs=None if deterministic else {"dropout": rng})
    nll_sum, count = objectives.token_nll(logits, batch["targets"], batch["mask"])
    hits, _ = objectives.token_accuracy(logits, batch["targets"], batch["mask"])
    return nll_sum, count, hits

  def loss_fn(params, batch, rng, deterministic):
    nll_sum, count, hits = sums(params, batch, rng, deterministic)
    return per_token(nll_sum, count), (nll_sum, count, hits)

  def loss_and_grads(params, batch, rng):
    if microbatches == 1:
      (loss, (_, count, hits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, False)
      return loss, count, hits, grads
    # The token mean's count is the labels', not the params': sum the micro-batches' NLL sums and their
    # gradients, then divide once by the batch's count.
    share = lambda p, mb, key: (lambda s, c, h: (s, (c, h)))(*sums(p, mb, key, False))
    grads, nll_sums, (counts, hits) = microbatch.accumulate(share, params, batch, microbatches, rng,
                                                               shardings["params"])
    count = jnp.sum(counts)
    return (per_token(jnp.sum(nll_sums), count), count, jnp.sum(hits),
            jax.tree.map(lambda g: per_token(g, count), grads))

  def train_step(state, batch, rng):
    with nn.logical_axis_rules(rules):
      rng = jax.random.fold_in(rng, state["step"])
      loss, count, hits, grads = loss_and_grads(state["params"], batch, rng)
      new_state, finite, grad_norm = guarded_update(state, grads, loss, tx)
      metrics = {"loss": loss, "accuracy": per_token(hits, count), "grad_norm": grad_norm,
                 "param_norm": optax.global_norm(new_state["params"]), "lr": schedule(state["step"]),
                 "tokens": count, "finite": finite}
      return new_state, metrics

  def eval_step(params, batch):
    with nn.logical_axis_rules(rules):
      _, (nll_sum, count, hits) = loss_fn(params, batch, None, True)
      return {"nll_sum": nll_sum, "count": count, "hits": hits}

  batch_sh = parallel.batch_sharding(mesh, rules)
  repl = parallel.replicated(mesh)
  train = jax.jit(train_step, in_shardings=(shardings, batch_sh, repl), out_shardings=(shardings, repl),
                  donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(shardings["params"], batch_sh), out_shardings=repl)
  return train, evaluate


def evaluate(eval_step, params, examples: TokenExamples, batch_size: int, mesh, rules) -> dict[str, float]:
  """Mean NLL / perplexity / accuracy over EVERY example: the last batch (static shape) is filled up with
  copies of row 0 whose loss mask is off, so they add nothing to any sum."""
  if len(examples) == 0:
    raise ValueError("no eval examples")
  tot = {"nll_sum": 0.0, "count": 0.0, "hits": 0.0}
  for start in range(0, len(examples), batch_size):
    idx = np.arange(start, min(start + batch_size, len(examples)))
    batch = examples.batch(np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)]))
    batch["mask"] = np.where(np.arange(batch_size)[:, None] < len(idx), batch["mask"], 0).astype(batch["mask"].dtype)
    out = eval_step(params, device_batch(batch, mesh, rules))
    for k in tot:
      tot[k] += float(out[k])
  nll = tot["nll_sum"] / max(tot["count"], 1.0)
  return {"loss": nll, "perplexity": float(np.exp(min(nll, 50.0))), "accuracy": tot["hits"] / max(tot["count"], 1.0)}


# ----------------------------------------------------------------------------- loop

def run(name: str, config, workdir: Path, train_examples: TokenExamples, valid_examples: TokenExamples,
        initial_params: Callable[[Any, Any], Any], mesh, rules,
        after_training: Callable[[Any], dict] | None = None, progress: Callable[[int, int], None] | None = None):
  """Train (or resume, or skip if complete) the LM stage `name`; returns the final params.

  initial_params(shardings, abstract) -> params: random init for pretrain, pretrain's final
  checkpoint for SFT. after_training(params) -> metrics is logged once at the end. progress(done,
  total) after each step (the pipeline's bar).
  """
  stage_cfg = config[name]
  model_cfg = ModelConfig.from_dict({**config.model, **stage_cfg.get("model_overrides", {})})
  tx, schedule = make_optimizer(stage_cfg, int(stage_cfg.steps))
  shardings = state_shardings(model_cfg, tx, mesh, rules)
  stage = loop.Stage(name=name, cfg=stage_cfg, workdir=Path(workdir),
                     model_dict=ModelConfig.from_dict(config.model).to_dict(), world_id=world_fingerprint(workdir),
                     rng=jax.random.key(config.seed + {"pretrain": 1, "sft": 2}[name]), tx=tx, shardings=shardings,
                     abstract=abstract_state(model_cfg, tx, shardings), progress=progress)
  train_step, eval_step = make_steps(model_cfg, tx, schedule, shardings, mesh, rules,
                                     int(stage_cfg.get("microbatches", 1)))
  seed, B = config.seed + 17 * len(name), stage_cfg.batch_size
  return loop.run(
      stage, mesh, rules,
      initial_params=lambda: initial_params(shardings["params"], stage.abstract["params"]),
      train_step=train_step,
      batch_at=lambda step: process_batch(train_examples.batch, batch_indices(len(train_examples), B, step, seed),
                                          mesh, rules),
      evaluate=lambda params: evaluate(eval_step, params, valid_examples, stage_cfg.eval_batch_size, mesh, rules),
      after_training=after_training, items_per_step=B * train_examples.tokens.shape[1], extra_meta={"seed": seed})
