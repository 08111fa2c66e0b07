"""PPO / PPO-ptx loss math: GAE against a plain double loop, the KL-penalised rewards, the
clipped policy and value losses on hand-computed numbers (and their zero gradients where
clipped), masked whitening, the k1 KL estimator against the exact KL, linearity of the ptx
gradient, the adaptive KL controller, the weight EMA and the RM ensemble's score."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl.objectives import (adaptive_kl_coef, ema_update, ensemble_score, entropy_from_logits, gae,
                                   kl_penalty_rewards, ppo_policy_loss, ptx_loss, token_nll, value_loss, whiten)

# Jitted once per shape: eager op-by-op dispatch is what makes CPU tests slow.
_gae = jax.jit(gae)
_kl_rewards = jax.jit(kl_penalty_rewards)
_whiten = jax.jit(whiten, static_argnames="shift_mean")
_policy = jax.jit(jax.value_and_grad(ppo_policy_loss, has_aux=True))
_value = jax.jit(jax.value_and_grad(value_loss, has_aux=True))


def ragged_mask(lengths, T):
  return np.arange(T)[None, :] < np.asarray(lengths)[:, None]


# ------------------------------------------------------------------------------------- GAE


def gae_reference(r, v, lengths, discount, lam):
  """A_t = sum_{k=t}^{L-1} (discount lam)^(k-t) delta_k, delta_k = r_k + discount V_{k+1} - V_k, V_L = 0."""
  B, T = r.shape
  adv = np.zeros((B, T))
  for b in range(B):
    L = lengths[b]
    for t in range(L):
      total = 0.0
      for k in range(t, L):
        v_next = v[b, k + 1] if k + 1 < L else 0.0
        total += (discount * lam) ** (k - t) * (r[b, k] + discount * v_next - v[b, k])
      adv[b, t] = total
  ret = np.where(ragged_mask(lengths, T), adv + v, 0.0)
  return adv, ret


@pytest.mark.parametrize("discount", [1.0, 0.9])
@pytest.mark.parametrize("lam", [0.95, 1.0])
def test_gae_matches_double_loop(discount, lam):
  rng = np.random.default_rng(0)
  lengths = [0, 1, 3, 5, 6]                      # empty, one token, ragged, full (T = 6)
  B, T = len(lengths), 6
  mask = ragged_mask(lengths, T)
  r, v = rng.normal(size=(B, T)), rng.normal(size=(B, T))
  want_adv, want_ret = gae_reference(r, v, lengths, discount, lam)
  # Garbage (NaN, huge) in the pads must not reach a real token.
  r_pad = np.where(mask, r, np.nan)
  v_pad = np.where(mask, v, 1e30)
  adv, ret = _gae(jnp.asarray(r_pad, jnp.float32), jnp.asarray(v_pad, jnp.float32), jnp.asarray(mask), discount, lam)
  np.testing.assert_allclose(adv, want_adv, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, atol=1e-5)
  assert np.all(np.asarray(adv)[~mask] == 0) and np.all(np.asarray(ret)[~mask] == 0)
  if discount == 1.0 and lam == 1.0:
    # Monte Carlo: A_t = (sum of rewards from t to the end) - V_t.
    future = np.where(mask, np.cumsum(np.where(mask, r, 0)[:, ::-1], axis=1)[:, ::-1], 0.0)
    np.testing.assert_allclose(adv, np.where(mask, future - v, 0.0), atol=1e-5)
    np.testing.assert_allclose(ret, future, atol=1e-5)


# ------------------------------------------------------------------------ KL-penalty rewards


def test_kl_penalty_rewards_hand_case():
  # Lengths 4 (full), 2, 0, 1; T = 4. logp - ref_logp = 0.5 on every real token of row 0,
  # [1, -1] on row 1, 0.25 on row 3; beta = 0.1, scores [1, 2, 3, 4].
  mask = ragged_mask([4, 2, 0, 1], 4)
  logp = np.array([[-1.0, -1.0, -1.0, -1.0],
                   [-2.0, -3.0, 9.0, 9.0],          # pads hold garbage
                   [5.0, 5.0, 5.0, 5.0],
                   [-0.75, np.nan, 0.0, 0.0]])
  ref = np.array([[-1.5, -1.5, -1.5, -1.5],
                  [-3.0, -2.0, 0.0, 0.0],
                  [0.0, 0.0, 0.0, 0.0],
                  [-1.0, 0.0, np.nan, 0.0]])
  score = np.array([1.0, 2.0, 3.0, 4.0])
  rewards, kl = _kl_rewards(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32),
                            jnp.asarray(score, jnp.float32), jnp.asarray(mask), 0.1)
  # Row 0: -0.1 * 0.5 = -0.05 each, the score 1 on index 3: -0.05 + 1 = 0.95.
  # Row 1: -0.1 * 1 = -0.1, then -0.1 * -1 + 2 = 2.1 on index 1 (its last real token), pads 0.
  # Row 2: no real token, no score anywhere.  Row 3: -0.1 * 0.25 + 4 = 3.975 on index 0.
  want_rewards = [[-0.05, -0.05, -0.05, 0.95], [-0.1, 2.1, 0, 0], [0, 0, 0, 0], [3.975, 0, 0, 0]]
  want_kl = [[0.5, 0.5, 0.5, 0.5], [1.0, -1.0, 0, 0], [0, 0, 0, 0], [0.25, 0, 0, 0]]
  np.testing.assert_allclose(rewards, want_rewards, atol=1e-6)
  np.testing.assert_allclose(kl, want_kl, atol=1e-6)
  # The total reward of each row = score (if any real token) - beta * summed KL.
  np.testing.assert_allclose(np.sum(rewards, axis=1), [1 - 0.2, 2 - 0.0, 0.0, 4 - 0.025], atol=1e-6)


def test_k1_kl_estimate_converges_to_exact_kl():
  """Tokens sampled from pi: the mean of log pi - log pi_ref is KL(pi || pi_ref)."""
  rng = np.random.default_rng(4)

  def log_softmax(z):
    return z - np.log(np.sum(np.exp(z - z.max()))) - z.max()

  logp_v, ref_logp_v = log_softmax(rng.normal(size=5)), log_softmax(rng.normal(size=5))
  exact = float(np.sum(np.exp(logp_v) * (logp_v - ref_logp_v)))
  y_bt = rng.choice(5, size=(400, 500), p=np.exp(logp_v) / np.exp(logp_v).sum())   # 200k tokens from pi
  mask = np.ones(y_bt.shape, bool)
  _, kl_bt = _kl_rewards(jnp.asarray(logp_v[y_bt], jnp.float32), jnp.asarray(ref_logp_v[y_bt], jnp.float32),
                         jnp.zeros(400), jnp.asarray(mask), 0.02)
  kl = np.asarray(kl_bt, np.float64)
  mean, se = kl.mean(), kl.std() / math.sqrt(kl.size)
  assert exact > 0 and mean > 0
  assert abs(mean - exact) < 4 * se, (mean, exact, se)
  assert kl.min() < 0            # single k1 samples can be negative; only the mean is >= 0


# ---------------------------------------------------------------------- clipped policy loss


def test_policy_loss_hand_computed_and_zero_grad_where_clipped():
  # clip = 0.2, so the ratio range is [0.8, 1.2]. Per token (pg = max(-A r, -A clip(r))):
  #   a: A = +1, r = 1.5: max(-1.5, -1.2) = -1.2  clipped (above 1 + c, A > 0): grad 0
  #   b: A = -1, r = 0.5: max( 0.5,  0.8) =  0.8  clipped (below 1 - c, A < 0): grad 0
  #   c: A = +1, r = 0.5: max(-0.5, -0.8) = -0.5  not clipped (pessimistic side): d/dlogp = -A r = -0.5
  #   d: A = -2, r = 1.5: max( 3.0,  2.4) =  3.0  not clipped: d/dlogp = -A r = 3.0
  #   e: A = +2, r = 1.1: inside the range, -2.2, d/dlogp = -2.2
  #   f: pad (garbage).
  # loss = (-1.2 + 0.8 - 0.5 + 3.0 - 2.2) / 5 = -0.1 / 5 = -0.02; clipfrac = 2 / 5 = 0.4;
  # grad = per-token derivative / 5 = [0, 0, -0.1, 0.6, -0.44, 0];
  # ratio_mean = (1.5 + 0.5 + 0.5 + 1.5 + 1.1) / 5 = 1.02.
  ratios = [1.5, 0.5, 0.5, 1.5, 1.1]
  old = np.array([[-1.0, -2.0, -0.5, -3.0, -1.0, 7.0]])
  logp = old.copy()
  logp[0, :5] += np.log(ratios)
  logp[0, 5] = np.nan
  adv = np.array([[1.0, -1.0, 1.0, -2.0, 2.0, np.inf]])
  mask = np.array([[True] * 5 + [False]])
  (loss, m), grad = _policy(jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32),
                            jnp.asarray(adv, jnp.float32), jnp.asarray(mask), 0.2)
  np.testing.assert_allclose(loss, -0.02, atol=1e-6)
  np.testing.assert_allclose(grad, [[0.0, 0.0, -0.1, 0.6, -0.44, 0.0]], atol=1e-6)
  np.testing.assert_allclose(m["clipfrac"], 0.4, atol=1e-6)
  np.testing.assert_allclose(m["ratio_mean"], 1.02, atol=1e-6)
  approxkl = 0.5 * np.mean(np.square(np.log(ratios)))
  np.testing.assert_allclose(m["approxkl"], approxkl, rtol=1e-5)
  assert m["tokens"] == 5


def test_value_loss_hand_computed_and_zero_grad_where_clipped():
  # clip = 0.2; all old values 0, so v_clip = clip(v, -0.2, 0.2). Per token
  # (0.5 * max((v - R)^2, (v_clip - R)^2)):
  #   a: v = +1, R = +1: max(0, (0.2 - 1)^2 = 0.64) = 0.64  clipped (above): grad 0
  #   b: v = -1, R = -1: max(0, (-0.2 + 1)^2 = 0.64) = 0.64  clipped (below): grad 0
  #   c: v = +1, R = 0:  max(1, 0.04) = 1                    not clipped: d/dv = 0.5 * 2 (v - R) = 1
  #   d: v = 0.1, R = 0.5: inside, 0.16                       d/dv = (0.1 - 0.5) = -0.4
  #   e: pad.
  # loss = 0.5 * (0.64 + 0.64 + 1 + 0.16) / 4 = 0.305; vf_clipfrac = 2 / 4;
  # grad = per-token / 4 = [0, 0, 0.25, -0.1, 0].
  v = np.array([[1.0, -1.0, 1.0, 0.1, np.nan]])
  old = np.array([[0.0, 0.0, 0.0, 0.0, 5.0]])
  ret = np.array([[1.0, -1.0, 0.0, 0.5, np.inf]])
  mask = np.array([[True] * 4 + [False]])
  (loss, m), grad = _value(jnp.asarray(v, jnp.float32), jnp.asarray(old, jnp.float32), jnp.asarray(ret, jnp.float32),
                           jnp.asarray(mask), 0.2)
  np.testing.assert_allclose(loss, 0.305, atol=1e-6)
  np.testing.assert_allclose(grad, [[0.0, 0.0, 0.25, -0.1, 0.0]], atol=1e-6)
  np.testing.assert_allclose(m["vf_clipfrac"], 0.5, atol=1e-6)
  # v_old = 0 explains nothing: 1 - Var(R) / Var(R) = 0.
  np.testing.assert_allclose(m["explained_variance"], 0.0, atol=1e-6)


def test_explained_variance_masked():
  rng = np.random.default_rng(1)
  mask = ragged_mask([3, 6, 1], 6)
  ret, old = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
  want = 1 - np.var((ret - old)[mask]) / np.var(ret[mask])
  garbage_old = np.where(mask, old, 1e6)
  (_, m), _ = _value(jnp.asarray(old, jnp.float32), jnp.asarray(garbage_old, jnp.float32),
                     jnp.asarray(ret, jnp.float32), jnp.asarray(mask), 0.2)
  np.testing.assert_allclose(m["explained_variance"], want, rtol=1e-5)
  (_, m), _ = _value(jnp.asarray(ret, jnp.float32), jnp.asarray(ret, jnp.float32),
                     jnp.asarray(ret, jnp.float32), jnp.asarray(mask), 0.2)
  np.testing.assert_allclose(m["explained_variance"], 1.0, atol=1e-6)   # a perfect value function


# -------------------------------------------------------------------------------- whitening


def test_whiten_ignores_pads_and_normalises():
  rng = np.random.default_rng(2)
  mask = ragged_mask([2, 5, 0, 4], 5)
  x = 3.0 + 2.0 * rng.normal(size=(4, 5))
  out = np.asarray(_whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask)))
  other = np.asarray(_whiten(jnp.asarray(np.where(mask, x, 1e6), jnp.float32), jnp.asarray(mask)))
  np.testing.assert_array_equal(out, other)                           # pads change nothing
  assert np.all(out[~mask] == 0)
  np.testing.assert_allclose(out[mask].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(out[mask].std(), 1.0, atol=1e-5)       # biased std (divide by n)
  want = (x[mask] - x[mask].mean()) / np.sqrt(x[mask].var() + 1e-8)
  np.testing.assert_allclose(out[mask], want, rtol=1e-5, atol=1e-5)
  scaled = np.asarray(_whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask), shift_mean=False))
  np.testing.assert_allclose(scaled[mask], want + x[mask].mean(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ entropy and ptx


def test_entropy_from_logits():
  # Uniform over 4: log 4; a near one-hot: ~0; a pad with garbage: ignored. Mean = log(4) / 2.
  logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0], [jnp.nan, 0.0, 0.0, 0.0]]])
  mask = jnp.array([[True, True, False]])
  np.testing.assert_allclose(jax.jit(entropy_from_logits)(logits, mask), math.log(4) / 2, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_entropy_is_of_the_distribution_sampled_at_temperature(temperature):
  """H(softmax(logits / T)) in NumPy, masked mean over real tokens; at T != 1 it differs from T = 1's."""
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 2, (2, 5, 7)).astype(np.float32)
  mask = rng.random((2, 5)) < 0.7
  z = logits / temperature
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = (-(p * np.log(p)).sum(-1))[mask].mean()
  got = float(jax.jit(entropy_from_logits, static_argnums=2)(logits, mask, temperature))
  assert got == pytest.approx(want, rel=1e-5)
  assert abs(got - float(entropy_from_logits(logits, mask))) > 1e-2


