"""JAX (this repo) vs the PyTorch stack (torch + transformers, TRL-style loops) on the same shapes, same run.

  python benchmarks/compare_torch.py                       # all parts: matmul, sft, generate, rm, ppo
  python benchmarks/compare_torch.py --parts=sft --sft_shape=llama8x512 --repeats=5
  python benchmarks/compare_torch.py --quick

Both sides get the same model shape (transformers' LlamaForCausalLM / GPT2LMHeadModel built from
`instructrl.models.hf.config_to_hf`, random init, no downloads), the same dtype (f32 unless --dtype),
the same batch and the same threads (torch.set_num_threads(--threads); XLA:CPU uses the cores it sees).

Each side runs in its own process (--isolate, the default): the parent starts a JAX-only and a torch-only
child per round (--rounds, order alternating) and pools their timings; medians are reported with the
load average. Why not both in one process: after every parallel region torch's OpenMP workers spin-wait
for more work, and on 2 cores those spinning threads take the CPU from the XLA step that follows (and
XLA's pool does the same to torch). Measured on a 2-core Xeon, tiny SFT step: JAX 12.7k tokens/s
interleaved with torch in one process vs 18.9k alone (torch 25.2k vs 23.4k); OMP_WAIT_POLICY=PASSIVE
removes the penalty to JAX but costs torch a third (BENCHMARKS.md). --no-isolate keeps the
old same-process interleaving (jax, torch, jax, torch, ...), to reproduce earlier numbers.
ratio = JAX throughput / torch throughput (> 1: JAX faster).

What each torch side does (what a PyTorch user would write):
  sft:      model(input_ids).logits -> cross-entropy -> backward -> clip_grad_norm_ -> AdamW.step.
  generate: model.generate(do_sample=True, use_cache=True, top_k=0) for max_new_tokens (EOS disabled
            on both sides, so both generate exactly max_new_tokens per row).
  rm:       TRL RewardTrainer's step: chosen and rejected of each pair forwarded (one batch of 2P),
            reward at the last real token, -logsigmoid(r_c - r_r), AdamW. Compared with our per-pair
            step (the same algorithm) and with our per-prompt step (one forward per response).
  ppo:      TRL PPOTrainer's iteration without ptx (TRL has none): generate, forward policy, reference,
            value and RM on prompt+response, k1 KL rewards, GAE, whitening, then for each minibatch
            a clipped policy loss and a clipped value loss, each with its own Adam (as ours).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
import transformers

from benchmarks import train_step as train_step_bench
from benchmarks.common import (SHAPES, CompileCounter, environment, interleaved, lm_params, matmul_peak, model_summary,
                               ppo_data, ppo_setup, ranked_batch, setup, summary)
from instructrl import parallel
from instructrl.data.rankings import pairs_from_ranked
from instructrl.data.tokenizer import PAD_ID
from instructrl.models.hf import config_to_hf
from instructrl.models.sampling import sample
from instructrl.stages import reward, train_state

NO_EOS = -1


# ----------------------------------------------------------------------------- torch models

def hf_config(cfg, pad_id=PAD_ID):
  d = config_to_hf(cfg)
  kind = d.pop("model_type")
  d.pop("architectures")
  d["pad_token_id"] = pad_id
  conf = transformers.CONFIG_MAPPING[kind](**d)
  return conf


def torch_lm(cfg):
  torch.manual_seed(0)
  return transformers.AutoModelForCausalLM.from_config(hf_config(cfg)).float().train()


class TorchScalar(torch.nn.Module):
  """Backbone + a linear scalar per token: the value function, and the RM read at the last real token."""

  def __init__(self, cfg):
    super().__init__()
    torch.manual_seed(1)
    self.backbone = transformers.AutoModel.from_config(hf_config(cfg)).float()
    self.head = torch.nn.Linear(cfg.d_model, 1)

  def forward(self, ids, attention_mask=None, position_ids=None):
    h = self.backbone(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return self.head(h)[..., 0]


def torch_matmul_peak(dtype, n=2048, repeats=3) -> float:
  a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
  a @ b
  best = min(_t(lambda: a @ b) for _ in range(repeats))
  return 2 * n ** 3 / best


def _t(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def timed_entry(ts: list[float], work: float, unit: str) -> dict:
  """Summary of one contender's timings; the raw times travel with it so rounds can be pooled."""
  return {**summary(ts), f"{unit}_per_s": work / statistics.median(ts), "times_s": list(ts), "work": work,
          "unit": unit}


