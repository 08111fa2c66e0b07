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


def ranking_loss(rewards_bk, ranks_bk, mask_bk):
  """The reward model's K-choose-2 loss, one batch element per prompt: (loss, metrics).

  loss = -1/C(K,2) * E_{(x, y_w, y_l)}[log sigmoid(r(x, y_w) - r(x, y_l))]   (paper, eq. 1)

  The paper puts all C(K,2) comparisons of a prompt in one batch element so that each response
  is forwarded once (K forward passes instead of 2 * C(K,2)) and the comparisons of one prompt,
  which are strongly correlated, make one gradient step rather than K - 1 steps per response
  (which overfits). So the rewards come in as [B, K_max], one per response, and the pairs are
  built here from a pairwise difference matrix [B, K, K]:
    pair (i, j) counts when both responses are real and rank_i < rank_j (i preferred; rank 0
    is the labeler's best). Equal ranks (ties) are not counted, as in the paper.
  Each prompt's loss is the mean over its counted pairs (= the 1/C(K,2) factor without ties);
  the batch loss is the mean over prompts with at least one pair, so a prompt weighs the same
  whatever its K, and padded slots (mask False) never matter, whatever their reward or rank.

  Metrics: accuracy = fraction of all counted pairs with r_w > r_l (strictly; an exact tie in
  reward counts as wrong), pairs and prompts counted, reward mean / std over real responses.
  """
  mask_bk = mask_bk.astype(bool)
  # Zero the padded rewards BEFORE any arithmetic: a NaN or inf in a padded slot would otherwise
  # leak into the loss (NaN * 0 = NaN) and into the gradient; `where` selects, never multiplies.
  rewards_bk = jnp.where(mask_bk, rewards_bk.astype(jnp.float32), 0.0)
  pair_bkk = (mask_bk[:, :, None] & mask_bk[:, None, :] & (ranks_bk[:, :, None] < ranks_bk[:, None, :]))
  diff_bkk = rewards_bk[:, :, None] - rewards_bk[:, None, :]      # r_i - r_j: winner minus loser
  logp_bkk = jnp.where(pair_bkk, jax.nn.log_sigmoid(diff_bkk), 0.0)
  pairs_b = jnp.sum(pair_bkk, axis=(1, 2)).astype(jnp.float32)
  has_pairs_b = pairs_b > 0
  loss_b = -jnp.sum(logp_bkk, axis=(1, 2)) / jnp.maximum(pairs_b, 1.0)
  prompts = jnp.sum(has_pairs_b).astype(jnp.float32)
  loss = jnp.sum(jnp.where(has_pairs_b, loss_b, 0.0)) / jnp.maximum(prompts, 1.0)

  pairs = jnp.sum(pairs_b)
  hits = jnp.sum(pair_bkk & (diff_bkk > 0)).astype(jnp.float32)
  real = mask_bk.astype(jnp.float32)
  n_real = jnp.maximum(jnp.sum(real), 1.0)
  mean = jnp.sum(rewards_bk * real) / n_real
  var = jnp.sum(jnp.square(rewards_bk - mean) * real) / n_real
  metrics = {"loss": loss, "accuracy": hits / jnp.maximum(pairs, 1.0), "pairs": pairs, "prompts": prompts,
             "reward_mean": mean, "reward_std": jnp.sqrt(var)}
  return loss, metrics


def pairwise_loss(rewards_chosen_b, rewards_rejected_b, weight_b=None):
  """-log sigmoid(r_chosen - r_rejected), one row per comparison, mean over rows: (loss, metrics).

  This is the ablation the paper warns against (section 3.5): every comparison shuffled into
  the dataset as an independent example, so each response is forwarded and updated K - 1
  times per epoch. Also the plain formulation for K = 2 data (HH-RLHF style pairs).
  `weight_b` (e.g. a 0/1 mask for padded rows) makes it a weighted mean.
  """
  chosen_b = rewards_chosen_b.astype(jnp.float32)
  rejected_b = rewards_rejected_b.astype(jnp.float32)
  w_b = jnp.ones_like(chosen_b) if weight_b is None else weight_b.astype(jnp.float32)
  keep_b = w_b > 0
  # As in ranking_loss: sanitise rows of weight 0 so garbage there cannot turn into NaN.
  chosen_b, rejected_b = jnp.where(keep_b, chosen_b, 0.0), jnp.where(keep_b, rejected_b, 0.0)
  diff_b = chosen_b - rejected_b
  total = jnp.maximum(jnp.sum(w_b), 1e-12)
  loss = -jnp.sum(w_b * jax.nn.log_sigmoid(diff_b)) / total
  both = jnp.concatenate([chosen_b, rejected_b])
  w2 = jnp.concatenate([w_b, w_b])
  mean = jnp.sum(both * w2) / (2 * total)
  var = jnp.sum(jnp.square(both - mean) * w2) / (2 * total)
  metrics = {"loss": loss, "accuracy": jnp.sum(w_b * (diff_b > 0)) / total, "pairs": jnp.sum(w_b),
             "margin": jnp.sum(w_b * diff_b) / total, "reward_mean": mean, "reward_std": jnp.sqrt(var)}
  return loss, metrics


def ranked_to_pairs(ranking) -> list[tuple[int, int]]:
  """All C(K,2) (winner_idx, loser_idx) comparisons of one ranking (response indices, best first).

  The data path of the independent-pairs ablation (pairwise_loss); the main path never expands
  pairs and uses ranking_loss on one [K] row per prompt instead.
  """
  order = [int(i) for i in ranking]
  if sorted(order) != list(range(len(order))):
    raise ValueError(f"ranking must be a permutation of range({len(order)}), got {order}")
  return [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
