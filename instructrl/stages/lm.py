"""Language-model training shared by the `pretrain` and `sft` stages.

Reads top to bottom: optimizer -> state -> train/eval step -> loop. The step is a pure
function `train_step(state, batch, rng) -> (state, metrics)` jitted with in/out shardings;
`pretrain.py` and `sft.py` only differ in their data (packed text vs. prompt/response with the
loss on the response) and where the params start.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from instructrl import checkpoints, objectives, parallel
from instructrl.data.batching import TokenExamples, batch_indices
from instructrl.metrics import MetricWriter
from instructrl.models.config import ModelConfig
from instructrl.models.transformer import Decoder
from instructrl.stages.world import world_fingerprint


class NonFiniteError(FloatingPointError):
  pass


# ----------------------------------------------------------------------------- optimizer

def make_schedule(lr: float, total_steps: int, warmup_steps: int, final_lr_fraction: float):
  """Linear warm-up from 0, then cosine decay to `final_lr_fraction * lr` (paper: 10%, no warm-up)."""
  if total_steps <= 0:
    raise ValueError(f"steps={total_steps}: expected a positive number of steps")
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps={warmup_steps}: expected 0 <= warmup_steps < steps={total_steps}")
  if warmup_steps == 0:
    return optax.cosine_decay_schedule(lr, decay_steps=total_steps, alpha=final_lr_fraction)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=total_steps,
      end_value=lr * final_lr_fraction)


def make_optimizer(stage_cfg, total_steps: int):
  schedule = make_schedule(stage_cfg.learning_rate, total_steps, stage_cfg.warmup_steps,
                           stage_cfg.final_lr_fraction)
  # Decay matrices only: norms, biases and the scalar head's bias keep their scale.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(stage_cfg.grad_clip),
      optax.adamw(schedule, b1=stage_cfg.b1, b2=stage_cfg.b2, eps=1e-8,
                  weight_decay=stage_cfg.weight_decay, mask=decay_mask))
  return tx, schedule


# ----------------------------------------------------------------------------- state

def abstract_params(model_cfg: ModelConfig, head: str = "lm"):
  """Boxed abstract params (shapes + logical axis names), no compute."""
  model = Decoder(model_cfg, head=head)
  return jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.key(0))


def state_shardings(model_cfg: ModelConfig, tx, mesh, rules, head: str = "lm"):
  boxed = abstract_params(model_cfg, head)
  return {
      "step": parallel.replicated(mesh),
      "params": parallel.logical_shardings(boxed, mesh, rules),
      "opt_state": parallel.logical_shardings(jax.eval_shape(tx.init, boxed), mesh, rules),
  }


def abstract_state(model_cfg, tx, shardings, head: str = "lm"):
  params = nn.unbox(abstract_params(model_cfg, head))
  tree = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
          "opt_state": jax.eval_shape(tx.init, params)}
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def init_params(model_cfg: ModelConfig, rng, shardings, mesh, rules, head: str = "lm"):
  model = Decoder(model_cfg, head=head)
  init = lambda r: nn.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"])
  with parallel.activate(mesh, rules):
    return jax.jit(init, out_shardings=shardings)(rng)


def new_state(params, tx, shardings, mesh):
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  return {"step": jax.device_put(jnp.int32(0), shardings["step"]), "params": params, "opt_state": opt_state}


# ----------------------------------------------------------------------------- steps

def make_steps(model_cfg: ModelConfig, tx, schedule, shardings, mesh, rules):
  """Jitted (train_step, eval_step) over the mesh; params donated, batch sharded over 'batch'."""
  model = Decoder(model_cfg, head="lm")

  def loss_fn(params, batch, rng, deterministic):
    logits, _ = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                            rngs=None if deterministic else {"dropout": rng})
    nll_sum, count = objectives.token_nll(logits, batch["targets"], batch["mask"])
    hits, _ = objectives.token_accuracy(logits, batch["targets"], batch["mask"])
    return nll_sum / jnp.maximum(count, 1.0), (nll_sum, count, hits)

  def train_step(state, batch, rng):
    with nn.logical_axis_rules(rules):
      rng = jax.random.fold_in(rng, state["step"])
      (loss, (_, count, hits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state["params"], batch, rng, False)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      grad_norm = optax.global_norm(grads)
      # The guard: a non-finite loss or gradient leaves the state exactly as it was.
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = {"step": state["step"] + finite.astype(jnp.int32),
                   "params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"])}
      metrics = {"loss": loss, "accuracy": hits / jnp.maximum(count, 1.0), "grad_norm": grad_norm,
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


def device_batch(batch: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
  """Global numpy batch -> sharded arrays; each process only materialises its own shards."""
  sh = parallel.batch_sharding(mesh, rules)
  return {k: jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx]) for k, v in batch.items()}


def evaluate(eval_step, params, examples: TokenExamples, batch_size: int, mesh, rules) -> dict[str, float]:
  """Mean NLL / perplexity / accuracy over whole batches of `examples` (the tail is dropped: static shapes)."""
  n_batches = len(examples) // batch_size
  if n_batches == 0:
    raise ValueError(f"{len(examples)} eval examples: fewer than one batch of {batch_size}")
  tot = {"nll_sum": 0.0, "count": 0.0, "hits": 0.0}
  for b in range(n_batches):
    out = eval_step(params, device_batch(examples.batch(np.arange(b * batch_size, (b + 1) * batch_size)),
                                         mesh, rules))
    for k in tot:
      tot[k] += float(out[k])
  nll = tot["nll_sum"] / max(tot["count"], 1.0)
  return {"loss": nll, "perplexity": float(np.exp(min(nll, 50.0))), "accuracy": tot["hits"] / max(tot["count"], 1.0)}


# ----------------------------------------------------------------------------- loop

def run(name: str, config, workdir: Path, train_examples: TokenExamples, valid_examples: TokenExamples,
        initial_params: Callable[[Any, Any], Any], mesh, rules,
        after_training: Callable[[Any], dict] | None = None):
  """Train (or resume, or skip if complete) the LM stage `name`; returns the final params.

  initial_params(shardings, abstract) -> params: random init for pretrain, pretrain's final
  checkpoint for SFT. after_training(params) -> metrics is logged once at the end.
  """
  stage_cfg = config[name]
  model_cfg = ModelConfig.from_dict({**config.model, **stage_cfg.get("model_overrides", {})})
  model_dict = ModelConfig.from_dict(config.model).to_dict()
  total = int(stage_cfg.steps)
  tx, schedule = make_optimizer(stage_cfg, total)
  shardings = state_shardings(model_cfg, tx, mesh, rules)
  abstract = abstract_state(model_cfg, tx, shardings)
  ckpt = checkpoints.StageCheckpoints(Path(workdir) / name, max_to_keep=stage_cfg.get("keep_checkpoints", 2))
  rng = jax.random.key(config.seed + {"pretrain": 1, "sft": 2}.get(name, 3))
  world_id = world_fingerprint(workdir)

  if ckpt.is_complete():
    logging.info("%s: complete checkpoint found at step %d, skipping", name, ckpt.latest_step())
    state, meta = ckpt.restore(abstract)
    checkpoints.check_model(meta["model"], model_dict, str(ckpt.directory))
    checkpoints.check_world(meta, world_id, str(ckpt.directory))
    ckpt.close()
    return state["params"]

  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract)
    checkpoints.check_model(meta["model"], model_dict, str(ckpt.directory))
    checkpoints.check_world(meta, world_id, str(ckpt.directory))
    logging.info("%s: resuming from step %d", name, meta["step"])
  else:
    params = initial_params(shardings["params"], abstract["params"])
    state = new_state(params, tx, shardings, mesh)
  start = int(state["step"])

  train_step, eval_step = make_steps(model_cfg, tx, schedule, shardings, mesh, rules)
  writer = MetricWriter(workdir, name, resume_step=start)
  seed = config.seed + 17 * len(name)
  meta = lambda step, complete=False: {"model": model_dict, "world": world_id, "data_position": step, "seed": seed,
                                       "rng": np.asarray(jax.random.key_data(rng)).tolist(), "complete": complete}
  B = stage_cfg.batch_size
  tokens_per_step = B * train_examples.tokens.shape[1]
  t_last, step_last = time.perf_counter(), start
  with parallel.activate(mesh, rules), tqdm(total=total, initial=start, desc=name, unit="step",
                                            disable=jax.process_index() != 0) as bar:
    for step in range(start, total):
      batch = device_batch(train_examples.batch(batch_indices(len(train_examples), B, step, seed)), mesh, rules)
      state, metrics = train_step(state, batch, rng)
      if not bool(metrics["finite"]):
        raise NonFiniteError(
            f"{name}: step {step} produced a non-finite loss or gradient (loss={float(metrics['loss'])}, "
            f"grad_norm={float(metrics['grad_norm'])}); the update was not applied and the last good "
            f"checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is intact")
      bar.update(1)
      done = step + 1
      if done % stage_cfg.log_every == 0 or done == total:
        m = jax.device_get(metrics)
        now = time.perf_counter()
        m["tokens_per_sec"] = tokens_per_step * (done - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, done
        bar.set_postfix(loss=f"{float(m['loss']):.3f}")
        writer.write(done, {k: v for k, v in m.items() if k != "finite"}, prefix="train/")
      if done % stage_cfg.eval_every == 0 or done == total:
        writer.write(done, evaluate(eval_step, state["params"], valid_examples, stage_cfg.eval_batch_size,
                                    mesh, rules), prefix="valid/")
      if done == total:
        # Save first: a failure in the end-of-stage evaluation must not cost the training.
        ckpt.save(done, state, meta(done, complete=True))
        if after_training:
          writer.write(done, after_training(state["params"]), prefix="final/")
      elif done % stage_cfg.checkpoint_every == 0:
        ckpt.save(done, state, meta(done))
  writer.close()
  ckpt.close()
  return state["params"]
