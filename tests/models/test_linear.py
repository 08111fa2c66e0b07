"""transformer.linear: an einsum whose backward is written out (for XLA:CPU's layouts) must be autodiff's.

Checked per einsum the model uses (f32 exactly to rounding, bf16 against f32), for the whole Decoder
against the same Decoder built on plain einsums, and against a central finite difference.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl.models import transformer
from instructrl.models.config import ModelConfig
from instructrl.models.transformer import Decoder, linear

# Every spec the Decoder passes to `linear`, with the sizes of its letters; both orders of the weight
# gradient's operands are exercised (x's free size below g's for btd->btf and btd->btv, above for
# btf->btd and btnh->btd).
SPECS = ["btd,dnh->btnh", "btd,dkh->btkh", "btnh,nhd->btd", "btd,df->btf", "btf,fd->btd", "btd,dv->btv"]
SIZES = dict(b=3, t=5, d=8, n=4, k=2, h=6, f=12, v=11)


def _operands(spec, dtype, seed=0):
  xs, rest = spec.split(",")
  ws, ys = rest.split("->")
  rng = np.random.default_rng(seed)
  shape = lambda letters: tuple(SIZES[c] for c in letters)
  x = jnp.asarray(rng.normal(size=shape(xs)), dtype)
  w = jnp.asarray(rng.normal(size=shape(ws)), dtype)
  c = jnp.asarray(rng.normal(size=shape(ys)), jnp.float32)     # a random cotangent direction
  return x, w, c


@pytest.mark.parametrize("spec", SPECS)
def test_linear_value_and_gradients_equal_autodiffs(spec):
  x, w, c = _operands(spec, jnp.float32)
  ours = lambda x, w: jnp.sum(linear(spec, x, w) * c)
  plain = lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * c)
  np.testing.assert_allclose(linear(spec, x, w), jnp.einsum(spec, x, w), rtol=0, atol=0)
  gx, gw = jax.jit(jax.grad(ours, argnums=(0, 1)))(x, w)
  rx, rw = jax.jit(jax.grad(plain, argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["btd,df->btf", "btd,dv->btv"])
def test_linear_in_bfloat16_keeps_dtypes_and_tracks_f32(spec):
  x, w, c = _operands(spec, jnp.bfloat16, seed=1)
  ours = lambda x, w: jnp.sum(linear(spec, x, w).astype(jnp.float32) * c)
  gx, gw = jax.grad(ours, argnums=(0, 1))(x, w)
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
  ref = lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * c)
  rx, rw = jax.grad(ref, argnums=(0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
  scale = lambda a: float(jnp.max(jnp.abs(a)))
  assert scale(gx.astype(jnp.float32) - rx) < 0.02 * scale(rx)
  assert scale(gw.astype(jnp.float32) - rw) < 0.02 * scale(rw)


CFGS = {
    "gpt_tied": dict(style="gpt", vocab_size=37, max_len=16, d_model=16, n_layers=2, n_heads=4, n_kv_heads=4,
                     head_dim=4, d_ff=24, tie_embeddings=True),
    "llama_untied_gqa": dict(style="llama", vocab_size=37, max_len=16, d_model=16, n_layers=2, n_heads=4,
                             n_kv_heads=2, head_dim=4, d_ff=24, tie_embeddings=False),
}


def _lm_loss(cfg, tokens):
  def loss(params):
    logits, _ = Decoder(cfg).apply({"params": params}, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
  return loss


@pytest.mark.parametrize("name", sorted(CFGS))
def test_decoder_gradient_equals_the_plain_einsum_decoders(name, monkeypatch):
  cfg = ModelConfig(**CFGS[name])
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (3, 9)), jnp.int32)
  params = nn.unbox(Decoder(cfg).init(jax.random.key(0), tokens)["params"])
  ours = jax.jit(jax.value_and_grad(_lm_loss(cfg, tokens)))(params)
  monkeypatch.setattr(transformer, "linear", lambda spec, x, w: jnp.einsum(spec, x, w))
  plain = jax.jit(jax.value_and_grad(_lm_loss(cfg, tokens)))(params)
  np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6)
  chex.assert_trees_all_close(ours[1], plain[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CFGS))
def test_decoder_gradient_matches_a_central_finite_difference(name):
  cfg = ModelConfig(**CFGS[name])
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  params = nn.unbox(Decoder(cfg).init(jax.random.key(1), tokens)["params"])
  loss = jax.jit(_lm_loss(cfg, tokens))
  grads = jax.jit(jax.grad(_lm_loss(cfg, tokens)))(params)
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(4)
  # Steps of ~1e-3 per weight (the weights are ~0.02): small enough for the loss to be near-linear,
  # large enough for f32 rounding of the loss (~4e-7) to stay well under the slope being measured.
  direction = treedef.unflatten([jnp.asarray(rng.normal(size=a.shape), jnp.float32) for a in leaves])
  eps = 1e-3
  shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)
  fd = (float(loss(shifted(1.0))) - float(loss(shifted(-1.0)))) / (2 * eps)
  analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  assert abs(analytic) > 1e-3                       # a direction the loss actually moves in
  np.testing.assert_allclose(analytic, fd, rtol=2e-2)
