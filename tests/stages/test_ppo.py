"""The PPO-ptx stage: rollout and update on a tiny random model (where the reward lands, the k1 KL
against the exact KL, the first update's ratio of 1, sharded == unsharded on 8 simulated devices),
and the `ppo` stage end to end on the smoke preset (step-0 metrics, the value function starting
from the RM, learning a hand-made reward, exact resume after SIGKILL through the CLI, a rerun of a
complete stage changing nothing).

The 8 simulated CPU devices live in a subprocess (XLA_FLAGS must be set before JAX starts), as in
test_sharding.py / test_reward.py; the CLI runs are subprocesses, as a user runs them, and share a
persistent compile cache so that the killed and the resumed runs do not compile again. Every
subprocess is bounded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instructrl import parallel
from instructrl.models.config import ModelConfig
from instructrl.models.sampling import process_logits
from instructrl.stages import ppo, train_state
from tests.cli_helpers import cli_env, final_params, run_worker_on_8_devices, sigkill_when_exists

ROOT = Path(__file__).resolve().parents[2]
EOS, PAD = 3, 0
# A tiny model: vocab 16, so EOS (1 in 16) ends some responses and not others (ragged rows).
TINY = dict(style="gpt", vocab_size=16, max_len=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
            d_ff=64, tie_embeddings=True)
TOL = 1e-5
# Updated params across meshes: Adam divides each element's gradient by its own RMS, so an element whose
# gradient is near round-off shows the reduction order at ~lr x its relative error (see test_reward.py).
PARAM_TOL = 3e-5
# The key bias shifts every attention logit of a query equally (softmax is invariant to it): its true
# gradient is 0, its computed one float round-off that Adam normalises into steps of up to ~lr, different
# for a different reduction order. It cannot change any loss, so it is not compared across meshes.
INVARIANT = ("layer_0/attn/bk",)


def ppo_cfg(**kw) -> ml_collections.ConfigDict:
  """The stage block of configs/instructgpt.py with test overrides."""
  from configs import instructgpt
  c = instructgpt._ppo_stage()
  c.update(dict(max_new_tokens=8, batch_size=8, minibatch_size=4, ptx_batch_size=4, learning_rate=1e-3,
                value_learning_rate=1e-3))
  c.update(kw)
  return c


def host_models(cfg: ModelConfig, perturb: float = 0.3, embed_scale: float = 1.0, seed: int = 0) -> dict:
  """Random policy, reference (= policy + perturb x each leaf's std of noise), value and RM params, numpy."""
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = parallel.DEFAULT_RULES
  sh = lambda head: parallel.logical_shardings(train_state.abstract_params(cfg, head), mesh, rules)
  init = lambda key, head: jax.tree.map(np.asarray, train_state.init_params(cfg, jax.random.key(key), sh(head),
                                                                            mesh, rules, head=head))
  policy = init(seed, "lm")
  policy["embed"] = policy["embed"] * np.float32(embed_scale)      # sharper next-token distributions
  rng = np.random.default_rng(seed + 100)
  ref = jax.tree.map(lambda x: (x + perturb * x.std() * rng.standard_normal(x.shape)).astype(x.dtype)
                     if x.ndim else x, policy)
  return {"policy": policy, "ref": ref, "value": init(seed + 1, "scalar"), "rm": init(seed + 2, "scalar")}


def tiny_prompts(B: int, P: int = 6, vocab: int = 16, seed: int = 0):
  """Left-padded random prompts: every third row has 2 pads."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(4, vocab, (B, P)).astype(np.int32)
  mask = np.ones((B, P), bool)
  mask[::3, :2] = False
  prompts[~mask] = PAD
  return prompts, mask


def tiny_ptx(n_mb: int, bs: int, L: int = 8, vocab: int = 16, seed: int = 1) -> dict:
  rng = np.random.default_rng(seed)
  toks = rng.integers(4, vocab, (n_mb, bs, L + 1)).astype(np.int32)
  return {"inputs": toks[..., :-1], "targets": toks[..., 1:], "mask": rng.random((n_mb, bs, L)) < 0.9}


def build(cfg: ModelConfig, pc, host: dict, mesh, rules, P: int, score_fn=None, n_rm: int = 1):
  """The stage's own programs (ppo.build) for model `cfg` and ppo block `pc` (prompts of P tokens), and the
  state on `mesh` from the host params; the RM (n_rm members) is the policy's model, as without rm.base_workdir."""
  from configs import instructgpt
  config = instructgpt.get_config("smoke")
  config.model = ml_collections.ConfigDict(cfg.to_dict())
  config.ppo = ml_collections.ConfigDict({**pc.to_dict(), "prompt_len": P})
  programs = ppo.build(config, mesh, rules, eos_id=EOS, pad_id=PAD, n_rm=n_rm, score_fn=score_fn)
  sh, repl = programs.shardings, parallel.replicated(mesh)
  policy = jax.device_put(host["policy"], sh["params"])
  value = jax.device_put(host["value"], sh["value"])
  with jax.set_mesh(mesh):
    popt = jax.jit(programs.policy_tx.init, out_shardings=sh["opt_state"])(policy)
    vopt = jax.jit(programs.value_tx.init, out_shardings=sh["value_opt"])(value)
  state = {"step": jax.device_put(jnp.int32(0), repl), "params": policy, "opt_state": popt, "value": value,
           "value_opt": vopt, "ema": jax.device_put(host["policy"], sh["params"]),
           "kl_coef": jax.device_put(jnp.float32(pc.kl_coef), repl),
           "score_gain": jax.device_put(jnp.float32(1.0), repl)}
  models = {"ref": jax.device_put(host["ref"], sh["params"]),
            "rm": (jax.device_put(host["rm"], sh["value"]),) if score_fn is None else None}   # one member
  return state, models, programs.rollout, programs.update


def one_device():
  return parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1]), parallel.DEFAULT_RULES


def flat(tree) -> dict:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp): np.asarray(v)
          for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def trees_equal(a, b) -> bool:
  fa, fb = flat(a), flat(b)
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


# ----------------------------------------------------------------------------- rollout (1 device)

