"""Sharded == unsharded for the LM train step, and a snapshot of every parameter's partition spec.

The 8 simulated CPU devices live in a subprocess (XLA_FLAGS must be set before JAX starts, and
must not leak into the other tests). The subprocess runs `_worker()` from this file and prints
one JSON line; the assertions are made here on what it reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}
TOL = 1e-5

GPT = dict(style="gpt", vocab_size=64, max_len=16, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=16,
           d_ff=128, tie_embeddings=True, embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
LLAMA = dict(style="llama", vocab_size=64, max_len=16, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
             head_dim=16, d_ff=128, tie_embeddings=False, embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)


def _strip(spec):
  """PartitionSpec -> list with trailing Nones dropped (P('a', None) and P('a') shard identically)."""
  out = [list(a) if isinstance(a, tuple) else a for a in spec]
  while out and out[-1] is None:
    out.pop()
  return out


def _worker(style):
  import jax
  import ml_collections
  import numpy as np

  from instructrl import parallel
  from instructrl.models.config import ModelConfig
  from instructrl.stages import lm, train_state

  assert len(jax.devices()) == 8, jax.devices()
  rules = parallel.DEFAULT_RULES
  stage = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=0, final_lr_fraction=0.1, grad_clip=1.0,
                                         b1=0.9, b2=0.95, weight_decay=0.1))
  rng = np.random.default_rng(0)
  toks = rng.integers(4, 64, (16, 9)).astype(np.int32)
  mask = rng.random((16, 8)) < 0.75
  mask[0] = False                       # a row with no trained token at all
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": mask}
  path = lambda kp: "/".join(str(k.key) for k in kp)

  def flat(tree):
    return {path(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

  def run(cfg, shape, init_from=None):
    devices = jax.devices() if np.prod(shape) == 8 else jax.devices()[:1]
    mesh = parallel.make_mesh(shape, devices=devices)
    tx, schedule = train_state.make_optimizer(stage, total_steps=10)
    sh = train_state.state_shardings(cfg, tx, mesh, rules)
    if init_from is None:
      params = train_state.init_params(cfg, jax.random.key(0), sh["params"], mesh, rules)
    else:   # same values, placed with this mesh's shardings (saves an init compile per mesh)
      params = jax.device_put(init_from, sh["params"])
    init = jax.tree.map(np.asarray, params)
    state = train_state.new_state(params, tx, sh, mesh)
    train, _ = lm.make_steps(cfg, tx, schedule, sh, mesh, rules)
    losses, grad_norms = [], []
    with parallel.activate(mesh, rules):
      b = train_state.device_batch(batch, mesh, rules)
      for _ in range(2):
        state, m = train(state, b, jax.random.key(5))
        losses.append(float(m["loss"]))
        grad_norms.append(float(m["grad_norm"]))
    info = {
        "losses": losses, "grad_norms": grad_norms, "step": int(state["step"]),
        "specs": {k: _strip(a.sharding.spec) for k, a in flat(state["params"]).items()},
        "declared": {k: _strip(s.spec) for k, s in flat(sh["params"]).items()},
        "n_shards": {k: len({tuple((i.start, i.stop) for i in idx)
                             for idx in a.sharding.devices_indices_map(a.shape).values()})
                     for k, a in flat(state["params"]).items()},
    }
    # optimizer moments are sharded like their parameter
    mu = flat(state["opt_state"][1][0].mu)
    info["mu_specs_match"] = all(_strip(mu[k].sharding.spec) == info["specs"][k] for k in info["specs"])
    return info, init, jax.tree.map(np.asarray, state["params"])

  def maxdiff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  out = {}
  cfg = ModelConfig(**{"gpt": GPT, "llama": LLAMA}[style])
  # train_state.init_params on the (2,2,2) mesh; the other meshes get the same values with device_put (an init
  # compile per mesh is the slowest part of this test); the 1-device reference must start equal.
  sharded, init, params = run(cfg, (2, 2, 2))
  ref, ref_init, ref_params = run(cfg, (1, 1, 1), init_from=init)
  if style == "llama":   # train_state.init_params itself gives the same values on 1 device as on (2,2,2)
    mesh1 = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tx, _ = train_state.make_optimizer(stage, total_steps=10)
    sh1 = train_state.state_shardings(cfg, tx, mesh1, rules)
    out["llama/init_1dev_vs_2x2x2"] = maxdiff(jax.tree.map(np.asarray, train_state.init_params(
        cfg, jax.random.key(0), sh1["params"], mesh1, rules)), init)
  out[f"{style}/1x1x1"] = {**ref, "param_diff": 0.0, "update_size": maxdiff(ref_params, ref_init)}
  results = {"2x2x2": (sharded, init, params)}
  if style == "gpt":
    for mname in ("8x1x1", "2x4x1"):
      results[mname] = run(cfg, MESHES[mname], init_from=ref_init)
  for mname, (info, init, params) in results.items():
    info["param_diff"] = maxdiff(params, ref_params)
    out[f"{style}/{mname}"] = info
  if style == "gpt":   # the scalar-head tree too (RM / value function), declared specs only
    mesh = parallel.make_mesh((2, 2, 2))
    tx, _ = train_state.make_optimizer(stage, total_steps=10)
    sh = train_state.state_shardings(cfg, tx, mesh, rules, head="scalar")
    out["gpt-scalar/declared"] = {k: _strip(s.spec) for k, s in flat(sh["params"]).items()}
    out["gpt/kv_cache_shards"] = _kv_cache_shards(cfg, init, mesh, rules)
  print("RESULT " + json.dumps(out))


def _kv_cache_shards(cfg, params, mesh, rules):
  """Per-device shapes of the sampler's KV-cache buffers in the compiled program on `mesh` (PPO rollout)."""
  import re

  import jax
  import numpy as np

  from instructrl import parallel
  from instructrl.models import sampling
  from instructrl.stages import train_state
  B, P, N = 8, 4, 4
  params = jax.device_put(params, parallel.logical_shardings(train_state.abstract_params(cfg), mesh, rules))
  prompt = jax.device_put(np.ones((B, P), np.int32), parallel.batch_sharding(mesh, rules))
  mask = jax.device_put(np.ones((B, P), bool), parallel.batch_sharding(mesh, rules))
  with parallel.activate(mesh, rules):
    text = sampling.sample.lower(params, prompt, mask, jax.random.key(1), cfg=cfg, max_new_tokens=N, eos_id=3,
                                 pad_id=0).compile().as_text()
  # The cache is [B, n_kv_heads, P + N, head_dim] globally; collect every buffer with its S and head_dim.
  pattern = rf"f32\[(\d+),(\d+),{P + N},{cfg.head_dim}\]"
  return sorted({(int(b), int(k)) for b, k in re.findall(pattern, text)})


