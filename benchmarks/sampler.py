"""Sampling throughput: new tokens/s at batch 1, 16, 64, with the KV cache vs recomputing the prefix.

  python benchmarks/sampler.py                      # tiny model, prompt 32, 32 new tokens
  python benchmarks/sampler.py --shape=llama8x512 --batches=1,16
  python benchmarks/sampler.py --quick
  python benchmarks/sampler.py --shape=small --prompt_len=1024 --max_new_tokens=1024 --batches=16 \
      --contenders=cache --eos_hazard=0.004     # paper lengths; early stop vs sampling to the cap

"cache" is instructrl.models.sampling.sample (prefill, then one token per lax.while_loop step against
a preallocated KV cache). "no_cache" is the same loop recomputing a full forward over the fixed
[B, P + N] buffer for every token (what a sampler without a cache does; static shapes, so one
compile). EOS is disabled (eos_id=-1) so every row generates exactly max_new_tokens: rates compare
like for like. Both run interleaved, medians reported. Prints one JSON object.

--eos_hazard=h adds "cache_eos": the same sampler and weights except that EOS gets a logit giving it
probability ~h at every step (so response lengths are ~geometric with mean ~1/h, capped), EOS enabled.
The loop stops once every row has ended; `early_stop` reports the time saved over sampling every row to
the cap ("cache"), the loop's steps and the rows' lengths.
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
from instructrl.data.tokenizer import EOS_ID, PAD_ID
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


def with_eos_hazard(params, cfg, hazard: float, eos_id: int = EOS_ID):
  """Params whose next-token distribution puts ~`hazard` on EOS at every step (a GPT-style tied model).

  The final LayerNorm's channel 0 is made the constant 1 (scale 0, bias 1), and EOS's embedding gets
  log(hazard (V - 1) / (1 - hazard)) there: EOS's logit rises by that, every other logit by its own
  channel-0 weight (~N(0, 0.02^2)). Random-init logits are near 0, so p(EOS) ~ hazard.
  """
  if cfg.style != "gpt" or not cfg.tie_embeddings:
    raise ValueError(f"--eos_hazard needs a GPT-style model with tied embeddings; got style={cfg.style!r}, "
                     f"tie_embeddings={cfg.tie_embeddings}")
  if not 0 < hazard < 1:
    raise ValueError(f"--eos_hazard={hazard}: expected a probability in (0, 1)")
  nf = params["norm_final"]
  nf = {"scale": nf["scale"].at[0].set(0.0), "bias": nf["bias"].at[0].set(1.0)}
  bump = float(np.log(hazard * (cfg.vocab_size - 1) / (1 - hazard)))
  return {**params, "norm_final": nf, "embed": params["embed"].at[eos_id, 0].set(bump)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="model shape (common.SHAPES)")
  ap.add_argument("--batches", default="1,16,64")
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--max_new_tokens", type=int, default=32)
  ap.add_argument("--max_len", type=int, default=0, help="model.max_len (default: the preset's, raised to fit)")
  ap.add_argument("--contenders", default="cache,no_cache",
                  help="cache and/or no_cache (the no-cache loop is O(N (P + N)^2): drop it at paper lengths)")
  ap.add_argument("--eos_hazard", type=float, default=0.0,
                  help="> 0: also time the cache sampler with EOS at ~this probability per step (early stop)")
  ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (cache, no cache); medians reported")
  ap.add_argument("--dtype", default=None, help="compute dtype override (float32/bfloat16)")
  ap.add_argument("--quick", action="store_true", help="2 rounds")
  args = ap.parse_args()
  if args.quick:
    args.repeats = 2

  counter = CompileCounter()
  preset, model, _, _ = SHAPES[args.shape]
  P, N = args.prompt_len, args.max_new_tokens
  s = setup(preset, dtype=args.dtype, min_len=max(P + N, args.max_len), model=model)
  cfg = s.cfg
  params = lm_params(s)
  rng = np.random.default_rng(0)
  key = jax.random.key(1)
  kw = dict(cfg=cfg, max_new_tokens=N, temperature=1.0, eos_id=NO_EOS, pad_id=PAD_ID)
  contenders = args.contenders.split(",")
  if not contenders or set(contenders) - {"cache", "no_cache"} or (args.eos_hazard and "cache" not in contenders):
    raise ValueError(f"--contenders={args.contenders!r}: expected cache and/or no_cache (cache with --eos_hazard)")
  eos_params = with_eos_hazard(params, cfg, args.eos_hazard) if args.eos_hazard else None
  results, compiles_warmup, after = [], 0, 0
  for B in [int(b) for b in args.batches.split(",")]:
    prompt, mask = prompts(rng, B, P, cfg.vocab_size)
    prompt, mask = jnp.asarray(prompt), jnp.asarray(mask)
    lengths = []

    def eos_run():
      out = sample(eos_params, prompt, mask, key, **{**kw, "eos_id": EOS_ID})
      lengths.append(np.asarray(out.lengths))

    fns = {"cache": lambda: jax.block_until_ready(sample(params, prompt, mask, key, **kw).tokens),
           "no_cache": lambda: jax.block_until_ready(sample_no_cache(params, prompt, mask, key, **kw)),
           "cache_eos": eos_run}
    fns = {k: f for k, f in fns.items() if k in contenders or (k == "cache_eos" and args.eos_hazard)}
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
    if "no_cache" in row:
      row["cache_speedup"] = row["cache"]["new_tokens_per_s"] / row["no_cache"]["new_tokens_per_s"]
    if "cache_eos" in row:
      row["early_stop"] = early_stop(row, lengths[-1], N, args.eos_hazard)
    results.append(row)
  print(json.dumps({
      "benchmark": "sampler", "shape": args.shape, "preset": preset, **environment(), "model": model_summary(cfg),
      "prompt_len": P, "max_new_tokens": N, "max_len": cfg.max_len, "contenders": contenders,
      "eos": "disabled: every row generates max_new_tokens" + (", except cache_eos" if args.eos_hazard else ""),
      "repeats": args.repeats, "quick": args.quick, "results": results, "peak_memory_bytes": peak_memory_bytes(),
      "compiles_warmup": compiles_warmup, "compiles_after_warmup": after,
  }, indent=1))


def early_stop(row: dict, lengths: np.ndarray, N: int, hazard: float) -> dict:
  """What stopping once every row has ended saved over sampling every row to the cap N.

  The draws are the same in every call (same key), so the lengths of the last call are every call's.
  cache_eos's new_tokens_per_s counts its real tokens (the rows' lengths); ended rows idle until the
  loop stops, which runs max(lengths) steps.
  """
  t_cap, t_eos = row["cache"]["median_s"], row["cache_eos"]["median_s"]
  row["cache_eos"]["new_tokens_per_s"] = float(lengths.sum()) / t_eos
  return {"eos_hazard": hazard, "cap": N, "loop_steps": int(lengths.max()), "mean_length": float(lengths.mean()),
          "min_length": int(lengths.min()), "time_saved_fraction": 1 - t_eos / t_cap,
          "steps_saved_fraction": 1 - int(lengths.max()) / N}


if __name__ == "__main__":
  main()
