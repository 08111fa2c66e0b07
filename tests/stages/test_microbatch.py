"""Gradient accumulation over micro-batches (stages/microbatch.py): the LM, RM and PPO train steps with
n = 2 and 4 micro-batches give the loss, metrics and gradient of the whole batch in one pass (n = 1), on
one device and on a (2,2,2) mesh of 8 simulated devices (a subprocess, as test_sharding.py); the split
keeps every row on its device. The PPO and 8-device tests take a minute each on 2 CPU cores: slow.

The gradient is read off an SGD step of learning rate 1 (new params = params - grads): the steps take
their optimizer as an argument (PPO's through ppo.make_optimizer), and Adam would divide each element by
its own RMS, magnifying the round-off of near-zero gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from instructrl import parallel
from instructrl.models.config import ModelConfig
from instructrl.stages import lm, microbatch, ppo, reward, train_state
from tests.cli_helpers import run_worker_on_8_devices

TOL = 1e-5
GPT = dict(style="gpt", vocab_size=64, max_len=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
           d_ff=64, tie_embeddings=True)
LLAMA = dict(style="llama", vocab_size=64, max_len=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
             head_dim=8, d_ff=64, tie_embeddings=False)
SGD = optax.sgd(1.0)


def lm_batch(B: int = 16, T: int = 12, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  toks = rng.integers(4, 64, (B, T + 1)).astype(np.int32)
  mask = rng.random((B, T)) < 0.7
  mask[3] = False              # a row with no trained token: the token count is uneven across micro-batches
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": mask}


def rm_batch(B: int = 8) -> dict:
  from tests.stages.test_reward import ragged_batch
  b = ragged_batch(B=B, K=4, T=12)
  b["ranks"][5] = 0            # all tied: a prompt with no pair, left out of the mean over prompts
  return b


def pair_batch(P: int = 8, T: int = 12, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"chosen": rng.integers(4, 64, (P, T)).astype(np.int32), "rejected": rng.integers(4, 64, (P, T)).astype(np.int32),
          "chosen_last": rng.integers(3, T, P).astype(np.int32), "rejected_last": rng.integers(3, T, P).astype(np.int32)}


def step_results(make_train, cfg: ModelConfig, head: str, batch: dict, mesh, n: int, init=None):
  """One train step with n micro-batches: (metrics, gradient, initial params as numpy)."""
  rules = parallel.DEFAULT_RULES
  sh = train_state.state_shardings(cfg, SGD, mesh, rules, head=head)
  params = (train_state.init_params(cfg, jax.random.key(0), sh["params"], mesh, rules, head=head) if init is None
            else jax.device_put(init, sh["params"]))
  before = jax.tree.map(np.asarray, params)
  state = train_state.new_state(params, SGD, sh, mesh)
  train = make_train(cfg, SGD, optax.constant_schedule(1.0), sh, mesh, rules, n)
  with parallel.activate(mesh, rules):
    state, m = train(state, train_state.device_batch(batch, mesh, rules), jax.random.key(3))
  grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, state["params"])
  return {k: float(v) for k, v in m.items() if k not in ("finite", "param_norm")}, grads, before


def assert_same(got, want, what: str):
  (m1, g1), (m0, g0) = got, want
  assert m1.keys() == m0.keys()
  for k in m0:
    assert abs(m1[k] - m0[k]) <= TOL * max(1.0, abs(m0[k])), (what, k, m1[k], m0[k])
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g0))
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)))
  assert scale > 1e-3 and diff <= TOL * scale, (what, diff, scale)


def one_device():
  return parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])


# ----------------------------------------------------------------------------- one device

@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_lm_step_accumulated_equals_full_batch(style):
  cfg = ModelConfig(**{"gpt": GPT, "llama": LLAMA}[style])
  make = lambda *a: lm.make_steps(*a[:6], microbatches=a[6])[0]
  mesh, batch = one_device(), lm_batch()
  m0, g0, init = step_results(make, cfg, "lm", batch, mesh, 1)
  assert m0["tokens"] == batch["mask"].sum()
  for n in (2, 4):
    m, g, _ = step_results(make, cfg, "lm", batch, mesh, n, init)
    assert_same((m, g), (m0, g0), f"{style} n={n}")


@pytest.mark.parametrize("formulation", ["per_prompt", "shuffled_pairs"])
def test_rm_step_accumulated_equals_full_batch(formulation):
  cfg = ModelConfig(**GPT)
  make = lambda *a: reward.make_steps(a[0], formulation, *a[1:6], microbatches=a[6])[0]
  mesh = one_device()
  batch = rm_batch() if formulation == "per_prompt" else pair_batch()
  m0, g0, init = step_results(make, cfg, "scalar", batch, mesh, 1)
  if formulation == "per_prompt":   # a mean over the 7 prompts with a pair, not over 8 or per micro-batch
    assert m0["prompts"] == 7
  for n in (2, 4):
    m, g, _ = step_results(make, cfg, "scalar", batch, mesh, n, init)
    assert_same((m, g), (m0, g0), f"{formulation} n={n}")


def test_rm_step_with_policy_pair_weight_accumulated_equals_full_batch():
  cfg = ModelConfig(**GPT)
  make = lambda *a: reward.make_steps(a[0], "per_prompt", *a[1:6], policy_pair_weight=3.0, microbatches=a[6])[0]
  batch = rm_batch()
  batch["own"] = np.random.default_rng(1).random(batch["mask"].shape) < 0.5
  m0, g0, init = step_results(make, cfg, "scalar", batch, one_device(), 1)
  assert_same(step_results(make, cfg, "scalar", batch, one_device(), 4, init)[:2], (m0, g0), "own pairs n=4")


def ppo_update_results(monkeypatch, n: int, host=None):
  """One PPO update (one minibatch: batch 8 = minibatch 8, ptx 8 rows) on a fixed rollout batch."""
  from tests.stages.test_ppo import build, host_models, ppo_cfg, tiny_prompts, tiny_ptx
  monkeypatch.setattr(ppo, "make_optimizer", lambda *a: (SGD, optax.constant_schedule(1.0)))
  cfg = ModelConfig(**{**GPT, "vocab_size": 16})
  pc = ppo_cfg(batch_size=8, minibatch_size=8, ptx_batch_size=8, ptx_coef=2.0, microbatches=n)
  host = host or host_models(cfg)
  mesh, rules = one_device(), parallel.DEFAULT_RULES
  state, models, rollout, update = build(cfg, pc, host, mesh, rules, 6)
  prompts, pmask = tiny_prompts(8, 6)
  before = {k: jax.tree.map(np.asarray, state[k]) for k in ("params", "value")}
  with parallel.activate(mesh, rules):
    batch, _, _ = rollout(state["params"], state["value"], models["ref"], models["rm"], prompts, pmask,
                          jax.random.key(1), state["kl_coef"], state["score_gain"])
    state, m = update(state, batch, tiny_ptx(1, 8, vocab=16), jax.random.key(2))
  grads = {k: jax.tree.map(lambda a, b: a - np.asarray(b), before[k], state[k]) for k in before}
  return {k: float(v) for k, v in m.items() if k != "finite"}, grads, host


@pytest.mark.slow
def test_ppo_update_with_ptx_accumulated_equals_full_minibatch(monkeypatch):
  m0, g0, host = ppo_update_results(monkeypatch, 1)
  assert m0["ppo/policy/ptx_loss"] > 0 and m0["ppo/val/value_loss"] > 0
  for n in (2, 4):
    m, g, _ = ppo_update_results(monkeypatch, n, host)
    for k in ("params", "value"):
      assert_same((m, g[k]), (m0, g0[k]), f"ppo {k} n={n}")


def test_split_and_join_keep_rows_in_order():
  x = np.arange(24).reshape(12, 2)
  parts = np.asarray(microbatch.split(jnp.asarray(x), 3))
  assert parts.shape == (3, 4, 2)
  assert np.array_equal(parts[1], x[1::3])     # micro-batch i: rows i, n + i, ...
  assert np.array_equal(np.asarray(microbatch.join(parts)), x)
  with pytest.raises(ValueError, match="12 rows does not split into 5"):
    microbatch.split(jnp.asarray(x), 5)


# ----------------------------------------------------------------------------- (2,2,2) mesh

def _worker():
  import json

  import jax

  assert len(jax.devices()) == 8, jax.devices()
  mesh = parallel.make_mesh((2, 2, 2))
  rules = parallel.DEFAULT_RULES
  out = {}
  # The split alone: each device's rows of the batch become its rows of every micro-batch, no communication.
  x = jax.device_put(np.arange(16 * 3, dtype=np.float32).reshape(16, 3), parallel.batch_sharding(mesh, rules))
  with parallel.activate(mesh, rules):
    compiled = jax.jit(lambda a: microbatch.split(a, 2)).lower(x).compile()
    parts = compiled(x)
  hlo = compiled.as_text()
  out["split_spec"] = [list(a) if isinstance(a, tuple) else a for a in parts.sharding.spec]
  out["split_collectives"] = [op for op in ("all-to-all", "all-gather", "collective-permute", "all-reduce")
                              if op in hlo]
  out["split_local"] = all(
      np.array_equal(np.asarray(s.data).ravel(), np.asarray(x)[1::2][s.index[1]].ravel())
      for s in parts.addressable_shards if s.index[0] == slice(1, 2, None))
  make_lm = lambda *a: lm.make_steps(*a[:6], microbatches=a[6])[0]
  make_rm = lambda *a: reward.make_steps(a[0], "per_prompt", *a[1:6], microbatches=a[6])[0]
  for name, make, cfg, head, batch in (("lm", make_lm, ModelConfig(**GPT), "lm", lm_batch()),
                                       ("rm", make_rm, ModelConfig(**GPT), "scalar", rm_batch(B=16))):
    m0, g0, init = step_results(make, cfg, head, batch, parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1]), 1)
    m, g, _ = step_results(make, cfg, head, batch, mesh, 2, init)
    out[name] = {"metrics": m, "metrics_ref": m0,
                 "grad_scale": max(float(np.max(np.abs(a))) for a in jax.tree.leaves(g0)),
                 "grad_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)))}
  print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def sharded_result():
  return run_worker_on_8_devices(__file__)


@pytest.mark.slow
def test_split_keeps_each_devices_rows_on_it(sharded_result):
  r = sharded_result
  assert r["split_spec"] == [None, ["data", "fsdp"]]
  assert r["split_collectives"] == [] and r["split_local"]


@pytest.mark.slow
@pytest.mark.parametrize("step", ["lm", "rm"])
def test_accumulated_step_on_2x2x2_equals_one_device_full_batch(sharded_result, step):
  r = sharded_result[step]
  for k, want in r["metrics_ref"].items():
    assert abs(r["metrics"][k] - want) <= TOL * max(1.0, abs(want)), (k, r["metrics"][k], want)
  assert r["grad_scale"] > 1e-3 and r["grad_diff"] <= TOL * r["grad_scale"], r
