"""Sampling throughput: new tokens/s at batch 1, 16, 64, with the KV cache vs recomputing the prefix.

  python benchmarks/sampler.py                      # tiny model, prompt 32, 32 new tokens
  python benchmarks/sampler.py --shape=llama8x512 --batches=1,16
  python benchmarks/sampler.py --quick

"cache" is instructrl.models.sampling.sample (prefill, then one token per lax.while_loop step against
a preallocated KV cache). "no_cache" is the same loop recomputing a full forward over the fixed
[B, P + N] buffer for every token (what a sampler without a cache does; static shapes, so one
compile). EOS is disabled (eos_id=-1) so every row generates exactly max_new_tokens: rates compare
like for like. Both run interleaved, medians reported. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (SHAPES, CompileCounter, environment, interleaved, lm_params, model_summary, peak_memory_bytes,
                               setup, summary)
from instructrl.data.tokenizer import PAD_ID
from instructrl.models.sampling import process_logits, sample
from instructrl.models.transformer import Decoder, left_pad_positions

NO_EOS = -1


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "eos_id", "pad_id"))
def sample_no_cache(params, prompt_bp, prompt_mask_bp, rng, *, cfg, max_new_tokens: int, temperature: float = 1.0,
                    eos_id: int, pad_id: int):
  """Tokens [B, N] drawn like `sample`, but each step runs the model over the whole [B, P + N] buffer."""
  model = Decoder(cfg, head="lm")
  B, P = prompt_bp.shape
  N = max_new_tokens
  kv_mask = jnp.concatenate([prompt_mask_bp.astype(bool), jnp.ones((B, N), bool)], axis=1)
  positions = left_pad_positions(kv_mask)
  row_keys = jax.random.split(rng, B)

  def body(i, carry):
    seq, done = carry
    logits, _ = model.apply({"params": params}, seq, positions, kv_mask_bs=kv_mask)
    logp = process_logits(jax.lax.dynamic_index_in_dim(logits, P - 1 + i, axis=1, keepdims=False), temperature)
    tok = jax.vmap(jax.random.categorical)(jax.vmap(jax.random.fold_in, (0, None))(row_keys, i), logp)
    tok = jnp.where(done, pad_id, tok)
    return jax.lax.dynamic_update_slice_in_dim(seq, tok[:, None], P + i, axis=1), done | (tok == eos_id)

  seq0 = jnp.concatenate([prompt_bp, jnp.full((B, N), pad_id, prompt_bp.dtype)], axis=1)
  seq, _ = jax.lax.fori_loop(0, N, body, (seq0, jnp.zeros((B,), bool)))
  return seq[:, P:]


def prompts(rng, B: int, P: int, vocab: int):
  lengths = rng.integers(P // 2, P + 1, B)
  mask = np.arange(P)[None, :] >= (P - lengths)[:, None]
  return np.where(mask, rng.integers(4, vocab, (B, P)), PAD_ID).astype(np.int32), mask


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="model shape (common.SHAPES)")
  ap.add_argument("--batches", default="1,16,64")
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--max_new_tokens", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (cache, no cache); medians reported")
  ap.add_argument("--dtype", default=None, help="compute dtype override (float32/bfloat16)")
  ap.add_argument("--quick", action="store_true", help="2 rounds")
  args = ap.parse_args()
  if args.quick:
    args.repeats = 2

  counter = CompileCounter()
  preset, model, _, _ = SHAPES[args.shape]
  P, N = args.prompt_len, args.max_new_tokens
  s = setup(preset, dtype=args.dtype, min_len=P + N, model=model)
  cfg = s.cfg
  params = lm_params(s)
  rng = np.random.default_rng(0)
  key = jax.random.key(1)
  kw = dict(cfg=cfg, max_new_tokens=N, temperature=1.0, eos_id=NO_EOS, pad_id=PAD_ID)
  results, compiles_warmup, after = [], 0, 0
  for B in [int(b) for b in args.batches.split(",")]:
    prompt, mask = prompts(rng, B, P, cfg.vocab_size)
    prompt, mask = jnp.asarray(prompt), jnp.asarray(mask)
    fns = {"cache": lambda: jax.block_until_ready(sample(params, prompt, mask, key, **kw).tokens),
           "no_cache": lambda: jax.block_until_ready(sample_no_cache(params, prompt, mask, key, **kw))}
    before = counter.count
    for f in fns.values():
      f()
    compiles_warmup += counter.count - before
    before = counter.count
    times = interleaved(fns, args.repeats)
    after += counter.count - before
    row = {"batch": B}
    for name, ts in times.items():
      row[name] = {**summary(ts), "new_tokens_per_s": B * N / summary(ts)["median_s"]}
    row["cache_speedup"] = row["cache"]["new_tokens_per_s"] / row["no_cache"]["new_tokens_per_s"]
    results.append(row)
  print(json.dumps({
      "benchmark": "sampler", "shape": args.shape, "preset": preset, **environment(), "model": model_summary(cfg),
      "prompt_len": P, "max_new_tokens": N, "eos": "disabled: every row generates max_new_tokens",
      "repeats": args.repeats, "quick": args.quick, "results": results, "peak_memory_bytes": peak_memory_bytes(),
      "compiles_warmup": compiles_warmup, "compiles_after_warmup": after,
  }, indent=1))


if __name__ == "__main__":
  main()
