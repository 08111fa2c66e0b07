"""The PPO rollout's KV cache is sized to the stage's prompt_len + max_new_tokens, not to model.max_len.

Read from the traced program (no compile, no run): the sampling loop is the rollout's `while`, and its
carried cache arrays are the only 4-d ([B, K, S, H]) / 5-d ([L, B, K, S, H]) floats it carries.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from instructrl.models.config import ModelConfig
from instructrl.stages import ppo, train_state
from tests.stages.test_ppo import EOS, PAD, TINY, ppo_cfg


def while_carries(jaxpr) -> list[list]:
  """The carried avals of every `while` in a closed jaxpr, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "while":
      found.append([v.aval for v in eqn.params["body_jaxpr"].jaxpr.invars])
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += while_carries(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += while_carries(sub)
  return found


@pytest.mark.parametrize("scan_layers", [False, True])
def test_rollout_cache_is_prompt_plus_answer_not_max_len(scan_layers):
  cfg = ModelConfig(**{**TINY, "max_len": 64, "n_layers": 2, "scan_layers": scan_layers})
  B, P, N = 4, 6, 5
  pc = ppo_cfg(max_new_tokens=N, prompt_len=P)
  rollout = ppo.make_rollout(cfg, pc, EOS, PAD)
  lm, scalar = (nn.unbox(train_state.abstract_params(cfg, h)) for h in ("lm", "scalar"))
  prompt = jax.ShapeDtypeStruct((B, P), jnp.int32)
  mask = jax.ShapeDtypeStruct((B, P), bool)
  closed = jax.make_jaxpr(rollout)(lm, scalar, lm, (scalar,), prompt, mask, jax.random.key(0), jnp.float32(0.1))
  rank = 5 if scan_layers else 4
  caches = [a.shape for carry in while_carries(closed.jaxpr) for a in carry
            if a.ndim == rank and jnp.issubdtype(a.dtype, jnp.floating)]
  per_layer = (B, cfg.n_kv_heads, P + N, cfg.head_dim)
  want = [(cfg.n_layers, *per_layer)] * 2 if scan_layers else [per_layer] * 2 * cfg.n_layers
  assert caches == want, caches
