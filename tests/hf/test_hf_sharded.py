"""An imported LLaMA checkpoint placed on a (data 2, fsdp 2, tensor 2) mesh of 8 simulated devices:
each weight is split the way its logical axes say, and the sharded forward equals the host one."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="needs the `hf` extra")


def _worker():
  import jax
  import jax.numpy as jnp
  import numpy as np
  sys.path.insert(0, str(Path(__file__).parent))
  from test_hf_convert import TOKENS, make_hf
  from instructrl import parallel
  from instructrl.models import hf
  from instructrl.models.transformer import Decoder
  assert jax.device_count() == 8
  with tempfile.TemporaryDirectory() as d:
    make_hf("llama", d, shard=True)
    host, cfg = hf.load(d)
    mesh = parallel.make_mesh((2, 2, 2))
    try:   # the default rules split 'vocab' over 'tensor', and 101 is odd
      hf.load(d, mesh=mesh, rules=parallel.DEFAULT_RULES)
      error = ""
    except hf.ConvertError as e:
      error = str(e)
    rules = tuple((k, None if k == "vocab" else v) for k, v in parallel.DEFAULT_RULES)
    params, _ = hf.load(d, mesh=mesh, rules=rules)
  wq, embed = params["layer_0"]["attn"]["wq"], params["embed"]
  fwd = lambda p: Decoder(cfg).apply({"params": p}, jnp.asarray(TOKENS))[0]
  with parallel.activate(mesh, rules):
    sharded = np.asarray(jax.jit(fwd)(params))
  plain = np.asarray(jax.jit(fwd)(jax.tree.map(jnp.asarray, host)))
  print("RESULT " + json.dumps({
      "wq_global": list(wq.shape), "wq_shard": list(wq.addressable_shards[0].data.shape),
      "wq_spec": [str(a) for a in wq.sharding.spec],
      "embed_shard": list(embed.addressable_shards[0].data.shape), "error": error,
      "max_diff": float(np.abs(sharded - plain).max())}))


@pytest.mark.slow
def test_import_onto_8_device_mesh():
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from cli_helpers import run_worker_on_8_devices
  r = run_worker_on_8_devices(__file__, timeout=240)
  # wq [D=32, N=4, H=8]: embed over fsdp (2), heads over tensor (2).
  assert r["wq_global"] == [32, 4, 8] and r["wq_shard"] == [16, 2, 8], r
  assert r["wq_spec"] == ["fsdp", "tensor", "None"], r
  # embed [V=101, D=32] with 'vocab' unsplit: D over fsdp only.
  assert r["embed_shard"] == [101, 16], r
  assert "weight embed of shape (101, 32) cannot be split" in r["error"] and "('vocab', None)" in r["error"], r
  assert r["max_diff"] < 1e-4, r