def ratio_row(times: dict, work: float, unit: str, ratios: dict) -> dict:
  """{contender: timed_entry} plus each ratio in `ratios` ({key: (numerator, denominator)}) whose two
  contenders were timed here (a one-sided child of --isolate has none)."""
  row = {name: timed_entry(ts, work, unit) for name, ts in times.items()}
  row["ratio_of"] = {k: list(v) for k, v in ratios.items()}
  return with_ratios(row)


def with_ratios(row: dict) -> dict:
  for key, (a, b) in row["ratio_of"].items():
    if a in row and b in row:
      unit = row[a]["unit"]
      row[key] = row[a][f"{unit}_per_s"] / row[b][f"{unit}_per_s"]
  return row


def for_side(fns: dict, side: str) -> dict:
  """The contenders this process times: all of them, or only JAX's / torch's (names start with the side)."""
  return {k: f for k, f in fns.items() if side == "both" or k.startswith(side)}


# ----------------------------------------------------------------------------- parts

def part_matmul(args, counter):
  out = {}
  for name, jdt, tdt in (("float32", jnp.float32, torch.float32), ("bfloat16", jnp.bfloat16, torch.bfloat16)):
    out[name] = {"n": args.matmul_n}
    if args.side in ("both", "jax"):
      out[name]["jax_flops_per_s"] = matmul_peak(jdt, n=args.matmul_n, inner=1, repeats=3)
    if args.side in ("both", "torch"):
      out[name]["torch_flops_per_s"] = torch_matmul_peak(tdt, n=args.matmul_n)
  return matmul_ratios(out)


def matmul_ratios(out: dict) -> dict:
  for row in out.values():
    if "jax_flops_per_s" in row and "torch_flops_per_s" in row:
      row["ratio"] = row["jax_flops_per_s"] / row["torch_flops_per_s"]
  return out


def part_sft(args, counter, shape):
  if args.side == "torch":            # a torch-only child needs the shape, not a compiled JAX state
    preset, model_over, B, T = SHAPES[shape]
    s = setup(preset, dtype=args.dtype, min_len=T, model=model_over)
    s.B, s.T, s.state = B, T, None
  else:
    s = train_step_bench.build(shape, dtype=args.dtype, steps=1000)
  cfg, B, T = s.cfg, s.B, s.T
  model = torch_lm(cfg)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  toks = np.random.default_rng(0).integers(4, cfg.vocab_size, (B, T + 1))
  inputs, targets = torch.tensor(toks[:, :-1]), torch.tensor(toks[:, 1:])
  state = [s.state]

  def jax_steps():
    with parallel.activate(s.mesh, s.rules):
      for _ in range(args.steps):
        state[0], m = s.train_step(state[0], s.batch, s.key)
      jax.block_until_ready(m)

  def torch_steps():
    for _ in range(args.steps):
      logits = model(input_ids=inputs).logits
      loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)

  fns = for_side({"jax": jax_steps, "torch": torch_steps}, args.side)
  for f in fns.values():                                        # warm-up (compile; torch's allocator)
    f()
  before = counter.count
  times = interleaved(fns, args.repeats)
  row = ratio_row(times, B * T * args.steps, "tokens", {"ratio": ("jax", "torch")})
  return {"shape": shape, "model": model_summary(cfg), "batch_size": B, "seq_len": T, "steps_per_timing": args.steps,
          **row, "compiles_after_warmup": counter.count - before}


