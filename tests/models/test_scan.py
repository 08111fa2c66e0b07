"""Layers as a scan (model.scan_layers): the same function as the per-layer loop, given the same weights
through models/layout.py; train steps, sampling, remat policies, HF mapping and checkpoints in both layouts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instructrl import checkpoints, parallel
from instructrl.models import hf, layout
from instructrl.models.config import REMAT_POLICIES, ModelConfig, mismatched_fields
from instructrl.models.sampling import sample
from instructrl.models.transformer import Decoder, abstract_params, init_cache
from instructrl.stages import lm, reward, train_state

GPT = ModelConfig(style="gpt", vocab_size=48, max_len=24, d_model=32, n_layers=3, n_heads=4, n_kv_heads=4,
                  head_dim=8, d_ff=64, tie_embeddings=True)
LLAMA = ModelConfig(style="llama", vocab_size=48, max_len=24, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=64, tie_embeddings=False)
CFGS = {"gpt": GPT, "llama": LLAMA}
STAGE = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=0, final_lr_fraction=0.1, grad_clip=1.0,
                                       b1=0.9, b2=0.95, weight_decay=0.1))


def scanned(cfg):
  return dataclasses.replace(cfg, scan_layers=True)


def random_params(cfg, head="lm", seed=0):
  """O(1) random weights in the per-layer layout (norm scales and biases too, so none is trivially 0/1)."""
  shapes = nn.unbox(abstract_params(cfg, head))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(max(s.shape[:1] or (1,))),
                                            s.dtype), shapes)


def tokens(B=3, T=10, V=48, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(4, V, (B, T)), jnp.int32)


def assert_trees_equal(a, b, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


# ----------------------------------------------------------------------------- layout conversion

@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_stacked_tree_is_the_scanned_models_tree_and_round_trips_exactly(style):
  cfg = CFGS[style]
  params = random_params(cfg)
  stacked = layout.stack_layers(params)
  want = nn.unbox(abstract_params(scanned(cfg)))
  assert jax.tree.structure(stacked) == jax.tree.structure(want)
  assert jax.tree.map(lambda a: a.shape, stacked) == jax.tree.map(lambda a: a.shape, want)
  np.testing.assert_array_equal(stacked["layers"]["attn"]["wq"][2], params["layer_2"]["attn"]["wq"])
  assert_trees_equal(layout.unstack_layers(stacked), params)
  assert layout.tree_layout(stacked) is True and layout.tree_layout(params) is False
  assert layout.tree_layout({"step": 1}) is None


def test_optimizer_state_converts_like_the_params():
  params = random_params(GPT)
  tx, _ = train_state.make_optimizer(STAGE, 10)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[1])
  opt = update(grads, params)
  opt_s = update(layout.stack_layers(grads), layout.stack_layers(params))
  assert_trees_equal(layout.stack_layers(opt), opt_s, atol=1e-7)
  assert_trees_equal(layout.unstack_layers(layout.stack_layers(opt)), opt)


def test_stack_refuses_a_gap_in_the_layer_numbers():
  with pytest.raises(ValueError, match="layer_0..layer_1"):
    layout.stack_layers({"layer_0": {"w": np.zeros(2)}, "layer_2": {"w": np.zeros(2)}})


def test_abstract_trees_convert_with_their_shardings():
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tx, _ = train_state.make_optimizer(STAGE, 10)
  for cfg, other in ((GPT, scanned(GPT)), (scanned(GPT), GPT)):
    a = train_state.abstract_state(cfg, tx, train_state.state_shardings(cfg, tx, mesh, parallel.DEFAULT_RULES))
    b = train_state.abstract_state(other, tx, train_state.state_shardings(other, tx, mesh, parallel.DEFAULT_RULES))
    conv = layout.to_layout(a, other.scan_layers)
    assert jax.tree.structure(conv) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(conv), jax.tree.leaves(b)):
      assert (x.shape, x.dtype) == (y.shape, y.dtype)
      assert x.sharding.is_equivalent_to(y.sharding, len(x.shape))


# ----------------------------------------------------------------------------- config

def test_config_switches_and_old_metas():
  old = {k: v for k, v in GPT.to_dict().items() if k not in ("scan_layers", "remat_policy")}
  cfg = ModelConfig.from_dict({**old, "remat": True})   # a model config recorded before these fields existed
  assert cfg.block_remat == "block_inputs" and not cfg.scan_layers
  assert ModelConfig(remat=True, remat_policy="dots_saveable").block_remat == "dots_saveable"
  assert ModelConfig().block_remat == "none"
  with pytest.raises(ValueError, match="remat_policy"):
    ModelConfig(remat_policy="everything")
  with pytest.raises(ValueError, match="scan_layers"):
    ModelConfig(scan_layers=1)
  # The layout and the remat policy do not change what the weights mean: an old meta matches either.
  assert mismatched_fields(old, scanned(dataclasses.replace(GPT, remat_policy="dots_saveable")).to_dict()) == []


# ----------------------------------------------------------------------------- the same function

@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_scanned_logits_equal_the_loop(style):
  cfg = CFGS[style]
  params = random_params(cfg)
  toks = tokens()
  mask = jnp.asarray(np.arange(10)[None] >= np.array([[0], [2], [5]]))
  want, _ = Decoder(cfg).apply({"params": params}, toks, kv_mask_bs=mask)
  got, _ = Decoder(scanned(cfg)).apply({"params": layout.stack_layers(params)}, toks, kv_mask_bs=mask)
  assert float(jnp.std(want)) > 0.1   # far from a constant output
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)
  # The scalar head too (RM / value function).
  sp = random_params(cfg, head="scalar")
  want, _ = Decoder(cfg, head="scalar").apply({"params": sp}, toks)
  got, _ = Decoder(scanned(cfg), head="scalar").apply({"params": layout.stack_layers(sp)}, toks)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_scanned_cache_is_stacked_and_equals_the_loops(style):
  cfg = CFGS[style]
  params = random_params(cfg)
  toks = tokens(T=6)
  _, want = Decoder(cfg).apply({"params": params}, toks, cache=init_cache(cfg, 3, 8), cache_index=0)
  _, got = Decoder(scanned(cfg)).apply({"params": layout.stack_layers(params)}, toks,
                                        cache=init_cache(scanned(cfg), 3, 8), cache_index=0)
  assert got["k"].shape == (cfg.n_layers, 3, cfg.n_kv_heads, 8, cfg.head_dim)
  for i in range(cfg.n_layers):
    np.testing.assert_allclose(np.asarray(got["k"][i]), np.asarray(want[i]["k"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["v"][i]), np.asarray(want[i]["v"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_greedy_and_sampled_tokens_equal_with_the_kv_cache(style):
  cfg = CFGS[style]
  params = random_params(cfg)
  prompt = tokens(T=6)
  mask = jnp.asarray(np.arange(6)[None] >= np.array([[0], [2], [4]]))
  prompt = jnp.where(mask, prompt, 0)
  for temperature in (0.0, 1.0):
    kw = dict(max_new_tokens=8, temperature=temperature, eos_id=-1, pad_id=0)
    want = sample(params, prompt, mask, jax.random.key(2), cfg=cfg, **kw)
    got = sample(layout.stack_layers(params), prompt, mask, jax.random.key(2), cfg=scanned(cfg), **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=0, atol=1e-5)
  assert len(set(np.asarray(want.tokens).ravel().tolist())) > 3   # not a constant sequence


def saved_elements(fn, *args) -> int:
  """Elements of the residuals autodiff keeps for fn's backward pass (jax prints one 'f32[a,b] ...' a line)."""
  import contextlib
  import io
  import re
  from jax.ad_checkpoint import print_saved_residuals
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(fn, *args)
  shapes = re.findall(r"^\w+\[([\d,]*)\]", buf.getvalue(), re.M)
  assert shapes, buf.getvalue()
  return sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)


