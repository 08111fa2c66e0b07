"""The RM's K-choose-2 ranking loss: hand-computed cases, a naive per-comparison loop, masking,
order invariance, and one forward per response vs one per comparison with a real Decoder."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl.data.rankings import ranked_examples
from instructrl.models.config import ModelConfig
from instructrl.models.transformer import Decoder
from instructrl.objectives import pairwise_loss, ranked_to_pairs, ranking_loss

# softplus(-x) = -log sigmoid(x), by hand: s(1) = log(1 + e^-1) = 0.3132616875,
# s(2) = log(1 + e^-2) = 0.1269280110, s(0) = log 2 = 0.6931471806;
# sigmoid(-1) = 1 / (1 + e) = 0.2689414214, sigmoid(-2) = 0.1192029220.
# Jitted (one compile per shape): op-by-op eager dispatch is what makes CPU tests slow.
_value_and_grad = jax.jit(jax.value_and_grad(ranking_loss, has_aux=True))


def loss_grad(rewards, ranks, mask):
  """((loss, metrics), d loss / d rewards) of ranking_loss."""
  return _value_and_grad(jnp.asarray(rewards, jnp.float32), jnp.asarray(ranks), jnp.asarray(mask))


S1, S2, S0 = 0.31326168751822286, 0.1269280110429725, 0.6931471805599453
SIG_M1, SIG_M2 = 0.2689414213699951, 0.11920292202211755

# K = 2: rewards [1, 0], response 0 preferred: loss = s(1); d/dr_w = -sigmoid(-1), d/dr_l = +sigmoid(-1).
K2 = dict(r=[1.0, 0.0], ranks=[0, 1], loss=S1, grad=[-SIG_M1, SIG_M1], acc=1.0)
# K = 3: rewards [2, 0, 1], labeler order 0 > 2 > 1 (ranks [0, 2, 1]). Pairs (w, l, r_w - r_l):
# (0, 2, 1), (0, 1, 2), (2, 1, 1): loss = (2 s(1) + s(2)) / 3 = 0.2511504620.
# Grads: r0 = -(sigmoid(-1) + sigmoid(-2)) / 3, r1 = +(sigmoid(-2) + sigmoid(-1)) / 3, r2 = 0 (wins one, loses one).
K3 = dict(r=[2.0, 0.0, 1.0], ranks=[0, 2, 1], loss=0.25115046202647273,
          grad=[-(SIG_M1 + SIG_M2) / 3, (SIG_M1 + SIG_M2) / 3, 0.0], acc=1.0)
# K = 4: rewards [1, 0, 0, -1], order 0 > 1 > 2 > 3. Differences: (0,1) 1, (0,2) 1, (0,3) 2, (1,2) 0,
# (1,3) 1, (2,3) 1: loss = (4 s(1) + s(2) + s(0)) / 6 = 0.3455203236; accuracy 5/6 (a reward tie is wrong).
# Grads (each pair contributes -sigmoid(-d)/6 to w, +sigmoid(-d)/6 to l; sigmoid(0) = 1/2):
# r0 = -(2 sig(-1) + sig(-2)) / 6; r1 = (sig(-1) - 1/2 - sig(-1)) / 6 = -1/12; r2 = (sig(-1) + 1/2 - sig(-1)) / 6 = 1/12;
# r3 = (sig(-2) + 2 sig(-1)) / 6.
K4 = dict(r=[1.0, 0.0, 0.0, -1.0], ranks=[0, 1, 2, 3], loss=0.3455203236126349,
          grad=[-(2 * SIG_M1 + SIG_M2) / 6, -1 / 12, 1 / 12, (2 * SIG_M1 + SIG_M2) / 6], acc=5 / 6)


def _row(case):
  return (jnp.asarray([case["r"]], jnp.float32), jnp.asarray([case["ranks"]], jnp.int32),
          jnp.ones((1, len(case["r"])), bool))


@pytest.mark.parametrize("case", [K2, K3, K4], ids=["K2", "K3", "K4"])
def test_hand_computed_single_prompt(case):
  r, ranks, mask = _row(case)
  (loss, m), grad = loss_grad(r, ranks, mask)
  np.testing.assert_allclose(loss, case["loss"], rtol=1e-6)
  np.testing.assert_allclose(m["accuracy"], case["acc"], rtol=1e-6)
  k = len(case["r"])
  assert m["pairs"] == k * (k - 1) // 2 and m["prompts"] == 1
  np.testing.assert_allclose(m["reward_mean"], np.mean(case["r"]), atol=1e-6)
  np.testing.assert_allclose(m["reward_std"], np.std(case["r"]), atol=1e-6)
  np.testing.assert_allclose(grad[0], case["grad"], atol=1e-7)


def test_k2_gradient_closed_form_and_pairwise_loss_agree():
  for rw, rl in [(1.0, 0.0), (-2.5, 0.7), (30.0, -30.0), (-30.0, 30.0)]:
    r = jnp.asarray([[rw, rl]])
    ranks, mask = jnp.asarray([[0, 1]]), jnp.ones((1, 2), bool)
    (loss, _), g = loss_grad(r, ranks, mask)
    g = g[0]
    # -log sigmoid(d), computed stably; d/dr_w = -sigmoid(-d), d/dr_l = +sigmoid(-d).
    d = rw - rl
    np.testing.assert_allclose(loss, np.logaddexp(0.0, -d), rtol=1e-6)
    sig = 1.0 / (1.0 + math.exp(d))
    np.testing.assert_allclose(g, [-sig, sig], rtol=1e-6, atol=1e-30)
    assert np.isfinite(loss)
    ploss, pm = pairwise_loss(jnp.asarray([rw]), jnp.asarray([rl]))
    np.testing.assert_allclose(ploss, loss, rtol=1e-6)
    assert pm["accuracy"] == float(d > 0)


def test_ragged_batch_padded_garbage_does_not_matter():
  # The three prompts above in one [3, K_max=4] batch; padded slots hold NaN, inf and huge
  # rewards and ranks that would count as "best" if the mask were ignored.
  r = jnp.asarray([[1.0, 0.0, jnp.nan, 1e30], [2.0, 0.0, 1.0, -jnp.inf], [1.0, 0.0, 0.0, -1.0]])
  ranks = jnp.asarray([[0, 1, -7, -1], [0, 2, 1, -3], [0, 1, 2, 3]])
  mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
  (loss, m), g = loss_grad(r, ranks, mask)
  np.testing.assert_allclose(loss, (K2["loss"] + K3["loss"] + K4["loss"]) / 3, rtol=1e-6)
  assert m["pairs"] == 1 + 3 + 6 and m["prompts"] == 3
  np.testing.assert_allclose(m["accuracy"], (1 + 3 + 5) / 10, rtol=1e-6)
  real = np.asarray([1, 0, 2, 0, 1, 1, 0, 0, -1], np.float32)
  np.testing.assert_allclose(m["reward_mean"], real.mean(), atol=1e-6)
  np.testing.assert_allclose(m["reward_std"], real.std(), atol=1e-6)
  # Each prompt weighs 1/3; gradients of padded slots are exactly zero, not NaN.
  g = np.asarray(g)
  np.testing.assert_allclose(g[0, :2], np.asarray(K2["grad"]) / 3, atol=1e-7)
  np.testing.assert_allclose(g[1, :3], np.asarray(K3["grad"]) / 3, atol=1e-7)
  np.testing.assert_allclose(g[2], np.asarray(K4["grad"]) / 3, atol=1e-7)
  assert np.all(g[~np.asarray(mask)] == 0.0)


def test_prompts_without_pairs_are_left_out_of_the_mean():
  # Row 1 has one real response, row 2 only ties: neither has a pair, the loss is row 0's.
  r = jnp.asarray([[1.0, 0.0, 0.0], [5.0, 0.0, 0.0], [3.0, -3.0, 1.0]])
  ranks = jnp.asarray([[0, 1, 0], [0, 1, 2], [1, 1, 1]])
  mask = jnp.asarray([[1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)
  (loss, m), _ = loss_grad(r, ranks, mask)
  np.testing.assert_allclose(loss, S1, rtol=1e-6)
  assert m["prompts"] == 1 and m["pairs"] == 1
  (empty_loss, em), g = loss_grad(r, ranks, jnp.zeros_like(mask))
  assert np.all(np.asarray(g) == 0.0)
  assert empty_loss == 0.0 and em["pairs"] == 0 and np.isfinite(em["accuracy"])


def _naive(rewards, ranks, mask):
  """Every comparison by hand, in float64: a Python loop over (i, j) with rank_i < rank_j.

  Returns the loss, its gradient (closed form per comparison: d/dr_w -log sigmoid(r_w - r_l) =
  -sigmoid(-(r_w - r_l)), d/dr_l = +sigmoid(-(r_w - r_l)), scaled by the prompt's and the
  batch's means) and the comparisons counted.
  """
  rewards = np.asarray(rewards, np.float64)
  B, K = rewards.shape
  per_prompt, grads, pairs = [], [], []
  for b in range(B):
    mine = [(i, j) for i in range(K) for j in range(K) if mask[b, i] and mask[b, j] and ranks[b, i] < ranks[b, j]]
    if not mine:
      continue
    total, g = 0.0, np.zeros_like(rewards)
    for i, j in mine:
      d = rewards[b, i] - rewards[b, j]
      total += math.log1p(math.exp(-d))
      g[b, i] -= 1.0 / (1.0 + math.exp(d)) / len(mine)
      g[b, j] += 1.0 / (1.0 + math.exp(d)) / len(mine)
    per_prompt.append(total / len(mine))
    grads.append(g)
    pairs += [(b, i, j) for i, j in mine]
  return sum(per_prompt) / len(per_prompt), sum(grads) / len(per_prompt), pairs


@pytest.mark.parametrize("ties", [False, True])
def test_matches_naive_loop_over_comparisons(ties):
  rng = np.random.default_rng(7 + ties)
  B, K_max = 6, 9
  ks = rng.integers(2, K_max + 1, B)
  ranks = np.full((B, K_max), 99, np.int32)
  mask = np.zeros((B, K_max), bool)
  for b, k in enumerate(ks):
    ranks[b, :k] = rng.integers(0, k, k) if ties else rng.permutation(k)
    mask[b, :k] = True
  r = rng.normal(0, 2, (B, K_max)).astype(np.float32)
  (loss, m), g = loss_grad(r, ranks, mask)
  want, g_naive, pairs = _naive(r, ranks, mask)
  np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(g, g_naive, atol=1e-6)
  pairs = [(b, i, j) for b in range(B) for i in range(K_max) for j in range(K_max)
           if mask[b, i] and mask[b, j] and ranks[b, i] < ranks[b, j]]
  assert m["pairs"] == len(pairs)
  np.testing.assert_allclose(m["accuracy"], np.mean([r[b, i] > r[b, j] for b, i, j in pairs]), rtol=1e-6)
  if not ties:
    assert len(pairs) == sum(k * (k - 1) // 2 for k in ks)


def test_invariant_to_storage_order_and_blind_to_padding():
  rng = np.random.default_rng(3)
  B, K_max = 4, 7
  ks = [7, 2, 5, 4]
  ranks = np.full((B, K_max), K_max, np.int32)
  mask = np.zeros((B, K_max), bool)
  for b, k in enumerate(ks):
    ranks[b, :k], mask[b, :k] = rng.permutation(k), True
  r = rng.normal(0, 1.5, (B, K_max)).astype(np.float32)
  (loss, m), g = loss_grad(r, ranks, mask)
  # Store each prompt's responses (and padded slots) in another order, ranks and mask moving along.
  perm = np.stack([rng.permutation(K_max) for _ in range(B)])
  take = lambda x: np.take_along_axis(x, perm, axis=1)
  (loss_p, m_p), g_p = loss_grad(take(r), take(ranks), take(mask))
  np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
  for key in m:
    np.testing.assert_allclose(m_p[key], m[key], rtol=1e-5, atol=1e-6)
  # Gradients move with the responses.
  np.testing.assert_allclose(g_p, take(np.asarray(g)), atol=1e-7)
  # Padded slots: any reward, any rank -> same loss and exactly zero gradient for them.
  r2, ranks2 = r.copy(), ranks.copy()
  r2[~mask] = rng.normal(0, 100, (~mask).sum())
  ranks2[~mask] = rng.integers(-5, 5, (~mask).sum())
  (loss2, _), g2 = loss_grad(r2, ranks2, mask)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  g2 = np.asarray(g2)
  assert np.all(g2[~mask] == 0.0)
  np.testing.assert_allclose(g2, g, atol=1e-7)


def test_ranked_to_pairs_and_the_independent_pairs_ablation():
  assert ranked_to_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
  assert ranked_to_pairs(np.array([1, 0])) == [(1, 0)]
  assert len(ranked_to_pairs(range(9))) == 36
  with pytest.raises(ValueError, match=r"permutation of range\(3\).*\[0, 0, 2\]"):
    ranked_to_pairs([0, 0, 2])
  # One prompt: the pairs view with pairwise_loss is the same loss as ranking_loss.
  rng = np.random.default_rng(0)
  ranking = rng.permutation(6)
  r = rng.normal(size=6).astype(np.float32)
  ranks = np.empty(6, np.int32)
  ranks[ranking] = np.arange(6)
  w, l = np.asarray(ranked_to_pairs(ranking)).T
  ploss, pm = pairwise_loss(jnp.asarray(r[w]), jnp.asarray(r[l]))
  (rloss, rm), _ = loss_grad(r[None], ranks[None], np.ones((1, 6), bool))
  np.testing.assert_allclose(ploss, rloss, rtol=1e-6)
  np.testing.assert_allclose(pm["accuracy"], rm["accuracy"], rtol=1e-6)
  assert pm["pairs"] == 15
  # Over several prompts the ablation weighs each COMPARISON equally (a K=9 prompt counts 36x a
  # K=2 one), ranking_loss each PROMPT: they differ, as the paper's ablation intends.
  r2 = np.asarray([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]], np.float32)
  ranks2 = np.asarray([[0, 1, 9, 9], [0, 1, 2, 3]])
  mask2 = np.asarray([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  rows = [(0, 0, 1)] + [(1, a, b) for a, b in ranked_to_pairs(range(4))]
  n, a, b = np.asarray(rows).T
  ploss2, _ = pairwise_loss(jnp.asarray(r2[n, a]), jnp.asarray(r2[n, b]))
  per_pair = np.logaddexp(0.0, -(r2[n, a] - r2[n, b]))
  np.testing.assert_allclose(ploss2, per_pair.mean(), rtol=1e-6)
  np.testing.assert_allclose(loss_grad(r2, ranks2, mask2)[0][0],
                             (per_pair[0] + per_pair[1:].mean()) / 2, rtol=1e-6)


def test_pairwise_loss_weights_ignore_garbage_rows():
  chosen = jnp.asarray([1.0, 2.0, jnp.nan])
  rejected = jnp.asarray([0.0, 2.0, jnp.inf])
  weight = jnp.asarray([1.0, 1.0, 0.0])
  loss, m = pairwise_loss(chosen, rejected, weight)
  np.testing.assert_allclose(loss, (S1 + S0) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["accuracy"], 0.5)
  assert m["pairs"] == 2
  gc, gr = jax.jit(jax.grad(lambda c, r: pairwise_loss(c, r, weight)[0], argnums=(0, 1)))(chosen, rejected)
  np.testing.assert_allclose(gc, [-SIG_M1 / 2, -0.25, 0.0], atol=1e-7)
  np.testing.assert_allclose(gr, [SIG_M1 / 2, 0.25, 0.0], atol=1e-7)


# --- one forward per response vs one per comparison, with a real scalar-head Decoder ----------

class FakeTokenizer:
  bos_id, eos_id, pad_id = 2, 3, 0

  def encode(self, text):
    return [4 + ord(c) % 30 for c in text]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]


CFG = ModelConfig(style="gpt", vocab_size=37, max_len=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                  head_dim=8, d_ff=32)


def test_one_forward_per_response_equals_one_per_comparison():
  records = [
      {"prompt": "sort 3 1", "responses": ["1 3", "3 1", "13", "1, 3"], "ranking": [0, 2, 3, 1]},
      {"prompt": "hi", "responses": ["hello", "go", "hey there"], "ranking": [2, 0, 1]},
  ]
  ex = ranked_examples(FakeTokenizer(), records, seq_len=16, k_max=4)
  batch = ex.batch(np.arange(2))
  tokens, last, ranks, mask = (batch[k] for k in ("tokens", "last_index", "ranks", "mask"))
  B, K, T = tokens.shape
  model = Decoder(CFG, head="scalar")
  # Random weights from the params' shapes (NumPy: compiling the init costs seconds on CPU), large
  # enough that rewards are O(1) and the comparison below is not between tiny numbers.
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes["params"])

  rows = {"one": 0, "naive": 0}

  def counted(fn, who):
    """Count the sequences each executed call forwards (tokens_nt is the call's second argument)."""
    def call(params, tokens_nt, *args):
      rows[who] += tokens_nt.shape[0]
      return fn(params, tokens_nt, *args)
    return call

  def score_at(params, tokens_nt, last_n):
    scores_nt = model.apply({"params": params}, tokens_nt)[0]      # [N, T], one scalar per token
    return jnp.take_along_axis(scores_nt, last_n[:, None], axis=1)[:, 0]

  # (a) the paper's way: every response of every prompt forwarded once, all pairs in the loss.
  @jax.jit
  @jax.value_and_grad
  def one_forward(params, tokens_nt, last_n):
    return ranking_loss(score_at(params, tokens_nt, last_n).reshape(B, K), ranks, mask)[0]

  loss_a, grad_a = counted(one_forward, "one")(params, tokens.reshape(B * K, T), last.reshape(B * K))

  # (b) naively: one call per comparison, forwarding its winner and loser; -log sigmoid averaged
  # per prompt, then over prompts (gradients averaged the same way).
  @jax.jit
  @jax.value_and_grad
  def comparison(params, tokens_2t, last_2):
    r_w, r_l = score_at(params, tokens_2t, last_2)
    return -jax.nn.log_sigmoid(r_w - r_l)

  per_comparison = counted(comparison, "naive")
  loss_b, grad_b = 0.0, jax.tree_util.tree_map(jnp.zeros_like, params)
  for b in range(B):
    pairs = ranked_to_pairs(np.argsort(ranks[b, :int(mask[b].sum())]))
    for w, l in pairs:
      loss_wl, grad_wl = per_comparison(params, tokens[b, [w, l]], last[b, [w, l]])
      scale = 1.0 / (len(pairs) * B)
      loss_b += scale * float(loss_wl)
      grad_b = jax.tree_util.tree_map(lambda acc, g: acc + scale * g, grad_b, grad_wl)

  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6)
  assert abs(float(loss_a) - math.log(2)) > 1e-3     # rewards really differ
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grad_a, grad_b)
  assert float(jnp.abs(grad_a["score"]).max()) > 1e-3
  # K_max forwards per prompt (K = 4 and 3, padded to 4) against 2 * C(K, 2) = 12 + 6.
  assert rows == {"one": B * K, "naive": 2 * (6 + 3)}


