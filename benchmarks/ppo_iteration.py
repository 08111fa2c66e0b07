"""PPO-ptx iteration throughput: episodes/s of a full iteration (rollout + update); prints one JSON object.

  python benchmarks/ppo_iteration.py --quick
  python benchmarks/ppo_iteration.py --preset=tiny --batch_size=512 --minibatch_size=64   # on an accelerator

One iteration is the stage's two jitted programs (instructrl/stages/ppo.py): `rollout` (sample with the
KV cache, re-score with policy, reference, value and RM, k1 KL rewards, GAE, whitening) and `update`
(a lax.scan over epochs x minibatches of guarded policy + value updates with the ptx term, then the EMA).
The model is the preset's, randomly initialised (throughput does not depend on the weights, except
through response lengths: a random policy rarely emits EOS, so responses run to max_new_tokens, the
worst case). The rollout time is split into sampling (the same `sample` program timed on its own) and
scoring (the rest: four full forwards, rewards, GAE). Compiles after warm-up must be 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from benchmarks.common import (CompileCounter, check_batch, environment, model_summary, peak_memory_bytes,
                               ppo_data, ppo_setup, setup)
from instructrl import parallel
from instructrl.data.tokenizer import EOS_ID, PAD_ID
from instructrl.models.sampling import sample
from instructrl.stages import ppo


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tiny", help="model, mesh and ppo block of this preset")
  ap.add_argument("--batch_size", type=int, default=None, help="episodes per iteration (default: the preset's)")
  ap.add_argument("--minibatch_size", type=int, default=None, help="episodes per update (default: the preset's)")
  ap.add_argument("--iterations", type=int, default=5, help="timed iterations per repeat")
  ap.add_argument("--repeats", type=int, default=2, help="timing rounds (x iterations); medians reported")
  ap.add_argument("--prompt_len", type=int, default=None)
  ap.add_argument("--max_new_tokens", type=int, default=None)
  ap.add_argument("--ptx_coef", type=float, default=None, help="0: plain PPO (no pretraining forward/backward)")
  ap.add_argument("--dtype", default=None, help="compute dtype override (float32/bfloat16)")
  ap.add_argument("--quick", action="store_true", help="16 episodes, minibatch 8, 2 iterations, 1 round")
  args = ap.parse_args()
  if args.quick:
    args.batch_size, args.minibatch_size, args.iterations, args.repeats = 16, 8, 2, 1

  counter = CompileCounter()
  from configs import instructgpt
  pc = instructgpt.get_config(args.preset).ppo
  pc.batch_size = args.batch_size or pc.batch_size
  pc.minibatch_size = args.minibatch_size or pc.minibatch_size
  pc.prompt_len = args.prompt_len or pc.prompt_len
  pc.max_new_tokens = args.max_new_tokens or pc.max_new_tokens
  if args.ptx_coef is not None:
    pc.ptx_coef = args.ptx_coef
  B, mb, P, N, L = pc.batch_size, pc.minibatch_size, pc.prompt_len, pc.max_new_tokens, pc.ptx_seq_len
  if B % mb:
    raise ValueError(f"--batch_size={B} must be a multiple of --minibatch_size={mb}")
  s = setup(args.preset, dtype=args.dtype, min_len=max(P + N, L))
  config, cfg, mesh = s.config, s.cfg, s.mesh
  check_batch(mb, "--minibatch_size", s)
  st = ppo_setup(s, pc)                                      # the stage's own programs (ppo.build)
  state, ref, rm, n_mb, rollout, update = st.state, st.ref, st.rm, st.n_mb, st.rollout, st.update
  batch, ptx, ptx_bs = ppo_data(s, pc, np.random.default_rng(0), st.programs)
  sampling = lambda params, key: sample(params, batch["prompt"], batch["prompt_mask"], key, cfg=cfg,
                                        max_new_tokens=N, temperature=pc.temperature, eos_id=EOS_ID, pad_id=PAD_ID)
  base = jax.random.key(config.seed)
  it = [0]

  def iteration(state):
    key = jax.random.fold_in(base, it[0])
    it[0] += 1
    t0 = time.perf_counter()
    ro, ro_m, _ = rollout(state["params"], state["value"], ref, rm, batch["prompt"], batch["prompt_mask"], key,
                          state["kl_coef"], state["score_gain"])
    jax.block_until_ready(ro)
    t1 = time.perf_counter()
    state, m = update(state, ro, ptx, jax.random.fold_in(key, 1))
    jax.block_until_ready(m)
    t2 = time.perf_counter()
    return state, {**ro_m, **m}, t1 - t0, t2 - t1

  def sample_only(state):
    t0 = time.perf_counter()
    jax.block_until_ready(sampling(state["params"], jax.random.fold_in(base, it[0] - 1)))
    return time.perf_counter() - t0

  with parallel.activate(mesh, s.rules):
    compiles_setup = counter.count
    t0 = time.perf_counter()
    state, metrics, _, _ = iteration(state)                  # compiles rollout and update
    sample_only(state)                                       # compiles the stand-alone sampler
    first_s = time.perf_counter() - t0
    state, metrics, _, _ = iteration(state)                  # one more, uncounted
    sample_only(state)
    compiles_warmup = counter.count - compiles_setup
    after_warmup = counter.count
    ro_t, up_t, sa_t, lens = [], [], [], []
    for _ in range(args.repeats * args.iterations):
      state, metrics, r, u = iteration(state)
      ro_t.append(r)
      up_t.append(u)
      lens.append(float(metrics["objective/response_length"]))
      sa_t.append(sample_only(state))                        # same policy, same key: the same responses
    # Medians: the machine is shared, a mean would carry other people's load spikes.
    best = {"rollout_s": float(np.median(ro_t)), "update_s": float(np.median(up_t)),
            "sampling_s": float(np.median(sa_t)), "response_length": float(np.mean(lens))}
    compiles_after_warmup = counter.count - after_warmup

  iteration_s = best["rollout_s"] + best["update_s"]
  scoring_s = max(best["rollout_s"] - best["sampling_s"], 0.0)
  print(json.dumps({
      "benchmark": "ppo_iteration", "preset": args.preset, **environment(),
      "mesh": dict(mesh.shape),
      "model": model_summary(cfg),
      "batch_size": B, "minibatch_size": mb, "ppo_epochs": pc.ppo_epochs, "updates_per_iteration": n_mb,
      "prompt_len": P, "max_new_tokens": N, "mean_response_length": best["response_length"],
      "ptx_coef": pc.ptx_coef, "ptx_batch_size": ptx_bs if ppo.ptx_enabled(pc) else 0, "ptx_seq_len": L,
      "iterations": args.iterations, "repeats": args.repeats, "quick": args.quick,
      "episodes_per_s": B / iteration_s,
      "iteration_s": iteration_s,
      "rollout_s": best["rollout_s"], "update_s": best["update_s"],
      "rollout_split_s": {"sampling": best["sampling_s"], "scoring": scoring_s},
      "fraction": {"sampling": best["sampling_s"] / iteration_s, "scoring": scoring_s / iteration_s,
                   "update": best["update_s"] / iteration_s},
      "final_metrics": {k: float(metrics[k]) for k in ("objective/kl", "ppo/policy/ratio_mean",
                                                        "ppo/policy/clipfrac", "ppo/val/value_loss")},
      "first_iteration_s_incl_compile": first_s,
      "peak_memory_bytes": peak_memory_bytes(),
      "compiles_warmup": compiles_warmup,
      "compiles_after_warmup": compiles_after_warmup,
  }, indent=1))


if __name__ == "__main__":
  main()
