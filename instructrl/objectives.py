"""Pure loss math, arrays in and (sum, count) or scalars out, readable beside the paper.

Token losses return (sum, count) rather than a mean so that averaging across devices,
microbatches and hosts stays exact; the caller divides once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def first_argmax(x, axis: int = -1):
  """jnp.argmax (the first index of the maximum) as a max and a min over the indices attaining it.

  Why: XLA:CPU runs argmax as one variadic (value, index) reduce, ~4x slower than these two plain
  reduces (44 vs 11 us at [16, 1024] on a CPU; BENCHMARKS.md); used by the sampler's draw and the
  train steps' accuracy. A row with a NaN has no index equal to its max; it gets the last index
  rather than an out-of-range one.
  """
  n = x.shape[axis]
  top = jnp.max(x, axis=axis, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
  return jnp.minimum(jnp.min(jnp.where(x == top, iota, n), axis=axis), n - 1)


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
  hit_bt = (first_argmax(logits_btv) == targets_bt).astype(jnp.float32)
  mask_bt = mask_bt.astype(jnp.float32)
  return jnp.sum(hit_bt * mask_bt), jnp.sum(mask_bt)


def counted_pairs(ranks_bk, mask_bk):
  """[B, K, K] bool: pair (i, j) counts when both responses are real and rank_i < rank_j (ranking_loss)."""
  mask_bk = mask_bk.astype(bool)
  return mask_bk[:, :, None] & mask_bk[:, None, :] & (ranks_bk[:, :, None] < ranks_bk[:, None, :])


def ranked_prompts(ranks_bk, mask_bk):
  """Prompts with at least one counted pair: the count ranking_loss's batch mean divides by. It depends
  on the labels only, so micro-batches of one batch can all divide by the batch's (see `prompts` below)."""
  return jnp.sum(jnp.any(counted_pairs(ranks_bk, mask_bk), axis=(1, 2))).astype(jnp.float32)


