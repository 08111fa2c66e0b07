"""model.attention="dot_product" (jax.nn.dot_product_attention) computes what the written-out attention does:
plain causal, left-padded, cached decoding, GQA, gradients; same param tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl.models.config import ModelConfig, mismatched_fields
from instructrl.models.transformer import Decoder, init_cache, left_pad_positions


def cfgs(style, kv_heads=2):
  base = dict(style=style, vocab_size=64, max_len=24, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads,
              head_dim=8, d_ff=64)
  return ModelConfig(**base), ModelConfig(**base, attention="dot_product")


@pytest.mark.parametrize("style,kv_heads", [("gpt", 4), ("llama", 2)])
def test_dot_product_attention_matches_einsum(style, kv_heads):
  ein, dpa = cfgs(style, kv_heads)
  tokens = jax.random.randint(jax.random.key(1), (3, 12), 4, 64)
  params = Decoder(ein).init(jax.random.key(0), tokens)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(Decoder(dpa).init(jax.random.key(0), tokens)["params"])
  run = lambda cfg, *a, **k: Decoder(cfg).apply({"params": params}, *a, **k)[0]
  np.testing.assert_allclose(run(dpa, tokens), run(ein, tokens), rtol=1e-5, atol=1e-5)

  mask = jnp.asarray(np.arange(12)[None, :] >= np.array([[0], [3], [7]]))          # left padding
  pos = left_pad_positions(mask)
  a, b = run(dpa, tokens, pos, kv_mask_bs=mask), run(ein, tokens, pos, kv_mask_bs=mask)
  np.testing.assert_allclose(np.where(mask[..., None], a, 0), np.where(mask[..., None], b, 0), rtol=1e-5, atol=1e-5)

  def decode(cfg):                                                              # prefill 8, then one token
    cache = init_cache(cfg, 3, 12)
    _, cache = Decoder(cfg).apply({"params": params}, tokens[:, :8], pos[:, :8], kv_mask_bs=mask, cache=cache)
    out, _ = Decoder(cfg).apply({"params": params}, tokens[:, 8:9], pos[:, 8:9], kv_mask_bs=mask, cache=cache,
                                cache_index=8)
    return out
  np.testing.assert_allclose(decode(dpa), decode(ein), rtol=1e-5, atol=1e-5)

  loss = lambda cfg: lambda p: jnp.mean(Decoder(cfg).apply({"params": p}, tokens)[0] ** 2)
  ga, gb = jax.grad(loss(dpa))(params), jax.grad(loss(ein))(params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), ga, gb)


def test_attention_is_not_a_checkpoint_mismatch_and_is_validated():
  ein, dpa = cfgs("llama")
  assert mismatched_fields(ein.to_dict(), dpa.to_dict()) == []
  with pytest.raises(ValueError, match="model.attention"):
    ModelConfig(attention="flash")
