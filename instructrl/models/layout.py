"""Per-layer <-> stacked layer layout of params and of every tree shaped like them.

Unscanned models keep one subtree per block (params["layer_0"], params["layer_1"], ...); with
`model.scan_layers` the same weights are one subtree params["layers"] whose leaves have a leading
[n_layers] axis. These functions rewrite any tree that mirrors the params (optimizer moments, PPO's
EMA, abstract trees of jax.ShapeDtypeStruct with shardings): every dict holding "layer_{i}" keys is
stacked, every dict holding "layers" is split, and everything else (step counters, scalars) is left
as it is. Stacking then splitting is exact: no arithmetic touches a value.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from instructrl.models.transformer import STACKED

_LAYER = re.compile(r"layer_(\d+)$")


def _layer_indices(d: Mapping) -> list[int]:
  return sorted(int(m.group(1)) for m in (_LAYER.match(str(k)) for k in d) if m)


def _map_dicts(tree, fn: Callable[[Mapping], Mapping | None]):
  """Rebuild `tree`, replacing each dict for which fn returns a dict (otherwise recursing into it)."""
  if isinstance(tree, Mapping):
    out = fn(tree)
    return out if out is not None else {k: _map_dicts(v, fn) for k, v in tree.items()}
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):   # optax states are namedtuples
    return type(tree)(*(_map_dicts(v, fn) for v in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_map_dicts(v, fn) for v in tree)
  return tree


def stack_leaves(xs: Sequence):
  """Arrays -> one array with a new leading axis (numpy stays numpy; jax arrays keep the mesh they are on)."""
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.stack(xs)
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in xs):
    return _abstract_stacked(xs[0], len(xs))
  return jnp.stack(xs)


def unstack_leaf(x, n: int) -> list:
  if x.shape[:1] != (n,):
    raise ValueError(f"a stacked layer leaf of shape {x.shape}: expected a leading axis of {n} layers")
  if isinstance(x, jax.ShapeDtypeStruct):
    return [_abstract_slice(x)] * n
  return [x[i] for i in range(n)]


def _with_spec(x: jax.ShapeDtypeStruct, shape, spec_fn):
  s = x.sharding
  sharding = NamedSharding(s.mesh, spec_fn(tuple(s.spec))) if isinstance(s, NamedSharding) else s
  return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)


def _abstract_stacked(x: jax.ShapeDtypeStruct, n: int):
  # The layers axis is unsharded (parallel.DEFAULT_RULES: "layers" -> None).
  return _with_spec(x, (n,) + tuple(x.shape), lambda spec: P(None, *spec))


def _abstract_slice(x: jax.ShapeDtypeStruct):
  return _with_spec(x, tuple(x.shape[1:]), lambda spec: P(*spec[1:]))


def stack_layers(tree):
  """layer_0..layer_{L-1} subtrees -> one "layers" subtree of [L, ...] leaves, wherever they occur."""
  def fn(d):
    idx = _layer_indices(d)
    if not idx:
      return None
    if idx != list(range(len(idx))):
      raise ValueError(f"layer subtrees {['layer_%d' % i for i in idx]}: expected layer_0..layer_{len(idx) - 1}")
    if STACKED in d:
      raise ValueError(f"a tree with both '{STACKED}' and 'layer_i' subtrees")
    rest = {k: _map_dicts(v, fn) for k, v in d.items() if not _LAYER.match(str(k))}
    return {**rest, STACKED: jax.tree.map(lambda *xs: stack_leaves(xs), *(d[f"layer_{i}"] for i in idx))}
  return _map_dicts(tree, fn)


def unstack_layers(tree):
  """The inverse of `stack_layers`: a "layers" subtree of [L, ...] leaves -> layer_0..layer_{L-1}."""
  def fn(d):
    if STACKED not in d:
      return None
    leaves, treedef = jax.tree.flatten(d[STACKED])
    n = leaves[0].shape[0]
    per_leaf = [unstack_leaf(x, n) for x in leaves]
    rest = {k: _map_dicts(v, fn) for k, v in d.items() if k != STACKED}
    return {**rest, **{f"layer_{i}": jax.tree.unflatten(treedef, [p[i] for p in per_leaf]) for i in range(n)}}
  return _map_dicts(tree, fn)


def tree_layout(tree) -> bool | None:
  """True: the tree holds stacked layers; False: per-layer subtrees; None: no layers at all."""
  found = []

  def fn(d):
    if STACKED in d:
      found.append(True)
    elif _layer_indices(d):
      found.append(False)
    return None
  _map_dicts(tree, fn)
  return found[0] if found else None


def to_layout(tree, scanned: bool):
  """`tree` in the stacked (scanned=True) or per-layer layout, whichever it is in now."""
  return stack_layers(tree) if scanned else unstack_layers(tree)


def saved_layout(meta: Mapping[str, Any]) -> bool:
  """The layout a checkpoint was saved in, from its recorded model config (before the switch: per-layer)."""
  return bool((meta.get("model") or {}).get("scan_layers", False))