def test_remat_policies_keep_the_function_and_save_less():
  params = layout.stack_layers(random_params(LLAMA))
  toks = tokens()
  grads, saved = {}, {}
  for policy in REMAT_POLICIES:
    cfg = dataclasses.replace(scanned(LLAMA), remat_policy=policy)
    loss = lambda p, cfg=cfg: jnp.mean(Decoder(cfg).apply({"params": p}, toks)[0] ** 2)
    grads[policy] = jax.grad(loss)(params)
    saved[policy] = saved_elements(loss, params)
  for policy in REMAT_POLICIES[1:]:
    assert_trees_equal(grads[policy], grads["none"], atol=1e-5)
  # Recomputing keeps less for the backward pass; saving the matmuls keeps more than saving nothing.
  assert saved["nothing_saveable"] == saved["block_inputs"] < saved["dots_saveable"] < saved["none"], saved


# ----------------------------------------------------------------------------- train steps

def without_bk(*trees):
  """The key bias's gradient is 0 in exact arithmetic (softmax ignores a shift shared by all keys): Adam
  turns its rounding noise into steps of random sign, so it is left out of a comparison of updated params."""
  drop = lambda t: jax.tree_util.tree_map_with_path(lambda p, x: None if p[-1].key == "bk" else x, t)
  return tuple(drop(t) for t in trees)


