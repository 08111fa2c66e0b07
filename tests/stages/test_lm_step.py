"""Loss math, batching, the LR schedule and the non-finite guard of the LM train step."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instructrl import objectives, parallel
from instructrl.data import batching
from instructrl.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from instructrl.models.config import ModelConfig
from instructrl.stages import lm, train_state


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ------------------------------------------------------------------ objectives

def test_token_nll_hand_computed():
  # B=1, T=3, V=3. Position 1 is masked and carries absurd logits that must not matter.
  logits = jnp.array([[[0.0, 0.0, 0.0], [100.0, -50.0, 3.0], [2.0, 1.0, 0.0]]], jnp.float32)
  targets = jnp.array([[1, 1, 0]])
  mask = jnp.array([[1, 0, 1]], bool)
  s, n = objectives.token_nll(logits, targets, mask)
  # position 0: uniform over 3 -> log 3; position 2: -log softmax([2,1,0])[0] = log(1 + e^-1 + e^-2)
  expect = math.log(3.0) + math.log(1.0 + math.exp(-1.0) + math.exp(-2.0))
  assert float(n) == 2.0
  assert float(s) == pytest.approx(expect, rel=1e-6)
  chex.assert_shape([s, n], ())
  chex.assert_type([s, n], jnp.float32)
  # changing the masked position changes nothing; unmasking it does
  s2, _ = objectives.token_nll(logits.at[0, 1].set(jnp.array([-7.0, 9.0, 1.0])), targets, mask)
  assert float(s2) == pytest.approx(expect, rel=1e-6)
  s3, n3 = objectives.token_nll(logits, targets, jnp.ones_like(mask))
  assert float(n3) == 3.0 and float(s3) == pytest.approx(expect + 150.0 + math.log(1 + math.exp(-150) + math.exp(-97)),
                                                        rel=1e-6)


def test_token_nll_matches_numpy_random():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, (2, 5))
  mask = rng.random((2, 5)) < 0.6
  s, n = objectives.token_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  lp = np_log_softmax(logits)
  ref = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
  assert float(s) == pytest.approx(ref[mask].sum(), rel=1e-5)
  assert float(n) == mask.sum()


def test_token_accuracy_hand_computed():
  logits = jnp.array([[[0.1, 0.9, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 1.0]]])
  targets = jnp.array([[1, 1, 2, 0]])   # hit, miss, hit (masked out), miss
  mask = jnp.array([[1, 1, 0, 1]])
  hits, n = objectives.token_accuracy(logits, targets, mask)
  assert float(hits) == 1.0 and float(n) == 3.0
  hits, n = objectives.token_accuracy(logits, targets, jnp.ones_like(mask))
  assert float(hits) == 2.0 and float(n) == 4.0


# ------------------------------------------------------------------ batching

class CharTokenizer:
  """a -> 10, b -> 11, ... (ids 0..3 are pad/unk/bos/eos)."""

  def encode_batch(self, texts):
    return [[10 + ord(c) - ord("a") for c in t] for t in texts]


def test_prompt_response_loss_mask_is_response_and_eos():
  ex = batching.prompt_response_examples(CharTokenizer(), ["ab", "abcdef", "x"], ["cde", "ghij", "yz"], seq_len=8)
  assert len(ex) == 2   # "abcdef"+"ghij" is 1 + 6 + 4 + 1 = 12 > 9 tokens: dropped
  chex.assert_shape([ex.tokens, ex.loss_mask], (2, 9))
  np.testing.assert_array_equal(ex.tokens[0], [BOS_ID, 10, 11, 12, 13, 14, EOS_ID, PAD_ID, PAD_ID])
  np.testing.assert_array_equal(ex.loss_mask[0], [0, 0, 0, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(ex.tokens[1], [BOS_ID, 33, 34, 35, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID])
  np.testing.assert_array_equal(ex.loss_mask[1], [0, 0, 1, 1, 1, 0, 0, 0, 0])
  b = ex.batch(np.array([0, 1]))
  chex.assert_shape([b["inputs"], b["targets"], b["mask"]], (2, 8))
  np.testing.assert_array_equal(b["inputs"], ex.tokens[:, :-1])
  np.testing.assert_array_equal(b["targets"], ex.tokens[:, 1:])
  # the trained targets are exactly the response tokens followed by EOS
  assert b["targets"][0][b["mask"][0]].tolist() == [12, 13, 14, EOS_ID]
  assert b["targets"][1][b["mask"][1]].tolist() == [34, 35, EOS_ID]


def test_prompt_response_exact_fit_kept_and_all_too_long_raises():
  # exactly seq_len + 1 tokens fits
  ex = batching.prompt_response_examples(CharTokenizer(), ["abc"], ["de"], seq_len=6)
  assert len(ex) == 1 and ex.tokens[0, -1] == EOS_ID and ex.loss_mask[0, -1]
  with pytest.raises(ValueError, match="seq_len"):
    batching.prompt_response_examples(CharTokenizer(), ["abcd"], ["de"], seq_len=6)


def test_prompt_response_truncate_keeps_every_row_and_its_eos():
  from instructrl.stages.rm_models import eos_index
  # seq_len=6: 7 tokens, room for 5 prompt + response tokens between BOS and EOS
  ex = batching.prompt_response_examples(CharTokenizer(), ["abcd", "ab", "x"], ["ef", "ghijklm", "y"], seq_len=6,
                                         truncate=True)
  np.testing.assert_array_equal(ex.tokens, [[BOS_ID, 11, 12, 13, 14, 15, EOS_ID],      # prompt loses its start
                                            [BOS_ID, 16, 17, 18, 19, 20, EOS_ID],      # response cut to 5, no prompt
                                            [BOS_ID, 33, 34, EOS_ID, PAD_ID, PAD_ID, PAD_ID]])
  np.testing.assert_array_equal(ex.loss_mask, [[0, 0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(eos_index(ex), [6, 6, 3])
  # rows that fit are what the dropping policy makes of them
  fits = batching.prompt_response_examples(CharTokenizer(), ["x"], ["y"], seq_len=6)
  np.testing.assert_array_equal(ex.tokens[2:], fits.tokens)


def test_pack_texts_windows():
  ex = batching.pack_texts([[10, 11], [12, 13, 14]], seq_len=4)
  # stream: BOS 10 11 EOS BOS 12 13 14 EOS (9 tokens) -> (9 - 1) // 4 = 2 windows of 5 overlapping by one
  np.testing.assert_array_equal(ex.tokens, [[BOS_ID, 10, 11, EOS_ID, BOS_ID], [BOS_ID, 12, 13, 14, EOS_ID]])
  assert ex.loss_mask.all() and ex.loss_mask.shape == (2, 5)
  b = ex.batch(np.array([1]))
  np.testing.assert_array_equal(b["inputs"], [[BOS_ID, 12, 13, 14]])
  np.testing.assert_array_equal(b["targets"], [[12, 13, 14, EOS_ID]])
  assert len(batching.pack_texts([[10, 11], [12, 13, 14]], seq_len=3)) == 2   # 8 // 3 windows
  with pytest.raises(ValueError, match="seq_len"):
    batching.pack_texts([[10]], seq_len=8)


def test_batch_indices_epochs_and_purity():
  n, bs, seed = 10, 4, 3
  steps = [batching.batch_indices(n, bs, s, seed) for s in range(5)]   # 20 indices = exactly 2 epochs
  for b in steps:
    assert b.shape == (bs,) and b.dtype == np.int64
  flat = np.concatenate(steps)
  assert sorted(flat[:n].tolist()) == list(range(n))
  assert sorted(flat[n:].tolist()) == list(range(n))
  assert not np.array_equal(flat[:n], flat[n:])              # epochs are differently shuffled
  assert not np.array_equal(flat[:n], np.arange(n))          # and shuffled at all
  # a pure function of (n, batch_size, step, seed): recomputing in any order gives the same batch
  for s in (4, 0, 2):
    np.testing.assert_array_equal(batching.batch_indices(n, bs, s, seed), steps[s])
  assert not np.array_equal(batching.batch_indices(n, bs, 0, seed + 1), steps[0])
  # batch larger than the dataset spans epochs
  big = batching.batch_indices(3, 7, 0, 0)
  assert big.shape == (7,) and sorted(big[:3].tolist()) == [0, 1, 2] and sorted(big[3:6].tolist()) == [0, 1, 2]
  with pytest.raises(ValueError):
    batching.batch_indices(0, 2, 0, 0)


# ------------------------------------------------------------------ schedule

def closed_form(step, lr, total, warmup, final):
  if step < warmup:
    return lr * step / warmup
  frac = (step - warmup) / (total - warmup)
  end = lr * final
  return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))


@pytest.mark.parametrize("warmup", [0, 10])
def test_schedule_warmup_cosine(warmup):
  lr, total, final = 1e-3, 100, 0.1
  sched = train_state.make_schedule(lr, total, warmup, final)
  mid = (warmup + total) // 2
  for step in (0, warmup // 2, warmup, mid, 80, total):
    want = closed_form(step, lr, total, warmup, final)
    got = float(sched(step))
    assert got == pytest.approx(want, rel=0.1, abs=1e-9), (step, got, want)
  assert float(sched(warmup)) == pytest.approx(lr, rel=1e-4)
  assert float(sched(total)) == pytest.approx(lr * final, rel=1e-3)
  assert float(sched(mid)) == pytest.approx(0.55e-3, rel=0.05)   # halfway down the cosine: (1 + 0.1) / 2
  if warmup:
    assert float(sched(0)) == 0.0


def test_schedule_rejects_bad_values():
  with pytest.raises(ValueError, match="warmup_steps"):
    train_state.make_schedule(1e-3, 10, 10, 0.1)
  with pytest.raises(ValueError, match="steps"):
    train_state.make_schedule(1e-3, 0, 0, 0.1)


# ------------------------------------------------------------------ the train step and its guard

def stage_cfg(**kw):
  return ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=0, final_lr_fraction=0.1, grad_clip=1.0,
                                        b1=0.9, b2=0.95, weight_decay=0.01, **kw))


@pytest.fixture(scope="module")
def one_device_steps():
  cfg = ModelConfig(style="gpt", vocab_size=32, max_len=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                    head_dim=8, d_ff=32, resid_dropout=0.1)
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = parallel.DEFAULT_RULES
  tx, schedule = train_state.make_optimizer(stage_cfg(), total_steps=10)
  sh = train_state.state_shardings(cfg, tx, mesh, rules)
  params = train_state.init_params(cfg, jax.random.key(0), sh["params"], mesh, rules)
  train, evaluate = lm.make_steps(cfg, tx, schedule, sh, mesh, rules)
  rng = np.random.default_rng(0)
  toks = rng.integers(4, 32, (4, 9)).astype(np.int32)
  batch = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
           "mask": jnp.asarray(rng.random((4, 8)) < 0.7)}
  return dict(cfg=cfg, mesh=mesh, rules=rules, tx=tx, sh=sh, params=params, train=train, evaluate=evaluate,
              batch=batch)


def _host(tree):
  return jax.tree.map(lambda a: np.array(a), tree)


def test_train_step_updates_and_reports(one_device_steps):
  d = one_device_steps
  state = train_state.new_state(jax.tree.map(jnp.copy, d["params"]), d["tx"], d["sh"], d["mesh"])
  before = _host(state)
  with parallel.activate(d["mesh"], d["rules"]):
    ev = d["evaluate"](state["params"], d["batch"])
    state, m = d["train"](state, d["batch"], jax.random.key(1))
  assert bool(m["finite"]) and int(state["step"]) == 1
  assert float(m["tokens"]) == float(np.asarray(d["batch"]["mask"]).sum())
  # eval NLL at the initial params is about log V (near-uniform init) and the train loss is close to it
  assert float(ev["nll_sum"]) / float(ev["count"]) == pytest.approx(math.log(32), rel=0.05)
  assert float(m["loss"]) == pytest.approx(float(ev["nll_sum"]) / float(ev["count"]), rel=0.05)
  assert float(m["lr"]) == pytest.approx(1e-3)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before["params"], state["params"])
  assert all(jax.tree.leaves(changed))


def test_non_finite_step_leaves_state_unchanged(one_device_steps):
  d = one_device_steps
  bad = jax.tree.map(jnp.copy, d["params"])
  bad["layer_0"]["mlp"]["w_in"] = bad["layer_0"]["mlp"]["w_in"].at[0, 0].set(jnp.nan)
  state = train_state.new_state(bad, d["tx"], d["sh"], d["mesh"])
  with parallel.activate(d["mesh"], d["rules"]):   # one good step first so opt_state is non-trivial
    good = train_state.new_state(jax.tree.map(jnp.copy, d["params"]), d["tx"], d["sh"], d["mesh"])
    good, _ = d["train"](good, d["batch"], jax.random.key(1))
  # carry the good optimizer state and step over to the NaN params
  state = {"step": good["step"], "params": state["params"], "opt_state": good["opt_state"]}
  before = _host(state)
  with parallel.activate(d["mesh"], d["rules"]):
    new, m = d["train"](state, d["batch"], jax.random.key(2))
  assert not bool(m["finite"])
  assert not np.isfinite(float(m["loss"]))
  after = _host(new)
  assert int(after["step"]) == int(before["step"]) == 1
  chex.assert_trees_all_equal_structs(after, before)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)   # NaN == NaN here: assert_array_equal treats NaNs as equal