def part_generate(args, counter):
  preset, model_over, _, _ = SHAPES[args.gen_shape]
  P, N = args.prompt_len, args.max_new_tokens
  s = setup(preset, dtype=args.dtype, min_len=P + N, model=model_over)
  cfg = s.cfg
  params = lm_params(s)
  model = torch_lm(cfg).eval()
  rng = np.random.default_rng(0)
  rows = []
  for B in [int(b) for b in args.gen_batches.split(",")]:
    lengths = rng.integers(P // 2, P + 1, B)
    mask = np.arange(P)[None, :] >= (P - lengths)[:, None]
    prompt = np.where(mask, rng.integers(4, cfg.vocab_size, (B, P)), PAD_ID).astype(np.int32)
    jp, jm = jnp.asarray(prompt), jnp.asarray(mask)
    tp, tm = torch.tensor(prompt, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    key = jax.random.key(1)
    kw = dict(cfg=cfg, max_new_tokens=N, temperature=1.0, eos_id=NO_EOS, pad_id=PAD_ID)

    def jax_gen():
      jax.block_until_ready(sample(params, jp, jm, key, **kw).tokens)

    def torch_gen():
      with torch.inference_mode():
        out = model.generate(input_ids=tp, attention_mask=tm, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                             max_new_tokens=N, min_new_tokens=N, use_cache=True, eos_token_id=None,
                             pad_token_id=PAD_ID)
      assert out.shape[1] == P + N, out.shape

    fns = for_side({"jax": jax_gen, "torch": torch_gen}, args.side)
    for f in fns.values():
      f()
    before = counter.count
    times = interleaved(fns, args.repeats)
    row = ratio_row(times, B * N, "new_tokens", {"ratio": ("jax", "torch")})
    rows.append({"batch": B, **row, "compiles_after_warmup": counter.count - before})
  return {"shape": args.gen_shape, "model": model_summary(cfg), "prompt_len": P, "max_new_tokens": N,
          "results": rows}


def part_rm(args, counter):
  from configs import instructgpt
  B, T = args.rm_prompts, args.rm_seq_len
  s = setup(args.preset, dtype=args.dtype, min_len=T,
            stage_overrides=dict(instructgpt.get_config(args.preset).rm.get("model_overrides", {})))
  cfg, mesh, rules = s.cfg, s.mesh, s.rules
  steps, states = rm_programs(cfg, s.config.rm, mesh, rules) if args.side != "torch" else ({}, {})
  tmodel = TorchScalar(cfg).train()
  topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-4)
  rng = np.random.default_rng(0)
  key = jax.random.key(1)
  rows = []
  for K in [int(k) for k in args.rm_ks.split(",")]:
    ranked = ranked_batch(rng, B, K, T, cfg.vocab_size)
    pairs = pairs_from_ranked(ranked)
    Pn = len(pairs)
    batches = {"per_prompt": train_state.device_batch(ranked.batch(np.arange(B)), mesh, rules),
               "shuffled_pairs": train_state.device_batch(pairs.batch(np.arange(Pn)), mesh, rules)}
    pb = pairs.batch(np.arange(Pn))
    ids = torch.tensor(np.concatenate([pb["chosen"], pb["rejected"]]), dtype=torch.long)
    last = torch.tensor(np.concatenate([pb["chosen_last"], pb["rejected_last"]]), dtype=torch.long)
    am = (torch.arange(T)[None, :] <= last[:, None]).long()

    def jax_fn(f):
      def run():
        with parallel.activate(mesh, rules):
          for _ in range(args.steps):
            states[f], m = steps[f](states[f], batches[f], key)
          jax.block_until_ready(m)
      return run

    def torch_fn():
      for _ in range(args.steps):
        r = tmodel(ids, attention_mask=am).gather(1, last[:, None])[:, 0]
        loss = -F.logsigmoid(r[:Pn] - r[Pn:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)
        topt.step()
        topt.zero_grad(set_to_none=True)

    fns = for_side({"jax_per_prompt": jax_fn("per_prompt"), "jax_per_pair": jax_fn("shuffled_pairs"),
                    "torch_per_pair": torch_fn}, args.side)
    for f in fns.values():
      f()
    before = counter.count
    times = interleaved(fns, args.repeats)
    row = ratio_row(times, B * K * (K - 1) // 2 * args.steps, "comparisons",
                    {"ratio_jax_per_pair_vs_torch": ("jax_per_pair", "torch_per_pair"),
                     "ratio_jax_per_prompt_vs_torch": ("jax_per_prompt", "torch_per_pair")})
    rows.append({"K": K, "comparisons_per_step": Pn, **row, "compiles_after_warmup": counter.count - before})
  return {"preset": args.preset, "model": model_summary(cfg), "prompts": B, "seq_len": T,
          "steps_per_timing": args.steps, "results": rows}


def rm_programs(cfg, rm_config, mesh, rules):
  """Our two RM steps (per prompt, shuffled pairs), each with its own state from the same random init."""
  tx, schedule = train_state.make_optimizer(rm_config, 1000)
  sh = train_state.state_shardings(cfg, tx, mesh, rules, head="scalar")
  host = jax.tree.map(np.asarray, train_state.init_params(cfg, jax.random.key(0), sh["params"], mesh, rules, "scalar"))
  forms = ("per_prompt", "shuffled_pairs")
  steps = {f: reward.make_steps(cfg, f, tx, schedule, sh, mesh, rules)[0] for f in forms}
  states = {f: train_state.new_state(jax.device_put(host, sh["params"]), tx, sh, mesh) for f in forms}
  return steps, states


def part_ppo(args, counter):
  from configs import instructgpt
  pc = instructgpt.get_config(args.preset).ppo
  pc.batch_size, pc.minibatch_size, pc.ptx_coef = args.ppo_batch, args.ppo_minibatch, 0.0
  B, mb, P, N = pc.batch_size, pc.minibatch_size, pc.prompt_len, pc.max_new_tokens
  s = setup(args.preset, dtype=args.dtype, min_len=max(P + N, pc.ptx_seq_len))
  cfg = s.cfg
  # EOS disabled on both sides: a random policy's response lengths would otherwise differ by framework.
  # The stage's own programs (ppo.build); a torch-only child builds none (ptx is off: ppo_data needs no programs).
  st = ppo_setup(s, pc, eos_id=NO_EOS) if args.side != "torch" else None
  batch, ptx, _ = ppo_data(s, pc, np.random.default_rng(0), st and st.programs)
  state = [st and st.state]
  it = [0]

  def jax_iter():
    with parallel.activate(s.mesh, s.rules):
      key = jax.random.fold_in(jax.random.key(0), it[0])
      it[0] += 1
      ro, _, _ = st.rollout(state[0]["params"], state[0]["value"], st.ref, st.rm, batch["prompt"], batch["prompt_mask"],
                         key, state[0]["kl_coef"], state[0]["score_gain"])
      state[0], m = st.update(state[0], ro, ptx, jax.random.fold_in(key, 1))
      jax.block_until_ready(m)

  # ---- torch, TRL-style
  policy, ref = torch_lm(cfg), torch_lm(cfg).eval()
  value, rm = TorchScalar(cfg), TorchScalar(cfg).eval()
  popt = torch.optim.Adam(policy.parameters(), lr=pc.learning_rate)
  vopt = torch.optim.Adam(value.parameters(), lr=pc.value_learning_rate)
  prompt = torch.tensor(np.asarray(batch["prompt"]), dtype=torch.long)
  pmask = torch.tensor(np.asarray(batch["prompt_mask"]), dtype=torch.long)
  T = 1.0 / max(pc.temperature, 1e-6)

  def logp_of(logits, toks):
    return torch.log_softmax(logits.float() * T, -1).gather(-1, toks[..., None])[..., 0]

  def torch_iter():
    with torch.no_grad():
      policy.eval()
      seq = policy.generate(input_ids=prompt, attention_mask=pmask, do_sample=True, top_k=0, top_p=1.0,
                            temperature=pc.temperature, max_new_tokens=N, min_new_tokens=N, eos_token_id=None,
                            pad_token_id=PAD_ID)
      policy.train()
      resp = seq[:, P:]
      am = torch.cat([pmask, torch.ones_like(resp)], 1)
      pos = (am.cumsum(1) - 1).clamp(min=0)
      logp = logp_of(policy(input_ids=seq, attention_mask=am, position_ids=pos).logits[:, P - 1:-1], resp)
      ref_logp = logp_of(ref(input_ids=seq, attention_mask=am, position_ids=pos).logits[:, P - 1:-1], resp)
      values = value(seq, am, pos)[:, P - 1:-1]
      score = rm(seq, am, pos)[:, -1]
      rewards = -pc.kl_coef * (logp - ref_logp)
      rewards[:, -1] += score
      adv = torch.zeros_like(rewards)
      last = torch.zeros(B)
      for t in reversed(range(N)):                   # TRL's GAE loop
        nv = values[:, t + 1] if t < N - 1 else 0.0
        delta = rewards[:, t] + pc.discount * nv - values[:, t]
        last = delta + pc.discount * pc.gae_lambda * last
        adv[:, t] = last
      returns = adv + values
      adv = (adv - adv.mean()) * torch.rsqrt(adv.var() + 1e-8)
    for _ in range(pc.ppo_epochs):
      for idx in torch.randperm(B).reshape(-1, mb):
        new_logp = logp_of(policy(input_ids=seq[idx], attention_mask=am[idx], position_ids=pos[idx]).logits[:, P - 1:-1],
                           resp[idx])
        ratio = torch.exp(new_logp - logp[idx])
        pg = torch.max(-adv[idx] * ratio, -adv[idx] * ratio.clamp(1 - pc.clip, 1 + pc.clip)).mean()
        pg.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), pc.grad_clip)
        popt.step()
        popt.zero_grad(set_to_none=True)
        v = value(seq[idx], am[idx], pos[idx])[:, P - 1:-1]
        vc = values[idx] + (v - values[idx]).clamp(-pc.value_clip, pc.value_clip)
        vl = 0.5 * torch.max((v - returns[idx]) ** 2, (vc - returns[idx]) ** 2).mean()
        vl.backward()
        torch.nn.utils.clip_grad_norm_(value.parameters(), pc.grad_clip)
        vopt.step()
        vopt.zero_grad(set_to_none=True)

  fns = for_side({"jax": jax_iter, "torch": torch_iter}, args.side)
  for name, f in fns.items():
    for _ in range(2 if name == "jax" else 1):   # JAX's second iteration has a donated state to reuse
      f()
  before = counter.count
  times = interleaved(fns, args.repeats)
  row = ratio_row(times, B, "episodes", {"ratio": ("jax", "torch")})
  return {"preset": args.preset, "model": model_summary(cfg), "batch_size": B, "minibatch_size": mb,
          "ppo_epochs": pc.ppo_epochs, "prompt_len": P, "max_new_tokens": N, "ptx": "off on both sides", **row,
          "compiles_after_warmup": counter.count - before}


