"""Train state shared by every stage: optimizer, sharded state creation, the guarded update.

A state is a plain dict {"step", "params", "opt_state"}; its shardings come from the logical
axis names on the model's params (optax.init run on the annotated abstract params, so Adam's
moments inherit each weight's axes and scalars are replicated).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from instructrl import parallel
from instructrl.models.config import ModelConfig
from instructrl.models.transformer import STACKED, Decoder, abstract_params


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


def weight_ndim(path, p) -> int:
  """A weight's own rank: without the leading layer axis of scanned (stacked) layers."""
  stacked = any(getattr(k, "key", None) == STACKED for k in path)
  return p.ndim - 1 if stacked else p.ndim


def make_optimizer(stage_cfg, total_steps: int):
  schedule = make_schedule(stage_cfg.learning_rate, total_steps, stage_cfg.warmup_steps,
                           stage_cfg.final_lr_fraction)
  # Decay matrices only: norms, biases and the scalar head's bias keep their scale.
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(lambda path, p: weight_ndim(path, p) >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(stage_cfg.grad_clip),
      optax.adamw(schedule, b1=stage_cfg.b1, b2=stage_cfg.b2, eps=1e-8,
                  weight_decay=stage_cfg.weight_decay, mask=decay_mask))
  return tx, schedule


# ----------------------------------------------------------------------------- state

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


def guarded_update(state, grads, loss, tx):
  """Apply an optimizer update unless the loss or gradient is non-finite; then keep the state as is.

  Returns (new_state, finite, grad_norm). The selection happens inside the jitted step, so a bad
  batch can never reach the params; the loop stops on `finite == False`.
  """
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = {"step": state["step"] + finite.astype(jnp.int32),
               "params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"])}
  return new_state, finite, grad_norm


def device_batch(batch: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
  """Global numpy batch -> arrays sharded on their leading 'batch' axis; each process builds its shards."""
  return {k: jax.make_array_from_callback(v.shape, parallel.batch_sharding(mesh, rules, v.ndim),
                                          lambda idx, v=v: v[idx]) for k, v in batch.items()}


def process_rows(global_rows: int, mesh, rules) -> np.ndarray:
  """Sorted indices of the rows of a global batch that this process's devices hold (every row on one host)."""
  sharding = parallel.batch_sharding(mesh, rules, 1)
  rows = set()
  for (sl,) in sharding.addressable_devices_indices_map((global_rows,)).values():
    rows.update(range(*sl.indices(global_rows)))
  return np.array(sorted(rows), np.int64)


def process_batch(read_rows, idx: np.ndarray, mesh, rules) -> dict[str, jax.Array]:
  """The global batch of examples `idx`, sharded on 'batch'; this process reads only its own rows.

  read_rows(indices) -> dict of numpy arrays with one row per index (e.g. `TokenExamples.batch`).
  On a pod each host thereby tokenises and copies 1/n_hosts of the batch, not all of it.
  """
  rows = process_rows(len(idx), mesh, rules)
  local = read_rows(idx[rows])
  where = np.full(len(idx), -1, np.int64)
  where[rows] = np.arange(len(rows))

  def shard(index, v):
    # A shard's rows are one contiguous range of the global batch, so they are contiguous in `local` too.
    start, stop, _ = index[0].indices(len(idx))
    return v[where[start]:where[start] + stop - start][(slice(None),) + tuple(index[1:])]

  return {k: jax.make_array_from_callback((len(idx),) + v.shape[1:], parallel.batch_sharding(mesh, rules, v.ndim),
                                          lambda index, v=v: shard(index, v)) for k, v in local.items()}


def batch_shards(batch_size: int, mesh, rules) -> int:
  """How many pieces the mesh cuts a batch's leading 'batch' axis into (its data-parallel shards)."""
  return batch_size // parallel.batch_sharding(mesh, rules, 1).shard_shape((batch_size,))[0]


def process_packed_batch(read_rows, idx: np.ndarray, rows_per_shard: int, pad_id: int, mesh,
                         rules) -> dict[str, jax.Array]:
  """process_batch for a packed per-prompt RM batch (data/packing.py): each data shard's prompts packed into
  its own `rows_per_shard` rows, so a device's packed rows are those of the prompts it holds, and this process
  reads and packs only the shards it holds. [B, ...] fields as process_batch; the packed ones are
  [n_shards * rows_per_shard, T]."""
  from instructrl.data import packing
  n_shards = batch_shards(len(idx), mesh, rules)
  per = len(idx) // n_shards
  rows = process_rows(len(idx), mesh, rules)
  local = read_rows(idx[rows])
  where = np.full(len(idx), -1, np.int64)
  where[rows] = np.arange(len(rows))
  packed = {}

  def shard_of(s):   # shard s's prompts, packed (once per shard, whatever the devices that hold it)
    if s not in packed:
      part = {k: v[where[s * per]:where[s * per] + per] for k, v in local.items()}
      packed[s] = packing.pack_batch(part, rows_per_shard, 1, pad_id, first_shard=s)
    return packed[s]

  def shard(index, key, lead):
    start, stop, _ = index[0].indices(lead)
    size = per if lead == len(idx) else rows_per_shard
    s = start // size
    assert stop - start == size, (key, start, stop, size)   # one device holds one whole data shard
    return shard_of(s)[key][(slice(None),) + tuple(index[1:])]

  shapes = {k: v.shape for k, v in shard_of(int(np.min(np.nonzero(where >= 0)[0])) // per).items()}
  out = {}
  for k, shape in shapes.items():
    lead = n_shards * rows_per_shard if k in packing.PACKED_ROW_KEYS else len(idx)
    out[k] = jax.make_array_from_callback((lead,) + shape[1:], parallel.batch_sharding(mesh, rules, len(shape)),
                                          lambda index, k=k, lead=lead: shard(index, k, lead))
  return out