def ranking_loss(rewards_bk, ranks_bk, mask_bk, pair_weight_bkk=None, prompts=None):
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

  pair_weight_bkk (not in the paper; rm.policy_pair_weight): a weight per pair (i, j); each prompt's
  loss becomes the weighted mean over its counted pairs (None: every pair weighs 1, the paper's loss).

  prompts: the count the loss divides by instead of this batch's (ranked_prompts): a micro-batch passes
  its whole batch's, so the micro-batches' losses (and gradients) add up to the batch's. Metrics are
  always this array's own.

  Metrics: accuracy = fraction of all counted pairs with r_w > r_l (strictly; an exact tie in
  reward counts as wrong; unweighted), pairs and prompts counted, reward mean / std over real responses.
  """
  mask_bk = mask_bk.astype(bool)
  # Zero the padded rewards BEFORE any arithmetic: a NaN or inf in a padded slot would otherwise
  # leak into the loss (NaN * 0 = NaN) and into the gradient; `where` selects, never multiplies.
  rewards_bk = jnp.where(mask_bk, rewards_bk.astype(jnp.float32), 0.0)
  pair_bkk = counted_pairs(ranks_bk, mask_bk)
  diff_bkk = rewards_bk[:, :, None] - rewards_bk[:, None, :]      # r_i - r_j: winner minus loser
  logp_bkk = jnp.where(pair_bkk, jax.nn.log_sigmoid(diff_bkk), 0.0)
  pairs_b = jnp.sum(pair_bkk, axis=(1, 2)).astype(jnp.float32)
  has_pairs_b = pairs_b > 0
  if pair_weight_bkk is None:
    loss_b = -jnp.sum(logp_bkk, axis=(1, 2)) / jnp.maximum(pairs_b, 1.0)
  else:
    w_bkk = jnp.where(pair_bkk, pair_weight_bkk.astype(jnp.float32), 0.0)
    loss_b = -jnp.sum(w_bkk * logp_bkk, axis=(1, 2)) / jnp.maximum(jnp.sum(w_bkk, axis=(1, 2)), 1e-12)
  prompts_here = jnp.sum(has_pairs_b).astype(jnp.float32)
  loss = jnp.sum(jnp.where(has_pairs_b, loss_b, 0.0)) / jnp.maximum(prompts_here if prompts is None else prompts, 1.0)

  pairs = jnp.sum(pairs_b)
  hits = jnp.sum(pair_bkk & (diff_bkk > 0)).astype(jnp.float32)
  real = mask_bk.astype(jnp.float32)
  n_real = jnp.maximum(jnp.sum(real), 1.0)
  mean = jnp.sum(rewards_bk * real) / n_real
  var = jnp.sum(jnp.square(rewards_bk - mean) * real) / n_real
  metrics = {"loss": loss, "accuracy": hits / jnp.maximum(pairs, 1.0), "pairs": pairs, "prompts": prompts_here,
             "reward_mean": mean, "reward_std": jnp.sqrt(var)}
  return loss, metrics


def pairwise_loss(rewards_chosen_b, rewards_rejected_b, weight_b=None, total=None):
  """-log sigmoid(r_chosen - r_rejected), one row per comparison, mean over rows: (loss, metrics).

  This is the ablation the paper warns against (section 3.5): every comparison shuffled into
  the dataset as an independent example, so each response is forwarded and updated K - 1
  times per epoch. Also the plain formulation for K = 2 data (HH-RLHF style pairs).
  `weight_b` (e.g. a 0/1 mask for padded rows) makes it a weighted mean. total: the weight the loss
  divides by instead of this array's (a micro-batch passes its whole batch's); metrics are this array's.
  """
  chosen_b = rewards_chosen_b.astype(jnp.float32)
  rejected_b = rewards_rejected_b.astype(jnp.float32)
  w_b = jnp.ones_like(chosen_b) if weight_b is None else weight_b.astype(jnp.float32)
  keep_b = w_b > 0
  # As in ranking_loss: sanitise rows of weight 0 so garbage there cannot turn into NaN.
  chosen_b, rejected_b = jnp.where(keep_b, chosen_b, 0.0), jnp.where(keep_b, rejected_b, 0.0)
  diff_b = chosen_b - rejected_b
  total_here = jnp.maximum(jnp.sum(w_b), 1e-12)
  loss = -jnp.sum(w_b * jax.nn.log_sigmoid(diff_b)) / (total_here if total is None else jnp.maximum(total, 1e-12))
  both = jnp.concatenate([chosen_b, rejected_b])
  w2 = jnp.concatenate([w_b, w_b])
  mean = jnp.sum(both * w2) / (2 * total_here)
  var = jnp.sum(jnp.square(both - mean) * w2) / (2 * total_here)
  metrics = {"loss": loss, "accuracy": jnp.sum(w_b * (diff_b > 0)) / total_here, "pairs": jnp.sum(w_b),
             "margin": jnp.sum(w_b * diff_b) / total_here, "reward_mean": mean, "reward_std": jnp.sqrt(var)}
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


# ---------------------------------------------------------------------------------------------
# PPO / PPO-ptx (paper section 3.5, appendix C.4).
#
#   objective(phi) = E_{(x,y) ~ pi_RL}[r_theta(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x))]
#                    + gamma * E_{x ~ D_pretrain}[log pi_RL(x)]
#
# A bandit episode: the prompt is the state, the response tokens are the actions, the RM scores
# the finished response and the episode ends. Where the paper gives no number we follow
# lm-human-preferences (Ziegler et al. 2019; Stiennon et al. 2020): GAE lambda 0.95, gamma 1,
# policy and value clip 0.2, advantages whitened per batch, approxkl = 0.5 * E[(dlogp)^2].
# All arrays are [B, T] over the response tokens only (B episodes, T the padded response
# length); `mask_bt` (bool or 0/1 float) marks real tokens. Responses are right-padded: a
# row's real tokens come first. Padded slots may hold anything, NaN included: they are
# removed with `where` (selection) before any arithmetic, never by multiplying with 0.
# ---------------------------------------------------------------------------------------------


def _masked_mean(x_bt, mask_bt, tokens=None):
  """Mean of x over real tokens (0 when there are none); `x_bt` must be finite where masked.

  tokens: the count to divide by instead of this array's real tokens (a micro-batch passes its whole
  batch's, so that the micro-batches' means add up to the batch's)."""
  m = mask_bt.astype(jnp.float32)
  return jnp.sum(jnp.where(mask_bt, x_bt, 0.0)) / jnp.maximum(jnp.sum(m) if tokens is None else tokens, 1.0)


