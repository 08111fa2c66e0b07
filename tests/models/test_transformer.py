"""Decoder forward vs an independent NumPy reference, causality, cache, dropout, param count, config."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl.models.config import ModelConfig
from instructrl.models.transformer import Decoder, init_cache, left_pad_positions

GPT = dict(style="gpt", vocab_size=37, max_len=24, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
           head_dim=8, d_ff=48, tie_embeddings=True)
LLAMA = dict(style="llama", vocab_size=37, max_len=24, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
             head_dim=8, d_ff=48, tie_embeddings=False, rope_theta=500.0)
STYLES = {"gpt": GPT, "llama": LLAMA}


def make_cfg(style, **kw):
  return ModelConfig(**{**STYLES[style], **kw})


@functools.lru_cache(maxsize=None)
def _init_fn(cfg, head):
  return jax.jit(lambda r: nn.unbox(Decoder(cfg, head=head).init(r, jnp.zeros((1, 4), jnp.int32))["params"]))


@functools.partial(jax.jit, static_argnames=("cfg", "head", "deterministic", "return_hidden"))
def fwd(params, tokens, positions=None, kv_mask=None, rng=None, *, cfg, head="lm", deterministic=True,
        return_hidden=False):
  """Jitted Decoder.apply (eager op-by-op dispatch is what makes CPU tests slow)."""
  out, _ = Decoder(cfg, head=head).apply({"params": params}, tokens, positions, kv_mask_bs=kv_mask,
                                         deterministic=deterministic, return_hidden=return_hidden,
                                         rngs=None if rng is None else {"dropout": rng})
  return out


def random_params(cfg, seed=0, head="lm"):
  """Real init, then every leaf replaced by O(1)-ish random values so biases/scales/positions matter."""
  params = jax.eval_shape(_init_fn(cfg, head), jax.random.key(seed))   # shapes only: no init compile
  leaves, treedef = jax.tree.flatten_with_path(params)
  rng = np.random.default_rng(seed + 1)
  out = []
  for path, leaf in leaves:
    name = str(path[-1].key)
    shape = leaf.shape
    if name == "scale":
      v = 1.0 + 0.3 * rng.standard_normal(shape)
    elif leaf.ndim <= 1 or name in ("bq", "bk", "bv"):
      v = 0.2 * rng.standard_normal(shape)
    else:
      fan_in = shape[0] if name != "wo" else shape[0] * shape[1]
      if name in ("embed", "pos_embed"):
        fan_in = 1
      v = rng.standard_normal(shape) / np.sqrt(fan_in) * (0.7 if name in ("embed", "pos_embed") else 1.0)
    out.append(jnp.asarray(v, leaf.dtype))
  return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------------ independent NumPy reference

def np_norm(x, p, cfg):
  if cfg.style == "gpt":
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.norm_eps) * p["scale"] + p["bias"]
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * p["scale"]


def np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_rope(x, pos, theta):
  """x [B, T, n, H]; rotate-half layout: pairs are (i, i + H/2)."""
  H = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, H, 2) / H)
  ang = pos[:, :, None, None] * inv[None, None, None, :]            # [B, T, 1, H/2]
  x1, x2 = x[..., :H // 2], x[..., H // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def np_forward(params, cfg, tokens, positions=None, kv_mask=None, head="lm", return_hidden=False):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  tokens = np.asarray(tokens)
  B, T = tokens.shape
  pos = np.broadcast_to(np.arange(T), (B, T)) if positions is None else np.asarray(positions)
  kv = np.ones((B, T), bool) if kv_mask is None else np.asarray(kv_mask, bool)
  N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  x = p["embed"][tokens]
  if cfg.style == "gpt":
    x = x + p["pos_embed"][pos]
  allowed = np.tril(np.ones((T, T), bool))[None] & kv[:, None, :]   # [B, T, S]
  for i in range(cfg.n_layers):
    L = p[f"layer_{i}"]
    a = L["attn"]
    h = np_norm(x, L["norm_attn"], cfg)
    q = np.einsum("btd,dnh->btnh", h, a["wq"])
    k = np.einsum("btd,dkh->btkh", h, a["wk"])
    v = np.einsum("btd,dkh->btkh", h, a["wv"])
    if cfg.style == "gpt":
      q, k, v = q + a["bq"], k + a["bk"], v + a["bv"]
    else:
      q, k = np_rope(q, pos, cfg.rope_theta), np_rope(k, pos, cfg.rope_theta)
    # grouped-query attention: query head n reads kv head n // (N // K)
    k = np.repeat(k, N // K, axis=2)
    v = np.repeat(v, N // K, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    s = np.where(allowed[:, None], s, -1e30)
    s = s - s.max(-1, keepdims=True)
    w = np.exp(s)
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", w, v)
    y = np.einsum("btnh,nhd->btd", o, a["wo"])
    if cfg.style == "gpt":
      y = y + a["bo"]
    x = x + y
    m = L["mlp"]
    h = np_norm(x, L["norm_mlp"], cfg)
    if cfg.style == "gpt":
      f = np_gelu_tanh(h @ m["w_in"] + m["b_in"]) @ m["w_out"] + m["b_out"]
    else:
      g = h @ m["w_gate"]
      f = (g / (1.0 + np.exp(-g)) * (h @ m["w_in"])) @ m["w_out"]
    x = x + f
  h = np_norm(x, p["norm_final"], cfg)
  if return_hidden:
    return h
  if head == "scalar":
    return h @ p["score"] + p["score_bias"]
  w_out = p["embed"].T if cfg.tie_embeddings else p["unembed"]
  return h @ w_out


def rand_tokens(B, T, V, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("style", ["gpt", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_forward_matches_numpy_reference(style, tied):
  cfg = make_cfg(style, tie_embeddings=tied)
  params = random_params(cfg, seed=3)
  tokens = rand_tokens(2, 11, cfg.vocab_size, seed=1)
  logits = fwd(params, tokens, cfg=cfg)
  chex.assert_shape(logits, (2, 11, cfg.vocab_size))
  chex.assert_type(logits, jnp.float32)
  _, cache = Decoder(cfg).apply({"params": params}, tokens[:, :2])
  assert cache is None
  ref = np_forward(params, cfg, tokens)
  assert np.abs(ref).max() > 0.5, "logits too small for the comparison to mean anything"
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-5)


def test_gqa_reference_differs_from_wrong_grouping():
  """Guard on the reference itself: a different kv-head grouping gives different logits."""
  cfg = make_cfg("llama")
  params = random_params(cfg, seed=5)
  tokens = rand_tokens(1, 9, cfg.vocab_size, seed=2)
  logits = fwd(params, tokens, cfg=cfg)
  swapped = jax.tree.map(lambda a: a, params)
  for i in range(cfg.n_layers):   # swap the two kv heads: grouping n // G must now mismatch
    a = dict(swapped[f"layer_{i}"]["attn"])
    a["wk"] = a["wk"][:, ::-1]
    a["wv"] = a["wv"][:, ::-1]
    swapped[f"layer_{i}"] = {**swapped[f"layer_{i}"], "attn": a}
  assert np.abs(np_forward(swapped, cfg, tokens) - np.asarray(logits)).max() > 1e-2


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_scalar_head_is_hidden_dot_score_plus_bias(style):
  cfg = make_cfg(style)
  params = random_params(cfg, seed=4, head="scalar")
  assert "unembed" not in params and {"score", "score_bias"} <= set(params)
  tokens = rand_tokens(3, 7, cfg.vocab_size, seed=3)
  out = fwd(params, tokens, cfg=cfg, head="scalar")
  chex.assert_shape(out, (3, 7))
  hidden = fwd(params, tokens, cfg=cfg, head="scalar", return_hidden=True)
  chex.assert_shape(hidden, (3, 7, cfg.d_model))
  expect = np.asarray(hidden) @ np.asarray(params["score"]) + float(params["score_bias"])
  np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), np_forward(params, cfg, tokens, head="scalar"), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(hidden), np_forward(params, cfg, tokens, return_hidden=True),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_causal_masking(style):
  cfg = make_cfg(style)
  params = random_params(cfg, seed=6)
  tokens = rand_tokens(2, 10, cfg.vocab_size, seed=4)
  base = fwd(params, tokens, cfg=cfg)
  for j in (0, 4, 9):
    changed = tokens.at[:, j].set((tokens[:, j] + 1) % cfg.vocab_size)
    out = fwd(params, changed, cfg=cfg)
    np.testing.assert_allclose(np.asarray(out[:, :j]), np.asarray(base[:, :j]), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(out[:, j:]) - np.asarray(base[:, j:])).max(axis=-1).min() > 1e-4, \
        "the changed token and every later position must see the change"


@pytest.mark.parametrize("style", ["gpt", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_num_params_matches_tree(style, tied):
  cfg = make_cfg(style, tie_embeddings=tied)
  params = jax.eval_shape(_init_fn(cfg, "lm"), jax.random.key(0))
  total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  assert cfg.num_params() == total
  emb = params["embed"].size + (params["pos_embed"].size if style == "gpt" else 0)
  emb += 0 if tied else params["unembed"].size
  assert ("unembed" in params) == (not tied)
  assert cfg.num_params(include_embeddings=False) == total - emb


@pytest.mark.parametrize("extra", [dict(qkv_bias=True), dict(embed_scale=True, glu_activation="gelu_tanh", head_dim=24),
                                   dict(sliding_window=4, rope_scaling="llama3", rope_factor=8.0,
                                        rope_original_max_len=32),
                                   dict(embed_scale=True, glu_activation="gelu_tanh", post_norms=True,
                                        attn_softcap=50.0, final_softcap=30.0, query_pre_attn_scalar=16.0)])
def test_num_params_matches_tree_llama_variants(extra):
  """The Qwen2 / Gemma / Mistral / LLaMA 3.1 / Gemma 2 switches: q/k/v biases and post-norms add parameters."""
  cfg = make_cfg("llama", **extra)
  params = jax.eval_shape(_init_fn(cfg, "lm"), jax.random.key(0))
  assert cfg.num_params() == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  assert ("bq" in params["layer_0"]["attn"]) == cfg.qkv_bias


def test_config_fields_added_later_keep_old_meta_readable():
  """A checkpoint meta written before the family fields existed reads back and compares equal; the fields
  are recorded only once they leave their defaults."""
  from instructrl.models.config import mismatched_fields
  cfg = make_cfg("llama")
  old_meta = cfg.to_dict()
  assert sorted(old_meta) == sorted([
      "style", "vocab_size", "max_len", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
      "norm_eps", "rope_theta", "tie_embeddings", "embed_dropout", "attn_dropout", "resid_dropout", "dtype",
      "param_dtype", "remat", "attention"])
  assert ModelConfig.from_dict(old_meta) == cfg
  assert mismatched_fields(old_meta, cfg.to_dict()) == []
  windowed = make_cfg("llama", sliding_window=16)
  assert windowed.to_dict()["sliding_window"] == 16
  assert mismatched_fields(old_meta, windowed.to_dict()) == ["sliding_window"]
  with pytest.raises(ValueError, match=r"model\.qkv_bias=True: expected False for style 'gpt'"):
    make_cfg("gpt", qkv_bias=True)
  with pytest.raises(ValueError, match=r"model\.glu_activation='relu'"):
    make_cfg("llama", glu_activation="relu")
  with pytest.raises(ValueError, match=r"model\.rope_original_max_len=0"):
    make_cfg("llama", rope_scaling="llama3", rope_factor=8.0)


def _prefill_then_step(cfg, params, tokens, P0, S, positions=None, kv_mask=None):
  """Prefill tokens[:, :P0], then one token at a time. Returns [B, T, V] logits from the cache path."""
  model = Decoder(cfg)
  B, T = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  if kv_mask is not None:
    kv_mask = jnp.concatenate([kv_mask, jnp.ones((B, S - T), bool)], axis=1)
  step = jax.jit(lambda p, t, pos, c, i: model.apply({"params": p}, t, pos, kv_mask_bs=kv_mask, cache=c,
                                                      cache_index=i))
  logits, cache = step(params, tokens[:, :P0], positions[:, :P0], init_cache(cfg, B, S), 0)
  chex.assert_shape(cache[0]["k"], (B, cfg.n_kv_heads, S, cfg.head_dim))
  outs = [logits]
  for t in range(P0, T):
    lg, cache = step(params, tokens[:, t:t + 1], positions[:, t:t + 1], cache, t)
    outs.append(lg)
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_cached_decoding_equals_full_forward(style):
  cfg = make_cfg(style)
  params = random_params(cfg, seed=7)
  tokens = rand_tokens(2, 12, cfg.vocab_size, seed=5)
  full = fwd(params, tokens, cfg=cfg)
  cached = _prefill_then_step(cfg, params, tokens, P0=5, S=16)
  chex.assert_shape(cached, full.shape)
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_left_padded_rows_match_unpadded_forward(style):
  cfg = make_cfg(style)
  params = random_params(cfg, seed=8)
  T, pads = 12, (0, 3, 7)
  rows = [rand_tokens(1, T - p, cfg.vocab_size, seed=10 + i)[0] for i, p in enumerate(pads)]
  pad_id = 0
  tokens = jnp.stack([jnp.concatenate([jnp.full((p,), pad_id, jnp.int32), r]) for p, r in zip(pads, rows)])
  mask = jnp.asarray(np.arange(T)[None, :] >= np.asarray(pads)[:, None])
  positions = left_pad_positions(mask)
  np.testing.assert_array_equal(np.asarray(positions[1]), [0, 0, 0] + list(range(T - 3)))
  full = fwd(params, tokens, positions, mask, cfg=cfg)
  cached = _prefill_then_step(cfg, params, tokens, P0=8, S=15, positions=positions, kv_mask=mask)
  for i, (p, r) in enumerate(zip(pads, rows)):
    alone = fwd(params, r[None], cfg=cfg)
    np.testing.assert_allclose(np.asarray(full[i, p:]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cached[i, p:]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(full[i, p:]),
                               np_forward(params, cfg, tokens[i:i + 1], positions[i:i + 1], mask[i:i + 1])[0, p:],
                               rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(full))) and np.all(np.isfinite(np.asarray(cached)))
  # Without the padding mask the padded rows must differ (the test would catch a mask that is ignored).
  unmasked = fwd(params, tokens, positions, cfg=cfg)
  assert np.abs(np.asarray(unmasked[2, 7:]) - np.asarray(full[2, 7:])).max() > 1e-3


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_dropout(style):
  drop = make_cfg(style, embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.2)
  nodrop = make_cfg(style)
  params = random_params(drop, seed=9)
  tokens = rand_tokens(2, 8, drop.vocab_size, seed=6)
  k1 = jax.random.key(1)
  det = fwd(params, tokens, cfg=drop)
  sto = fwd(params, tokens, rng=k1, cfg=drop, deterministic=False)
  sto2 = fwd(params, tokens, rng=jax.random.key(2), cfg=drop, deterministic=False)
  assert np.abs(np.asarray(sto) - np.asarray(det)).max() > 1e-3
  assert np.abs(np.asarray(sto) - np.asarray(sto2)).max() > 1e-3
  sto_again = fwd(params, tokens, rng=k1, cfg=drop, deterministic=False)
  np.testing.assert_array_equal(np.asarray(sto), np.asarray(sto_again))
  zero_det = fwd(params, tokens, cfg=nodrop)
  zero_sto = fwd(params, tokens, rng=k1, cfg=nodrop, deterministic=False)
  np.testing.assert_allclose(np.asarray(zero_sto), np.asarray(zero_det), rtol=0, atol=0)
  np.testing.assert_allclose(np.asarray(det), np.asarray(zero_det), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("field,value", [
    ("style", "foo"), ("n_kv_heads", 3), ("resid_dropout", 1.5), ("attn_dropout", -0.1),
    ("d_model", 0), ("dtype", "float64"), ("head_dim", 7),
])
def test_config_validation_names_field(field, value):
  base = {**LLAMA}
  with pytest.raises(ValueError, match=rf"\b{field}\b"):
    ModelConfig(**{**base, field: value})


def test_config_from_dict_rejects_unknown_and_roundtrips():
  with pytest.raises(ValueError, match="n_head_typo"):
    ModelConfig.from_dict({**GPT, "n_head_typo": 3})
  cfg = ModelConfig.from_dict(GPT)
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="n_kv_heads"):
    ModelConfig.from_dict({**GPT, "n_heads": 6, "n_kv_heads": 4})


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_remat_with_dropout_matches_plain(style):
  """remat=True must trace with dropout on (deterministic is a Python bool: a static argument of the remat)."""
  plain = make_cfg(style, n_layers=1, resid_dropout=0.2, attn_dropout=0.1)
  remat = make_cfg(style, n_layers=1, resid_dropout=0.2, attn_dropout=0.1, remat=True)
  params = random_params(plain, seed=10)
  tokens = rand_tokens(2, 6, plain.vocab_size, seed=7)
  k = jax.random.key(3)
  for deterministic in (True, False):
    loss = lambda p, cfg: jnp.sum(fwd(p, tokens, rng=k, cfg=cfg, deterministic=deterministic) ** 2)
    a, ga = jax.value_and_grad(loss)(params, plain)
    b, gb = jax.value_and_grad(loss)(params, remat)
    np.testing.assert_allclose(float(b), float(a), rtol=1e-5)
    chex.assert_trees_all_close(gb, ga, rtol=1e-4, atol=1e-4)   # bk grads are exactly 0 up to noise
