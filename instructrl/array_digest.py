"""A content digest of a tree of arrays: equal for equal values, whatever the files, mesh or process.

What it hashes: for every leaf (in jax's fixed tree order, dict keys sorted) its key path, dtype, shape
and four 32-bit lane sums; the hex sha256 of that list is the digest. Lane l of an array is the sum,
mod 2**32, over its elements of fmix(fmix(pos ^ seed_l) ^ word), where `word` is the element's bits
(an element wider than 32 bits is split into 32-bit words, an extra trailing axis) and `pos` a hash of
its coordinates. For a fixed position this is a bijection of the word, so changing any one element
changes every lane; the four lanes are keyed independently (128 bits in all).

Why sums: integer addition mod 2**32 is exact and does not depend on the order it is done in, so
the lanes are computed where the shards are (one jitted pass, each device over its own shard, then
an all-reduce of 16 bytes): no process gathers an array, and the result is the same on any mesh
shape, any number of hosts, and any backend (only integer operations; a float's bits are hashed, so
-0.0 and 0.0 differ, as their bytes do). Not a cryptographic MAC: it tells checkpoints apart, it does
not resist someone crafting a collision.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

SEEDS = (0x9E3779B9, 0x7F4A7C15, 0x85EBCA77, 0xC2B2AE3D)


def _u32(v: int):
  return jnp.uint32(v)


def _fmix(h):
  """MurmurHash3's 32-bit finalizer: a bijection that spreads every input bit over the output."""
  h = h ^ (h >> 16)
  h = h * _u32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * _u32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x) -> jax.Array:
  """The array's bits as uint32 (narrower types zero-extended; wider ones as a trailing axis of words)."""
  x = jnp.asarray(x)
  size = x.dtype.itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if size < 4:
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _lanes(x) -> jax.Array:
  w = _words(x)
  pos = jnp.full(w.shape, _u32(w.ndim))
  for d in range(w.ndim):
    pos = _fmix(pos ^ jax.lax.broadcasted_iota(jnp.uint32, w.shape, d))
  return jnp.stack([jnp.sum(_fmix(_fmix(pos ^ _u32(s)) ^ w), dtype=jnp.uint32) for s in SEEDS])


_tree_lanes = jax.jit(lambda tree: jax.tree.map(_lanes, tree))


def digest(tree) -> str:
  """Hex sha256 of the tree's leaves (key path, dtype, shape, lanes); see the module docstring."""
  lanes = jax.device_get(_tree_lanes(tree))   # replicated 4-word results: addressable on every process
  rows = [[jax.tree_util.keystr(path), str(x.dtype), list(np.shape(x)), [int(v) for v in lane]]
          for (path, x), lane in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(lanes))]
  return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
