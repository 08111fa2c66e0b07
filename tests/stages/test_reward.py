"""The RM stage: sharded == unsharded per-prompt step, the shuffled-pairs ablation step, where the
score is read, one ranking per prompt, labeler agreement, the demo-mean bias, and the `rm` stage
end to end through the CLI (collection files, metrics, exact resume after SIGKILL, rerun no-op).

The 8 simulated CPU devices live in a subprocess (XLA_FLAGS must be set before JAX starts), as in
test_sharding.py; the CLI runs are subprocesses, as a user runs them. Every subprocess is bounded.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instructrl import objectives, parallel
from instructrl.models.config import ModelConfig
from instructrl.stages import reward, rm_collect, rm_models, rm_probes, train_state
from tests.cli_helpers import cli_env, final_params, run_worker_on_8_devices, sigkill_when_exists

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
# Updated params: Adam divides each element's gradient by its own RMS, so an element whose gradient is
# near round-off shows the sharded reduction order at ~lr x its relative error (measured: attn/wo 1.2e-5
# on (2,2,2) after two steps of lr 1e-3, i.e. 0.6% of one step); 3e-5 is 1.5% of one step.
PARAM_TOL = 3e-5

# Tiny scalar-head model; dropout on so the sharded test also checks the dropout masks agree.
GPT = dict(style="gpt", vocab_size=64, max_len=16, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=16,
           d_ff=128, tie_embeddings=True, embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
NO_DROPOUT = {**GPT, "embed_dropout": 0.0, "attn_dropout": 0.0, "resid_dropout": 0.0}
# Params the K-choose-2 loss is exactly invariant to (their true gradient is 0): the score bias and the
# final norm's bias shift every reward equally (the loss sees only differences within a prompt), and the
# key bias shifts every attention logit of a query equally (softmax). Their computed gradients are float
# round-off, which Adam normalises into steps of up to ~lr, so they are not compared across meshes
# (a different reduction order gives different round-off); they cannot change any loss or accuracy.
INVARIANT = ("score_bias", "norm_final/bias", "layer_0/attn/bk")
STAGE = dict(learning_rate=1e-3, warmup_steps=0, final_lr_fraction=0.1, grad_clip=1.0, b1=0.9, b2=0.95,
             weight_decay=0.1)


def ragged_batch(B: int = 8, K: int = 4, T: int = 12, vocab: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
  """A RankedExamples-like batch: K per prompt in {2, 3, 4}, padded slots all PAD with rank K, last_index 0."""
  rng = np.random.default_rng(seed)
  ks = np.resize([4, 2, 3, 4, 2, 4, 3, 2], B)
  toks = np.zeros((B, K, T), np.int32)
  last = np.zeros((B, K), np.int32)
  ranks = np.full((B, K), K, np.int32)
  mask = np.zeros((B, K), bool)
  for b in range(B):
    for k in range(ks[b]):
      n = int(rng.integers(4, T + 1))
      toks[b, k, :n] = rng.integers(4, vocab, n)
      last[b, k] = n - 1
    ranks[b, :ks[b]] = rng.permutation(ks[b])
    mask[b, :ks[b]] = True
  assert (~mask).any() and mask.sum(1).min() >= 2
  return {"tokens": toks, "last_index": last, "ranks": ranks, "mask": mask}


def one_device_setup(cfg: ModelConfig, formulation: str, seed: int = 0, policy_pair_weight: float = 1.0):
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = parallel.DEFAULT_RULES
  tx, schedule = train_state.make_optimizer(ml_collections.ConfigDict(STAGE), total_steps=10)
  sh = train_state.state_shardings(cfg, tx, mesh, rules, head="scalar")
  params = train_state.init_params(cfg, jax.random.key(seed), sh["params"], mesh, rules, head="scalar")
  steps = reward.make_steps(cfg, formulation, tx, schedule, sh, mesh, rules, policy_pair_weight)
  return mesh, rules, tx, sh, params, steps


# ----------------------------------------------------------------------------- sharded == unsharded

def _worker():
  import jax
  import ml_collections
  import numpy as np

  from instructrl import parallel
  from instructrl.models.config import ModelConfig
  from instructrl.stages import reward, train_state

  assert len(jax.devices()) == 8, jax.devices()
  rules = parallel.DEFAULT_RULES
  cfg = ModelConfig(**GPT)
  batch = ragged_batch()

  def leafdiff(a, b):
    return {"/".join(str(k.key) for k in kp): float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
            for (kp, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b))}

  def maxdiff(a, b):   # over the params the ranking loss depends on
    return max(v for k, v in leafdiff(a, b).items() if k not in INVARIANT)

  def run(shape, init_from=None):
    devices = jax.devices() if np.prod(shape) == 8 else jax.devices()[:1]
    mesh = parallel.make_mesh(shape, devices=devices)
    tx, schedule = train_state.make_optimizer(ml_collections.ConfigDict(STAGE), total_steps=10)
    sh = train_state.state_shardings(cfg, tx, mesh, rules, head="scalar")
    if init_from is None:
      params = train_state.init_params(cfg, jax.random.key(0), sh["params"], mesh, rules, head="scalar")
    else:   # the same values placed with this mesh's shardings (an init compile per mesh is the slow part)
      params = jax.device_put(init_from, sh["params"])
    init = jax.tree.map(np.asarray, params)
    state = train_state.new_state(params, tx, sh, mesh)
    train, evaluate, _ = reward.make_steps(cfg, "per_prompt", tx, schedule, sh, mesh, rules)
    out = {"losses": [], "grad_norms": [], "accuracy": [], "pairs": []}
    with parallel.activate(mesh, rules):
      b = train_state.device_batch(batch, mesh, rules)
      for _ in range(2):
        state, m = train(state, b, jax.random.key(5))
        for k, name in (("losses", "loss"), ("grad_norms", "grad_norm"), ("accuracy", "accuracy"),
                        ("pairs", "pairs")):
          out[k].append(float(m[name]))
      e = evaluate(state["params"], b)
    out.update(step=int(state["step"]), eval_loss=float(e["loss"]), eval_accuracy=float(e["accuracy"]),
               n_shards_wq=len({tuple((i.start, i.stop) for i in idx) for idx in
                                state["params"]["layer_0"]["attn"]["wq"].sharding.devices_indices_map(
                                    state["params"]["layer_0"]["attn"]["wq"].shape).values()}))
    return out, init, jax.tree.map(np.asarray, state["params"])

  res = {}
  sharded, init, params = run((2, 2, 2))
  ref, ref_init, ref_params = run((1, 1, 1), init_from=init)
  res["1x1x1"] = {**ref, "param_diff": 0.0, "update_size": maxdiff(ref_params, ref_init),
                  "leaf_update": leafdiff(ref_params, ref_init)}
  res["2x2x2"] = {**sharded, "param_diff": maxdiff(params, ref_params), "leaf_diff": leafdiff(params, ref_params)}
  for name, shape in (("8x1x1", (8, 1, 1)), ("2x4x1", (2, 4, 1))):
    info, _, p = run(shape, init_from=ref_init)
    res[name] = {**info, "param_diff": maxdiff(p, ref_params), "leaf_diff": leafdiff(p, ref_params)}
  print("RESULT " + json.dumps(res))


@pytest.fixture(scope="module")
def sharded_result():
  return run_worker_on_8_devices(__file__)


@pytest.mark.parametrize("mesh", ["8x1x1", "2x4x1", "2x2x2"])
def test_per_prompt_step_sharded_equals_unsharded(sharded_result, mesh):
  r, ref = sharded_result[mesh], sharded_result["1x1x1"]
  assert ref["step"] == r["step"] == 2
  assert ref["update_size"] > 1e-4, "the two steps must actually move the params"
  assert all(v > 1e-4 for k, v in ref["leaf_update"].items() if k not in INVARIANT), ref["leaf_update"]
  # ragged K: 4,2,3,4,2,4,3,2 responses -> 6+1+3+6+1+6+3+1 = 27 comparisons, padded slots never counted
  assert r["pairs"] == ref["pairs"] == [27.0, 27.0]
  for key in ("losses", "accuracy"):
    np.testing.assert_allclose(r[key], ref[key], atol=TOL, err_msg=key)
  np.testing.assert_allclose(r["grad_norms"], ref["grad_norms"], rtol=1e-4, atol=1e-6)
  assert abs(r["eval_loss"] - ref["eval_loss"]) < TOL and abs(r["eval_accuracy"] - ref["eval_accuracy"]) < TOL
  assert r["param_diff"] < PARAM_TOL, r["leaf_diff"]
  assert r["n_shards_wq"] == {"8x1x1": 1, "2x4x1": 4, "2x2x2": 4}[mesh]   # really split on fsdp (x tensor)


# ----------------------------------------------------------------------------- steps, scores (1 device)

def test_shuffled_pairs_step_loss_is_pairwise_loss_of_rm_scores():
  from instructrl.models.transformer import Decoder
  from instructrl.data.rankings import RankedExamples, pairs_from_ranked
  cfg = ModelConfig(**NO_DROPOUT)
  mesh, rules, tx, sh, params, (train, _, score) = one_device_setup(cfg, "shuffled_pairs", seed=1)
  b = ragged_batch(seed=3)
  pairs = pairs_from_ranked(RankedExamples(b["tokens"], b["last_index"], b["ranks"], b["mask"],
                                           np.arange(len(b["tokens"]))))
  assert len(pairs) == 27
  batch = pairs.batch(np.arange(16))
  model = Decoder(cfg, head="scalar")
  host_params = jax.tree.map(np.asarray, params)          # the step donates its state
  scores = jax.jit(lambda p, t, l: rm_models.rm_scores(model, p, t, l))
  r_c = scores(host_params, batch["chosen"], batch["chosen_last"])
  r_r = scores(host_params, batch["rejected"], batch["rejected_last"])
  want, want_m = objectives.pairwise_loss(r_c, r_r)
  # by hand too: mean over rows of -log sigmoid(r_w - r_l)
  by_hand = float(np.mean(np.log1p(np.exp(-(np.asarray(r_c, np.float64) - np.asarray(r_r, np.float64))))))
  assert abs(float(want) - by_hand) < 1e-6
  state = train_state.new_state(params, tx, sh, mesh)
  with parallel.activate(mesh, rules):
    new, m = train(state, train_state.device_batch(batch, mesh, rules), jax.random.key(0))
  assert bool(m["finite"]) and int(new["step"]) == 1
  assert abs(float(m["loss"]) - float(want)) < 1e-6, (float(m["loss"]), float(want))
  assert abs(float(m["accuracy"]) - float(want_m["accuracy"])) < 1e-6 and float(m["pairs"]) == 16
  moved = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(jax.tree.leaves(new["params"]),
                                                                        jax.tree.leaves(host_params)))
  assert moved > 1e-5
  # score_step is rm_scores under jit
  with parallel.activate(mesh, rules):
    s = score(jax.device_put(host_params, sh["params"]), jnp.asarray(batch["chosen"]),
              jnp.asarray(batch["chosen_last"]))
  np.testing.assert_allclose(np.asarray(s), np.asarray(r_c), atol=1e-6)


def test_policy_pair_weight_reweights_the_step_loss_by_own_pairs():
  from instructrl.models.transformer import Decoder
  cfg = ModelConfig(**NO_DROPOUT)
  b = ragged_batch(seed=5)
  own = np.zeros(b["mask"].shape, bool)
  own[:, :2] = True                                        # slots 0 and 1 of every prompt: the policy's
  model = Decoder(cfg, head="scalar")
  losses = {}
  for weight in (1.0, 4.0):
    mesh, rules, tx, sh, params, (train, _, _) = one_device_setup(cfg, "per_prompt", 2, policy_pair_weight=weight)
    host = jax.tree.map(np.asarray, params)
    B, K, T = b["tokens"].shape
    r = np.asarray(jax.jit(lambda p: rm_models.rm_scores(model, p, b["tokens"].reshape(B * K, T),
                                                      b["last_index"].reshape(B * K)))(host)).reshape(B, K)
    w = np.where(own[:, :, None] & own[:, None, :], weight, 1.0)
    want = objectives.ranking_loss(jnp.asarray(r), jnp.asarray(b["ranks"]), jnp.asarray(b["mask"]), jnp.asarray(w))[0]
    with parallel.activate(mesh, rules):
      _, m = train(train_state.new_state(params, tx, sh, mesh),
                   train_state.device_batch({**b, "own": own}, mesh, rules), jax.random.key(0))
    np.testing.assert_allclose(float(m["loss"]), float(want), rtol=1e-5)
    losses[weight] = float(m["loss"])
  assert abs(losses[4.0] - losses[1.0]) > 1e-4, losses       # the weight reaches the loss


def test_rm_scores_reads_the_score_at_last_index():
  from instructrl.models.transformer import Decoder
  cfg = ModelConfig(**NO_DROPOUT)
  _, _, _, _, params, _ = one_device_setup(cfg, "per_prompt", seed=2)
  params = jax.tree.map(np.asarray, params)
  params["score_bias"] = np.float32(0.25)             # a non-zero bias is part of the score
  model = Decoder(cfg, head="scalar")
  f = jax.jit(lambda t, l: rm_models.rm_scores(model, params, t, l))
  full = jax.jit(lambda t: model.apply({"params": params}, t)[0])
  rng = np.random.default_rng(0)
  T = 12
  last = np.array([3, 7, 11, 5], np.int32)
  toks = np.zeros((4, T), np.int32)
  for i, n in enumerate(last + 1):
    toks[i, :n] = rng.integers(4, 64, n)
    toks[i, n - 1] = 3                                  # the EOS at last_index
  base = np.asarray(f(toks, last))
  np.testing.assert_allclose(base, np.asarray(full(toks))[np.arange(4), last], atol=1e-6)
  # anything after the EOS (pads or garbage) changes nothing
  after = toks.copy()
  for i, n in enumerate(last + 1):
    after[i, n:] = rng.integers(4, 64, T - n)
  np.testing.assert_allclose(np.asarray(f(after, last)), base, atol=1e-6)
  # the token at last_index (and before it) does change the score, row by row
  at = toks.copy()
  at[np.arange(4), last] = 17
  changed = np.asarray(f(at, last))
  assert np.all(np.abs(changed - base) > 1e-6), (changed, base)
  # reading one position earlier gives a different number (it is not a pooled score)
  assert np.all(np.abs(np.asarray(f(toks, last - 1)) - base) > 1e-6)


def test_mean_score_averages_every_row_not_whole_batches_only():
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  score_step = jax.jit(lambda params, t, l: jnp.take_along_axis(t, l[:, None], 1)[:, 0].astype(jnp.float32) + params)
  tokens = np.arange(5 * 3, dtype=np.int32).reshape(5, 3)
  last = np.array([0, 1, 2, 0, 1], np.int32)        # scores 0, 4, 8, 9, 13: mean 6.8 (whole batches of 2: 5.25)
  assert reward.mean_score(score_step, jnp.float32(0.0), tokens, last, 2, mesh, parallel.DEFAULT_RULES) == \
      pytest.approx(6.8)
  assert reward.mean_score(score_step, jnp.float32(1.0), tokens, last, 8, mesh, parallel.DEFAULT_RULES) == \
      pytest.approx(7.8)                            # fewer rows than one batch


def test_gold_agreement_on_hand_made_pairs():
  # prompts: gold prefers greedy / sampled / ties / greedy / sampled; the RM gets 1, 2 and 4 right, ties 5
  rm_g, rm_s = [0.9, 0.1, 0.5, 0.2, 0.3], [0.1, 0.8, 0.0, 0.6, 0.3]
  gold_g, gold_s = [1.0, 0.2, 0.5, 1.0, 0.1], [0.0, 0.9, 0.5, 0.3, 0.7]
  out = rm_probes.gold_agreement(rm_g, rm_s, gold_g, gold_s)
  assert out["pairs"] == 4                                  # the gold tie is not a pair
  assert out["agreement"] == pytest.approx(2 / 4)          # prompts 1, 2 right; 4 wrong; the RM tie is a miss
  assert out["score_gap"] == pytest.approx((np.mean(rm_g) - np.mean(rm_s)) / np.std(rm_s))
  assert out["gold_greedy"] == pytest.approx(0.56) and out["gold_sampled"] == pytest.approx(0.48)
  # no pair where gold differs: no agreement to report (run_gold_probe then drops it, keeping the count)
  assert np.isnan(rm_probes.gold_agreement([1.0], [0.0], [0.5], [0.5])["agreement"])


# ----------------------------------------------------------------------------- data helpers

def test_family_accuracy_on_hand_made_rankings():
  from instructrl.data.rankings import RankedExamples

  class World:   # gold = the response's length; utility adds a taste for "!"
    judge = lambda self, rec, x: type("V", (), {"score": len(x)})()
    utility = lambda self, rec, x, labeler: len(x) + 10 * x.endswith("!")

  recs = [{"family": "b", "labeler": "L0", "responses": ["a", "bb", "ccc!"]},
          {"family": "a", "labeler": "L1", "responses": ["xx", "yy"]},
          {"family": "b", "labeler": "L0", "responses": ["dropped", "q"]}]
  # record 2 was dropped (over-long): rows 0, 1 are records 0, 1; row 1's second slot is padding
  ranks = np.array([[1, 0, 2], [0, 3, 3]])         # record 0: "bb" > "a" > "ccc!"
  ex = RankedExamples(tokens=np.zeros((2, 3, 4), np.int32), last_index=np.zeros((2, 3), np.int32), ranks=ranks,
                      mask=np.array([[1, 1, 1], [1, 1, 0]], bool), index=np.array([0, 1]))
  with pytest.raises(IndexError):
    rm_probes.family_accuracy(recs, RankedExamples(ex.tokens, ex.last_index, ranks, np.ones((2, 3), bool),
                                                ex.index), np.zeros((2, 3)), World())   # slot past "xx", "yy"
  ex = RankedExamples(ex.tokens, ex.last_index, ranks, ex.mask, ex.index)
  scores = np.array([[0.0, 1.0, 2.0], [5.0, 5.0, np.nan]])
  out = rm_probes.family_accuracy(recs, ex, scores, World())
  assert list(out) == ["a", "b", "all"]
  # family b: labeler pairs (bb>a), (bb>ccc!), (a>ccc!); RM scores 0 < 1 < 2 agree on the first only;
  # utility (1, 2, 14) agrees on the first only; gold (1, 2, 4) never ties, RM agrees with gold on all 3
  assert out["b"] == {"pairs": 3, "accuracy": 1 / 3, "utility_accuracy": 1 / 3, "gold_pairs": 3, "gold_accuracy": 1.0}
  # family a: one pair, an RM tie and a utility tie count half, gold ties (no gold pairs)
  assert out["a"]["pairs"] == 1 and out["a"]["accuracy"] == 0.5 and out["a"]["utility_accuracy"] == 0.5
  assert out["a"]["gold_pairs"] == 0 and math.isnan(out["a"]["gold_accuracy"])
  assert out["all"]["pairs"] == 4 and out["all"]["accuracy"] == 1.5 / 4 and out["all"]["gold_accuracy"] == 1.0
  # the RM reversed on record 0: it disagrees with gold everywhere, with the labeler on (a>ccc!) and (bb>ccc!)
  out = rm_probes.family_accuracy(recs, ex, -scores, World())
  assert out["b"]["gold_accuracy"] == 0.0 and out["b"]["accuracy"] == 2 / 3


def test_example_scores_scores_real_slots_only():
  from instructrl.data.rankings import RankedExamples
  tokens = np.arange(2 * 2 * 3).reshape(2, 2, 3)
  ex = RankedExamples(tokens=tokens, last_index=np.ones((2, 2), np.int32), ranks=np.zeros((2, 2), np.int32),
                      mask=np.array([[1, 0], [1, 1]], bool), index=np.arange(2))
  seen = []
  out = rm_probes.example_scores(lambda t, l: seen.append(t.shape) or t[:, 0].astype(float), ex)
  assert seen == [(3, 3)]
  np.testing.assert_array_equal(out, [[0.0, np.nan], [6.0, 9.0]])


def test_select_one_ranking_per_prompt_round_robin_over_groups():
  ids = ["p3", "p0", "p4", "p1", "p2"]
  records = [{"id": pid, "group": g, "ranking": [0, 1]} for pid in ids for g in range(5)]
  picked = reward.select(records, [0, 1, 3])
  assert sorted(r["id"] for r in picked) == sorted(ids)                      # one per prompt
  # sorted ids p0..p4 get groups 0, 1, 3, 0, 1
  assert {r["id"]: r["group"] for r in picked} == {"p0": 0, "p1": 1, "p2": 3, "p3": 0, "p4": 1}
  assert all(r["group"] != 4 for r in reward.select(records, [0, 1, 2, 3]))  # held-out group never picked


def test_select_several_rankings_per_prompt_from_distinct_groups():
  ids = ["p3", "p0", "p4", "p1", "p2"]
  records = [{"id": pid, "group": g, "ranking": [0, 1]} for pid in ids for g in range(5)]
  picked = reward.select(records, [0, 1, 3], per_prompt=2)
  got = {pid: sorted(r["group"] for r in picked if r["id"] == pid) for pid in ids}
  # sorted ids p0..p4 start at groups 0, 1, 3, 0, 1 and take the next one round-robin
  assert got == {"p0": [0, 1], "p1": [1, 3], "p2": [0, 3], "p3": [0, 1], "p4": [1, 3]}
  assert len(reward.select(records, [0, 1, 3], per_prompt=3)) == 15           # every training group's ranking
  with pytest.raises(ValueError, match="rankings_per_prompt=4: expected 1..3"):
    reward.select(records, [0, 1, 3], per_prompt=4)


def test_mismatched_prompts_are_other_prompts_half_of_the_same_family():
  pool = [{"prompt": f"{f} {i}", "family": f} for f in ("count", "add", "sort") for i in range(20)]
  prompts = [r["prompt"] for r in pool] * 10
  got = rm_collect.mismatched_prompts(prompts, pool, jax.random.key(0))
  assert got == rm_collect.mismatched_prompts(prompts, pool, jax.random.key(0))      # deterministic in the key
  assert got != rm_collect.mismatched_prompts(prompts, pool, jax.random.key(1))
  assert all(q != p for p, q in zip(prompts, got))                                # never the prompt itself
  family = {r["prompt"]: r["family"] for r in pool}
  same = np.mean([family[p] == family[q] for p, q in zip(prompts, got)])
  # half drawn from the family, half from all three families (a third of which is the same family again)
  assert abs(same - (0.5 + 0.5 * 19 / 59)) < 0.05, same
  with pytest.raises(ValueError, match="2 distinct"):
    rm_collect.mismatched_prompts(["a"], [{"prompt": "a", "family": "add"}], jax.random.key(0))


def test_zero_weight_sources_do_not_change_the_collection_key():
  from configs.instructgpt import get_config
  config = get_config("smoke")
  key = rm_collect.collection_key(config)
  assert "mismatched" not in key["source_mix"] and "ppo" not in key["source_mix"]
  config.rm.source_mix.mismatched = 0.25
  assert rm_collect.collection_key(config)["source_mix"]["mismatched"] == 0.25


def test_settings_saved_before_a_nested_field_was_added_still_match():
  from instructrl import checkpoints
  asked = ml_collections.ConfigDict({"lr": 1.0, "extra_comparisons": "", "source_mix": {"policy": 1.0, "mismatched": 0.0}})
  checkpoints.check_settings({"settings": {"lr": 1.0, "source_mix": {"policy": 1.0}}}, asked, "W/rm", "rm")
  asked.source_mix.mismatched = 0.5
  with pytest.raises(checkpoints.CheckpointMismatch, match="source_mix"):
    checkpoints.check_settings({"settings": {"lr": 1.0, "source_mix": {"policy": 1.0}}}, asked, "W/rm", "rm")


def test_best_of_n_curve_on_hand_made_scores():
  from instructrl.tools.best_of_n import curve
  # 2 prompts x 4 samples. Prompt 0: the RM's favourite is the worst answer; prompt 1: the RM is right.
  rm = [[0.1, 0.9, 0.2, 0.3], [0.5, 0.1, 0.4, 0.0]]
  gold = [[1.0, 0.0, 0.5, 0.2], [1.0, 0.2, 0.2, 0.0]]
  win = [[0.9, 0.1, 0.5, 0.3], [0.8, 0.4, 0.4, 0.2]]
  out = curve(rm, gold, win, [1, 2, 4])
  assert out["n"] == [1, 2, 4]
  assert out["rm_pick_gold"][0] == pytest.approx(np.mean(gold)) and out["gold_pick_gold"][0] == pytest.approx(np.mean(gold))
  # n=2: groups (0,1) and (2,3). Prompt 0 picks 1 then 3 -> gold 0, 0.2; prompt 1 picks 0 then 2 -> 1, 0.2
  assert out["rm_pick_gold"][1] == pytest.approx((0.0 + 0.2 + 1.0 + 0.2) / 4)
  assert out["gold_pick_gold"][1] == pytest.approx((1.0 + 0.5 + 1.0 + 0.2) / 4)
  assert out["rm_pick_gold"][2] == pytest.approx((0.0 + 1.0) / 2) and out["gold_pick_win"][2] == pytest.approx(0.85)
  with pytest.raises(ValueError, match="n=8"):
    curve(rm, gold, win, [8])


def test_best_of_n_by_family_splits_the_prompts():
  from instructrl.tools.best_of_n import by_family
  rm = np.array([[0.1, 0.9, 0.2, 0.3], [0.5, 0.1, 0.4, 0.0], [0.0, 1.0, 0.0, 0.0]])
  gold = np.array([[1.0, 0.0, 0.5, 0.2], [1.0, 0.2, 0.2, 0.0], [0.0, 1.0, 0.0, 0.0]])
  win = gold / 2
  rows = {r["family"]: r for r in by_family(rm, gold, win, ["sort", "capital", "capital"], 4)}
  assert set(rows) == {"sort", "capital"} and rows["sort"]["prompts"] == 1 and rows["capital"]["prompts"] == 2
  assert rows["sort"]["rm_pick_gold"] == 0.0 and rows["sort"]["gold_pick_gold"] == 1.0
  assert rows["sort"]["sample_gold"] == pytest.approx(gold[0].mean())
  assert rows["capital"]["rm_pick_gold"] == 1.0 and rows["capital"]["rm_pick_win"] == 0.5
  # the RM ranks sort's answers against gold: negative within-prompt correlation
  assert rows["sort"]["rm_gold_correlation_within_prompt"] < 0 < rows["capital"]["rm_gold_correlation_within_prompt"]


def test_pick_responses_drops_duplicates_and_keeps_one_empty_answer_only_when_asked():
  from instructrl.stages.rm_collect import pick_responses
  plan = ["policy", "policy", "pretrain", "policy"]
  pools = {"policy": ["3 7 9", "", "3 7 9", "", "9 7 3"], "pretrain": ["3 7 9", "Sort these too."]}
  assert pick_responses(plan, pools, keep_empty=False) == (["3 7 9", "9 7 3", "Sort these too."],
                                                           ["policy", "policy", "pretrain"])
  # the empty sample is ranked like any other, once; the pool's second empty is a duplicate
  assert pick_responses(plan, pools, keep_empty=True) == (["3 7 9", "", "Sort these too.", "9 7 3"],
                                                          ["policy", "policy", "pretrain", "policy"])


def test_own_comparisons_may_hold_an_empty_answer_other_ranked_data_may_not(tmp_path):
  from instructrl.data.rankings import RecordError, load_ranked
  f = tmp_path / "train.jsonl"
  f.write_text(json.dumps({"prompt": "Reverse these words: cat sun", "responses": ["sun cat", ""], "ranking": [0, 1]}) + "\n")
  with pytest.raises(RecordError, match=r"train.jsonl:1: responses\[1\] is empty"):
    load_ranked(f)
  assert load_ranked(f, allow_empty_response=True)[0]["responses"] == ["sun cat", ""]


def test_restrict_keeps_one_sources_responses_in_ranked_order():
  r = {"responses": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1], "sources": ["policy", "pretrain", "policy", "policy"]}
  (out,) = reward.restrict([r], "policy")
  assert out["responses"] == ["a", "c", "d"] and out["ranking"] == [1, 0, 2]   # c > a > d, as in the full ranking
  assert reward.restrict([r], "pretrain") == []                               # one response left: nothing to compare
  plain = {"responses": ["x", "y"], "ranking": [1, 0]}                         # no sources field: a user's own data
  assert reward.restrict([plain], "policy")[0]["ranking"] == [1, 0]


def test_pairwise_agreement_on_hand_made_rankings():
  a = [{"ranking": [2, 0, 3, 1]}, {"ranking": [0, 1, 2]}]
  assert rm_probes.pairwise_agreement(a, a) == 1.0
  rev = [{"ranking": r["ranking"][::-1]} for r in a]
  assert rm_probes.pairwise_agreement(a, rev) == 0.0
  # [0, 1, 2] vs [1, 0, 2]: pairs (1>0) disagrees, (1>2) and (0>2) agree -> 2 of 3
  assert rm_probes.pairwise_agreement([{"ranking": [0, 1, 2]}], [{"ranking": [1, 0, 2]}]) == pytest.approx(2 / 3)
  # pooled over prompts: 2 of 3 plus 1 of 1 (K = 2, identical) -> 3 of 4
  assert rm_probes.pairwise_agreement([{"ranking": [0, 1, 2]}, {"ranking": [1, 0]}],
                                   [{"ranking": [1, 0, 2]}, {"ranking": [1, 0]}]) == pytest.approx(3 / 4)


def _hand_ranked(ranks: dict) -> list[dict]:
  """{(id, group): ranking} -> ranked records (the responses do not matter to agreement)."""
  return [{"id": i, "group": g, "labeler": f"L{g}", "ranking": r, "responses": [str(x) for x in r]}
          for (i, g), r in ranks.items()]


def test_labeler_agreement_averages_every_pair_of_groups_and_reranks_the_heldout_group():
  # Training groups 0, 1, 2 and held-out group 3; prompt "p" (K = 3: pairs (a>b), (a>c), (b>c)) and "q" (K = 2).
  recs = _hand_ranked({("p", 0): [0, 1, 2], ("p", 1): [0, 1, 2], ("p", 2): [2, 1, 0], ("p", 3): [1, 0, 2],
                       ("q", 0): [0, 1], ("q", 1): [1, 0], ("q", 3): [0, 1]})
  # train pairs: (0,1) on p 3/3 and q 0/1 -> 3/4; (0,2) on p only: 0/3; (1,2) on p only: 0/3 -> mean 1/4
  # held-out vs 0: p [1,0,2] vs [0,1,2] 2/3, q 1/1 -> 3/4; vs 1: p 2/3, q 0/1 -> 2/4; vs 2: p 1/3 -> mean 19/36
  # held-out vs a second held-out labeler, here ranking p as [2, 1, 0] (only b>a agrees: 1/3) and q the same
  # (1/1): 2/4
  rerank = lambda r: {**r, "ranking": [2, 1, 0] if r["id"] == "p" else r["ranking"]}
  out = rm_probes.labeler_agreement(recs, [0, 1, 2], 3, rerank)
  assert out == pytest.approx({"labeler_agreement/train_groups": 1 / 4, "labeler_agreement/heldout_vs_train": 19 / 36,
                               "labeler_agreement/heldout": 2 / 4})
  # no held-out ranking: that entry is left out, not reported as 0
  assert "labeler_agreement/heldout" not in rm_probes.labeler_agreement(recs, [0, 1, 2], 4, rerank)


def test_second_labeler_is_another_member_of_the_group_with_a_reproducible_draw():
  class World:   # two labelers in group 3; rank() records who ranked and draws a permutation
    labelers = [type("L", (), {"id": i, "group": g})() for i, g in (("A", 3), ("B", 0), ("C", 3))]

    def rank(self, record, responses, labeler, rng):
      self.who = labeler
      return list(rng.permutation(len(responses)))

  world, rec = World(), {"id": "rm-00007", "group": 3, "labeler": "C", "ranking": [0, 1, 2, 3],
                         "responses": list("abcd")}
  out = rm_probes.second_labeler(world, 5)(rec)
  assert world.who == "A" and out["labeler"] == "A" and sorted(out["ranking"]) == [0, 1, 2, 3]
  assert out == rm_probes.second_labeler(world, 5)(rec) and rec["ranking"] == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="group 0 has 1 labeler"):
    rm_probes.second_labeler(world, 5)({**rec, "group": 0, "labeler": "B"})


def test_validation_counts_every_prompt_when_the_last_batch_is_partial():
  """7 prompts in batches of 3: accuracy and loss equal NumPy's count over all 7, not over the first 6."""
  from instructrl.data.rankings import RankedExamples
  b = ragged_batch(B=7, K=4, T=12)
  rng = np.random.default_rng(4)
  b["tokens"][..., 0] = rng.integers(0, 50, b["tokens"].shape[:2])     # the first token is the "score"
  ex = RankedExamples(b["tokens"], b["last_index"], b["ranks"], b["mask"], np.arange(7))
  eval_step = jax.jit(lambda params, batch: objectives.ranking_loss(
      batch["tokens"][..., 0].astype(jnp.float32) * params, batch["ranks"], batch["mask"])[1])
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  got = reward.evaluate(eval_step, jnp.float32(0.1), ex, 3, mesh, parallel.DEFAULT_RULES)
  hits = pairs = 0
  losses = []
  for n in range(7):
    r, k = 0.1 * b["tokens"][n, :, 0].astype(np.float64), b["mask"][n]
    pl = [(i, j) for i in range(4) for j in range(4) if k[i] and k[j] and b["ranks"][n, i] < b["ranks"][n, j]]
    hits += sum(r[i] > r[j] for i, j in pl)
    pairs += len(pl)
    losses.append(np.mean([np.log1p(np.exp(-(r[i] - r[j]))) for i, j in pl]))
  assert got["pairs"] == pairs and got["accuracy"] == pytest.approx(hits / pairs)
  assert got["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
  first6 = reward.evaluate(eval_step, jnp.float32(0.1), RankedExamples(*(x[:6] for x in (
      ex.tokens, ex.last_index, ex.ranks, ex.mask, ex.index))), 3, mesh, parallel.DEFAULT_RULES)
  assert first6["pairs"] < pairs                       # the seventh prompt's pairs are counted


def test_rm_heldout_group_is_refused_and_world_heldout_group_is_the_one_field():
  from configs import instructgpt
  from instructrl import checkpoints
  from instructrl.errors import ConfigError
  config = instructgpt.get_config("smoke")
  assert "heldout_group" not in config.rm
  assert reward.heldout_group_of(config) == config.world.heldout_group
  old = instructgpt.get_config("smoke")
  old.rm.heldout_group = 4
  with pytest.raises(ConfigError, match=r"rm.heldout_group=4: this field was removed.*set world.heldout_group"):
    reward.heldout_group_of(old)
  # a generated world that holds out another group than the config's is refused (its evaluators are group 4)
  world = type("W", (), {"labelers": [type("L", (), {"group": g, "heldout": g == 4})() for g in range(5)]})()
  assert reward.heldout_group_of(config, world) == 4
  config.world.heldout_group = 2
  with pytest.raises(ConfigError, match=r"world.heldout_group=2, but the generated world holds out group 4"):
    reward.heldout_group_of(config, world)
  # A checkpoint recorded while rm.heldout_group existed: its settings had it in the rm block. Accepted when it
  # equals the held-out group the stage now records (world.heldout_group), refused otherwise.
  meta = {"complete": True, "settings": checkpoints.settings_of({**old.rm.to_dict(), "steps": 12})}
  checkpoints.check_settings(meta, reward.stage_settings(instructgpt.get_config("smoke"), 12, 4), "W/rm", "rm")
  with pytest.raises(checkpoints.CheckpointMismatch, match=r"rm.heldout_group: checkpoint has 4, config has 2"):
    checkpoints.check_settings(meta, reward.stage_settings(instructgpt.get_config("smoke"), 12, 2), "W/rm", "rm")


# ----------------------------------------------------------------------------- end to end (CLI, smoke)

FAST = ["--config.eval.n_prompts=0", "--config.pretrain.steps=40", "--config.pretrain.checkpoint_every=5",
        "--config.sft.steps=20", "--config.sft.checkpoint_every=5", "--config.rm.epochs=3"]
STAGES = "world,pretrain,sft,rm"


def cli(workdir, *extra, stages=STAGES, timeout=300):
  cmd = [sys.executable, "-m", "instructrl.main", "--config=configs/instructgpt.py:smoke", f"--workdir={workdir}",
         f"--stages={stages}", *FAST, *extra]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=cli_env())
  if out.returncode:
    raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return out