def _one_step(cfg, params, make, batch, head="lm"):
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = parallel.DEFAULT_RULES
  tx, schedule = train_state.make_optimizer(STAGE, 10)
  sh = train_state.state_shardings(cfg, tx, mesh, rules, head=head)
  # Host copies: the step donates the state, and a device_put onto the same device would hand it the caller's buffers.
  state = train_state.new_state(jax.device_put(jax.tree.map(np.array, params), sh["params"]), tx, sh, mesh)
  train = make(cfg, tx, schedule, sh, mesh, rules)[0]
  with parallel.activate(mesh, rules):
    state, m = train(state, batch, jax.random.key(5))
  return state, m


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_sft_step_equal_in_both_layouts(style):
  cfg = CFGS[style]
  params = random_params(cfg)
  toks = np.asarray(tokens(B=4, T=11))
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": np.random.default_rng(0).random((4, 10)) < 0.8}
  want, mw = _one_step(cfg, params, lm.make_steps, batch)
  got, mg = _one_step(scanned(cfg), layout.stack_layers(params), lm.make_steps, batch)
  np.testing.assert_allclose(float(mg["loss"]), float(mw["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(mg["grad_norm"]), float(mw["grad_norm"]), rtol=1e-5)
  # Weight decay applies to the same weights (a stacked bias is 2-D but is not a matrix).
  assert_trees_equal(*without_bk(layout.unstack_layers(got["params"]), want["params"]), atol=1e-5)   # Adam divides by sqrt(v): a last-bit gradient difference on a near-zero entry moves it ~lr
  mu_got, mu_want = layout.unstack_layers(got["opt_state"])[1][0].mu, want["opt_state"][1][0].mu
  assert_trees_equal(mu_got, mu_want, atol=1e-7)


def test_rm_step_equal_in_both_layouts():
  cfg = LLAMA
  params = random_params(cfg, head="scalar")
  B, K, T = 2, 3, 8
  rng = np.random.default_rng(3)
  batch = {"tokens": rng.integers(4, 48, (B, K, T)).astype(np.int32),
           "last_index": rng.integers(3, T, (B, K)).astype(np.int32),
           "ranks": np.tile(np.arange(K, dtype=np.int32), (B, 1)), "mask": np.ones((B, K), bool)}
  make = lambda *a: reward.make_steps(a[0], "per_prompt", *a[1:])
  want, mw = _one_step(cfg, params, make, batch, head="scalar")
  got, mg = _one_step(scanned(cfg), layout.stack_layers(params), make, batch, head="scalar")
  np.testing.assert_allclose(float(mg["loss"]), float(mw["loss"]), rtol=1e-6)
  assert_trees_equal(*without_bk(layout.unstack_layers(got["params"]), want["params"]), atol=2e-6)


# ----------------------------------------------------------------------------- HF mapping

@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_hf_mapping_in_both_layouts(style):
  cfg = CFGS[style]
  params = jax.tree.map(np.asarray, random_params(cfg))
  tensors = hf.params_to_hf(cfg, params)
  assert_trees_equal(hf.params_to_hf(scanned(cfg), layout.stack_layers(params)), tensors)
  assert_trees_equal(hf.params_from_hf(scanned(cfg), dict(tensors)), layout.stack_layers(params))


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("saved_scan", [False, True])
def test_checkpoint_restores_into_the_other_layout(tmp_path, saved_scan):
  src, dst = (scanned(GPT), GPT) if saved_scan else (GPT, scanned(GPT))
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = parallel.DEFAULT_RULES
  tx, _ = train_state.make_optimizer(STAGE, 10)
  params = random_params(GPT)
  src_sh = train_state.state_shardings(src, tx, mesh, rules)
  state = train_state.new_state(jax.device_put(layout.to_layout(params, saved_scan), src_sh["params"]), tx,
                                src_sh, mesh)
  state = {**state, "step": jnp.int32(3)}
  ckpt = checkpoints.StageCheckpoints(tmp_path / "sft")
  ckpt.save(3, state, {"model": src.to_dict(), "complete": True})
  digest = ckpt.meta()["digests"]["params"]
  ckpt.close()

  dst_sh = train_state.state_shardings(dst, tx, mesh, rules)
  abstract = train_state.abstract_state(dst, tx, dst_sh)
  ckpt = checkpoints.StageCheckpoints(tmp_path / "sft")
  restored, meta = ckpt.restore(abstract, check=lambda m: checkpoints.check_model(m["model"], dst.to_dict(), "x"))
  ckpt.close()
  assert int(restored["step"]) == 3
  assert_trees_equal(restored["params"], layout.to_layout(params, not saved_scan))
  assert_trees_equal(restored["opt_state"], layout.to_layout(state["opt_state"], not saved_scan))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
  loaded, _ = checkpoints.load_params(tmp_path / "sft", abstract["params"], dst.to_dict())
  assert_trees_equal(loaded, layout.to_layout(params, not saved_scan))
  # The digest is of the per-layer layout: the same weights have one id whichever layout saved them.
  from instructrl import array_digest
  assert digest == array_digest.digest(params)


# ----------------------------------------------------------------------------- 8 simulated devices

MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]


def _worker():
  import jax
  import numpy as np

  from instructrl import parallel
  from instructrl.models import layout
  from instructrl.stages import lm, train_state

  assert len(jax.devices()) == 8
  rules = parallel.DEFAULT_RULES
  rng = np.random.default_rng(0)
  toks = rng.integers(4, 48, (8, 11)).astype(np.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": rng.random((8, 10)) < 0.8}
  out = {}
  for style, cfg in CFGS.items():
    params = jax.tree.map(np.asarray, random_params(cfg))   # host arrays: each run's step donates its own copy

    def run(cfg, params, shape):
      devices = jax.devices()[:int(np.prod(shape))]
      mesh = parallel.make_mesh(shape, devices=devices)
      tx, schedule = train_state.make_optimizer(STAGE, 10)
      sh = train_state.state_shardings(cfg, tx, mesh, rules)
      state = train_state.new_state(jax.device_put(params, sh["params"]), tx, sh, mesh)
      train = lm.make_steps(cfg, tx, schedule, sh, mesh, rules)[0]
      with parallel.activate(mesh, rules):
        state, m = train(state, train_state.device_batch(batch, mesh, rules), jax.random.key(5))
      spec = list(state["params"]["layers" if cfg.scan_layers else "layer_0"]["attn"]["wq"].sharding.spec)
      return float(m["loss"]), jax.tree.map(np.asarray, layout.unstack_layers(state["params"])), spec

    ref_loss, ref_params, _ = run(cfg, params, (1, 1, 1))
    for shape in MESHES:
      loss, got, spec = run(scanned(cfg), layout.stack_layers(params), shape)
      got, ref = without_bk(got, ref_params)
      diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
      out[f"{style}/{shape}"] = {"loss": loss, "ref_loss": ref_loss, "param_diff": diff,
                                 "wq_spec": [list(a) if isinstance(a, tuple) else a for a in spec]}
  print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def sharded():
  here = os.path.abspath(__file__)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true"}
  code = textwrap.dedent(f"""
      import importlib.util
      spec = importlib.util.spec_from_file_location("_scan_worker", {here!r})
      mod = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(mod)
      mod._worker()
  """)
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-6000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert line, proc.stdout[-3000:]
  return json.loads(line[-1][len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("style", ["gpt", "llama"])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_scanned_sharded_equals_unscanned_unsharded(sharded, style, shape):
  r = sharded[f"{style}/{tuple(shape)}"]
  assert abs(r["loss"] - r["ref_loss"]) < 1e-5, r
  assert r["param_diff"] < 1e-5, r
  # The stacked weight keeps its layers axis whole and shards the rest as a per-layer weight would.
  assert r["wq_spec"][:3] == [None, "fsdp", "tensor"], r
