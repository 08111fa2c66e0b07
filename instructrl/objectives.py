"""Pure loss math, arrays in and (sum, count) or scalars out, readable beside the paper.

Token losses return (sum, count) rather than a mean so that averaging across devices,
microbatches and hosts stays exact; the caller divides once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_btv, targets_bt, mask_bt):
  """Next-token negative log-likelihood summed over masked tokens: (sum, count).

  SFT uses it with the mask on response tokens only (and the EOS that ends them); pretraining
  and the ptx term use it with the mask on every real token.
  """
  logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  nll_bt = -jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
  mask_bt = mask_bt.astype(jnp.float32)
  return jnp.sum(nll_bt * mask_bt), jnp.sum(mask_bt)


def token_accuracy(logits_btv, targets_bt, mask_bt):
  """Greedy next-token hits over masked tokens: (hits, count)."""
  hit_bt = (jnp.argmax(logits_btv, axis=-1) == targets_bt).astype(jnp.float32)
  mask_bt = mask_bt.astype(jnp.float32)
  return jnp.sum(hit_bt * mask_bt), jnp.sum(mask_bt)
