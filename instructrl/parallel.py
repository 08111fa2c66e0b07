"""One mesh over (data, fsdp, tensor), logical-axis rules from config, and shardings.

Parameters and activations carry logical names ('batch', 'length', 'embed', 'heads',
'kv_heads', 'kv', 'mlp', 'vocab'); the rules in `config.mesh.rules` map them to mesh axes.
A mesh axis already used in a spec is skipped by Flax, so 'embed' -> 'fsdp' on weights
and 'batch' -> ('data', 'fsdp') on activations coexist.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: batch over data x fsdp; weights' embed dim over fsdp (ZeRO-3 style);
# heads / mlp / vocab over tensor (Megatron style).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),     # the stacked-layer axis of scanned weights: each device holds every layer's shard
)


def make_mesh(shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
  """Mesh of shape (data, fsdp, tensor); one entry may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh.shape={tuple(shape)}: expected {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape={tuple(shape)}: at most one entry may be -1")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % rest:
      raise ValueError(f"mesh.shape={tuple(shape)}: {len(devices)} devices are not divisible by {rest}")
    shape[shape.index(-1)] = len(devices) // rest
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh.shape={tuple(shape)} needs {int(np.prod(shape))} devices, {len(devices)} available")
  return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules) -> tuple:
  return tuple((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)


@contextlib.contextmanager
def activate(mesh, rules):
  """Mesh and logical rules in context: needed while tracing model code."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_shardings(abstract_boxed_tree, mesh, rules):
  """NamedShardings for a tree whose leaves may be nn.LogicallyPartitioned (unannotated -> replicated)."""
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh, rules, ndim: int = 2) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def stacked_batch_sharding(mesh, rules, ndim: int = 3) -> NamedSharding:
  """[n, batch, ...]: a stack of batches scanned over its first axis, each batch sharded on 'batch'."""
  spec = nn.logical_to_mesh_axes((None, "batch") + (None,) * (ndim - 2), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
