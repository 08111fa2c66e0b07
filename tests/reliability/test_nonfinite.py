"""Non-finite values: injected NaN/inf in a batch, a loss or a gradient is caught by the guard of every
stage's jitted step (LM = pretrain/SFT, RM, PPO) and the update is not applied; the shared loop then
stops (naming the step and the offending metric, checkpoint intact) or skips (`on_nonfinite="skip"`,
at most `max_nonfinite_skips` in a row).

Injection is test-only: a NaN written into a float field of the batch, or the stage's objective
monkeypatched (before tracing) to return NaN, or to pass its input through an identity whose
gradient is NaN. No production code path knows about it.
"""

from __future__ import annotations

import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instructrl import checkpoints, objectives, parallel
from instructrl.models.config import ModelConfig
from instructrl.stages import loop, lm, reward, train_state
from instructrl.stages.train_state import NonFiniteError
from tests.reliability.kill_harness import ROOT, cli_cmd, cli_env

CFG = ModelConfig(style="gpt", vocab_size=32, max_len=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                  head_dim=8, d_ff=32)


@jax.custom_vjp
def nan_grad(x):
  return x


nan_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.full_like(g, jnp.nan),))


def inject(monkeypatch, name: str, how: str):
  """Patch objectives.<name> so its loss is NaN ("loss") or its first input's gradient is ("grad")."""
  real = getattr(objectives, name)

  def patched(x, *args, **kw):
    if how == "grad":
      return real(nan_grad(x), *args, **kw)
    out = real(x, *args, **kw)
    return (out[0] * jnp.nan, *out[1:])
  monkeypatch.setattr(objectives, name, patched)


def stage_cfg(**kw):
  c = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=0, final_lr_fraction=0.1, b1=0.9, b2=0.95,
                                     weight_decay=0.0, grad_clip=1.0, steps=6, log_every=1, eval_every=100,
                                     checkpoint_every=2, keep_checkpoints=3, on_nonfinite="stop",
                                     max_nonfinite_skips=3))
  c.update(kw)
  return c


def one_device():
  return parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1]), parallel.DEFAULT_RULES


def host(tree):
  return jax.tree.map(np.array, tree)