def test_ptx_gradient_adds_linearly():
  """grad(ppo + gamma * ptx_sum / count) = grad(ppo) + gamma * grad(ptx_sum / count), so the
  paper's consecutive-step accumulation (C.4) is the same as one combined loss."""
  V, D, gamma = 5, 3, 27.8
  rng = np.random.default_rng(3)       # numpy inputs: eager jax.random ops each compile
  w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
  h_rl, y_rl = jnp.asarray(rng.normal(size=(2, 4, D)), jnp.float32), jnp.asarray(rng.integers(0, V, (2, 4)))
  adv, rl_mask = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32), jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  h_pt, y_pt = jnp.asarray(rng.normal(size=(2, 6, D)), jnp.float32), jnp.asarray(rng.integers(0, V, (2, 6)))
  pt_mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2], bool)

  def logp_of(w, h, y):
    return jnp.take_along_axis(jax.nn.log_softmax(h @ w), y[..., None], axis=-1)[..., 0]

  old_logp = logp_of(w + jnp.asarray(rng.normal(size=(D, V)), jnp.float32), h_rl, y_rl)   # stale: some tokens clip

  def ppo(w):
    return ppo_policy_loss(logp_of(w, h_rl, y_rl), old_logp, adv, rl_mask)[0]

  def ptx(w):
    total, count = ptx_loss(h_pt @ w, y_pt, pt_mask)
    return total / count

  grads = jax.jit(lambda w: (jax.grad(lambda w: ppo(w) + gamma * ptx(w))(w), jax.grad(ppo)(w), jax.grad(ptx)(w)))
  g_sum, g_ppo, g_ptx = grads(w)   # one compile for the three
  clipfrac = jax.jit(lambda w: ppo_policy_loss(logp_of(w, h_rl, y_rl), old_logp, adv, rl_mask)[1]["clipfrac"])(w)
  assert 0 < float(clipfrac) < 1     # both branches of the clip are exercised
  np.testing.assert_allclose(g_sum, g_ppo + gamma * g_ptx, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(g_ptx).sum()) > 0 and float(jnp.abs(g_ppo).sum()) > 0
  np.testing.assert_array_equal(jax.jit(ptx_loss)(h_pt @ w, y_pt, pt_mask), jax.jit(token_nll)(h_pt @ w, y_pt, pt_mask))