# ----------------------------------------------------------------------------- --isolate: one process per side

def merge(a, b):
  """Pool two children's outputs: timings concatenated, one-sided keys united, peaks maximised."""
  if isinstance(a, dict) and isinstance(b, dict):
    if "times_s" in a and "times_s" in b:
      ts = a["times_s"] + b["times_s"]
      return timed_entry(ts, a["work"], a["unit"])
    out = dict(a)
    for k, v in b.items():
      if k not in a:
        out[k] = v
      elif k.endswith("_flops_per_s") or k == "compiles_after_warmup":
        out[k] = max(a[k], v)
      else:
        out[k] = merge(a[k], v)
    return out
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    return [merge(x, y) for x, y in zip(a, b)]
  return a


def finish(out):
  """Recompute every ratio of a merged output (rows carry their `ratio_of`; matmul its two peaks)."""
  if isinstance(out, dict):
    for v in out.values():
      finish(v)
    if "ratio_of" in out:
      with_ratios(out)
  elif isinstance(out, list):
    for v in out:
      finish(v)
  return out


def run_isolated(argv: list[str], rounds: int) -> dict:
  """Run this script once per (round, side) in a fresh process and pool the results."""
  pooled = {}
  for r in range(rounds):
    for side in (("jax", "torch") if r % 2 == 0 else ("torch", "jax")):
      cmd = [sys.executable, str(Path(__file__).resolve()), *argv, f"--side={side}", "--no-isolate"]
      p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
      if p.returncode:
        raise RuntimeError(f"compare_torch: the {side} child of round {r} failed (rc {p.returncode}): "
                           f"{' '.join(cmd)}\n{p.stderr[-3000:]}")
      child = json.loads(p.stdout)
      pooled.setdefault(side, []).append(child)
  out = {}
  for side, children in pooled.items():
    merged = children[0]
    for c in children[1:]:
      merged = merge(merged, c)
    out = merge(out, merged) if out else merged
  if "matmul" in out:
    matmul_ratios(out["matmul"])
  return finish(out)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--parts", default="matmul,sft,generate,rm,ppo")
  ap.add_argument("--preset", default="tiny", help="model of the generate/rm/ppo parts")
  ap.add_argument("--sft_shapes", default="tiny,llama8x512", help="common.SHAPES for the SFT part")
  ap.add_argument("--gen_shape", default="tiny")
  ap.add_argument("--gen_batches", default="1,16,64")
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--max_new_tokens", type=int, default=32)
  ap.add_argument("--rm_prompts", type=int, default=8)
  ap.add_argument("--rm_seq_len", type=int, default=64)
  ap.add_argument("--rm_ks", default="4,9")
  ap.add_argument("--ppo_batch", type=int, default=64)
  ap.add_argument("--ppo_minibatch", type=int, default=16)
  # torch's bf16 matmul has no hardware path on CPUs without AVX512-BF16/AMX: ~85 s per 2048^3 here.
  ap.add_argument("--matmul_n", type=int, default=2048)
  ap.add_argument("--steps", type=int, default=3, help="train steps per timing (sft, rm)")
  ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians reported")
  ap.add_argument("--threads", type=int, default=2, help="torch threads (XLA:CPU uses the cores it sees)")
  ap.add_argument("--dtype", default=None, help="compute dtype override on the JAX side (float32/bfloat16)")
  ap.add_argument("--quick", action="store_true", help="small batches, 2 rounds, one process per side")
  ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                  help="time each side in its own process (default); --no-isolate: both in this one, interleaved")
  ap.add_argument("--rounds", type=int, default=2, help="--isolate: processes per side (order alternating)")
  ap.add_argument("--side", default="both", choices=("both", "jax", "torch"), help="contenders timed here")
  args = ap.parse_args()
  if args.quick:
    args.repeats, args.steps, args.matmul_n, args.rounds = 2, 1, 512, 1
    args.sft_shapes, args.gen_batches, args.rm_prompts, args.rm_ks = "tiny", "1,16", 2, "4"
    args.ppo_batch, args.ppo_minibatch = 16, 8
  if args.isolate and args.side == "both":
    argv, skip = [], False   # the children get this command line minus the parent's own flags
    for a in sys.argv[1:]:
      if skip or a.startswith(("--isolate", "--rounds", "--side")):
        skip = not skip and a in ("--rounds", "--side")   # "--rounds 3": drop the value too
        continue
      argv.append(a)
    t0 = time.perf_counter()
    # The children's own "isolated"/"side" keys are overridden: this is the pooled, two-sided result.
    out = {**run_isolated(argv, args.rounds), "benchmark": "compare_torch", "quick": args.quick,
           "repeats": args.repeats, "isolated": True, "rounds": args.rounds, "side": "both"}
    out["wall_s"] = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    out.update(environment())
    print(json.dumps(out, indent=1))
    return
  torch.set_num_threads(args.threads)
  counter = CompileCounter()
  out = {"benchmark": "compare_torch", "quick": args.quick, "repeats": args.repeats, "isolated": False,
         "side": args.side}
  parts = args.parts.split(",")
  t0 = time.perf_counter()
  if "matmul" in parts:
    out["matmul"] = part_matmul(args, counter)
  if "sft" in parts:
    out["sft"] = [part_sft(args, counter, sh) for sh in args.sft_shapes.split(",")]
  if "generate" in parts:
    out["generate"] = part_generate(args, counter)
  if "rm" in parts:
    out["rm"] = part_rm(args, counter)
  if "ppo" in parts:
    out["ppo"] = part_ppo(args, counter)
  out["wall_s"] = time.perf_counter() - t0
  out.update(environment())
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