def metric_rows(workdir, stage="rm"):
  return [json.loads(l) for l in (Path(workdir) / "metrics" / f"{stage}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  w = tmp_path_factory.mktemp("rm_ref")
  cli(w)
  return w, json.loads((w / "config.json").read_text())


@pytest.mark.slow
def test_collection_files_and_metrics(reference_run):
  from instructrl.data.rankings import load_ranked
  w, config = reference_run
  rm = config["rm"]
  world = json.loads((w / "world" / "world.json").read_text())
  groups = sorted({l["group"] for l in world["labelers"]})
  assert "heldout_group" not in rm and len(groups) >= 3 and config["world"]["heldout_group"] in groups
  ids, ks = {}, []
  for split in ("train", "valid"):
    recs = load_ranked(w / "comparisons" / f"{split}.jsonl", allow_empty_response=True)      # every record validated
    by_prompt = {}
    for r in recs:
      by_prompt.setdefault(r["id"], []).append(r)
    for pid, rs in by_prompt.items():
      assert sorted(r["group"] for r in rs) == groups, pid       # once per labeler group
      ks.append(len(rs[0]["responses"]))
      assert all(r["responses"] == rs[0]["responses"] for r in rs)   # the groups rank the same samples
    ids[split] = set(by_prompt)
  # K is drawn from k_choices; duplicate samples are dropped before ranking (documented policy; empty ones are
  # kept, rm.keep_empty),
  # which can only lower K, never below 2 (such prompts are skipped and counted in COMPLETE).
  assert all(2 <= k <= max(rm["k_choices"]) for k in ks)
  assert np.mean([k in rm["k_choices"] for k in ks]) >= 0.9, ks
  skipped = json.loads((w / "comparisons" / "COMPLETE").read_text())["skipped"]
  assert skipped <= 2
  assert not ids["train"] & ids["valid"]
  n_valid = round(rm["valid_fraction"] * rm["n_prompts"])
  assert n_valid - skipped <= len(ids["valid"]) <= n_valid
  assert len(ids["train"]) + len(ids["valid"]) == rm["n_prompts"] - skipped

  rows = metric_rows(w)
  assert final_params(w / "rm")[0] == math.ceil(3 * len(ids["train"]) / rm["batch_size"]) == 12
  valid = [r for r in rows if "valid/accuracy" in r]
  assert valid and 0 <= valid[-1]["valid/accuracy"] <= 1 and 0 <= valid[-1]["valid/heldout_group/accuracy"] <= 1
  final = [r for r in rows if "final/labeler_agreement/train_groups" in r]
  assert len(final) == 1 and all(0 < final[0][f"final/labeler_agreement/{k}"] < 1
                                 for k in ("train_groups", "heldout_vs_train", "heldout"))
  # the gold probe ran on the validation prompts (SFT greedy vs sampled; smoke's answers differ on some)
  probe = {k: v for k, v in final[0].items() if k.startswith("final/gold_probe/")}
  assert 0 < probe["final/gold_probe/pairs"] <= n_valid, probe
  assert 0 <= probe["final/gold_probe/agreement"] <= 1 and np.isfinite(probe["final/gold_probe/score_gap"])
  assert 0 <= probe["final/gold_probe/gold_sampled"] <= 1 and 0 <= probe["final/gold_probe/gold_greedy"] <= 1
  # per-family validation accuracy: every validation family has a row, and the pools add up to "all"
  fam = {k[len("final/valid/by_family/"):].rsplit("/", 1)[0] for k in final[0] if k.startswith("final/valid/by_family/")}
  valid_recs = load_ranked(w / "comparisons" / "valid.jsonl", allow_empty_response=True)
  assert fam - {"all"} == {r["family"] for r in valid_recs} and "all" in fam
  pairs = lambda f: final[0][f"final/valid/by_family/{f}/pairs"]
  assert sum(pairs(f) for f in fam - {"all"}) == pairs("all") > 0
  for f in fam:
    for m in ("accuracy", "utility_accuracy"):
      assert 0 <= final[0][f"final/valid/by_family/{f}/{m}"] <= 1
  train = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train] == list(range(2, 13, 2))
  assert all(np.isfinite(r["train/loss"]) for r in train)


@pytest.mark.slow
def test_collection_mixes_sources_by_weight(reference_run, tmp_path):
  """rm.source_mix: each response slot draws its model; the record says which; the RM trains on it."""
  from instructrl.data.rankings import load_ranked
  w, _ = reference_run
  for stage in ("world", "pretrain", "sft"):
    shutil.copytree(w / stage, tmp_path / stage)
  cli(tmp_path, "--config.rm.source_mix.policy=0.5", "--config.rm.source_mix.pretrain=0.25",
      "--config.rm.source_mix.pretrain_few_shot=0.25", stages="rm")
  recs = load_ranked(tmp_path / "comparisons" / "train.jsonl", allow_empty_response=True) + load_ranked(tmp_path / "comparisons" / "valid.jsonl", allow_empty_response=True)
  assert all(len(r["sources"]) == len(r["responses"]) for r in recs)
  sources = [s for r in recs if r["group"] == 0 for s in r["sources"]]
  share = {s: sources.count(s) / len(sources) for s in ("policy", "pretrain", "pretrain_few_shot")}
  assert 0.3 < share["policy"] < 0.7 and share["pretrain"] > 0.1 and share["pretrain_few_shot"] > 0.1, share
  # few-shot answers are cut at the newline that ends an answer in the Q/A format
  assert not any("\n" in t for r in recs for t, s in zip(r["responses"], r["sources"]) if s == "pretrain_few_shot")
  assert final_params(tmp_path / "rm")[0] > 0
  # the per-family rows also come over the policy's own pairs only: fewer pairs than all sources give
  final = [r for r in metric_rows(tmp_path) if "final/valid/by_family/all/pairs" in r][-1]
  mixed, own = final["final/valid/by_family/all/pairs"], final.get("final/valid/policy_pairs/by_family/all/pairs")
  valid = [r for r in recs if r["id"] in {v["id"] for v in load_ranked(tmp_path / "comparisons" / "valid.jsonl",
                                                                         allow_empty_response=True)}]
  assert any(r["sources"].count("policy") >= 2 for r in valid)     # so policy-only pairs exist
  assert own is not None and 0 < own < mixed, (own, mixed)
  with pytest.raises(AssertionError, match="source_mix"):
    cli(tmp_path / "bad", "--config.rm.source_mix.policy=0", stages="rm")   # refused before any work


@pytest.mark.slow
def test_collection_with_mismatched_answers_ranks_them_beside_the_policys(reference_run, tmp_path):
  """rm.source_mix.mismatched: some slots hold rm.policy's answer to another prompt, named in `sources`,
  ranked by the labelers like any other response; the RM trains on them."""
  from instructrl.data.rankings import load_ranked
  w, _ = reference_run
  for stage in ("world", "pretrain", "sft"):
    shutil.copytree(w / stage, tmp_path / stage)
  cli(tmp_path, "--config.rm.source_mix.policy=0.5", "--config.rm.source_mix.mismatched=0.5", stages="rm")
  recs = load_ranked(tmp_path / "comparisons" / "train.jsonl", allow_empty_response=True) + load_ranked(tmp_path / "comparisons" / "valid.jsonl", allow_empty_response=True)
  sources = [s for r in recs if r["group"] == 0 for s in r["sources"]]
  assert set(sources) == {"policy", "mismatched"} and 0.25 < sources.count("mismatched") / len(sources) < 0.75
  key = json.loads((tmp_path / "comparisons" / "COMPLETE").read_text())["key"]
  assert key["source_mix"] == {"policy": 0.5, "mismatched": 0.5}
  assert final_params(tmp_path / "rm")[0] > 0


@pytest.mark.slow
def test_extra_comparisons_add_an_earlier_round_to_this_one(reference_run, tmp_path):
  """rm.extra_comparisons (iterated collection): an earlier round's rankings are trained on beside this
  round's, so the RM sees both rounds' samples; bad paths are refused with the path named."""
  from instructrl.data.rankings import load_ranked
  w, config = reference_run
  for stage in ("world", "pretrain", "sft"):
    shutil.copytree(w / stage, tmp_path / stage)
  # round two samples at another temperature (in use: from a PPO policy, rm.source_mix.ppo)
  cli(tmp_path, f"--config.rm.extra_comparisons={w / 'comparisons'}", "--config.rm.sample_temperature=0.7", stages="rm")
  this = load_ranked(tmp_path / "comparisons" / "train.jsonl", allow_empty_response=True)
  earlier = load_ranked(w / "comparisons" / "train.jsonl", allow_empty_response=True)
  ids = lambda recs: {r["id"] for r in recs}
  assert ids(this) == ids(earlier)       # the same prompts, sampled again: one more ranking of each
  assert [r["responses"] for r in this] != [r["responses"] for r in earlier]
  # one training ranking of each prompt per round, 3 epochs of batch_size prompts
  assert final_params(tmp_path / "rm")[0] == math.ceil(3 * 2 * len(ids(this)) / config["rm"]["batch_size"])
  assert final_params(w / "rm")[0] == math.ceil(3 * len(ids(this)) / config["rm"]["batch_size"])

  from configs.instructgpt import get_config
  cfg = get_config("smoke")
  cfg.rm.extra_comparisons = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere.*COMPLETE"):
    rm_collect.earlier_rounds(cfg, tmp_path)
  cfg.rm.extra_comparisons = f"{w / 'comparisons'}, {tmp_path / 'comparisons'}"
  with pytest.raises(ValueError, match="this run's own"):
    rm_collect.earlier_rounds(cfg, tmp_path)
  other = tmp_path / "other_world" / "comparisons"
  other.mkdir(parents=True)
  (other / "COMPLETE").write_text("{}")
  cfg.rm.extra_comparisons = str(other)
  with pytest.raises(ValueError, match="collected on world None"):
    rm_collect.earlier_rounds(cfg, tmp_path)


@pytest.mark.slow
def test_best_of_n_cli_writes_the_curve(reference_run):
  w, _ = reference_run
  out = subprocess.run([sys.executable, "-m", "instructrl.tools.best_of_n", "--config=configs/instructgpt.py:smoke",
                        f"--workdir={w}", "--n=4", "--config.eval.report_prompts=16"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads((w / "analysis" / "best_of_n.json").read_text())
  assert got["n"] == [1, 2, 4] and got["samples"] == 4 and 0 < got["prompts"] <= 16
  # gold's own pick can only get better with more samples; the RM's need not
  assert got["gold_pick_gold"] == sorted(got["gold_pick_gold"])
  assert all(r <= g + 1e-9 for r, g in zip(got["rm_pick_gold"], got["gold_pick_gold"]))
  assert all(0 <= x <= 1 for x in got["rm_pick_win"] + got["gold_pick_win"])
  assert sum(r["prompts"] for r in got["by_family"]) == got["prompts"]
  assert (w / "analysis" / "best_of_n.png").stat().st_size > 0


@pytest.mark.slow
def test_bias_makes_demonstrations_score_zero_on_average(reference_run):
  from instructrl.data.world.api import World
  from instructrl.models.transformer import Decoder
  from instructrl.stages.world import load_tokenizer
  w, config = reference_run
  final = [r for r in metric_rows(w) if "final/demo_mean_score" in r][-1]
  assert abs(final["final/demo_mean_score"]) < 1e-5, final

  # Independently: restore the RM's params, score EVERY demonstration of demos_valid at its EOS.
  _, params = final_params(w / "rm")
  seq_len = config["rm"]["seq_len"]
  tok = load_tokenizer(w)
  demos = [json.loads(l) for l in (w / "world" / "demos_valid.jsonl").read_text().splitlines() if l.strip()]
  seqs = [[tok.bos_id, *tok.encode(World.format_prompt(d["prompt"])), *tok.encode(d["response"]), tok.eos_id]
          for d in demos]
  seqs = [s for s in seqs if len(s) <= seq_len]                 # the stage's drop policy for over-long demos
  assert len(seqs) >= 10
  toks = np.full((len(seqs), seq_len), tok.pad_id, np.int32)
  for i, s in enumerate(seqs):
    toks[i, :len(s)] = s
  last = np.array([len(s) - 1 for s in seqs])
  model = Decoder(ModelConfig.from_dict({**config["model"], "resid_dropout": 0.0}), head="scalar")
  scores = np.asarray(jax.jit(lambda t: model.apply({"params": params}, t)[0])(toks))[np.arange(len(seqs)), last]
  spread = float(np.std(scores))
  assert spread > 0
  # ~0 relative to how much the scores differ between demonstrations (float32 rounding only)
  assert abs(float(np.mean(scores))) < 1e-3 * spread + 1e-6, (float(np.mean(scores)), spread, len(seqs))


@pytest.mark.slow
def test_rm_resume_after_sigkill_gives_identical_params(reference_run, tmp_path):
  ref, _ = reference_run
  w = tmp_path / "killed"
  for stage in ("world", "pretrain", "sft"):          # completed upstream stages, as a user's run dir has them
    shutil.copytree(ref / stage, w / stage)
  cmd = [sys.executable, "-m", "instructrl.main", "--config=configs/instructgpt.py:smoke", f"--workdir={w}",
         "--stages=rm", *FAST]
  sigkill_when_exists(cmd, w / "rm" / "2", cwd=ROOT, env=cli_env())
  assert not (w / "rm" / "12").exists(), "the kill landed after rm finished"
  killed_at = max(int(p.name) for p in (w / "rm").iterdir() if p.name.isdigit())
  assert killed_at < 12
  out = cli(w)
  assert "rm: resuming from step" in out.stderr
  step_a, a = final_params(ref / "rm")
  step_b, b = final_params(w / "rm")
  assert step_a == step_b == 12
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b)), "resumed rm params differ"
  for split in ("train", "valid"):    # collection is deterministic and was not redone
    assert (w / "comparisons" / f"{split}.jsonl").read_text() == (ref / "comparisons" / f"{split}.jsonl").read_text()
  strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_per_sec")} for r in rows]
  assert strip(metric_rows(w)) == strip(metric_rows(ref))


@pytest.mark.slow
def test_rerun_of_complete_rm_stage_changes_nothing(reference_run):
  w, _ = reference_run
  files = ["metrics/rm.jsonl", "comparisons/train.jsonl", "comparisons/valid.jsonl", "comparisons/COMPLETE"]
  before = {f: (w / f).read_bytes() for f in files}
  step, params = final_params(w / "rm")
  out = cli(w, stages="rm")
  assert "rm: complete checkpoint at step 12, skipping" in out.stderr
  assert {f: (w / f).read_bytes() for f in files} == before
  step2, params2 = final_params(w / "rm")
  assert step2 == step and jax.tree.all(jax.tree.map(np.array_equal, params, params2))


@pytest.mark.slow
def test_rm_trunk_comes_from_rm_init_stage(reference_run):
  """rm.init_stage: the RM's trunk is that stage's (default rm.policy, the SFT model), its head the same
  fresh init either way."""
  from configs.instructgpt import get_config
  w, _ = reference_run
  config = get_config("smoke")
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = parallel.DEFAULT_RULES
  model_cfg = ModelConfig.from_dict({**config.model, **config.rm.model_overrides})
  tx, _ = train_state.make_optimizer(config.rm, 1)
  sh = train_state.state_shardings(model_cfg, tx, mesh, rules, head="scalar")
  got = {}
  for init_stage, lm_stage in (("", "sft"), ("pretrain", "pretrain")):
    config.rm.init_stage = init_stage
    rm = jax.tree.map(np.asarray, rm_models.initial_rm_params(config, w, mesh, rules, model_cfg, sh, jax.random.key(3)))
    lm = final_params(w / lm_stage)[1]
    trunk = [k for k in rm if k in lm]
    assert trunk and set(rm) - set(trunk), sorted(rm)          # a trunk from the LM and a head of its own
    for k in trunk:
      assert jax.tree.all(jax.tree.map(np.array_equal, rm[k], lm[k])), (init_stage, k)
    got[lm_stage] = (rm, trunk)
  (a, trunk), (b, _) = got["sft"], got["pretrain"]
  assert not all(jax.tree.all(jax.tree.map(np.array_equal, a[k], b[k])) for k in trunk)  # two different trunks
  for k in set(a) - set(trunk):
    assert jax.tree.all(jax.tree.map(np.array_equal, a[k], b[k])), k


def test_summarise_cv_folds_mean_and_stderr():
  from instructrl.tools.rm_cv import summarise
  folds = {g: {"valid/accuracy": a, "valid/heldout_group/accuracy": h}
           for g, (a, h) in enumerate([(0.70, 0.60), (0.74, 0.64), (0.72, 0.68)])}
  s = summarise(folds)
  assert s["valid/accuracy"]["mean"] == pytest.approx(0.72)
  assert s["valid/heldout_group/accuracy"]["mean"] == pytest.approx(0.64)
  # stderr = sample std / sqrt(n): std of (0.70, 0.74, 0.72) is 0.02
  assert s["valid/accuracy"]["stderr"] == pytest.approx(0.02 / np.sqrt(3))


@pytest.mark.slow
def test_labeler_group_cross_validation_runs_every_fold(reference_run, tmp_path):
  ref, _ = reference_run
  w = tmp_path / "cv"
  for d in ("world", "sft", "comparisons"):
    shutil.copytree(ref / d, w / d, symlinks=True)
  # One epoch per fold: what is checked is that every fold trains, validates on its held-out group and enters
  # the summary, not how well five RMs learn.
  cmd = [sys.executable, "-m", "instructrl.tools.rm_cv", "--config=configs/instructgpt.py:smoke", f"--workdir={w}",
         "--config.rm.epochs=1"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=cli_env())
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((w / "rm_cv" / "summary.json").read_text())
  assert sorted(summary["folds"]) == ["0", "1", "2", "3", "4"]
  for g in range(5):
    meta_lines = [json.loads(l) for l in (w / "rm_cv" / f"fold{g}" / "metrics" / "rm.jsonl").read_text().splitlines()]
    assert any("final/valid/heldout_group/accuracy" in r for r in meta_lines)
    assert (w / "rm_cv" / f"fold{g}" / "rm").is_dir()
  accs = [f["valid/heldout_group/accuracy"] for f in summary["folds"].values()]
  assert summary["valid/heldout_group/accuracy"]["mean"] == pytest.approx(np.mean(accs))


def test_collected_comparisons_are_reused_only_with_the_same_collection_settings(tmp_path):
  from configs.instructgpt import get_config
  config = get_config("smoke")
  out = tmp_path / "comparisons"
  out.mkdir()
  (out / "COMPLETE").write_text(json.dumps({"prompts": 40, "skipped": 0, "key": rm_collect.collection_key(config)}))
  assert rm_collect.collect(config, tmp_path, None, None) == out          # same settings: reused, nothing sampled
  config.rm.learning_rate = 1e-3                                     # training settings do not matter
  assert rm_collect.collect(config, tmp_path, None, None) == out
  config.rm.n_prompts = 41
  with pytest.raises(ValueError, match=r"n_prompts.*40.*41.*delete"):
    rm_collect.collect(config, tmp_path, None, None)
  (out / "COMPLETE").write_text(json.dumps({"prompts": 40, "skipped": 0}))   # collected before the check: kept
  assert rm_collect.collect(config, tmp_path, None, None) == out
  # a set collected before rm.keep_empty dropped empty samples: reused as keep_empty=False only
  config.rm.n_prompts = 40
  old = {k: v for k, v in rm_collect.collection_key(config).items() if k != "keep_empty"}
  (out / "COMPLETE").write_text(json.dumps({"prompts": 40, "skipped": 0, "key": old}))
  with pytest.raises(ValueError, match=r"keep_empty.*False.*True"):
    rm_collect.collect(config, tmp_path, None, None)
  config.rm.keep_empty = False
  assert rm_collect.collect(config, tmp_path, None, None) == out