# ------------------------------------------------------------- adaptive KL controller, EMA


def test_adaptive_kl_coef_hand_steps():
  # beta 0.2, target 6, horizon 10000, 512 episodes a step: n / horizon = 0.0512.
  #   KL 9:   e = 9/6 - 1 = 0.5 -> clipped 0.2: beta * (1 + 0.2 * 0.0512) = 0.2 * 1.01024 = 0.202048
  #   KL 6.6: e = 0.1:   0.2 * (1 + 0.00512) = 0.201024
  #   KL 6:   e = 0:     0.2
  #   KL 3:   e = -0.5 -> -0.2: 0.2 * (1 - 0.01024) = 0.197952
  for kl, want in [(9.0, 0.202048), (6.6, 0.201024), (6.0, 0.2), (3.0, 0.197952)]:
    np.testing.assert_allclose(adaptive_kl_coef(0.2, kl, 6.0, 10000, 512), want, rtol=1e-6)   # float32
  # Two steps compose multiplicatively: 0.2 * 1.01024 * 0.98976 = 0.19999790...
  coef = adaptive_kl_coef(adaptive_kl_coef(0.2, 100.0, 6.0, 10000, 512), 0.0, 6.0, 10000, 512)
  np.testing.assert_allclose(coef, 0.2 * 1.01024 * 0.98976, rtol=1e-6)
  # Jittable with a traced coefficient.
  np.testing.assert_allclose(jax.jit(adaptive_kl_coef)(jnp.float32(0.2), 9.0, 6.0, 10000, 512), 0.202048, rtol=1e-6)