def _masked_var(x_bt, mask_bt):
  """Biased (population, divide-by-n) variance over real tokens, as tf.nn.moments."""
  mean = _masked_mean(x_bt, mask_bt)
  return _masked_mean(jnp.square(jnp.where(mask_bt, x_bt, mean) - mean), mask_bt)


def ensemble_score(scores_nb, uncertainty_coef):
  """The members' scores [N, B] -> mean - coef * std over members (Coste et al. 2023's uncertainty-weighted
  objective; coef 0: the plain mean) and the std. With one member the std is 0 and this is its score."""
  mean, std = scores_nb.mean(0), scores_nb.std(0)
  return mean - uncertainty_coef * std, std


def kl_penalty_rewards(logp_bt, ref_logp_bt, score_b, mask_bt, kl_coef):
  """Per-token rewards of the bandit episode: (rewards_bt, kl_bt).

  rewards_t = -beta * (log pi_RL(y_t | .) - log pi_SFT(y_t | .))   on every real token,
            + r_theta(x, y)                                        on the last real token only,
  as lm-human-preferences (`rewards = -kl_coef * kl; rewards[:, -1] += scores`), except that
  the score goes to each row's last REAL token (index of the last True of the mask), not to
  column T - 1, so ragged right-padded responses are scored where they end; a row with no
  real token gets no score at all. Pads get reward 0.

  kl_bt = log pi_RL(y_t) - log pi_SFT(y_t), the "k1" estimator of KL(pi_RL || pi_SFT): with
  y_t sampled from pi_RL (at the temperature the log-probs are taken at; 1 in the paper) its
  expectation is exactly the per-token KL, and its sum over a response is an unbiased
  estimate of the sequence KL. A single sample can be negative; only its mean is >= 0.
  `logp_bt` must be the log-probs of the policy that SAMPLED (the rollout policy), taken
  without gradient; `kl_coef` (beta; 0.02 in the paper, C.4) may be a traced scalar, e.g. the
  output of adaptive_kl_coef.
  """
  mask_bt = mask_bt.astype(bool)
  kl_bt = jnp.where(mask_bt, logp_bt.astype(jnp.float32) - ref_logp_bt.astype(jnp.float32), 0.0)
  T = mask_bt.shape[-1]
  last_b = T - 1 - jnp.argmax(mask_bt[:, ::-1], axis=-1)          # index of the last True
  has_b = jnp.any(mask_bt, axis=-1)
  at_end_bt = (jnp.arange(T)[None, :] == last_b[:, None]) & has_b[:, None]
  score_b = score_b.astype(jnp.float32)
  rewards_bt = -kl_coef * kl_bt + jnp.where(at_end_bt, score_b[:, None], 0.0)
  return rewards_bt, kl_bt


def gae(rewards_bt, values_bt, mask_bt, gamma=1.0, lam=0.95):
  """Generalised advantage estimation (Schulman et al. 2016): (advantages_bt, returns_bt).

    delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1},
  computed by a reverse `lax.scan` over time. The episode ends after the last real token:
  V and A after it are 0 (bandit episode; no bootstrap). A masked position restarts the
  recursion with V = A = 0, so pads get advantage 0 and, whatever they hold, never reach a
  real token (with right padding this is exactly "the value after the last token is 0").
  returns_t = A_t + V_t on real tokens (the lambda-return, the value target), 0 on pads.
  Defaults: gamma 1 (paper C.4, "no discount"), lam 0.95 (lm-human-preferences).
  With gamma = lam = 1, A_t = sum_{t' >= t} r_t' - V_t (Monte Carlo).
  """
  mask_bt = mask_bt.astype(bool)
  r_tb = jnp.where(mask_bt, rewards_bt.astype(jnp.float32), 0.0).T
  v_tb = jnp.where(mask_bt, values_bt.astype(jnp.float32), 0.0).T
  m_tb = mask_bt.T

  def step(carry, xs):
    next_v_b, next_a_b = carry
    r_b, v_b, m_b = xs
    delta_b = r_b + gamma * next_v_b - v_b
    a_b = jnp.where(m_b, delta_b + gamma * lam * next_a_b, 0.0)
    return (v_b, a_b), a_b          # on pads v_b = a_b = 0: the recursion restarts

  zeros_b = jnp.zeros(r_tb.shape[1], jnp.float32)
  _, adv_tb = jax.lax.scan(step, (zeros_b, zeros_b), (r_tb, v_tb, m_tb), reverse=True)
  adv_bt = adv_tb.T
  return adv_bt, jnp.where(mask_bt, adv_bt + v_tb.T, 0.0)