def test_reward_lands_on_the_last_real_token_of_ragged_responses():
  cfg = ModelConfig(**TINY)
  B, P, N = 64, 6, 8
  penalty = -0.5
  # kl_coef 0, discount = lambda = 1, no whitening: every real token's return is its row's final reward.
  pc = ppo_cfg(max_new_tokens=N, kl_coef=0.0, discount=1.0, gae_lambda=1.0, whiten_advantages=False,
               missing_eos_penalty=penalty)
  seen = {}

  def score_fn(seq, last, tokens, mask):
    # A known number per row: 10 x (row + 1) + `last` + 100 if the token there is EOS.
    jax.debug.callback(lambda s: seen.__setitem__("seq_np", np.asarray(s)), seq)   # what the RM is given
    return (10.0 * (jnp.arange(seq.shape[0]) + 1) + last
            + 100.0 * (jnp.take_along_axis(seq, last[:, None], 1)[:, 0] == EOS))

  mesh, rules = one_device()
  state, models, rollout, _ = build(cfg, pc, host_models(cfg), mesh, rules, P, score_fn)
  prompts, pmask = tiny_prompts(B, P)
  with parallel.activate(mesh, rules):
    batch, m, tokens = rollout(state["params"], state["value"], models["ref"], None, prompts, pmask,
                               jax.random.key(1), state["kl_coef"], state["score_gain"])
  b = jax.tree.map(np.asarray, batch)
  tokens, mask = np.asarray(tokens), b["mask"]
  lengths = mask.sum(1)
  ended = (tokens == EOS).any(1)
  # ragged: short and full-length rows, rows that emitted EOS and rows that did not
  assert lengths.min() < N and lengths.max() == N and 0 < ended.mean() < 1, (lengths, ended)
  # the mask is a prefix, ending at the EOS where there is one; pads after it
  assert np.array_equal(mask, np.arange(N)[None] < lengths[:, None])
  assert np.all(tokens[~mask] == PAD)
  assert np.all(tokens[ended, lengths[ended] - 1] == EOS)
  assert not np.any((tokens == EOS) & (np.arange(N)[None] < lengths[:, None] - 1))   # no EOS before the end
  assert np.array_equal(b["seq"][:, P:], tokens) and np.array_equal(b["seq"][:, :P], prompts)
  # The RM reads every row at an EOS: its own (index P - 1 + length), or for a truncated row one placed
  # right after its last token, in the one spare column (index P + N); there, the missing-EOS penalty too.
  want = 10.0 * (np.arange(B) + 1) + np.where(ended, P - 1 + lengths, P + N) + 100.0 + np.where(ended, 0.0, penalty)
  scored = seen["seq_np"]
  assert scored.shape == (B, P + N + 1) and np.array_equal(scored[:, :P + N], b["seq"])
  assert np.array_equal(scored[:, -1], np.where(ended, PAD, EOS))
  returns = b["returns"]
  np.testing.assert_allclose(returns, np.where(mask, want[:, None], 0.0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(b["advantages"], np.where(mask, want[:, None] - b["old_values"], 0.0),
                             rtol=1e-5, atol=1e-4)
  raw = want - np.where(ended, 0.0, penalty)          # objective/score is the RM's own score, before gain/penalty
  assert float(m["objective/score"]) == pytest.approx(raw.mean(), rel=1e-6)
  assert float(m["objective/score_std"]) == pytest.approx(raw.std(), rel=1e-5)
  assert float(m["objective/score_normalized"]) == pytest.approx(want.mean(), rel=1e-6)   # gain 1 here
  with parallel.activate(mesh, rules):   # the same samples (same key) with the reward normalisation's gain
    _, m2, _ = rollout(state["params"], state["value"], models["ref"], None, prompts, pmask, jax.random.key(1),
                       state["kl_coef"], 2.0)
  assert float(m2["objective/score_normalized"]) == pytest.approx((2 * raw + want - raw).mean(), rel=1e-6)
  assert float(m["objective/reward"]) == pytest.approx(want.mean(), rel=1e-6)
  assert float(m["objective/response_length"]) == pytest.approx(lengths.mean())
  assert float(m["objective/eos_fraction"]) == pytest.approx(ended.mean())
  # the reference differs from the policy (host_models perturbs it): a KL is measured, but kl_coef 0 rewards none
  assert float(m["objective/kl"]) != 0.0


def test_rm_scores_a_truncated_response_with_an_eos_after_it():
  """The RM's score of each row, recomputed by hand: the row unpadded (real prompt tokens, then the response up
  to its EOS, or for a row that reached max_new_tokens its N tokens and an EOS) through the RM, read at the end."""
  from instructrl.models.transformer import Decoder
  cfg = ModelConfig(**TINY)
  B, P, N = 32, 6, 8
  pc = ppo_cfg(max_new_tokens=N, normalize_score=False)
  host = host_models(cfg)
  mesh, rules = one_device()
  state, models, rollout, _ = build(cfg, pc, host, mesh, rules, P)
  prompts, pmask = tiny_prompts(B, P)
  with parallel.activate(mesh, rules):
    batch, _, tokens = rollout(state["params"], state["value"], models["ref"], models["rm"], prompts, pmask,
                               jax.random.key(1), state["kl_coef"], state["score_gain"])
  tokens, mask, score = np.asarray(tokens), np.asarray(batch["mask"]), np.asarray(batch["score"])
  ended = (tokens == EOS).any(1)
  assert 0 < ended.mean() < 1
  rm = Decoder(cfg, head="scalar")
  for i in range(B):
    row = [*prompts[i][pmask[i]], *tokens[i][mask[i]], *([] if ended[i] else [EOS])]
    out, _ = rm.apply({"params": host["rm"]}, np.asarray([row], np.int32))
    assert score[i] == pytest.approx(float(out[0, -1]), abs=1e-5), (i, bool(ended[i]))
    if not ended[i]:   # the EOS matters: the score at the last response token itself is another number
      assert abs(score[i] - float(out[0, -2])) > 1e-6


def test_k1_kl_estimate_matches_the_exact_sequence_kl():
  """mean over samples of sum_t (log pi - log ref)(y_t) vs sum_t KL(pi(.|y_<t) || ref(.|y_<t)) on the
  same sampled paths: both are unbiased for the sequence KL; their difference is a martingale (mean 0)."""
  cfg = ModelConfig(**TINY)
  B, P, N = 2048, 6, 8
  # kl_coef 1, score 0, discount = lambda = 1, no whitening: returns[:, 0] = -(per-episode k1 KL).
  pc = ppo_cfg(max_new_tokens=N, kl_coef=1.0, discount=1.0, gae_lambda=1.0, whiten_advantages=False)
  host = host_models(cfg, perturb=1.0, embed_scale=4.0)
  mesh, rules = one_device()
  state, models, rollout, _ = build(cfg, pc, host, mesh, rules, P, lambda s, l, t, m: jnp.zeros(s.shape[0]))
  prompts, pmask = tiny_prompts(B, P)

  def exact(seq, positions, kv_mask, mask):
    lp = process_logits(ppo.response_view(cfg, host["policy"], "lm", seq, positions, kv_mask, P))
    lq = process_logits(ppo.response_view(cfg, host["ref"], "lm", seq, positions, kv_mask, P))
    return jnp.sum(jnp.where(mask, jnp.sum(jnp.exp(lp) * (lp - lq), -1), 0.0), 1)

  with parallel.activate(mesh, rules):
    batch, m, _ = rollout(state["params"], state["value"], models["ref"], None, prompts, pmask,
                          jax.random.key(3), state["kl_coef"], state["score_gain"])
    ex = np.asarray(jax.jit(exact)(batch["seq"], batch["positions"], batch["kv_mask"], batch["mask"]), np.float64)
  k1 = -np.asarray(batch["returns"][:, 0], np.float64)
  assert float(m["objective/kl"]) == pytest.approx(k1.mean(), rel=1e-5)
  assert (k1 < 0).mean() > 0.05                       # single episodes go negative ...
  assert ex.min() >= -1e-6                            # ... the exact KL along a path never does
  se = (k1 - ex).std() / np.sqrt(B)
  assert 0.3 < ex.mean() < 5, ex.mean()               # a KL well above the noise (measured: 1.15 nats)
  assert abs(k1.mean() - ex.mean()) < 4 * se, (k1.mean(), ex.mean(), se)
  assert k1.mean() > 10 * k1.std() / np.sqrt(B)       # >= 0 on average, by a wide margin


def test_rm_ensemble_score_is_the_members_mean_minus_coef_times_their_std():
  """Rollouts with the same key draw the same samples; the ensemble's reward of each episode is then the
  closed form of the single members' scores (two members: std = |a - b| / 2)."""
  cfg = ModelConfig(**TINY)
  B, P = 16, 6
  coef = 0.5
  mesh, rules = one_device()
  prompts, pmask = tiny_prompts(B, P)
  rm_a, rm_b = host_models(cfg)["rm"], host_models(cfg, seed=7)["rm"]
  scores, stds = {}, {}
  for name, members, c in (("a", (rm_a,), 0.0), ("b", (rm_b,), 0.0), ("ab", (rm_a, rm_b), coef),
                           ("aa", (rm_a, rm_a), coef)):
    state, models, rollout, _ = build(cfg, ppo_cfg(rm_uncertainty_coef=c), host_models(cfg), mesh, rules, P,
                                      n_rm=len(members))
    with parallel.activate(mesh, rules):
      batch, m, _ = rollout(state["params"], state["value"], models["ref"], members, prompts, pmask,
                            jax.random.key(4), state["kl_coef"], state["score_gain"])
    scores[name], stds[name] = np.asarray(batch["score"], np.float64), float(m["objective/rm_ensemble_std"])
  a, b = scores["a"], scores["b"]
  assert np.abs(a - b).max() > 1e-3                    # two different RMs
  np.testing.assert_allclose(scores["ab"], (a + b) / 2 - coef * np.abs(a - b) / 2, rtol=1e-5, atol=1e-6)
  assert stds["ab"] == pytest.approx(np.mean(np.abs(a - b) / 2), rel=1e-5)
  np.testing.assert_allclose(scores["aa"], a, rtol=1e-6, atol=1e-7)   # members that agree: no penalty
  assert stds["aa"] == 0.0 and stds["a"] == 0.0


def test_first_update_has_ratio_one_and_moves_policy_value_and_ema():
  cfg = ModelConfig(**TINY)
  B, P = 16, 6
  # one minibatch of the whole batch: the ratio is computed before any update, so it is exactly 1
  pc = ppo_cfg(batch_size=B, minibatch_size=B, ptx_batch_size=4, ptx_coef=0.5, kl_coef=0.1)
  host = host_models(cfg)
  mesh, rules = one_device()
  state, models, rollout, update = build(cfg, pc, host, mesh, rules, P)
  prompts, pmask = tiny_prompts(B, P)
  with parallel.activate(mesh, rules):
    batch, _, _ = rollout(state["params"], state["value"], models["ref"], models["rm"], prompts, pmask,
                          jax.random.key(4), state["kl_coef"], state["score_gain"])
    state, m = update(state, batch, tiny_ptx(1, 4), jax.random.key(5))
  assert bool(m["finite"]) and int(state["step"]) == 1
  assert abs(float(m["ppo/policy/ratio_mean"]) - 1.0) < 1e-6
  assert float(m["ppo/policy/clipfrac"]) == 0.0 and float(m["ppo/policy/approxkl"]) < 1e-12
  assert float(m["ppo/val/vf_clipfrac"]) == 0.0
  assert np.isfinite(float(m["ppo/policy/ptx_loss"])) and float(m["ppo/policy/ptx_loss"]) > 0
  new = flat(state["params"])
  assert max(np.abs(new[k] - v).max() for k, v in flat(host["policy"]).items()) > 1e-5
  assert max(np.abs(v - flat(state["value"])[k]).max() for k, v in flat(host["value"]).items()) > 1e-5
  # EMA (paper C.4, decay 0.992): ema = decay * policy_0 + (1 - decay) * policy_1 after one iteration
  ema, old = flat(state["ema"]), flat(host["policy"])
  for k in old:
    np.testing.assert_allclose(ema[k], 0.992 * old[k] + 0.008 * new[k], rtol=1e-6, atol=1e-7, err_msg=k)
  assert float(state["kl_coef"]) == pytest.approx(0.1)


@pytest.mark.parametrize("ema_every", ["iteration", "update"])
def test_ema_after_one_iteration_matches_the_closed_form(ema_every):
  """lr 0 keeps the policy constant at c, so ema_n = c + decay^n (ema_0 - c) exactly, with n = 1 per iteration
  or n = epochs x minibatches (2 x 2 here) per iteration with ppo.ema_every = "update"."""
  cfg = ModelConfig(**TINY)
  B, P, decay = 8, 6, 0.5
  pc = ppo_cfg(batch_size=B, minibatch_size=4, ppo_epochs=2, ptx_coef=0.0, learning_rate=0.0,
               value_learning_rate=0.0, ema_decay=decay, ema_every=ema_every)
  host = host_models(cfg)
  mesh, rules = one_device()
  state, models, rollout, update = build(cfg, pc, host, mesh, rules, P)
  state["ema"] = jax.device_put(host["ref"])            # ema_0 != the policy c
  prompts, pmask = tiny_prompts(B, P)
  with parallel.activate(mesh, rules):
    batch, _, _ = rollout(state["params"], state["value"], models["ref"], models["rm"], prompts, pmask,
                          jax.random.key(4), state["kl_coef"], state["score_gain"])
    state, _ = update(state, batch, tiny_ptx(ppo.ptx_minibatches(pc), 1), jax.random.key(5))
  n = {"iteration": 1, "update": 4}[ema_every]
  c, ema0, ema = flat(host["policy"]), flat(host["ref"]), flat(state["ema"])
  assert trees_equal(state["params"], host["policy"])   # lr 0: the input is constant
  for k in c:
    np.testing.assert_allclose(ema[k], c[k] + decay**n * (ema0[k] - c[k]), rtol=1e-6, atol=1e-7, err_msg=k)


def test_ptx_minibatches_are_fresh_every_epoch_and_reproducible():
  pc = ppo_cfg(batch_size=16, minibatch_size=4, ppo_epochs=3, ptx_batch_size=5)
  n_windows, seed = 1000, 8
  idx = ppo.ptx_indices(n_windows, pc, step=7, seed=seed)
  assert ppo.ptx_minibatches(pc) == 12 and idx.shape == (12, 5)       # 3 epochs x 4 minibatches, 5 rows each
  by_epoch = idx.reshape(3, 4 * 5)
  assert len(np.unique(idx)) == 60                                     # no window twice in an iteration
  assert all(not set(by_epoch[a]) & set(by_epoch[b]) for a in range(3) for b in range(a + 1, 3))
  assert np.array_equal(idx, ppo.ptx_indices(n_windows, pc, step=7, seed=seed))   # a resumed run draws these
  assert not np.array_equal(idx, ppo.ptx_indices(n_windows, pc, step=8, seed=seed))
  # the next iteration continues the same seeded permutation: 2 iterations use 120 distinct windows
  assert len(np.unique(np.concatenate([idx, ppo.ptx_indices(n_windows, pc, step=8, seed=seed)]))) == 120
  # with one epoch, the draw is the one-epoch update's (what earlier runs took): the first 4 x 5 of the stream
  one = ppo_cfg(batch_size=16, minibatch_size=4, ppo_epochs=1, ptx_batch_size=5)
  from instructrl.data.batching import batch_indices
  assert np.array_equal(ppo.ptx_indices(n_windows, one, 7, seed).reshape(-1), batch_indices(n_windows, 20, 7, seed))


def test_update_refuses_ptx_minibatches_of_a_single_epoch():
  """With ppo_epochs 2 the update takes epochs x minibatches pretraining minibatches: a single epoch's (the
  shape that used to be repeated) is refused while tracing, naming the count it expects."""
  cfg = ModelConfig(**TINY)
  B, P = 8, 6
  pc = ppo_cfg(batch_size=B, minibatch_size=4, ppo_epochs=2, ptx_coef=0.5, ptx_batch_size=2)
  mesh, rules = one_device()
  state, models, rollout, update = build(cfg, pc, host_models(cfg), mesh, rules, P)
  prompts, pmask = tiny_prompts(B, P)
  with parallel.activate(mesh, rules):
    batch, _, _ = rollout(state["params"], state["value"], models["ref"], models["rm"], prompts, pmask,
                          jax.random.key(4), state["kl_coef"], state["score_gain"])
    with pytest.raises(ValueError, match=r"2 pretraining minibatches, expected .* 2 x 2"):
      update(state, batch, tiny_ptx(2, 2), jax.random.key(5))


# ----------------------------------------------------------------------------- sharded == unsharded

def _worker():
  import jax
  import numpy as np

  from instructrl import parallel
  from instructrl.models.config import ModelConfig
  from instructrl.stages import train_state

  assert len(jax.devices()) == 8, jax.devices()
  rules = parallel.DEFAULT_RULES
  cfg = ModelConfig(**TINY)
  B, P = 8, 6
  pc = ppo_cfg(batch_size=B, minibatch_size=4, ptx_batch_size=8, ptx_coef=0.5, kl_coef=0.1)
  host = host_models(cfg)
  prompts, pmask = tiny_prompts(B, P)
  ptx = tiny_ptx(2, 8)

  def run(shape):
    devices = jax.devices() if np.prod(shape) == 8 else jax.devices()[:1]
    mesh = parallel.make_mesh(shape, devices=devices)
    state, models, rollout, update = build(cfg, pc, host, mesh, rules, P)     # score_fn None: the RM scores
    with parallel.activate(mesh, rules):
      b = train_state.device_batch({"prompt": prompts, "prompt_mask": pmask}, mesh, rules)
      batch, ro_m, tokens = rollout(state["params"], state["value"], models["ref"], models["rm"], b["prompt"],
                                    b["prompt_mask"], jax.random.key(7), state["kl_coef"], state["score_gain"])
      ptx_dev = jax.device_put(ptx, parallel.stacked_batch_sharding(mesh, rules))   # as ppo.run: rows over 'batch'
      state, m = update(state, batch, ptx_dev, jax.random.key(8))
    wq = state["params"]["layer_0"]["attn"]["wq"]
    ptx_rows = {s.data.shape[1] for s in ptx_dev["inputs"].addressable_shards}
    return {"tokens": np.asarray(tokens).tolist(), "lengths": np.asarray(batch["mask"]).sum(1).tolist(),
            "rollout": {k: float(v) for k, v in ro_m.items()},
            "batch": {k: np.asarray(batch[k], np.float64).tolist() for k in ("old_logp", "old_values", "advantages",
                                                                               "returns")},
            "update": {k: float(v) for k, v in m.items()}, "step": int(state["step"]),
            "ptx_rows_per_device": sorted(ptx_rows),
            "n_shards_wq": len({tuple((i.start, i.stop) for i in idx)
                                for idx in wq.sharding.devices_indices_map(wq.shape).values()}),
            }, {k: flat(state[k]) for k in ("params", "value", "ema")}

  ref, ref_params = run((1, 1, 1))
  out = {"1x1x1": ref, "param_diff": {}}
  for name, shape in MESHES.items():
    out[name], params = run(shape)
    out["param_diff"][name] = {tree: {k: float(np.max(np.abs(params[tree][k] - v))) for k, v in ref_params[tree].items()}
                               for tree in ref_params}
  out["moved"] = {tree: {k: float(np.max(np.abs(v - np.asarray(flat(host["policy" if tree != "value" else "value"])[k]))))
                         for k, v in ref_params[tree].items()} for tree in ref_params}
  print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def sharded_result():
  return run_worker_on_8_devices(__file__)


# Pure data parallel, data x fsdp (ZeRO-3) and data x fsdp x tensor: wq [32, 2, 16] is whole, split 4 ways on
# its embed dim, and split 2 x 2 on embed x heads.
MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}
WQ_SHARDS = {"8x1x1": 1, "2x4x1": 4, "2x2x2": 4}
PTX_ROWS = {"8x1x1": [1], "2x4x1": [1], "2x2x2": [2]}   # 8 ptx rows over the data x fsdp devices


@pytest.mark.parametrize("mesh", list(MESHES))
def test_rollout_and_update_sharded_equal_unsharded(sharded_result, mesh):
  ref, r = sharded_result["1x1x1"], sharded_result[mesh]
  assert r["n_shards_wq"] == WQ_SHARDS[mesh]
  assert r["ptx_rows_per_device"] == PTX_ROWS[mesh] and ref["ptx_rows_per_device"] == [8]
  assert r["tokens"] == ref["tokens"], "the same rng must sample the same responses on every mesh"
  assert r["lengths"] == ref["lengths"] and len(set(ref["lengths"])) > 1     # ragged
  for k, v in ref["rollout"].items():
    assert abs(r["rollout"][k] - v) < TOL * max(1.0, abs(v)), (k, r["rollout"][k], v)
  assert ref["rollout"]["objective/kl"] != 0.0 and ref["rollout"]["objective/score"] != 0.0
  for k, v in ref["batch"].items():
    np.testing.assert_allclose(r["batch"][k], v, atol=TOL, err_msg=k)
  assert ref["step"] == r["step"] == 1 and ref["update"]["finite"] == r["update"]["finite"] == 1.0
  for k, v in ref["update"].items():
    rel = 1e-4 if k.endswith("grad_norm") else TOL
    assert abs(r["update"][k] - v) < rel * max(1.0, abs(v)), (k, r["update"][k], v)
  for tree, diffs in sharded_result["param_diff"][mesh].items():
    compared = {k: d for k, d in diffs.items() if k not in INVARIANT}
    assert max(compared.values()) < PARAM_TOL, (tree, diffs)
    moved = sharded_result["moved"][tree]
    assert all(v > 1e-6 for k, v in moved.items() if k not in INVARIANT), (tree, moved)


# ----------------------------------------------------------------------------- end to end (smoke)

FAST = ["--config.eval.n_prompts=0", "--config.pretrain.steps=20", "--config.pretrain.checkpoint_every=20",
        "--config.sft.steps=10", "--config.sft.checkpoint_every=5",
        "--config.sft.keep_period=5", "--config.rm.epochs=1"]
# 12 iterations of 16 episodes, a checkpoint every 2: the kill lands between ppo/2 and ppo/12.
PPO_FLAGS = ["--config.ppo.total_episodes=192", "--config.ppo.checkpoint_every=2"]
PPO_STEPS = 12


def cli_cmd(workdir, stages, *extra):
  return [sys.executable, "-m", "instructrl.main", "--config=configs/instructgpt.py:smoke", f"--workdir={workdir}",
          f"--stages={stages}", *FAST, *extra]


def cli(workdir, stages, *extra, timeout=300):
  cmd = cli_cmd(workdir, stages, *extra)
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=cli_env())
  if out.returncode:
    raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return out


