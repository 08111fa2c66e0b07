"""RM train-step throughput: the paper's one-forward-per-response step vs the per-comparison ablation.

  python benchmarks/rm_step.py --quick
  python benchmarks/rm_step.py --preset=tiny --steps=20 --batch_prompts=16     # on an accelerator

Per prompt (paper, section 3.5): a batch of B prompts with K responses each forwards B*K sequences
and trains on all B*C(K,2) comparisons. Shuffled pairs (the ablation): every comparison is its own
row, forwarding its chosen and its rejected response, 2*B*C(K,2) sequences for the same comparisons.
Same model, same comparisons per step (unless --max_pair_batch caps the pairs batch; the rates are
per comparison either way), so the measured comparisons/s ratio should approach the theory,
2*C(K,2)/K = K - 1 (at K = 2 both forward 2 sequences per comparison). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from benchmarks.common import (CompileCounter, check_batch, environment, model_summary, peak_memory_bytes,
                               ranked_batch, setup)
from instructrl import parallel
from instructrl.data.rankings import pairs_from_ranked
from instructrl.stages import reward, train_state


def timed(step, state, batch, key, steps: int):
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  return state, metrics, (time.perf_counter() - t0) / steps


def rm_overrides(preset: str) -> dict:
  from configs import instructgpt
  return dict(instructgpt.get_config(preset).rm.get("model_overrides", {}))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tiny", help="model (and mesh / optimizer) of this preset")
  ap.add_argument("--steps", type=int, default=10, help="timed steps per formulation and repeat")
  ap.add_argument("--repeats", type=int, default=3, help="alternating timing rounds; the median is reported")
  ap.add_argument("--batch_prompts", type=int, default=8, help="B: prompts per per-prompt batch")
  ap.add_argument("--seq_len", type=int, default=64)
  ap.add_argument("--ks", default="2,4,9", help="K values (responses per prompt)")
  ap.add_argument("--max_pair_batch", type=int, default=0,
                  help="cap on comparisons per shuffled-pairs batch (memory); 0 = B*C(K,2)")
  ap.add_argument("--dtype", default=None, help="compute dtype override (float32/bfloat16)")
  ap.add_argument("--quick", action="store_true", help="2 prompts, 2 steps, 1 round: a smoke check")
  args = ap.parse_args()
  if args.quick:
    args.steps, args.repeats, args.batch_prompts = 2, 1, 2

  counter = CompileCounter()
  B, T = args.batch_prompts, args.seq_len
  s = setup(args.preset, dtype=args.dtype, min_len=T, stage_overrides=rm_overrides(args.preset))
  config, cfg, mesh, rules, n_batch_shards = s.config, s.cfg, s.mesh, s.rules, s.n_batch_shards
  check_batch(B, "--batch_prompts", s)

  tx, schedule = train_state.make_optimizer(config.rm, 1000)
  shardings = train_state.state_shardings(cfg, tx, mesh, rules, head="scalar")
  params = train_state.init_params(cfg, jax.random.key(0), shardings["params"], mesh, rules, head="scalar")
  host_params = jax.tree.map(np.asarray, params)
  steps = {f: reward.make_steps(cfg, f, tx, schedule, shardings, mesh, rules)[0]
           for f in ("per_prompt", "shuffled_pairs")}
  states = {f: train_state.new_state(jax.device_put(host_params, shardings["params"]), tx, shardings, mesh)
            for f in steps}
  key = jax.random.key(1)
  rng = np.random.default_rng(0)
  results, compiles_warmup, first_step_s = [], 0, {}

  with parallel.activate(mesh, rules):
    for K in [int(k) for k in args.ks.split(",")]:
      C = K * (K - 1) // 2
      ranked = ranked_batch(rng, B, K, T, cfg.vocab_size)
      pairs = pairs_from_ranked(ranked)
      P = len(pairs) if args.max_pair_batch <= 0 else min(len(pairs), args.max_pair_batch)
      P -= P % n_batch_shards
      batches = {"per_prompt": train_state.device_batch(ranked.batch(np.arange(B)), mesh, rules),
                 "shuffled_pairs": train_state.device_batch(pairs.batch(np.arange(P)), mesh, rules)}
      comparisons = {"per_prompt": B * C, "shuffled_pairs": P}
      sequences = {"per_prompt": B * K, "shuffled_pairs": 2 * P}
      before = counter.count
      for f in steps:                                   # warm-up: compile, then one more step
        t0 = time.perf_counter()
        states[f], metrics = steps[f](states[f], batches[f], key)
        jax.block_until_ready(metrics)
        first_step_s[f"{f}/K={K}"] = time.perf_counter() - t0
        states[f], metrics = steps[f](states[f], batches[f], key)
        jax.block_until_ready(metrics)
      compiles_warmup += counter.count - before
      after_warmup = counter.count
      times = {f: [] for f in steps}
      losses = {}
      for _ in range(args.repeats):                     # alternate, so machine load hits both alike
        for f in steps:
          states[f], metrics, dt = timed(steps[f], states[f], batches[f], key, args.steps)
          times[f].append(dt)
          losses[f] = float(metrics["loss"])
      row = {"K": K, "comparisons_per_prompt": C, "compiles_after_warmup": counter.count - after_warmup}
      best = {f: statistics.median(times[f]) for f in steps}
      for f in steps:
        row[f] = {"comparisons_per_step": comparisons[f], "sequences_per_step": sequences[f],
                  "sequences_per_comparison": sequences[f] / comparisons[f], "step_time_s": best[f],
                  "comparisons_per_s": comparisons[f] / best[f], "time_per_comparison_s": best[f] / comparisons[f],
                  "loss": losses[f], "step_times_s": times[f]}
      row["measured_ratio"] = row["per_prompt"]["comparisons_per_s"] / row["shuffled_pairs"]["comparisons_per_s"]
      row["theory_ratio"] = K - 1
      row["target_ratio"] = 0.8 * (K - 1)             # the goal: one-forward >= (K-1) x 0.8 per-comparison
      # All prompts have K real responses, so the per-prompt loss (mean over prompts of the mean over their
      # pairs) is the mean over all pairs: with a whole pairs batch both runs follow the same trajectory,
      # up to round-off that grows with the steps taken (and with bfloat16).
      row["loss_abs_diff"] = abs(losses["per_prompt"] - losses["shuffled_pairs"])
      results.append(row)

  print(json.dumps({
      "benchmark": "rm_step", "preset": args.preset, **environment(),
      "model": model_summary(cfg),
      "batch_prompts": B, "seq_len": T, "steps": args.steps, "repeats": args.repeats, "quick": args.quick,
      "max_pair_batch": args.max_pair_batch,
      "results": results,
      "first_step_s_incl_compile": first_step_s,
      "peak_memory_bytes": peak_memory_bytes(),
      "compiles_warmup": compiles_warmup,
      "compiles_after_warmup": sum(r["compiles_after_warmup"] for r in results),
  }, indent=1))


if __name__ == "__main__":
  main()