def whiten(x_bt, mask_bt, shift_mean=True, eps=1e-8):
  """(x - mean) / sqrt(var + eps) over real tokens; pads come out 0.

  As lm-human-preferences `whiten` (applied to the advantages before the PPO update): BIASED
  variance (divide by n, tf.nn.moments), eps 1e-8 inside the sqrt; with shift_mean=False the
  mean is added back (scale only; a Python bool, static under jit). TRL's masked_whiten divides by n - 1 instead; for batches of
  thousands of tokens the difference is negligible, and divide-by-n keeps one-token batches
  finite. Statistics are over the whole array: under jit with a sharded batch that is the
  global batch, as lm-human-preferences whitens over all ranks' rollouts.
  """
  mask_bt = mask_bt.astype(bool)
  x_bt = jnp.where(mask_bt, x_bt.astype(jnp.float32), 0.0)
  mean = _masked_mean(x_bt, mask_bt)
  out_bt = (x_bt - mean) * jax.lax.rsqrt(_masked_var(x_bt, mask_bt) + eps)
  if not shift_mean:
    out_bt = out_bt + mean
  return jnp.where(mask_bt, out_bt, 0.0)


def ppo_policy_loss(logp_bt, old_logp_bt, adv_bt, mask_bt, clip=0.2, tokens=None):
  """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), masked token mean: (loss, metrics).

    ratio = exp(logp - old_logp),   loss = E_t[max(-A ratio, -A clip(ratio, 1 - c, 1 + c))]
  (the negated min, minimised). Where the clipped term wins (ratio past 1 + c with A > 0, or
  below 1 - c with A < 0) it is constant in logp: those tokens give no gradient. The mean is
  over every real token of the batch (lm-human-preferences averages over all tokens).
  `adv_bt` is treated as data (stop_gradient), already whitened by the caller.

  Metrics: clipfrac = fraction of real tokens whose clipped term is strictly larger (clip
  active), approxkl = 0.5 * E[(logp - old_logp)^2] (lm-human-preferences' estimator of
  KL(old || new), second order in the log-ratio), ratio_mean, tokens (the count, for callers
  that weight microbatches). tokens: the count the loss divides by instead of this array's (a
  micro-batch passes its minibatch's, _masked_mean); the metrics are this array's.
  """
  mask_bt = mask_bt.astype(bool)
  dlogp_bt = jnp.where(mask_bt, logp_bt.astype(jnp.float32) - old_logp_bt.astype(jnp.float32), 0.0)
  adv_bt = jax.lax.stop_gradient(jnp.where(mask_bt, adv_bt.astype(jnp.float32), 0.0))
  ratio_bt = jnp.exp(dlogp_bt)
  pg1_bt = -adv_bt * ratio_bt
  pg2_bt = -adv_bt * jnp.clip(ratio_bt, 1.0 - clip, 1.0 + clip)
  loss = _masked_mean(jnp.maximum(pg1_bt, pg2_bt), mask_bt, tokens)
  metrics = {
      "policy_loss": loss,
      "clipfrac": _masked_mean((pg2_bt > pg1_bt).astype(jnp.float32), mask_bt),
      "approxkl": 0.5 * _masked_mean(jnp.square(dlogp_bt), mask_bt),
      "ratio_mean": _masked_mean(ratio_bt, mask_bt),
      "tokens": jnp.sum(mask_bt.astype(jnp.float32)),
  }
  return loss, metrics


