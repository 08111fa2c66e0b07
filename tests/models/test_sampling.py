"""KV-cache sampler: padding invariance, log-probs vs recomputation, logit processing, EOS, statistics."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl.models import sampling
from instructrl.models.config import ModelConfig
from instructrl.models.sampling import process_logits, sample, token_logprobs
from instructrl.models.transformer import Decoder, left_pad_positions

PAD, EOS = 0, 3
GPT = ModelConfig(style="gpt", vocab_size=24, max_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
                  head_dim=8, d_ff=48, tie_embeddings=False)
LLAMA = ModelConfig(style="llama", vocab_size=24, max_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=48, tie_embeddings=False)
CFGS = {"gpt": GPT, "llama": LLAMA}


def random_params(cfg, seed=0, scale=1.0):
  """Random O(1) weights (shapes from the real init) so the next-token distribution is far from uniform."""
  init = lambda r: nn.unbox(Decoder(cfg).init(r, jnp.zeros((1, 4), jnp.int32))["params"])
  shapes = jax.eval_shape(init, jax.random.key(0))
  rng = np.random.default_rng(seed)
  def leaf(path, s):
    name = str(path[-1].key)
    if name == "scale":
      return jnp.asarray(1.0 + 0.2 * rng.standard_normal(s.shape), s.dtype)
    fan_in = 1 if name in ("embed", "pos_embed") or len(s.shape) <= 1 else (
        s.shape[0] * s.shape[1] if name == "wo" else s.shape[0])
    return jnp.asarray(scale * rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def prompts(B, lengths, V, seed=0):
  """Random real prompt tokens (never PAD/EOS) per row, as python lists."""
  rng = np.random.default_rng(seed)
  return [rng.integers(4, V, n).tolist() for n in lengths]


def left_pad(rows, P):
  toks = np.full((len(rows), P), PAD, np.int32)
  mask = np.zeros((len(rows), P), bool)
  for i, r in enumerate(rows):
    toks[i, P - len(r):] = r
    mask[i, P - len(r):] = True
  return jnp.asarray(toks), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "top_k", "top_p"))
def recompute_logprobs(params, prompt, pmask, tokens, *, cfg, temperature=1.0, top_k=0, top_p=1.0):
  """Independent recomputation: one full forward over prompt + response. Also returns the argmax tokens."""
  P = prompt.shape[1]
  toks = jnp.concatenate([prompt, tokens], axis=1)
  mask = jnp.concatenate([pmask, jnp.ones(tokens.shape, bool)], axis=1)
  lp = token_logprobs(params, cfg, toks, left_pad_positions(mask), mask, temperature=temperature, top_k=top_k,
                      top_p=top_p)
  logits, _ = Decoder(cfg).apply({"params": params}, toks, left_pad_positions(mask), kv_mask_bs=mask)
  return lp[:, P - 1:], jnp.argmax(logits[:, P - 1:-1], -1)


def check_logprobs(params, cfg, prompt, pmask, s, **proc):
  ref, greedy = recompute_logprobs(params, prompt, pmask, s.tokens, cfg=cfg, **proc)
  chex.assert_equal_shape([ref, s.tokens])
  m = np.asarray(s.mask)
  assert m.sum() >= len(m)
  np.testing.assert_allclose(np.asarray(s.logprobs)[m], np.asarray(ref)[m], rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(s.logprobs)[m] <= 0) and np.all(np.asarray(s.logprobs)[m] > -30)
  assert np.all(np.asarray(s.logprobs)[~m] == 0)
  if proc.get("temperature", 1.0) == 0.0:   # greedy: every token is the argmax of the next-token distribution
    np.testing.assert_array_equal(np.asarray(s.tokens)[m], np.asarray(greedy)[m])


# ------------------------------------------------------------------ process_logits

def test_process_logits_temperature_topk_topp():
  probs = np.array([0.1, 0.5, 0.05, 0.15, 0.2])
  logits = jnp.asarray(np.log(probs) + 1.3, jnp.float32)[None]
  # temperature scales
  np.testing.assert_allclose(process_logits(logits, temperature=0.5)[0],
                             jax.nn.log_softmax(logits[0] / 0.5), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(process_logits(logits)[0], np.log(probs), rtol=1e-5, atol=1e-6)
  # top-k keeps exactly k (the k largest), renormalised
  for k in (1, 2, 3, 4):
    p = np.exp(np.asarray(process_logits(logits, top_k=k)[0]))
    keep = np.argsort(-probs)[:k]
    assert (p > 1e-30).sum() == k
    np.testing.assert_allclose(p[keep], probs[keep] / probs[keep].sum(), rtol=1e-5)
  # top-p keeps the smallest prefix (by descending prob) whose mass reaches p
  order = np.argsort(-probs)    # 0.5, 0.2, 0.15, 0.1, 0.05
  for top_p, n_keep in ((0.3, 1), (0.65, 2), (0.72, 3), (0.8, 3), (0.86, 4), (0.97, 5)):
    p = np.exp(np.asarray(process_logits(logits, top_p=top_p)[0]))
    keep = order[:n_keep]
    assert (p > 1e-30).sum() == n_keep, (top_p, p)
    np.testing.assert_allclose(p[keep], probs[keep] / probs[keep].sum(), rtol=1e-5)
  # top-k then top-p: of the top 3 (renormalised 0.588, 0.235, 0.176) p=0.7 keeps two
  p = np.exp(np.asarray(process_logits(logits, top_k=3, top_p=0.7)[0]))
  assert (p > 1e-30).sum() == 2
  np.testing.assert_allclose(p[order[:2]], probs[order[:2]] / probs[order[:2]].sum(), rtol=1e-5)
  # temperature applies before truncation: at T=0.25 the top token holds > 0.9 of the mass, top_p=0.9 keeps it alone
  p = np.exp(np.asarray(process_logits(logits, temperature=0.25, top_p=0.9)[0]))
  assert (p > 1e-30).sum() == 1 and p[1] == pytest.approx(1.0)


# ------------------------------------------------------------------ padding invariance

B, P, N = 4, 6, 8   # shared shapes: the tests below reuse the same compiled samplers


@pytest.mark.parametrize("style,temperatures", [("gpt", (0.0, 1.0)), ("llama", (1.0,))])
def test_padding_changes_no_sample(style, temperatures):
  cfg = CFGS[style]
  params = random_params(cfg, seed=1)
  rows = prompts(B, [2, 5, 3, 6], cfg.vocab_size, seed=2)
  rng = jax.random.key(7)
  for temperature in temperatures:
    kw = dict(cfg=cfg, max_new_tokens=N, temperature=temperature, eos_id=EOS, pad_id=PAD)
    short = sample(params, *left_pad(rows, P), rng, **kw)
    long = sample(params, *left_pad(rows, 12), rng, **kw)
    chex.assert_shape([short.tokens, short.logprobs, short.mask], (B, N))
    chex.assert_shape(short.lengths, (B,))
    np.testing.assert_array_equal(np.asarray(short.tokens), np.asarray(long.tokens))
    np.testing.assert_array_equal(np.asarray(short.mask), np.asarray(long.mask))
    np.testing.assert_allclose(np.asarray(short.logprobs), np.asarray(long.logprobs), rtol=1e-5, atol=1e-5)
    # the rows differ from each other: the comparison is not between constant outputs
    assert len({tuple(r) for r in np.asarray(short.tokens).tolist()}) > 1
    # and the returned log-probs equal a full-forward recomputation (temperature 1 and greedy)
    check_logprobs(params, cfg, *left_pad(rows, P), short, temperature=temperature)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_row_sample_independent_of_other_rows(style):
  cfg = CFGS[style]
  params = random_params(cfg, seed=3)
  rows = prompts(B, [4, 6, 5, 1], cfg.vocab_size, seed=4)
  other = prompts(B, [6, 2, 3, 4], cfg.vocab_size, seed=5)
  kw = dict(cfg=cfg, max_new_tokens=N, temperature=1.0, eos_id=EOS, pad_id=PAD)
  rng = jax.random.key(11)
  a = sample(params, *left_pad(rows, P), rng, **kw)
  b = sample(params, *left_pad([rows[0], *other[1:]], P), rng, **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens[0]), np.asarray(b.tokens[0]))
  np.testing.assert_allclose(np.asarray(a.logprobs[0]), np.asarray(b.logprobs[0]), rtol=1e-5, atol=1e-5)
  assert not np.array_equal(np.asarray(a.tokens[1:]), np.asarray(b.tokens[1:]))


# ------------------------------------------------------------------ log-probs vs recomputation

@pytest.mark.parametrize("style,proc", [
    ("llama", dict(temperature=0.7, top_k=5)),
    ("gpt", dict(temperature=1.0, top_p=0.8)),
    ("llama", dict(temperature=0.9, top_k=6, top_p=0.9)),
])
def test_logprobs_equal_recomputation_processed(style, proc):
  """Temperature 1 and greedy are checked in test_padding_changes_no_sample; here the processed cases."""
  cfg = CFGS[style]
  params = random_params(cfg, seed=6, scale=0.7)
  prompt, pmask = left_pad(prompts(B, [3, 6, 1, 5], cfg.vocab_size, seed=8), P)
  s = sample(params, prompt, pmask, jax.random.key(3), cfg=cfg, max_new_tokens=N, eos_id=EOS, pad_id=PAD, **proc)
  check_logprobs(params, cfg, prompt, pmask, s, **proc)
  # the recomputation is not trivially equal: plain temperature-1 log-probs differ
  ref1, _ = recompute_logprobs(params, prompt, pmask, s.tokens, cfg=cfg)
  m = np.asarray(s.mask)
  assert np.abs(np.asarray(ref1)[m] - np.asarray(s.logprobs)[m]).max() > 1e-3


# ------------------------------------------------------------------ EOS

def test_eos_invariants_with_seeded_sampling():
  cfg = LLAMA
  params = random_params(cfg, seed=12, scale=0.6)
  # favour EOS moderately so that some rows stop mid-way and some never do
  params = {**params, "unembed": params["unembed"].at[:, EOS].add(0.15 * params["unembed"][:, EOS])}
  B, P, N = 32, 5, 10
  rows = prompts(B, [1 + i % 5 for i in range(B)], cfg.vocab_size, seed=13)
  s = sample(params, *left_pad(rows, P), jax.random.key(5), cfg=cfg, max_new_tokens=N, eos_id=EOS, pad_id=PAD)
  toks, lp, m, L = map(np.asarray, s)
  chex.assert_type([s.tokens, s.logprobs, s.mask], [jnp.int32, jnp.float32, jnp.bool_])
  assert np.issubdtype(L.dtype, np.integer)
  n_mid = n_none = 0
  for b in range(B):
    hits = np.flatnonzero(toks[b] == EOS)
    end = hits[0] + 1 if len(hits) else N
    n_mid += bool(len(hits)) and end < N
    n_none += not len(hits)
    assert L[b] == end
    assert m[b, :end].all() and not m[b, end:].any()
    assert (toks[b, end:] == PAD).all()
    assert (lp[b, end:] == 0).all() and (lp[b, :end] < 0).all()
  assert n_mid >= 3 and n_none >= 3, (n_mid, n_none)


class _CountingDecoder:
  """Stands in for Decoder inside `sample` and counts forward passes as they execute."""
  calls = 0

  def __init__(self, cfg, head="lm"):
    self.inner = Decoder(cfg, head=head)

  def apply(self, *args, **kwargs):
    jax.debug.callback(lambda: setattr(_CountingDecoder, "calls", _CountingDecoder.calls + 1))
    return self.inner.apply(*args, **kwargs)


def _force_eos(params, cfg):
  """norm_final.scale = 0 makes the final hidden equal the bias b for every token; unembed[:, EOS] = 50 b."""
  b = jnp.asarray(np.random.default_rng(0).standard_normal(cfg.d_model), jnp.float32)
  nf = {"scale": jnp.zeros_like(params["norm_final"]["scale"]), "bias": b}
  return {**params, "norm_final": nf, "unembed": params["unembed"].at[:, EOS].set(50.0 * b)}


def test_forced_eos_and_early_stop(monkeypatch):
  cfg, temperature = GPT, 1.0
  params = _force_eos(random_params(cfg, seed=14), cfg)
  B, P, N = 4, 5, 12
  prompt, pmask = left_pad(prompts(B, [5, 3, 1, 4], cfg.vocab_size, seed=15), P)
  monkeypatch.setattr(sampling, "Decoder", _CountingDecoder)
  fresh = jax.jit(sample.__wrapped__, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p",
                                                        "eos_id", "pad_id"))   # fresh trace uses the stand-in
  _CountingDecoder.calls = 0
  s = fresh(params, prompt, pmask, jax.random.key(0), cfg=cfg, max_new_tokens=N, temperature=temperature,
            eos_id=EOS, pad_id=PAD)
  jax.block_until_ready(s)
  jax.effects_barrier()
  np.testing.assert_array_equal(np.asarray(s.tokens[:, 0]), EOS)
  np.testing.assert_array_equal(np.asarray(s.tokens[:, 1:]), PAD)
  np.testing.assert_array_equal(np.asarray(s.mask), np.arange(N)[None].repeat(B, 0) == 0)
  np.testing.assert_array_equal(np.asarray(s.lengths), 1)
  np.testing.assert_allclose(np.asarray(s.logprobs[:, 0]), 0.0, atol=1e-5)   # EOS is (almost) certain
  np.testing.assert_array_equal(np.asarray(s.logprobs[:, 1:]), 0.0)
  # the prefill draws every row's EOS, and the loop never runs a decode pass (not N + 1 passes)
  assert _CountingDecoder.calls == 1, _CountingDecoder.calls

  # control: with EOS made impossible, prefill + N - 1 decode steps: the last token is drawn, never fed
  _CountingDecoder.calls = 0
  never = {**params, "unembed": params["unembed"].at[:, EOS].set(-50.0 * params["norm_final"]["bias"])}
  s2 = fresh(never, prompt, pmask, jax.random.key(0), cfg=cfg, max_new_tokens=N, temperature=temperature,
             eos_id=EOS, pad_id=PAD)
  jax.block_until_ready(s2)
  jax.effects_barrier()
  assert not (np.asarray(s2.tokens) == EOS).any()
  np.testing.assert_array_equal(np.asarray(s2.lengths), N)
  assert _CountingDecoder.calls == N, _CountingDecoder.calls


# ------------------------------------------------------------------ statistics

def test_first_token_frequencies_match_softmax():
  cfg = ModelConfig(style="llama", vocab_size=8, max_len=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                    head_dim=8, d_ff=32, tie_embeddings=False)
  params = random_params(cfg, seed=21, scale=0.8)
  B, P = 4000, 4
  prompt, pmask = left_pad([[5, 6, 7]] * B, P)
  logits, _ = jax.jit(Decoder(cfg).apply)({"params": params}, prompt[:1], left_pad_positions(pmask[:1]),
                                          kv_mask_bs=pmask[:1])
  for temperature, top_k in ((1.0, 0),):
    p = np.exp(np.asarray(process_logits(logits[0, -1], temperature, top_k), np.float64))
    assert p.max() < 0.7 and (p > 0.02).sum() >= (3 if top_k else 4), p   # a non-trivial distribution
    s = sample(params, prompt, pmask, jax.random.key(42), cfg=cfg, max_new_tokens=1, temperature=temperature,
               top_k=top_k, eos_id=EOS, pad_id=PAD)
    freq = np.bincount(np.asarray(s.tokens[:, 0]), minlength=cfg.vocab_size) / B
    se = np.sqrt(p * (1 - p) / B)
    assert np.all(np.abs(freq - p) <= 4.5 * se + 1e-9), (freq, p)
    if top_k:
      assert set(np.flatnonzero(freq)) <= set(np.argsort(-p)[:top_k])
    # the returned log-prob is that of the drawn token
    np.testing.assert_allclose(np.asarray(s.logprobs[:, 0]), np.log(p)[np.asarray(s.tokens[:, 0])], rtol=1e-5)


def test_first_argmax_equals_argmax_including_ties_and_masked_entries():
  from instructrl.objectives import first_argmax
  rng = np.random.default_rng(5)
  x = rng.normal(size=(64, 37)).astype(np.float32)
  x[:, 5] = x.max(axis=1) + 1.0                     # a tie: the first of two maxima must win
  x[::2, 20] = x[::2, 5]
  x[1::3, :10] = np.finfo(np.float32).min           # masked entries (top-k / top-p fill)
  for axis in (-1, 0):
    np.testing.assert_array_equal(first_argmax(jnp.asarray(x), axis=axis), np.argmax(x, axis=axis))
  x[3, 7] = np.nan                                   # a NaN row stays in range
  assert 0 <= int(first_argmax(jnp.asarray(x))[3]) < x.shape[1]


def test_gumbel_max_draws_what_jax_random_categorical_draws():
  from instructrl.models.sampling import gumbel_max
  logp = jax.nn.log_softmax(jnp.asarray(np.random.default_rng(6).normal(size=(200, 50)) * 3, jnp.float32))
  keys = jax.random.split(jax.random.key(7), 200)
  ours = jax.jit(jax.vmap(gumbel_max))(keys, logp)
  theirs = jax.jit(jax.vmap(jax.random.categorical))(keys, logp)
  np.testing.assert_array_equal(ours, theirs)