def test_ema_closed_form():
  decay, n = 0.992, 20
  ema = {"a": jnp.full((3,), 2.0), "b": {"c": jnp.zeros((2,), jnp.bfloat16)}}
  new = {"a": jnp.zeros((3,)), "b": {"c": jnp.ones((2,), jnp.bfloat16)}}
  step = jax.jit(ema_update)
  for _ in range(n):
    ema = step(ema, new, decay)
  # ema_n = c + decay^n (ema_0 - c): a: 0 + 0.992^20 * 2; c: 1 + 0.992^20 * (0 - 1).
  np.testing.assert_allclose(ema["a"], np.full(3, 2.0 * decay**n), rtol=1e-5)
  assert ema["b"]["c"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(ema["b"]["c"], np.float32), 1.0 - decay**n, atol=2e-2)


def test_ensemble_score_closed_form():
  # 3 members x 3 episodes. Episode 0 scores 1, 3, 2: mean 2, population std sqrt((1 + 1 + 0) / 3) = sqrt(2/3);
  # episodes 1 and 2: the members agree, so no penalty.
  s = jnp.array([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [2.0, 0.0, 2.0]])
  score, std = ensemble_score(s, 1.5)
  np.testing.assert_allclose(std, [np.sqrt(2 / 3), 0.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(score, [2.0 - 1.5 * np.sqrt(2 / 3), 0.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(ensemble_score(s, 0.0)[0], [2.0, 0.0, 2.0], rtol=1e-6)     # coef 0: the plain mean
  one, std1 = ensemble_score(s[:1], 3.0)                                                 # one member: its score
  np.testing.assert_array_equal(one, s[0])
  np.testing.assert_array_equal(std1, 0.0)