def test_pair_weights_make_a_weighted_mean_over_a_prompts_pairs():
  # K3's pairs (w, l, r_w - r_l): (0, 2, 1), (0, 1, 2), (2, 1, 1). Weight 3 on the pair of slots 0 and 2 only
  # (either orientation of the matrix): loss = (3 s(1) + s(2) + s(1)) / 5.
  w = np.ones((1, 3, 3))
  w[0, 0, 2] = w[0, 2, 0] = 3.0
  r, ranks = jnp.asarray([K3["r"]], jnp.float32), jnp.asarray([K3["ranks"]])
  mask = jnp.ones((1, 3), bool)
  loss, m = ranking_loss(r, ranks, mask, jnp.asarray(w))
  np.testing.assert_allclose(loss, (4 * S1 + S2) / 5, rtol=1e-6)
  assert float(m["accuracy"]) == 1.0 and float(m["pairs"]) == 3            # metrics stay unweighted
  # weights of 1 are the paper's loss, and weights on padded slots or non-pairs change nothing
  np.testing.assert_allclose(ranking_loss(r, ranks, mask, jnp.ones((1, 3, 3)))[0], K3["loss"], rtol=1e-6)
  r4, ranks4 = jnp.asarray([K3["r"] + [5.0]], jnp.float32), jnp.asarray([K3["ranks"] + [3]])
  mask4 = jnp.asarray([[True, True, True, False]])
  w4 = np.full((1, 4, 4), 7.0)
  w4[0, :3, :3] = 1.0
  np.testing.assert_allclose(ranking_loss(r4, ranks4, mask4, jnp.asarray(w4))[0], K3["loss"], rtol=1e-6)