@pytest.fixture(scope="module")
def result():
  """Two workers (gpt, llama) run concurrently; each is one process with 8 simulated devices."""
  here = os.path.abspath(__file__)
  # Low XLA CPU optimisation: compile time dominates here, and both sides of every comparison share it.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true"}
  procs = {}
  for style in ("gpt", "llama"):
    code = textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("_sharding_worker", {here!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod._worker({style!r})
    """)
    procs[style] = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
  out = {}
  try:
    for style, proc in procs.items():
      stdout, stderr = proc.communicate(timeout=600)
      assert proc.returncode == 0, f"{style} worker failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
      line = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
      assert line, stdout[-3000:]
      out.update(json.loads(line[-1][len("RESULT "):]))
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return out


@pytest.mark.parametrize("run", ["gpt/8x1x1", "gpt/2x4x1", "gpt/2x2x2", "llama/2x2x2"])
def test_sharded_equals_unsharded(result, run):
  r = result[run]
  ref = result[run.split("/")[0] + "/1x1x1"]
  assert ref["step"] == r["step"] == 2
  assert ref["update_size"] > 1e-4, "the two steps must actually move the params"
  for a, b in zip(r["losses"], ref["losses"]):
    assert abs(a - b) < TOL, (r["losses"], ref["losses"])
  for a, b in zip(r["grad_norms"], ref["grad_norms"]):
    assert abs(a - b) < 1e-4 * max(1.0, abs(b)), (r["grad_norms"], ref["grad_norms"])
  assert ref["losses"][1] < ref["losses"][0]
  assert r["param_diff"] < TOL, r["param_diff"]
  assert r["mu_specs_match"]


def _expected_specs(tied: bool, style: str, head: str = "lm"):
  """The snapshot: logical axes -> (data, fsdp, tensor) with DEFAULT_RULES, per parameter name."""
  per_layer = {
      "norm_attn/scale": ["fsdp"], "norm_mlp/scale": ["fsdp"],
      "attn/wq": ["fsdp", "tensor"], "attn/wk": ["fsdp", "tensor"], "attn/wv": ["fsdp", "tensor"],
      "attn/wo": ["tensor", None, "fsdp"],
      "mlp/w_in": ["fsdp", "tensor"], "mlp/w_out": ["tensor", "fsdp"],
  }
  top = {"embed": ["tensor", "fsdp"], "norm_final/scale": ["fsdp"]}
  if style == "gpt":
    per_layer.update({"norm_attn/bias": ["fsdp"], "norm_mlp/bias": ["fsdp"], "attn/bq": ["tensor"],
                      "attn/bk": ["tensor"], "attn/bv": ["tensor"], "attn/bo": ["fsdp"],
                      "mlp/b_in": ["tensor"], "mlp/b_out": ["fsdp"]})
    top.update({"pos_embed": [None, "fsdp"], "norm_final/bias": ["fsdp"]})
  else:
    per_layer["mlp/w_gate"] = ["fsdp", "tensor"]
  if head == "scalar":
    top.update({"score": ["fsdp"], "score_bias": []})
  elif not tied:
    top["unembed"] = ["fsdp", "tensor"]
  want = dict(top)
  for i in range(GPT["n_layers"]):
    want.update({f"layer_{i}/{k}": v for k, v in per_layer.items()})
  return want


@pytest.mark.parametrize("run,tied,style", [("gpt/2x2x2", True, "gpt"), ("llama/2x2x2", False, "llama")])
def test_partition_spec_snapshot(result, run, tied, style):
  r = result[run]
  want = _expected_specs(tied, style)
  assert sorted(r["declared"]) == sorted(want), "parameter names changed: update the snapshot deliberately"
  for k, v in want.items():
    assert r["declared"][k] == v, (k, r["declared"][k], v)
    assert r["specs"][k] == v, ("placed", k, r["specs"][k], v)   # the live arrays follow the declaration
  # really split: wq [64, 4, 16] over fsdp=2 (embed) x tensor=2 (heads) -> 4 distinct shards
  assert "fsdp" in r["specs"]["layer_0/attn/wq"] and "tensor" in r["specs"]["layer_0/attn/wq"]
  assert r["n_shards"]["layer_0/attn/wq"] == 4
  assert r["n_shards"]["layer_0/mlp/w_in"] == 4
  assert r["n_shards"]["norm_final/scale"] == 2


def test_init_params_independent_of_mesh(result):
  assert result["llama/init_1dev_vs_2x2x2"] < 1e-7


def test_partition_spec_snapshot_scalar_head(result):
  got = result["gpt-scalar/declared"]
  want = _expected_specs(True, "gpt", head="scalar")
  assert got == want


def test_sampler_kv_cache_is_sharded(result):
  """On (2,2,2) every cache buffer holds 8 / (data x fsdp) = 2 rows and 4 / tensor = 2 kv heads per device."""
  assert result["gpt/kv_cache_shards"] == [[2, 2]]


def test_fsdp_only_mesh_shards_embed_dim(result):
  r = result["gpt/2x4x1"]
  assert r["n_shards"]["layer_0/attn/wq"] == 4      # embed over fsdp=4, heads over tensor=1
  assert r["n_shards"]["embed"] == 4
  r = result["gpt/8x1x1"]
  assert all(n == 1 for n in r["n_shards"].values())   # pure data parallel: params replicated
