"""Autoregressive sampling with a preallocated KV cache inside `lax.while_loop`.

Prompts are LEFT-padded to a common length P so that every row writes its next token into the
same cache slot; positions restart at 0 on each row's first real token and padded slots are
masked out of attention, so padding changes no sample (tested).

Each row draws from its own key (split once per row, folded with the step), so a row's sample
does not depend on which other rows share the batch.

The log-prob returned for each token is under exactly the distribution that was sampled from
(temperature, top-k and top-p applied), which PPO needs for a KL that cannot go negative.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from instructrl.models.config import ModelConfig
from instructrl.models.transformer import Decoder, init_cache, left_pad_positions
from instructrl.objectives import first_argmax


class Samples(NamedTuple):
  tokens: jax.Array     # [B, N] generated ids; pad_id after EOS
  logprobs: jax.Array   # [B, N] log-prob of each token under the sampling distribution; 0 where masked
  mask: jax.Array       # [B, N] True for real response tokens (the EOS included)
  lengths: jax.Array    # [B] number of real response tokens


def process_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Log-probs of the sampling distribution: temperature, then top-k, then top-p truncation.

  temperature == 0 means greedy; the returned log-probs are then those of temperature 1
  (there is no proper distribution to report for an argmax).
  """
  logits = logits.astype(jnp.float32)
  if temperature > 0:
    logits = logits / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def gumbel_max(key, logp_v):
  """One draw from softmax(logp_v): jax.random.categorical's own Gumbel-max, with `first_argmax`."""
  return first_argmax(jax.random.gumbel(key, logp_v.shape, logp_v.dtype) + logp_v)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "eos_id", "pad_id"))
def sample(params, prompt_bp, prompt_mask_bp, rng, *, cfg: ModelConfig, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int, pad_id: int) -> Samples:
  """Sample up to `max_new_tokens` after left-padded prompts. Jitted; one compile per shape/setting."""
  model = Decoder(cfg, head="lm")
  B, P = prompt_bp.shape
  N = max_new_tokens
  # Learned positions end at max_len; an imported Gemma 2's context is capped there (hf._gemma2_window).
  if P + N > cfg.max_len and (cfg.style == "gpt" or cfg.post_norms):
    raise ValueError(f"prompt length {P} + max_new_tokens {N} exceeds model.max_len={cfg.max_len}")
  prompt_mask_bp = prompt_mask_bp.astype(bool)
  positions_bp = left_pad_positions(prompt_mask_bp)
  kv_mask_bs = jnp.concatenate([prompt_mask_bp, jnp.ones((B, N), bool)], axis=1)

  # The prefill attends over the prompt's P slots only (not P + N, most of them empty at paper lengths);
  # the N answer slots are appended after it, so the loop's cache is P + N whatever model.max_len is.
  logits_bpv, cache = model.apply({"params": params}, prompt_bp, positions_bp, kv_mask_bs=prompt_mask_bp,
                                  cache=init_cache(cfg, B, P), cache_index=0, last_only=True)
  cache = jax.tree.map(lambda c: jnp.pad(c, [(0, 0)] * (c.ndim - 2) + [(0, N), (0, 0)]), cache)
  row_keys = jax.random.split(rng, B)

  def draw(logits_bv, i):
    logp_bv = process_logits(logits_bv, temperature, top_k, top_p)
    if temperature > 0:
      keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, i)
      tok_b = jax.vmap(gumbel_max)(keys, logp_bv)
    else:
      tok_b = first_argmax(logp_bv)
    return tok_b, jnp.take_along_axis(logp_bv, tok_b[:, None], axis=-1)[:, 0]

  def record(i, tok_b, logp_b, done_b, tokens, logprobs, mask):
    alive_b = ~done_b
    tok_b = jnp.where(alive_b, tok_b, pad_id)
    tokens = tokens.at[:, i].set(tok_b)
    logprobs = logprobs.at[:, i].set(jnp.where(alive_b, logp_b, 0.0))
    mask = mask.at[:, i].set(alive_b)
    return tok_b, done_b | (tok_b == eos_id), tokens, logprobs, mask

  def cond(carry):
    i, done_b = carry[0], carry[3]
    return (i < N) & ~jnp.all(done_b)

  # Token i-1 is fed at the top of step i, so no forward pass runs after the last token is drawn.
  def body(carry):
    i, cache, prev_b, done_b, pos_b, tokens, logprobs, mask = carry
    logits_b1v, cache = model.apply({"params": params}, prev_b[:, None], pos_b[:, None], kv_mask_bs=kv_mask_bs,
                                    cache=cache, cache_index=P + i - 1)
    tok_b, done_b, tokens, logprobs, mask = record(i, *draw(logits_b1v[:, 0], i), done_b, tokens, logprobs, mask)
    return i + 1, cache, tok_b, done_b, pos_b + 1, tokens, logprobs, mask

  tok_b, done_b, tokens, logprobs, mask = record(
      0, *draw(logits_bpv[:, -1], 0), jnp.zeros((B,), bool), jnp.full((B, N), pad_id, jnp.int32),
      jnp.zeros((B, N), jnp.float32), jnp.zeros((B, N), bool))
  carry = (jnp.int32(1), cache, tok_b, done_b, positions_bp[:, -1] + 1, tokens, logprobs, mask)
  _, _, _, _, _, tokens, logprobs, mask = jax.lax.while_loop(cond, body, carry)
  return Samples(tokens, logprobs, mask, mask.sum(-1))


def token_logprobs(params, cfg: ModelConfig, tokens_bt, positions_bt, kv_mask_bt, *, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0):
  """Log-prob of tokens_bt[:, t+1] given tokens up to t, under the same processing as `sample`. [B, T-1]."""
  logits, _ = Decoder(cfg, head="lm").apply({"params": params}, tokens_bt, positions_bt, kv_mask_bs=kv_mask_bt)
  logp = process_logits(logits[:, :-1], temperature, top_k, top_p)
  return jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1)[..., 0]