def upstream_copy(ref: Path, w: Path) -> Path:
  for stage in ("world", "pretrain", "sft", "rm"):   # completed upstream stages, as a user's run dir has them
    shutil.copytree(ref / stage, w / stage)
  return w


def final_state(stage_dir):
  """The latest checkpoint's step and whole state (policy, value, EMA, both optimizer states, ...) as numpy."""
  import orbax.checkpoint as ocp
  step = max(int(p.name) for p in Path(stage_dir).iterdir() if p.name.isdigit())
  with ocp.CheckpointManager(Path(stage_dir).absolute(), item_names=("state", "meta")) as m:
    state = m.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
  return step, jax.tree.map(np.asarray, state)


def metric_rows(workdir, stage="ppo"):
  return [json.loads(l) for l in (Path(workdir) / "metrics" / f"{stage}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """world, pretrain, sft, rm on the smoke preset (cut short: PPO needs complete checkpoints, not good ones)."""
  w = tmp_path_factory.mktemp("ppo_ref")
  cli(w, "world,pretrain,sft,rm")
  return w


@pytest.fixture(scope="module")
def ppo_run(reference_run, tmp_path_factory):
  """An uninterrupted `--stages=ppo` run on a copy of the reference run (smoke ppo block: kl 0.02, ptx 1)."""
  w = upstream_copy(reference_run, tmp_path_factory.mktemp("ppo_full"))
  cli(w, "ppo", *PPO_FLAGS)
  return w


@pytest.mark.slow
def test_step_zero_policy_is_reference_and_value_is_rm(reference_run, ppo_run, monkeypatch):
  # the first rollout: the policy IS the reference, so the k1 KL of every token is exactly 0
  first = [r for r in metric_rows(ppo_run) if r["step"] == 1][0]
  assert first["train/objective/kl"] == 0.0
  assert first["train/ppo/policy/clipfrac"] == 0.0
  # minibatch 8 of 16: the first minibatch's ratio is exactly 1, the second comes after one small update
  assert abs(first["train/ppo/policy/ratio_mean"] - 1.0) < 1e-3
  assert first["train/ppo/policy/approxkl"] < 1e-4
  assert first["train/objective/kl_coef"] == pytest.approx(0.02)
  # warm-up from a tenth of the peak (paper C.4; smoke: lr 1e-4, 1 iteration = 2 updates): the logged lr is
  # that of the iteration's first update
  rows = {r["step"]: r for r in metric_rows(ppo_run) if "train/ppo/policy/lr" in r}
  assert rows[1]["train/ppo/policy/lr"] == pytest.approx(1e-5) and rows[2]["train/ppo/policy/lr"] == pytest.approx(1e-4)
  assert np.isfinite(first["train/ppo/policy/ptx_loss"]) and first["train/ppo/policy/ptx_loss"] > 0
  later = [r["train/objective/kl"] for r in metric_rows(ppo_run) if r["step"] > 1]
  assert any(k != 0.0 for k in later)

  # The initial state, from ppo.run itself (its loop replaced by one that only builds the state).
  from configs import instructgpt
  config = instructgpt.get_config("smoke")
  captured = {}

  def fake_loop_run(stage, mesh, rules, *, initial_state, **kw):
    captured["state"] = initial_state()
    captured["stage"] = stage

  monkeypatch.setattr(ppo.loop, "run", fake_loop_run)
  mesh = parallel.make_mesh(config.mesh.shape)
  ppo.run(config, reference_run, mesh, parallel.rules_from_config(config.mesh.rules))
  state = captured["state"]
  _, rm = final_params(reference_run / "rm")
  _, sft = final_params(reference_run / "sft")
  # The value function starts from the RM (paper C.4): its trunk exactly, its head times the score gain
  # that gives the RM's scores on the initial policy's samples std 1 (lm-human-preferences).
  gain = float(state["score_gain"])
  assert np.isfinite(gain) and gain > 0
  v, r = flat(state["value"]), flat(rm)
  assert v.keys() == r.keys()
  head = [k for k in v if k.split("/")[-1] in ("score", "score_bias")]
  assert len(head) == 2
  for k in v:
    if k in head:
      np.testing.assert_allclose(v[k], gain * r[k], rtol=1e-6)
    else:
      assert np.array_equal(v[k], r[k]), k
  assert trees_equal(state["params"], sft) and trees_equal(state["ema"], sft)
  assert int(state["step"]) == 0 and float(state["kl_coef"]) == pytest.approx(0.02)
  # fresh optimizers: Adam's moments and counts all zero
  assert all(not np.any(v) for v in [*flat(state["opt_state"]).values(), *flat(state["value_opt"]).values()])
  assert captured["stage"].cfg.steps == 4             # smoke: 64 episodes / 16 per iteration


@pytest.mark.slow
def test_ppo_learns_a_hand_made_reward(reference_run, tmp_path):
  """Reward = fraction of response tokens equal to one token: PPO raises it far above the SFT policy's rate."""
  from configs import instructgpt
  from instructrl.stages.world import load_tokenizer
  w = upstream_copy(reference_run, tmp_path / "learn")
  target = load_tokenizer(w).encode(" the")[-1]
  config = instructgpt.get_config("smoke")
  config.eval.n_prompts = 0
  iterations = 32
  config.ppo.update(total_episodes=16 * iterations, batch_size=16, minibatch_size=8, learning_rate=1e-3,
                    value_learning_rate=1e-3, warmup_iterations=0, kl_coef=0.01, ptx_coef=0.0,
                    checkpoint_every=1000)

  def score_fn(seq, last, tokens, mask):
    return jnp.sum((tokens == target) & mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1)

  mesh = parallel.make_mesh(config.mesh.shape)
  ppo.run(config, w, mesh, parallel.rules_from_config(config.mesh.rules), score_fn=score_fn)
  rows = [r for r in metric_rows(w) if "train/objective/score" in r]
  assert [r["step"] for r in rows] == list(range(1, iterations + 1))
  score = np.array([r["train/objective/score"] for r in rows])
  first, last = score[:4].mean(), score[-4:].mean()
  # measured: 0.04 over the first 4 iterations -> 0.65 over the last 4
  assert last > first + 0.2 and last > 3 * first, score.round(3).tolist()
  assert all(np.isfinite(r["train/ppo/val/value_loss"]) for r in rows)


@pytest.mark.slow
def test_ppo_resume_after_sigkill_gives_identical_state(ppo_run, reference_run, tmp_path):
  w = upstream_copy(reference_run, tmp_path / "killed")
  sigkill_when_exists(cli_cmd(w, "ppo", *PPO_FLAGS), w / "ppo" / "2", cwd=ROOT, env=cli_env())
  assert not (w / "ppo" / str(PPO_STEPS)).exists(), "the kill landed after ppo finished"
  killed_at = max(int(p.name) for p in (w / "ppo").iterdir() if p.name.isdigit())
  print(f"killed at ppo/{killed_at}")
  assert 2 <= killed_at < PPO_STEPS
  out = cli(w, "ppo", *PPO_FLAGS)
  assert "ppo: resuming from step" in out.stderr
  step_a, a = final_state(ppo_run / "ppo")
  step_b, b = final_state(w / "ppo")
  assert step_a == step_b == PPO_STEPS
  assert sorted(a) == sorted(b) and {"params", "value", "ema", "opt_state", "value_opt", "kl_coef"} <= set(a)
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  differ = [k for k in fa if not np.array_equal(fa[k], fb[k])]
  assert not differ, f"resumed state differs in {differ[:10]}"
  strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_per_sec") and "/time/" not in k}
                        for r in rows]
  assert strip(metric_rows(w)) == strip(metric_rows(ppo_run))


@pytest.mark.slow
def test_rerun_of_complete_ppo_stage_changes_nothing(ppo_run):
  before = (ppo_run / "metrics" / "ppo.jsonl").read_bytes()
  step, state = final_state(ppo_run / "ppo")
  out = cli(ppo_run, "ppo", *PPO_FLAGS)
  assert f"ppo: complete checkpoint at step {PPO_STEPS}, skipping" in out.stderr
  assert (ppo_run / "metrics" / "ppo.jsonl").read_bytes() == before
  step2, state2 = final_state(ppo_run / "ppo")
  assert step2 == step and trees_equal(state, state2)


# ----------------------------------------------------------------------------- the eval stage on these runs

@pytest.mark.slow
def test_eval_stage_compares_every_model_and_resumes_exactly(ppo_run, reference_run, tmp_path):
  w = tmp_path / "eval_run"
  shutil.copytree(ppo_run, w)
  shutil.copy(reference_run / "metrics" / "rm.jsonl", w / "metrics" / "rm.jsonl")   # the RM's accuracies
  cli(w, "ppo_noptx,eval", *PPO_FLAGS)
  rep = json.loads((w / "eval" / "report.json").read_text())
  assert rep["models"] == ["GPT", "GPT prompted", "GPT prompted (T=1)", "SFT", "SFT (T=0.7)", "PPO-ptx", "PPO"]
  assert rep["results"]["PPO-ptx"]["ptx_coef"] == 1.0 and rep["results"]["PPO"]["ptx_coef"] == 0.0
  assert rep["judged_by"]["group"] == 4 and rep["n_prompts"]["eval"] == 32
  for name, r in rep["results"].items():
    win = r["win_rate_vs_sft"]
    assert 0 <= win["ci_low"] <= win["mean"] <= win["ci_high"] <= 1, name
    assert win["n"] == 32 and 1 <= r["likert"]["mean"] <= 7
    assert 0 <= r["cloze_accuracy"] <= 1 and r["heldout_lm_loss"] > 0
    assert set(r["toxicity"]) == {"rude_rate/plain", "rude_rate/respectful", "gold/plain", "gold/respectful"}
  assert {"accuracy_train_groups", "accuracy_heldout_group"} <= set(rep["rm"])
  assert len(rep["ppo_curves"]["PPO"]["step"]) == PPO_STEPS
  md = (w / "eval" / "report.md").read_text()
  assert all(f"| {name} |" in md for name in rep["models"])
  assert all((w / "eval" / p).stat().st_size > 1000 for p in ("win_rates.png", "alignment_tax.png", "ppo_curves.png"))
  # the PPO stages kept separate checkpoints, metrics and gammas
  assert (w / "ppo_noptx").is_dir() and metric_rows(w, "ppo_noptx")
  # rerun: skipped; without the report: rebuilt from the cached answers; without those: resampled, identical
  assert "eval: report for" in cli(w, "eval").stderr
  (w / "eval" / "report.json").unlink()
  cli(w, "eval")
  assert json.loads((w / "eval" / "report.json").read_text()) == rep
  shutil.rmtree(w / "eval")
  cli(w, "eval")
  assert json.loads((w / "eval" / "report.json").read_text()) == rep


@pytest.mark.slow
def test_ppo_starts_from_the_sft_candidate_the_rm_scores_best(reference_run, tmp_path):
  from instructrl import checkpoints
  w = upstream_copy(reference_run, tmp_path / "select")
  assert checkpoints.kept_steps(w / "sft") == [5, 10]          # keep_period kept the earlier candidate
  cli(w, "ppo", *PPO_FLAGS, "--config.ppo.total_episodes=32", "--config.ppo.select_sft_by_rm=True")
  sel = json.loads((w / "sft_selection.json").read_text())
  scores = {int(k): v for k, v in sel["scores"].items()}
  assert sorted(scores) == [5, 10] and sel["chosen"] == max(scores, key=scores.get)
  assert scores[5] != scores[10]                                 # two different models were scored
  meta = json.loads((w / "ppo" / "2" / "meta" / "metadata").read_text())
  assert meta["policy_init_step"] == sel["chosen"]


@pytest.mark.slow
def test_rm_round_two_ranks_an_earlier_ppo_policys_samples(reference_run, ppo_run, tmp_path):
  """Iterated collection (paper 3.5: later comparisons rank the RL policies' samples): a second RM's
  comparisons mix in responses from round one's PPO policy (its EMA), named in each record."""
  w = tmp_path / "round2"
  for stage in ("world", "pretrain", "sft"):
    shutil.copytree(reference_run / stage, w / stage)
  cli(w, "rm", "--config.rm.source_mix.policy=0.5", "--config.rm.source_mix.ppo=0.5",
      f"--config.rm.ppo_source={ppo_run / 'ppo'}")
  recs = [json.loads(l) for split in ("train", "valid")
          for l in (w / "comparisons" / f"{split}.jsonl").read_text().splitlines()]
  sources = [s for r in recs for s in r["sources"]]
  assert set(sources) == {"policy", "ppo"} and 0.25 < sources.count("ppo") / len(sources) < 0.75
  key = json.loads((w / "comparisons" / "COMPLETE").read_text())["key"]
  assert key["ppo_source"] == str(ppo_run / "ppo") and key["source_mix"]["ppo"] == 0.5
  assert any("final/valid/accuracy" in r for r in metric_rows(w, "rm"))


@pytest.mark.slow
def test_gold_reward_scores_every_sample_with_the_gold_judge(reference_run, tmp_path):
  """ppo.reward=gold (the oracle diagnostic): the score inside the jitted rollout is the gold judge's
  score of the very samples the host decodes and judges for the gold metric; the report names the run."""
  from instructrl.stages import evaluate
  w = upstream_copy(reference_run, tmp_path / "gold")
  cli(w, "ppo", *PPO_FLAGS, "--config.ppo.reward=gold")
  rows = [r for r in metric_rows(w) if "train/objective/score" in r]
  assert len(rows) == PPO_STEPS
  for r in rows:
    assert r["train/objective/score"] == pytest.approx(r["train/objective/gold_score"], abs=1e-5), r["step"]
  assert len({round(r["train/objective/score"], 6) for r in rows}) > 1      # judged samples, not a constant
  names = [m["name"] for m in evaluate.available_models(w)]
  assert "PPO-ptx [gold reward]" in names, names
  with pytest.raises(AssertionError, match="ppo.reward='oracle'"):
    cli(upstream_copy(reference_run, tmp_path / "bad"), "ppo", *PPO_FLAGS, "--config.ppo.reward=oracle")


@pytest.mark.slow
def test_rm_larger_than_the_policy_scores_and_initialises_the_value(reference_run, tmp_path):
  """rm.base_workdir: the RM (and so PPO's value function) starts from a wider model's SFT trained on
  the same world in another workdir (paper: a 6B RM for every policy size)."""
  base = tmp_path / "rm_base"
  shutil.copytree(reference_run / "world", base / "world")
  cli(base, "pretrain,sft", "--config.model.d_model=96", "--config.model.d_ff=384")      # smoke: 64 / 256
  w = tmp_path / "main"
  for stage in ("world", "pretrain", "sft", "comparisons"):
    shutil.copytree(reference_run / stage, w / stage)
  cli(w, "rm", f"--config.rm.base_workdir={base}")
  shutil.rmtree(base)    # PPO reads the RM's model from W/rm: the base run is no longer needed
  cli(w, "ppo", "--config.ppo.total_episodes=32")
  rm_meta = json.loads((w / "rm" / str(max(int(p.name) for p in (w / "rm").iterdir() if p.name.isdigit()))
                        / "meta" / "metadata").read_text())
  assert rm_meta["model"]["d_model"] == 96 and rm_meta["complete"]
  assert any("final/valid/accuracy" in r for r in metric_rows(w, "rm"))
  _, state = final_state(w / "ppo")
  assert state["value"]["embed"].shape[-1] == 96            # the value function is the RM's size
  assert state["params"]["embed"].shape[-1] == 64           # the policy is not
  assert all(np.isfinite(r["train/objective/score"]) for r in metric_rows(w) if "train/objective/score" in r)


@pytest.mark.slow
def test_rm_ensemble_joins_a_finished_rm_and_ppo_penalises_the_members_disagreement(reference_run, tmp_path):
  """rm.ensemble_size=3 on a run whose single RM is finished: W/rm is kept as member 0 (skipped, not
  retrained), members 1 and 2 train on bootstrap resamples; PPO scores with all three."""
  w = upstream_copy(reference_run, tmp_path / "ens")
  shutil.copytree(reference_run / "comparisons", w / "comparisons")
  (w / "metrics").mkdir()
  shutil.copyfile(reference_run / "metrics" / "rm.jsonl", w / "metrics" / "rm.jsonl")
  _, rm0_before = final_params(w / "rm")
  out = cli(w, "rm", "--config.rm.ensemble_size=3")
  assert "rm: complete checkpoint" in out.stderr
  _, rm0 = final_params(w / "rm")
  assert trees_equal(rm0, rm0_before)
  members = [rm0] + [final_params(w / "rm_ensemble" / f"member{i}")[1] for i in (1, 2)]
  heads = [np.asarray(m["score"]).ravel() for m in members]
  assert all(np.abs(heads[i] - heads[j]).max() > 1e-4 for i in range(3) for j in range(i))   # three different RMs
  for i in (1, 2):
    rows = [json.loads(l) for l in (w / "rm_ensemble" / "metrics" / f"member{i}.jsonl").read_text().splitlines()]
    assert 0 < [r for r in rows if "valid/accuracy" in r][-1]["valid/accuracy"] < 1
  ens = [r for r in metric_rows(w, "rm") if "final/ensemble/size" in r]
  assert len(ens) == 1 and ens[0]["final/ensemble/size"] == 3
  assert 0 < ens[0]["final/ensemble/valid/accuracy"] < 1 and 0 < ens[0]["final/ensemble/valid/heldout_group/accuracy"] < 1
  # the gold probe of the ensemble's mean score, on member 0's pairs (same answers, so the same count)
  single = [r for r in metric_rows(w, "rm") if "final/gold_probe/pairs" in r][-1]
  assert ens[0]["final/ensemble/gold_probe/pairs"] == single["final/gold_probe/pairs"] > 0
  assert 0 <= ens[0]["final/ensemble/gold_probe/agreement"] <= 1
  cli(w, "rm", "--config.rm.ensemble_size=3")      # complete: nothing retrained, the ensemble row not repeated
  assert len([r for r in metric_rows(w, "rm") if "final/ensemble/size" in r]) == 1
  assert trees_equal(final_params(w / "rm_ensemble" / "member2")[1], members[2])

  ens_flags = ["--config.rm.ensemble_size=3", "--config.ppo.rm_uncertainty_coef=1.0", "--config.ppo.total_episodes=32"]
  cli(w, "ppo", *ens_flags)
  rows = [r for r in metric_rows(w) if "train/objective/score" in r]
  assert len(rows) == 2 and all(r["train/objective/rm_ensemble_std"] > 0 for r in rows)
  # a finished PPO stage refuses another penalty (or another ensemble) instead of being silently skipped
  bad = subprocess.run(cli_cmd(w, "ppo", *ens_flags[:2], "--config.ppo.total_episodes=32",
                               "--config.ppo.rm_uncertainty_coef=0.5"),
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
  assert bad.returncode != 0 and "ppo.rm_uncertainty_coef: checkpoint has 1.0, config has 0.5" in bad.stderr
  bad = subprocess.run(cli_cmd(w, "ppo", "--config.ppo.total_episodes=32"), cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=cli_env())
  assert bad.returncode != 0 and "ppo.rm_ensemble_size: checkpoint has 3, config has 1" in bad.stderr
  # a smaller ensemble of the same members is evaluated again (its own row), nothing retrained
  cli(w, "rm", "--config.rm.ensemble_size=2")
  assert [r["final/ensemble/size"] for r in metric_rows(w, "rm") if "final/ensemble/size" in r] == [3, 2]


@pytest.mark.slow
def test_rm_runs_join_another_runs_rm_as_an_ensemble_member(reference_run, tmp_path):
  """ppo.rm_runs: a second run on the same world, whose RM trained on other comparisons (another seed), is
  a member beside W/rm: the members disagree, the penalty sees it, and a wrong entry is a clear error."""
  other = upstream_copy(reference_run, tmp_path / "other")
  shutil.rmtree(other / "rm")
  cli(other, "rm", "--config.seed=1")          # other comparisons and data order: another RM
  w = upstream_copy(reference_run, tmp_path / "main")
  flags = [f"--config.ppo.rm_runs={other}", "--config.ppo.rm_uncertainty_coef=1.0", "--config.ppo.total_episodes=32"]
  cli(w, "ppo", *flags)
  rows = [r for r in metric_rows(w) if "train/objective/score" in r]
  assert len(rows) == 2 and all(r["train/objective/rm_ensemble_std"] > 1e-4 for r in rows)
  meta = json.loads((w / "ppo" / str(final_state(w / "ppo")[0]) / "meta" / "metadata").read_text())
  assert meta["settings"]["rm_ensemble_size"] == 2 and meta["settings"]["rm_runs"] == str(other)
  from instructrl.stages import evaluate
  assert [m["name"] for m in evaluate.available_models(w) if m["stage"] == "ppo"] == ["PPO-ptx [2 RMs]"]
  for bad_runs, why in ((tmp_path / "nothing", "has no rm stage"), (w, "is this run"),
                        (f"{other},{other}", "is listed twice")):
    out = subprocess.run(cli_cmd(w, "ppo_noptx", f"--config.ppo.rm_runs={bad_runs}",
                                 "--config.ppo.total_episodes=32"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
    assert out.returncode != 0 and "ppo.rm_runs: " in out.stderr and why in out.stderr, out.stderr[-2000:]


def test_rm_uncertainty_penalty_without_an_ensemble_is_a_clear_error(tmp_path):
  out = subprocess.run(cli_cmd(tmp_path, "world", "--config.ppo.rm_uncertainty_coef=1.0"), cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=cli_env())
  assert out.returncode != 0 and "needs rm.ensemble_size >= 2" in out.stderr


def test_rm_base_workdir_without_a_finished_sft_is_a_clear_error(tmp_path):
  from configs import instructgpt
  from instructrl.stages import rm_models
  config = instructgpt.get_config("smoke")
  config.rm.base_workdir = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="rm.base_workdir=.*nothing: no finished 'sft' stage"):
    rm_models.rm_model(config)
  config.rm.base_workdir = ""
  assert rm_models.rm_model(config)["d_model"] == config.model.d_model


def test_a_checkpoint_saved_under_ppo_gamma_is_checked_as_ppo_discount():
  """ppo.gamma (the GAE discount) is now ppo.discount: a checkpoint whose settings name the old field resumes
  under the same value and is refused, naming the new field, under another."""
  from instructrl import checkpoints
  saved = checkpoints.settings_of(ppo_cfg())
  saved["gamma"] = saved.pop("discount")                  # as checkpoints saved before the rename record it
  checkpoints.check_settings({"settings": saved}, ppo_cfg(), "W/ppo", "ppo")
  with pytest.raises(checkpoints.CheckpointMismatch, match=r"ppo.discount: checkpoint has 1.0, config has 0.9\)"):
    checkpoints.check_settings({"settings": saved}, ppo_cfg(discount=0.9), "W/ppo", "ppo")


def test_preflight_accepts_a_ppo_stage_saved_under_ppo_gamma(tmp_path):
  """The CLI's check before a run reads the recorded settings the same way: a finished ppo stage that names
  the discount `gamma` passes under the same value, and is refused under another, naming ppo.discount."""
  from configs import instructgpt
  from instructrl import checkpoints, main
  config = instructgpt.get_config("smoke")
  saved = checkpoints.settings_of(config.ppo)
  saved["gamma"] = saved.pop("discount")
  ckpt = checkpoints.StageCheckpoints(tmp_path / "ppo")
  try:
    ckpt.save(4, {"x": np.zeros(1, np.float32)}, {"complete": True, "settings": saved})
  finally:
    ckpt.close()
  main.preflight(config, tmp_path, ["ppo"])
  config.ppo.discount = 0.9
  with pytest.raises(checkpoints.CheckpointMismatch, match="ppo.discount: checkpoint has 1.0, config has 0.9"):
    main.preflight(config, tmp_path, ["ppo"])