def value_loss(values_bt, old_values_bt, returns_bt, mask_bt, clip=0.2, tokens=None):
  """Clipped value loss, masked token mean: (loss, metrics).

    v_clip = v_old + clip(v - v_old, -c, c),   loss = 0.5 E_t[max((v - R)^2, (v_clip - R)^2)]
  as lm-human-preferences (cliprange_value 0.2; the paper gives no value clip) and OpenAI
  baselines ppo2: where the clipped error is larger the token gives no gradient, so the value
  function moves at most c from its rollout value per update. `returns_bt` are targets (no
  gradient). The paper trains a separate value network (C.4), so the caller applies the value
  learning rate; there is no vf_coef here.

  Metrics: vf_clipfrac (fraction of real tokens where the clipped error is strictly larger),
  explained_variance = 1 - Var(R - v_old) / Var(R) over real tokens (biased variances; 0 when
  Var(R) = 0, where baselines returns NaN, so NaN checks stay quiet), value_mean, return_mean.
  tokens: as ppo_policy_loss's (the loss only).
  """
  mask_bt = mask_bt.astype(bool)
  v_bt = jnp.where(mask_bt, values_bt.astype(jnp.float32), 0.0)
  v_old_bt = jnp.where(mask_bt, old_values_bt.astype(jnp.float32), 0.0)
  ret_bt = jax.lax.stop_gradient(jnp.where(mask_bt, returns_bt.astype(jnp.float32), 0.0))
  v_clip_bt = v_old_bt + jnp.clip(v_bt - v_old_bt, -clip, clip)
  vf1_bt = jnp.square(v_bt - ret_bt)
  vf2_bt = jnp.square(v_clip_bt - ret_bt)
  loss = 0.5 * _masked_mean(jnp.maximum(vf1_bt, vf2_bt), mask_bt, tokens)
  var_ret = _masked_var(ret_bt, mask_bt)
  ev = jnp.where(var_ret > 0, 1.0 - _masked_var(ret_bt - v_old_bt, mask_bt) / jnp.where(var_ret > 0, var_ret, 1.0), 0.0)
  metrics = {
      "value_loss": loss,
      "vf_clipfrac": _masked_mean((vf2_bt > vf1_bt).astype(jnp.float32), mask_bt),
      "explained_variance": ev,
      "value_mean": _masked_mean(v_bt, mask_bt),
      "return_mean": _masked_mean(ret_bt, mask_bt),
  }
  return loss, metrics


def token_entropy(logits_btv, temperature: float = 1.0):
  """H(softmax(logits / T)) = -sum_v p_v log p_v per token [B, T], in nats."""
  logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.sum(jnp.exp(logp_btv) * logp_btv, axis=-1)


def mean_entropy(ent_bt, mask_bt):
  """token_entropy's mean over real tokens."""
  return _masked_mean(ent_bt, mask_bt.astype(bool))


def entropy_from_logits(logits_btv, mask_bt, temperature: float = 1.0):
  """Mean over real tokens of H(softmax(logits / T)) = -sum_v p_v log p_v, in nats: the entropy of the
  distribution the policy samples from at temperature T (a diagnostic: the paper uses no entropy bonus,
  nor does lm-human-preferences' default)."""
  return mean_entropy(token_entropy(logits_btv, temperature), mask_bt)


def ptx_loss(logits_btv, targets_bt, mask_bt):
  """The pretraining term of PPO-ptx as a loss, -log pi_RL(x) over pretraining tokens: (sum, count).

  The caller adds gamma * sum / count to the PPO loss, or (as the paper, C.4) computes the two
  gradients in consecutive steps and accumulates gamma times the pretraining one (gamma 27.8):
  the same thing, gradients being linear.
  """
  return token_nll(logits_btv, targets_bt, mask_bt)


def adaptive_kl_coef(coef, current_kl, target, horizon, n_steps):
  """One update of Ziegler et al. (2019)'s AdaptiveKLController, as a pure function.

    e = clip(KL / KL_target - 1, -0.2, 0.2),    beta <- beta * (1 + e * n_steps / horizon)
  `current_kl` is the mean per-episode KL of the last rollout batch (sum of kl_bt over a
  response), `n_steps` the episodes in it. The paper itself uses a fixed beta (0.02, C.4); this
  is the option lm-human-preferences offers (e.g. target 6 nats, horizon 10000).
  """
  err = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
  return coef * (1.0 + err * n_steps / horizon)


def ema_update(ema_tree, new_tree, decay):
  """ema <- decay * ema + (1 - decay) * new, leaf by leaf, in each EMA leaf's dtype.

  The paper keeps an exponential moving average of the PPO weights with decay 0.992 (C.4);
  no bias correction (the EMA starts from the initial weights, not from zero). After n
  updates with a constant input c: ema_n = c + decay^n (ema_0 - c). PPO calls it once per
  iteration or once per optimizer update (ppo.ema_every), which sets what n counts.
  """
  return jax.tree.map(lambda e, n: (decay * e + (1.0 - decay) * n).astype(e.dtype), ema_tree, new_tree)
