"""Gradient accumulation over micro-batches: one optimizer step's batch in n passes of B/n rows.

Every training loss here is a mean over the whole batch (tokens, prompts with a pair, pairs) whose
count depends on the labels and masks only, not on the params. So each micro-batch's share (its sum
over the whole batch's count, or its sums divided once after the last) can be differentiated on its
own and the shares' gradients summed: the batch's gradient, up to the order of the float sums. The
micro-batches run as one `lax.scan` (one compiled body), so the program holds one micro-batch's
activations and one gradient accumulator, then the step makes one optimizer update. The metrics are
computed after the scan from the micro-batches' small outputs (sums, per-row scores, per-token
log-probs), with the same objective functions as the full batch: they equal its metrics.

Rows: micro-batch i takes rows i, n + i, 2n + i, ... ([B, ...] -> [B/n, n, ...] -> [n, B/n, ...]). A
device holding a contiguous block of B/D rows of the batch (the 'batch' sharding over D data-parallel
devices) thereby holds B/(nD) rows of every micro-batch: the split moves no row between devices. It
needs B/n to divide over the D devices (config_check). Dropout draws its masks per micro-batch (the
step's key folded with the micro-batch's index), so with dropout on the accumulated step is another
draw, not the full batch's.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def split(tree, n: int):
  """[B, ...] leaves -> [n, B/n, ...]: micro-batch i is rows i, n + i, ...; its rows stay on 'batch'."""
  def one(x):
    if x.shape[0] % n:
      raise ValueError(f"a batch of {x.shape[0]} rows does not split into {n} micro-batches")
    y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(y, (None, "batch") + (None,) * (x.ndim - 1))
  return jax.tree.map(one, tree)


def join(tree):
  """split's inverse on per-row outputs: [n, B/n, ...] -> [B, ...] in the batch's row order."""
  return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(y.shape[0] * y.shape[1], *y.shape[2:]), tree)


def accumulate(share: Callable, params, batch, n: int, rng=None, shardings=None) -> tuple[Any, Any, Any]:
  """The gradients of share(params, micro_batch, key) -> (scalar, aux) summed over the n micro-batches.

  Returns (grads, shares [n], aux with a leading [n] axis). key is rng folded with the micro-batch's
  index (None without rng). `params` may be a tuple of trees (PPO: policy and value in one pass).
  shardings: the params' (a matching tree), kept on the accumulator: XLA does not carry them over to a
  zeros buffer, and a replicated accumulator holds a whole fp32 copy of every trained model a device.
  """
  grad_fn = jax.value_and_grad(share, has_aux=True)
  keep = (lambda t: t) if shardings is None else (lambda t: jax.lax.with_sharding_constraint(t, shardings))

  def body(acc, xs):
    mb, i = xs
    (value, aux), grads = grad_fn(params, mb, None if rng is None else jax.random.fold_in(rng, i))
    return keep(jax.tree.map(jnp.add, acc, grads)), (value, aux)

  zeros = keep(jax.tree.map(jnp.zeros_like, params))
  grads, (values, aux) = jax.lax.scan(body, zeros, (split(batch, n), jnp.arange(n)))
  return grads, values, aux
