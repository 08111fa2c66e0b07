"""Layers as a loop vs as one scan (model.scan_layers): SFT step, RM step and PPO iteration, same run.

  python benchmarks/scan_ratio.py                     # tiny preset
  python benchmarks/scan_ratio.py --ppo_batch=16 --ppo_minibatch=8 --repeats=3

Each stage program is built twice from the same preset, once per layout, and the six are timed
round-robin (sft loop, sft scan, rm loop, rm scan, ppo loop, ppo scan, ...) so that machine load hits
both layouts alike; medians reported. ratio = scan time / loop time (<= 1: the scan is no slower).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from benchmarks.common import (CompileCounter, environment, interleaved, model_summary, ppo_data, ppo_setup,
                               ranked_batch, setup, summary)
from instructrl import parallel
from instructrl.stages import lm, reward, train_state


def sft_fn(preset: str, scan: bool, steps: int):
  s = setup(preset, model=dict(scan_layers=scan))
  B, T = s.config.sft.batch_size, s.config.sft.seq_len
  s = setup(preset, min_len=T, model=dict(scan_layers=scan))
  tx, schedule = train_state.make_optimizer(s.config.sft, 1000)
  sh = train_state.state_shardings(s.cfg, tx, s.mesh, s.rules)
  state = [train_state.new_state(train_state.init_params(s.cfg, jax.random.key(0), sh["params"], s.mesh, s.rules),
                                 tx, sh, s.mesh)]
  step, _ = lm.make_steps(s.cfg, tx, schedule, sh, s.mesh, s.rules)
  toks = np.random.default_rng(0).integers(4, s.cfg.vocab_size, (B, T + 1)).astype(np.int32)
  batch = train_state.device_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": np.ones((B, T), bool)},
                                   s.mesh, s.rules)

  def run():
    with parallel.activate(s.mesh, s.rules):
      for _ in range(steps):
        state[0], m = step(state[0], batch, jax.random.key(1))
      jax.block_until_ready(m)
  return run, s.cfg, {"batch_size": B, "seq_len": T, "steps_per_timing": steps}


def rm_fn(preset: str, scan: bool, steps: int, B: int, K: int, T: int):
  from configs import instructgpt
  over = dict(instructgpt.get_config(preset).rm.get("model_overrides", {}))
  s = setup(preset, min_len=T, stage_overrides=over, model=dict(scan_layers=scan))
  tx, schedule = train_state.make_optimizer(s.config.rm, 1000)
  sh = train_state.state_shardings(s.cfg, tx, s.mesh, s.rules, head="scalar")
  params = train_state.init_params(s.cfg, jax.random.key(0), sh["params"], s.mesh, s.rules, "scalar")
  state = [train_state.new_state(params, tx, sh, s.mesh)]
  step = reward.make_steps(s.cfg, "per_prompt", tx, schedule, sh, s.mesh, s.rules)[0]
  ranked = ranked_batch(np.random.default_rng(0), B, K, T, s.cfg.vocab_size)
  batch = train_state.device_batch(ranked.batch(np.arange(B)), s.mesh, s.rules)

  def run():
    with parallel.activate(s.mesh, s.rules):
      for _ in range(steps):
        state[0], m = step(state[0], batch, jax.random.key(1))
      jax.block_until_ready(m)
  return run, s.cfg, {"formulation": "per_prompt", "prompts": B, "K": K, "seq_len": T, "steps_per_timing": steps}


def ppo_fn(preset: str, scan: bool, B: int | None, mb: int | None):
  from configs import instructgpt
  pc = instructgpt.get_config(preset).ppo
  pc.batch_size, pc.minibatch_size = B or pc.batch_size, mb or pc.minibatch_size
  s = setup(preset, min_len=max(pc.prompt_len + pc.max_new_tokens, pc.ptx_seq_len), model=dict(scan_layers=scan))
  st = ppo_setup(s, pc)
  batch, ptx, _ = ppo_data(s, pc, np.random.default_rng(0), st.programs)
  state, it = [st.state], [0]

  def run():
    with parallel.activate(s.mesh, s.rules):
      key = jax.random.fold_in(jax.random.key(0), it[0])
      it[0] += 1
      ro, _, _ = st.rollout(state[0]["params"], state[0]["value"], st.ref, st.rm, batch["prompt"],
                            batch["prompt_mask"], key, state[0]["kl_coef"], state[0]["score_gain"])
      state[0], m = st.update(state[0], ro, ptx, jax.random.fold_in(key, 1))
      jax.block_until_ready(m)
  return run, s.cfg, {"batch_size": pc.batch_size, "minibatch_size": pc.minibatch_size,
                      "prompt_len": pc.prompt_len, "max_new_tokens": pc.max_new_tokens, "ptx_coef": pc.ptx_coef}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--repeats", type=int, default=5, help="round-robin rounds; medians reported")
  ap.add_argument("--steps", type=int, default=5, help="SFT / RM steps per timing")
  ap.add_argument("--rm_prompts", type=int, default=8)
  ap.add_argument("--rm_k", type=int, default=4)
  ap.add_argument("--rm_seq_len", type=int, default=64)
  ap.add_argument("--ppo_batch", type=int, default=None, help="episodes per iteration (default: the preset's)")
  ap.add_argument("--ppo_minibatch", type=int, default=None)
  args = ap.parse_args()

  counter = CompileCounter()
  fns, info = {}, {}
  for scan in (False, True):
    name = "scan" if scan else "loop"
    for stage, (run, cfg, what) in {
        "sft": sft_fn(args.preset, scan, args.steps),
        "rm": rm_fn(args.preset, scan, args.steps, args.rm_prompts, args.rm_k, args.rm_seq_len),
        "ppo": ppo_fn(args.preset, scan, args.ppo_batch, args.ppo_minibatch)}.items():
      fns[f"{stage}/{name}"] = run
      info[stage] = {**what, "model": model_summary(cfg)}
  fns = {k: fns[k] for k in sorted(fns)}                 # ppo/loop, ppo/scan, rm/loop, ...
  for f in fns.values():                                  # compile; PPO's second call reuses a donated state
    f()
    f()
  before = counter.count
  times = interleaved(fns, args.repeats)
  out = {}
  for stage in info:
    loop, scan = summary(times[f"{stage}/loop"]), summary(times[f"{stage}/scan"])
    out[stage] = {**info[stage], "loop": {**loop, "times_s": times[f"{stage}/loop"]},
                  "scan": {**scan, "times_s": times[f"{stage}/scan"]},
                  "ratio_scan_over_loop": scan["median_s"] / loop["median_s"]}
  print(json.dumps({"benchmark": "scan_ratio", "preset": args.preset, "repeats": args.repeats, **out,
                    "compiles_after_warmup": counter.count - before, **environment()}, indent=1))


if __name__ == "__main__":
  main()