def unchanged(before, after) -> bool:
  return all(np.array_equal(a, b, equal_nan=True) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


# ----------------------------------------------------------------------------- the guard in each stage's step

def lm_setup(head="lm"):
  mesh, rules = one_device()
  tx, schedule = train_state.make_optimizer(stage_cfg(), 10)
  sh = train_state.state_shardings(CFG, tx, mesh, rules, head=head)
  params = train_state.init_params(CFG, jax.random.key(0), sh["params"], mesh, rules, head=head)
  return mesh, rules, tx, schedule, sh, train_state.new_state(params, tx, sh, mesh)


def lm_batch(float_mask_nan=False, float_mask=False):
  rng = np.random.default_rng(0)
  toks = rng.integers(4, 32, (4, 9)).astype(np.int32)
  mask = (rng.random((4, 8)) < 0.7).astype(np.float32 if float_mask_nan or float_mask else bool)
  if float_mask_nan:
    mask[1, 2] = np.nan
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": mask}


@pytest.mark.parametrize("where", ["batch", "loss", "grad"])
def test_lm_step_guard(where, monkeypatch):
  if where != "batch":
    inject(monkeypatch, "token_nll", where)
  mesh, rules, tx, schedule, sh, state = lm_setup()
  train, _ = lm.make_steps(CFG, tx, schedule, sh, mesh, rules)
  before = host(state)
  with parallel.activate(mesh, rules):
    new, m = train(state, lm_batch(float_mask_nan=where == "batch"), jax.random.key(1))
  assert not bool(m["finite"])
  assert (np.isfinite(float(m["loss"])) and not np.isfinite(float(m["grad_norm"]))) if where == "grad" else \
      not np.isfinite(float(m["loss"]))
  assert unchanged(before, host(new)) and int(new["step"]) == 0


# RM batches hold token ids, indices and a mask used as a selector: no float field a NaN could ride in.
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_rm_step_guard(where, monkeypatch):
  inject(monkeypatch, "ranking_loss", where)
  mesh, rules, tx, schedule, sh, state = lm_setup(head="scalar")
  train, _, _ = reward.make_steps(CFG, "per_prompt", tx, schedule, sh, mesh, rules)
  rng = np.random.default_rng(1)
  B, K, T = 2, 3, 8
  mask = np.ones((B, K), bool)
  batch = {"tokens": rng.integers(4, 32, (B, K, T)).astype(np.int32),
           "last_index": np.full((B, K), T - 1, np.int32),
           "ranks": np.stack([rng.permutation(K) for _ in range(B)]).astype(np.int32), "mask": mask}
  before = host(state)
  with parallel.activate(mesh, rules):
    new, m = train(state, batch, jax.random.key(1))
  assert not bool(m["finite"])
  assert unchanged(before, host(new)) and int(new["step"]) == 0


@pytest.mark.parametrize("where", ["batch", pytest.param("loss", marks=pytest.mark.slow),
                                   pytest.param("grad", marks=pytest.mark.slow)])
def test_ppo_update_guard(where, monkeypatch):
  from tests.stages.test_ppo import TINY, build, host_models, ppo_cfg, tiny_prompts, tiny_ptx
  if where != "batch":
    inject(monkeypatch, "ppo_policy_loss", where)
  cfg = ModelConfig(**TINY)
  B, P = 8, 6
  pc = ppo_cfg(batch_size=B, minibatch_size=4, ptx_batch_size=4, ptx_coef=0.5)
  mesh, rules = one_device()
  state, models, rollout, update = build(cfg, pc, host_models(cfg), mesh, rules, P)
  prompts, pmask = tiny_prompts(B, P)
  with parallel.activate(mesh, rules):
    batch, _, _ = rollout(state["params"], state["value"], models["ref"], models["rm"], prompts, pmask,
                          jax.random.key(4), state["kl_coef"], state["score_gain"])
    if where == "batch":   # a NaN advantage in one episode: every minibatch it lands in is refused
      batch = {**batch, "advantages": batch["advantages"].at[:, 0].set(jnp.nan)}
    before = {k: host(state[k]) for k in ("params", "opt_state", "step")}
    new, m = update(state, batch, tiny_ptx(2, 4), jax.random.key(5))
  assert not bool(m["finite"])
  assert unchanged(before, {k: host(new[k]) for k in before}) and int(new["step"]) == 0


# ----------------------------------------------------------------------------- the loop's policies

def loop_run(tmp_path, poison_steps, **cfg_kw):
  """The shared loop on a tiny LM; batches at `poison_steps` carry a NaN in their (float) mask."""
  mesh, rules, tx, schedule, sh, state0 = lm_setup()
  cfg = stage_cfg(**cfg_kw)
  stage = loop.Stage(name="lm", cfg=cfg, workdir=tmp_path, model_dict=CFG.to_dict(), world_id=None,
                     rng=jax.random.key(3), tx=tx, shardings=sh, abstract=train_state.abstract_state(CFG, tx, sh))
  train, _ = lm.make_steps(CFG, tx, schedule, sh, mesh, rules)
  batch_at = lambda step: lm_batch(float_mask_nan=step in poison_steps, float_mask=True)   # one compile
  out = loop.run(stage, mesh, rules, initial_state=lambda: state0, train_step=train, batch_at=batch_at)
  return out, stage


def test_stop_policy_names_step_and_metric_and_keeps_the_checkpoint(tmp_path):
  with pytest.raises(NonFiniteError) as e:
    loop_run(tmp_path, poison_steps={3})
  msg = str(e.value)
  assert "lm: step 3 produced non-finite values" in msg and "'loss': nan" in msg and "not applied" in msg, msg
  assert "last good checkpoint (step 2)" in msg, msg
  c = checkpoints.StageCheckpoints(tmp_path / "lm")
  assert c.latest_step() == 2 and checkpoints.manifest_problem(tmp_path / "lm" / "2") is None
  c.close()


def test_skip_policy_skips_the_bad_batches_only(tmp_path):
  skipped, _ = loop_run(tmp_path / "skip", poison_steps={1, 3}, on_nonfinite="skip")
  # Reference: the same loop where steps 1 and 3 are simply not applied (step counter still advances).
  mesh, rules, tx, schedule, sh, state = lm_setup()
  train, _ = lm.make_steps(CFG, tx, schedule, sh, mesh, rules)
  with parallel.activate(mesh, rules):
    for step in range(6):
      if step in (1, 3):
        state = {**state, "step": state["step"] + 1}
      else:
        state, _ = train(state, lm_batch(float_mask=True), jax.random.key(3))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(skipped)))
  assert unchanged(host(state["params"]), host(skipped))
  import json
  rows = [json.loads(l) for l in (tmp_path / "skip" / "metrics" / "lm.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r.get("train/nonfinite_skipped")] == [2, 4]   # 0-based steps 1 and 3
  assert all(r.get("train/nonfinite/loss") == "nan" for r in rows if r.get("train/nonfinite_skipped"))


def test_skip_policy_stops_after_too_many_in_a_row(tmp_path):
  with pytest.raises(NonFiniteError, match=r"step 4 produced non-finite values \(4 in a row, more than "
                                           r"lm.max_nonfinite_skips=3\)"):
    loop_run(tmp_path, poison_steps={1, 2, 3, 4}, on_nonfinite="skip")


@pytest.mark.slow
def test_cli_stops_on_a_diverging_learning_rate(tmp_path):
  """End to end, no injection at all: a learning rate of 1e30 overflows the forward pass."""
  out = subprocess.run(cli_cmd(tmp_path, "world,pretrain", ["--config.pretrain.learning_rate=1e30",
                                                            "--config.pretrain.checkpoint_every=1"]),
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "NonFiniteError: pretrain: step" in out.stderr and "produced non-finite values" in out.stderr, \
      out.stderr[-2000:]
  assert "'loss': nan" in out.stderr or "'loss': inf" in out.stderr, out.stderr[-2000:]
  c = checkpoints.StageCheckpoints(tmp_path / "pretrain")
  step = c.latest_step()
  assert step is not None and not c.meta()["complete"] and checkpoints.manifest_problem(tmp_path / "pretrain" / str(step)) is None
  c.close()
