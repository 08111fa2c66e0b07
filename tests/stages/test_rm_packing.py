"""rm.packing: the RM's per-prompt train step on packed rows makes the unpacked step's update, on one device and
sharded over 8 simulated ones (each data shard packing its own prompts); the options it cannot go with are
refused."""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import pytest

from instructrl import parallel
from instructrl.data import packing
from instructrl.models.config import ModelConfig
from instructrl.stages import reward, train_state
from tests.cli_helpers import run_worker_on_8_devices
from tests.stages.test_reward import INVARIANT, NO_DROPOUT, PARAM_TOL, STAGE, TOL, ragged_batch


def _steps(shape, params=None, packed=False, n_steps=2):
  """Two train steps on ragged_batch over a mesh of `shape`: (metrics per step, final params, initial params)."""
  cfg = ModelConfig(**NO_DROPOUT)
  devices = jax.devices()[:int(np.prod(shape))]
  mesh, rules = parallel.make_mesh(shape, devices=devices), parallel.DEFAULT_RULES
  tx, schedule = train_state.make_optimizer(ml_collections.ConfigDict(STAGE), total_steps=10)
  sh = train_state.state_shardings(cfg, tx, mesh, rules, head="scalar")
  if params is None:
    params = train_state.init_params(cfg, jax.random.key(0), sh["params"], mesh, rules, head="scalar")
  else:
    params = jax.device_put(params, sh["params"])
  init = jax.tree.map(np.asarray, params)
  state = train_state.new_state(params, tx, sh, mesh)
  train, _, _ = reward.make_steps(cfg, "per_prompt", tx, schedule, sh, mesh, rules)
  examples = ragged_batch()
  idx = np.arange(len(examples["tokens"]))
  read = lambda i: {k: v[i] for k, v in examples.items()}
  with parallel.activate(mesh, rules):
    if packed:
      shards = train_state.batch_shards(len(idx), mesh, rules)
      rows = packing.rows_needed(examples["last_index"], examples["mask"], examples["tokens"].shape[-1], shards)
      batch = train_state.process_packed_batch(read, idx, rows, 0, mesh, rules)
    else:
      batch = train_state.process_batch(read, idx, mesh, rules)
    metrics = []
    for _ in range(n_steps):
      state, m = train(state, batch, jax.random.key(5))
      metrics.append({k: float(m[k]) for k in ("loss", "accuracy", "pairs", "grad_norm")})
  return metrics, jax.tree.map(np.asarray, state["params"]), init


def _maxdiff(a, b) -> float:
  flat = jax.tree_util.tree_flatten_with_path(a)[0]
  return max(float(np.max(np.abs(x - y))) for (kp, x), y in zip(flat, jax.tree.leaves(b))
             if "/".join(str(k.key) for k in kp) not in INVARIANT)


def _compare(got, want):
  got_m, got_p = got
  want_m, want_p = want
  for g, w in zip(got_m, want_m):
    assert g["pairs"] == w["pairs"] == 27.0
    np.testing.assert_allclose([g["loss"], g["accuracy"]], [w["loss"], w["accuracy"]], atol=TOL)
    np.testing.assert_allclose(g["grad_norm"], w["grad_norm"], rtol=1e-4)
  assert _maxdiff(got_p, want_p) < PARAM_TOL


def test_packed_step_makes_the_unpacked_update_on_one_device():
  ref_m, ref_p, init = _steps((1, 1, 1))
  assert _maxdiff(ref_p, init) > 1e-4, "the steps must move the params"
  m, p, _ = _steps((1, 1, 1), params=init, packed=True)
  _compare((m, p), (ref_m, ref_p))


def _worker():
  assert len(jax.devices()) == 8
  ref_m, ref_p, init = _steps((1, 1, 1))
  res = {}
  for shape in ((8, 1, 1), (2, 2, 2)):
    m, p, _ = _steps(shape, params=init, packed=True)
    res["x".join(map(str, shape))] = {"metrics": m, "ref": ref_m, "param_diff": _maxdiff(p, ref_p)}
  print("RESULT " + json.dumps(res))


@pytest.mark.slow
def test_packed_step_sharded_makes_the_unpacked_update():
  """8 prompts over 8 data shards (one prompt each, packed in its own rows) and over 2 data x 2 fsdp x 2 tensor."""
  res = run_worker_on_8_devices(__file__)
  for mesh, r in res.items():
    for g, w in zip(r["metrics"], r["ref"]):
      assert g["pairs"] == w["pairs"] == 27.0, mesh
      np.testing.assert_allclose([g["loss"], g["accuracy"]], [w["loss"], w["accuracy"]], atol=TOL, err_msg=mesh)
    assert r["param_diff"] < PARAM_TOL, (mesh, r["param_diff"])


def test_packing_is_refused_where_it_does_not_apply():
  from configs import instructgpt
  from instructrl import config_check
  config = instructgpt.get_config("smoke")
  config.rm.packing = True
  config_check.check_config(config, 1, config.stages.split(","))
  for field, value in (("formulation", "shuffled_pairs"), ("microbatches", 2)):
    bad = instructgpt.get_config("smoke")
    bad.rm.packing = True
    bad.rm[field] = value
    with pytest.raises(config_check.ConfigError, match=r"rm.packing=True: expected False with rm.formulation="):
      config_check.check_config(bad, 1, bad.stages.split(","))


def test_a_checkpoint_resumes_under_either_packing_value():
  """Packing changes how the scores are computed, not which: a run may switch it and keep its RM checkpoints."""
  from configs import instructgpt
  from instructrl import checkpoints
  config = instructgpt.get_config("smoke")
  saved = {"settings": checkpoints.settings_of(reward.stage_settings(config, 12, 4)), "complete": True}
  config.rm.packing = not config.rm.packing
  checkpoints.check_settings(saved, reward.stage_settings(config, 12, 4), "W/rm", "rm")
  config.rm.learning_rate *= 2    # a setting that changes what is trained is still refused
  with pytest.raises(checkpoints.CheckpointMismatch, match="rm.learning_rate"):
    checkpoints.check_settings(saved, reward.stage_settings(config, 12, 4), "W/rm", "rm")
