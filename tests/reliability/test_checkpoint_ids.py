"""Checkpoint ids from the arrays' contents (array_digest, evaluate.checkpoint_id): the same arrays saved
twice, under Orbax's different random file names, get the same id; any changed value another one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from instructrl import array_digest, checkpoints
from instructrl.stages import evaluate

ROOT = Path(__file__).resolve().parents[2]
M32 = (1 << 32) - 1


def fmix(h: int) -> int:
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & M32
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & M32
  return h ^ (h >> 16)


def reference_lanes(words: np.ndarray) -> list[int]:
  """The module docstring's formula, element by element in Python integers."""
  out = []
  for seed in array_digest.SEEDS:
    total = 0
    for idx in np.ndindex(words.shape):
      pos = words.ndim
      for c in idx:
        pos = fmix(pos ^ c)
      total += fmix(fmix(pos ^ seed) ^ int(words[idx]))
    out.append(total & M32)
  return out


def test_lanes_match_the_formula():
  x = np.array([[1.5, -0.0, 3.25], [np.inf, 7.0, -2.0]], np.float32)
  assert [int(v) for v in array_digest._lanes(x)] == reference_lanes(x.view(np.uint32))
  b = np.array([1, -2, 3], np.int8)     # narrower than 32 bits: zero-extended bit patterns
  assert [int(v) for v in array_digest._lanes(b)] == reference_lanes(b.view(np.uint8).astype(np.uint32))


def test_digest_tells_values_positions_dtypes_and_paths_apart():
  x = jax.random.normal(jax.random.key(0), (16, 8))
  tree = {"a": x, "b": jnp.arange(6, dtype=jnp.int32)}
  d = array_digest.digest(tree)
  assert d == array_digest.digest({"b": jnp.arange(6, dtype=jnp.int32), "a": x + 0})   # key order, new buffers
  swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
  others = [{**tree, "a": x.at[3, 4].add(1e-6)}, {**tree, "a": swapped}, {**tree, "a": x.astype(jnp.bfloat16)},
            {**tree, "a": x.reshape(8, 16)}, {"c": x, "b": tree["b"]}, {**tree, "a": x.at[2, 2].set(-0.0 * x[2, 2])}]
  digests = [array_digest.digest(t) for t in others]
  assert d not in digests and len(set(digests)) == len(digests)


def test_digest_is_the_same_on_any_mesh():
  """Sharded over 1, 2x2 or 4 devices (four CPU devices in a fresh interpreter): the same digest."""
  code = """
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from instructrl import array_digest
devs = np.array(jax.devices())
tree = {"w": jax.random.normal(jax.random.key(0), (32, 24), jnp.bfloat16), "v": jnp.arange(40.0)}
put = lambda t, mesh, spec: jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec(a))), t)
grid, line = Mesh(devs.reshape(2, 2), ("a", "b")), Mesh(devs, ("a",))
print(json.dumps([array_digest.digest(tree),
                  array_digest.digest(put(tree, grid, lambda a: P("a", "b") if a.ndim == 2 else P(("a", "b")))),
                  array_digest.digest(put(tree, line, lambda a: P(None, "a") if a.ndim == 2 else P("a"))),
                  array_digest.digest(put(tree, grid, lambda a: P()))]))
"""
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PATH": "/usr/bin:/bin"}
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  digests = json.loads(out.stdout.strip().splitlines()[-1])
  assert len(set(digests)) == 1, digests


def _save(directory: Path, state: dict, step: int = 3) -> None:
  ckpt = checkpoints.StageCheckpoints(directory)
  try:
    ckpt.save(step, state, {"complete": True})
  finally:
    ckpt.close()


def test_checkpoint_id_is_the_same_for_the_same_arrays_under_other_file_names(tmp_path):
  params = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (8, 4)), "bias": jnp.zeros(4)}}
  state = {"step": jnp.int32(3), "params": params, "ema": jax.tree.map(lambda a: a * 0.5, params)}
  for run in ("a", "b"):
    _save(tmp_path / run / "sft", state)
  files = [json.loads((tmp_path / run / "sft" / "3" / checkpoints.MANIFEST).read_text())["files"] for run in "ab"]
  # The defect this guards against: Orbax's data files have random names, so a hash of the files differs.
  assert set(files[0]) != set(files[1])
  ids = {run: {e: evaluate.checkpoint_id(tmp_path / run, "sft", 3, e) for e in ("params", "ema")} for run in "ab"}
  assert ids["a"] == ids["b"] and ids["a"]["params"] != ids["a"]["ema"]
  assert ids["a"]["params"] == array_digest.digest(params)[:16]
  changed = {**state, "params": {"dense": {**params["dense"], "bias": params["dense"]["bias"].at[1].set(1e-3)}}}
  _save(tmp_path / "c" / "sft", changed)
  assert evaluate.checkpoint_id(tmp_path / "c", "sft", 3) != ids["a"]["params"]
  assert evaluate.checkpoint_id(tmp_path / "c", "sft", 3, "ema") == ids["a"]["ema"]


def test_a_step_saved_without_digests_keeps_its_manifest_id(tmp_path, monkeypatch):
  """An older workdir: its step's id is the manifest hash it always had, so its judged record still matches."""
  import hashlib
  monkeypatch.setattr(checkpoints, "DIGESTED", ())
  _save(tmp_path / "sft", {"params": {"w": jnp.ones(3)}})
  manifest = (tmp_path / "sft" / "3" / checkpoints.MANIFEST).read_bytes()
  assert evaluate.checkpoint_id(tmp_path, "sft", 3) == hashlib.sha256(manifest).hexdigest()[:16]
  assert evaluate.checkpoint_id(tmp_path, "ppo", 3) == "unknown"
