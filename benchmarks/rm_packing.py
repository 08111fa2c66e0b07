"""RM train step with packed responses (rm.packing) vs the [B, K_max, T] batch it replaces.

  python benchmarks/rm_packing.py --quick
  python benchmarks/rm_packing.py --preset=tiny --workdir=W        # the lengths and K of a finished run's comparisons

A per-prompt batch forwards B x K_max rows of T tokens, while a prompt ranks K = 4..9 responses of
BOS + prompt + response + EOS tokens each. Packed, the real sequences fill `rows` rows per data shard: the
most any of --batches batches needs (the stage sizes a run the same way, over all its batches). Both steps
start from the same params on the same batch; the JSON gives each step's median time, the rows and token fill,
the speed-up, and the first step's loss under both (equal up to float rounding).

Without --workdir the batch is synthetic: K uniform over the preset's rm.k_choices, prompts of 6-20 tokens and
responses of 1-30 (tiny's round-two comparisons: K 4..9, a quarter of the unpacked positions real).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from benchmarks.common import CompileCounter, check_batch, environment, interleaved, model_summary, setup
from benchmarks.rm_step import rm_overrides
from instructrl import parallel
from instructrl.data import packing
from instructrl.data.batching import batch_indices
from instructrl.data.rankings import RankedExamples
from instructrl.stages import reward, train_state


def synthetic(rng, n: int, k_choices, T: int, vocab: int) -> RankedExamples:
  k_max = max(k_choices)
  toks = np.zeros((n, k_max, T), np.int32)
  last = np.zeros((n, k_max), np.int32)
  ranks = np.full((n, k_max), k_max, np.int32)
  mask = np.zeros((n, k_max), bool)
  for i in range(n):
    k, prompt = int(rng.choice(k_choices)), int(rng.integers(6, 21))
    for j in range(k):
      length = min(T, 1 + prompt + int(rng.integers(1, 31)) + 1)
      toks[i, j, :length] = rng.integers(4, vocab, length)
      last[i, j] = length - 1
    ranks[i, :k], mask[i, :k] = rng.permutation(k), True
  return RankedExamples(toks, last, ranks, mask, np.arange(n))


def from_workdir(workdir: Path, config, T: int) -> RankedExamples:
  """The training examples of a run's RM (its own comparisons and round one's, one ranking per prompt)."""
  from instructrl.data import world as world_lib
  from instructrl.data.rankings import load_ranked, ranked_examples
  from instructrl.stages.world import load_tokenizer
  world = world_lib.World.load(workdir / "world")
  dirs = [d for d in (workdir / "comparisons", workdir / "round1" / "comparisons") if d.is_dir()]
  recs = [r for d in dirs for r in load_ranked(d / "train.jsonl", allow_empty_response=True)]
  held = {config.world.heldout_group, world.cfg.get("dev_group")}
  groups = sorted({l.group for l in world.labelers} - held)
  recs = reward.select(recs, groups)
  return ranked_examples(load_tokenizer(workdir), recs, T, max(config.rm.k_choices), world.format_prompt)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--workdir", default="", help="a finished run: its comparisons' lengths and K (else synthetic)")
  ap.add_argument("--batch_prompts", type=int, default=16, help="B: prompts per batch (tiny's rm.batch_size)")
  ap.add_argument("--seq_len", type=int, default=64)
  ap.add_argument("--batches", type=int, default=100, help="batches the packed row count is sized over")
  ap.add_argument("--steps", type=int, default=10, help="timed steps per variant and repeat")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--quick", action="store_true", help="4 prompts, 2 steps, 1 round: a smoke check")
  args = ap.parse_args()
  if args.quick:
    args.batch_prompts, args.steps, args.repeats, args.batches = 4, 2, 1, 10

  counter = CompileCounter()
  B, T = args.batch_prompts, args.seq_len
  s = setup(args.preset, min_len=T, stage_overrides=rm_overrides(args.preset))
  config, cfg, mesh, rules = s.config, s.cfg, s.mesh, s.rules
  check_batch(B, "--batch_prompts", s)
  rng = np.random.default_rng(0)
  examples = (from_workdir(Path(args.workdir), config, T) if args.workdir else
              synthetic(rng, max(B * args.batches, B), tuple(config.rm.k_choices), T, cfg.vocab_size))
  batches = [batch_indices(len(examples), B, step, 0) for step in range(args.batches)]
  shards = train_state.batch_shards(B, mesh, rules)
  rows = max(packing.rows_needed(examples.last_index[i], examples.mask[i], T, shards) for i in batches)

  tx, schedule = train_state.make_optimizer(config.rm, 1000)
  shardings = train_state.state_shardings(cfg, tx, mesh, rules, head="scalar")
  params = jax.tree.map(np.asarray, train_state.init_params(cfg, jax.random.key(0), shardings["params"], mesh,
                                                            rules, head="scalar"))
  step = reward.make_steps(cfg, "per_prompt", tx, schedule, shardings, mesh, rules)[0]
  key = jax.random.key(1)
  with parallel.activate(mesh, rules):
    device = {"unpacked": train_state.process_batch(examples.batch, batches[0], mesh, rules),
              "packed": train_state.process_packed_batch(examples.batch, batches[0], rows, 0, mesh, rules)}
    states, first_loss = {}, {}
    for name, batch in device.items():   # warm-up: compile, and the first step's loss from the same params
      states[name] = train_state.new_state(jax.device_put(params, shardings["params"]), tx, shardings, mesh)
      states[name], m = step(states[name], batch, key)
      first_loss[name] = float(m["loss"])
    warm = counter.count

    def run(name):
      for _ in range(args.steps):
        states[name], m = step(states[name], device[name], key)
      jax.block_until_ready(m)

    times = interleaved({name: (lambda name=name: run(name)) for name in device}, args.repeats)
  step_s = {name: statistics.median(t) / args.steps for name, t in times.items()}
  real = int(sum((examples.last_index[i] + 1)[examples.mask[i]].sum() for i in batches))
  print(json.dumps({
      "benchmark": "rm_packing", "preset": args.preset, **environment(), "model": model_summary(cfg),
      "data": args.workdir or "synthetic", "batch_prompts": B, "seq_len": T, "k_max": int(examples.mask.shape[1]),
      "sized_over_batches": len(batches), "steps": args.steps, "repeats": args.repeats, "quick": args.quick,
      "rows_unpacked": B * examples.mask.shape[1], "rows_packed": rows * shards,
      "fill_unpacked": real / (len(batches) * B * examples.mask.shape[1] * T),
      "fill_packed": real / (len(batches) * rows * shards * T),
      "step_time_s": step_s, "speedup": step_s["unpacked"] / step_s["packed"],
      "first_step_loss": first_loss, "first_step_loss_abs_diff": abs(first_loss["packed"] - first_loss["unpacked"]),
      "compiles_warmup": warm, "compiles_after_warmup": counter.count - warm,
  }, indent=1))


if __name__ == "__main__":
  main()
