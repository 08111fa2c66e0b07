"""The `ppo` stage: PPO-ptx on the bandit environment (paper section 3.5, appendix C.4).

A prompt comes, the policy answers, the RM scores the whole answer, the episode ends. Every token
also gets -beta * (log pi_RL - log pi_SFT); the value function starts from the RM; PPO-ptx adds
gamma * E_pretrain[log pi_RL(x)] to every minibatch's objective (ptx_coef = 0 is plain PPO).

Reads top to bottom: config -> rollout -> update -> state -> loop. One iteration is two jitted
programs, no host round-trip inside either: `rollout` (sample, re-score with policy, reference,
value and RM, rewards, GAE, whitening) and `update` (a lax.scan over epochs x minibatches of
guarded policy and value updates, each with its own pretraining minibatch; the EMA after each update
or once after the scan, ppo.ema_every). All four models live in the one SPMD program on
one mesh. Over 450 lines because those programs, `build` (the one place they are jitted, shared with
tools/plan.py) and the stage that runs them read best in one file; the step count and cost for the
pipeline's ETA close it.

Defaults where the paper is silent (lm-human-preferences / Stiennon et al. 2020): GAE lambda 0.95,
discount 1, clip 0.2 for policy and value, whitened advantages, no entropy bonus, the "k1" KL
estimator (log pi_RL - log pi_SFT of the sampled token).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from instructrl import checkpoints, distributed, measures, objectives, parallel
from instructrl.data.batching import batch_indices, left_pad_prompts, pack_texts
from instructrl.data.records import load_jsonl
from instructrl.models.config import ModelConfig
from instructrl.models.sampling import process_logits, sample
from instructrl.models.transformer import Decoder, left_pad_positions
from instructrl.stages import costs, loop, microbatch, rm_ensemble, rm_models, select
from instructrl.stages.train_state import abstract_state, guarded_update, process_batch, state_shardings
from instructrl.stages.source import open_source
from instructrl.stages.world import world_fingerprint

ScoreFn = Callable  # (seq_bs, last_index_b, response_bt, response_mask_bt) -> score_b


# ----------------------------------------------------------------------------- optimizers

def make_optimizer(lr: float, warmup_updates: int, grad_clip: float, b1: float, b2: float):
  """Constant lr after a linear warm-up from a tenth of the peak (paper C.4: 10 iterations)."""
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.1 * lr, lr, max(warmup_updates, 1)), optax.constant_schedule(lr)],
      [max(warmup_updates, 1)])
  return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(schedule, b1=b1, b2=b2)), schedule


# ----------------------------------------------------------------------------- rollout

def response_view(model_cfg, params, head, seq_bs, positions_bs, kv_mask_bs, P):
  """Run a model over prompt + response; return its per-response-token outputs [B, N, ...].

  Token t of the response sits at P + t and is predicted from position P + t - 1, so the
  policy's logits (and the value of the state before emitting t) come from P - 1 .. S - 2.
  """
  out, _ = Decoder(model_cfg, head=head).apply({"params": params}, seq_bs, positions_bs, kv_mask_bs=kv_mask_bs)
  return out[:, P - 1:-1]


def make_rollout(model_cfg: ModelConfig, cfg, eos_id: int, pad_id: int, score_fn: ScoreFn | None = None,
                 rm_cfg: ModelConfig | None = None):
  """rollout(policy, value, ref, rm, prompt_bp, prompt_mask_bp, rng, kl_coef, score_gain) -> (batch, metrics).

  rm: a tuple of the RM ensemble's params (one entry: the paper's single RM); the score is their mean
  minus ppo.rm_uncertainty_coef times their std. rm_cfg: the RM's and the value function's model when it
  is not the policy's (rm.base_workdir)."""
  rm_cfg = rm_cfg or model_cfg
  logp_of = lambda logits, toks: jnp.take_along_axis(
      process_logits(logits, cfg.temperature), toks[..., None], axis=-1)[..., 0]

  def rollout(policy, value, ref, rm, prompt_bp, prompt_mask_bp, rng, kl_coef, score_gain=1.0):
    B, P = prompt_bp.shape
    s = sample(policy, prompt_bp, prompt_mask_bp, rng, cfg=model_cfg, max_new_tokens=cfg.max_new_tokens,
               temperature=cfg.temperature, eos_id=eos_id, pad_id=pad_id)
    seq = jnp.concatenate([prompt_bp, s.tokens], axis=1)
    kv_mask = jnp.concatenate([prompt_mask_bp.astype(bool), s.mask], axis=1)
    positions = left_pad_positions(jnp.concatenate([prompt_mask_bp, jnp.ones_like(s.mask)], axis=1))
    view = lambda m, **kw: response_view(m, seq_bs=seq, positions_bs=positions, kv_mask_bs=kv_mask, P=P, **kw)
    # Re-scored with a full forward, exactly as the update will: the PPO ratio starts at 1.
    logp = logp_of(view(model_cfg, params=policy, head="lm"), s.tokens)
    ref_logp = logp_of(view(model_cfg, params=ref, head="lm"), s.tokens)   # same temperature: a KL that is >= 0
    values = view(rm_cfg, params=value, head="scalar")
    ended = jnp.any(s.tokens == eos_id, axis=1)
    # The RM reads every row at an EOS, the only place it was trained to score (a truncated row: the EOS
    # the labelers' data would have had, one position past the cap).
    r_seq, r_positions, r_kv_mask, last = eos_terminated(seq, positions, kv_mask, P - 1 + s.lengths, ended,
                                                         eos_id, pad_id)
    if score_fn is None:   # rm: the ensemble's members (one for the paper's single RM)
      at_last = lambda params: jnp.take_along_axis(Decoder(rm_cfg, head="scalar").apply(
          {"params": params}, r_seq, r_positions, kv_mask_bs=r_kv_mask)[0], last[:, None], axis=1)[:, 0]
      score, disagreement = objectives.ensemble_score(jnp.stack([at_last(p) for p in rm]), cfg.rm_uncertainty_coef)
    else:
      score, disagreement = score_fn(r_seq, last, s.tokens, s.mask), jnp.zeros((B,))
    raw = score
    # score_gain: 1 / the RM scores' std on the initial policy's samples (ppo.normalize_score).
    score = score_gain * score + jnp.where(ended, 0.0, cfg.missing_eos_penalty)
    rewards, kl = objectives.kl_penalty_rewards(logp, ref_logp, score, s.mask, kl_coef)
    adv, returns = objectives.gae(rewards, values, s.mask, cfg.discount, cfg.gae_lambda)
    if cfg.whiten_advantages:
      adv = objectives.whiten(adv, s.mask)
    batch = {"seq": seq, "positions": positions, "kv_mask": kv_mask, "mask": s.mask, "old_logp": logp,
             "old_values": values, "advantages": adv, "returns": returns, "score": raw}
    metrics = {"objective/score": raw.mean(), "objective/score_std": raw.std(),
               "objective/rm_ensemble_std": disagreement.mean(),
               "objective/score_normalized": score.mean(), "objective/kl": kl.sum(1).mean(),
               "objective/kl_coef": kl_coef, "objective/reward": rewards.sum(1).mean(),
               "objective/response_length": s.lengths.mean(), "objective/eos_fraction": ended.mean()}
    return batch, metrics, s.tokens

  return rollout


def eos_terminated(seq_bs, positions_bs, kv_mask_bs, last_b, ended_b, eos_id: int, pad_id: int):
  """The rollout's sequences as the RM scores them: one column wider, holding an EOS right after the last
  token of each row that reached ppo.max_new_tokens without one (a pad, masked out, elsewhere).

  The RM was trained only on EOS-terminated responses, its score read at the EOS (rm_models.eos_index);
  text answers are re-encoded with an EOS before scoring (batching.prompt_response_examples), and this is
  the same for token rollouts. Returns (seq, positions, kv_mask, last): last is the EOS's index in every
  row. The causal RM's reading at a row's own EOS never sees the extra column.
  """
  missing = ~ended_b
  seq = jnp.concatenate([seq_bs, jnp.where(missing, eos_id, pad_id)[:, None].astype(seq_bs.dtype)], axis=1)
  positions = jnp.concatenate([positions_bs, positions_bs[:, -1:] + 1], axis=1)
  kv_mask = jnp.concatenate([kv_mask_bs, missing[:, None]], axis=1)
  return seq, positions, kv_mask, last_b + missing.astype(last_b.dtype)


def gold_score_fn(world, tokenizer, records: list[dict], prompts_np: np.ndarray, prompt_mask_np: np.ndarray) -> ScoreFn:
  """ppo.reward = "gold": the gold judge's score of each sampled response, through a host callback.

  A row's record is found from its (unpadded) prompt tokens; the response is decoded up to its EOS.
  An oracle for diagnostics: PPO on it shows what the RL settings reach with a perfect RM."""
  by_prompt = {tuple(t[m].tolist()): r for t, m, r in zip(prompts_np, prompt_mask_np.astype(bool), records)}
  P = prompts_np.shape[1]
  pad, eos = tokenizer.pad_id, tokenizer.eos_id

  def host(seq, tokens, mask):
    out = []
    for s, t, m in zip(np.asarray(seq), np.asarray(tokens), np.asarray(mask)):
      p = s[:P]
      rec = by_prompt.get(tuple(p[p != pad].tolist()))
      if rec is None:
        raise ValueError("ppo.reward=gold: a rollout prompt is not one of prompts_ppo.jsonl's")
      out.append(world.judge(rec, tokenizer.decode([int(x) for x, k in zip(t, m) if k and x != eos])).score)
    return np.asarray(out, np.float32)

  def score_fn(seq, last, tokens, mask):
    return jax.pure_callback(host, jax.ShapeDtypeStruct((seq.shape[0],), jnp.float32), seq, tokens, mask)

  return score_fn


# ----------------------------------------------------------------------------- update

def make_update(model_cfg: ModelConfig, cfg, policy_tx, value_tx, P: int, value_cfg: ModelConfig | None = None,
                grad_shardings=None):
  """update(state, batch, ptx_mbs, rng) -> (state, metrics): epochs x minibatches in one lax.scan.

  value_cfg: the value function's model when it is not the policy's (an RM from rm.base_workdir).
  grad_shardings: (policy params', value params') shardings, kept on the micro-batches' gradient sums.
  ppo.microbatches: each minibatch's policy and value gradients (episodes and ptx rows split alike) are
  accumulated over that many micro-batches (stages/microbatch.py) before its update; 1: in one pass."""
  value_cfg = value_cfg or model_cfg
  n_micro = int(cfg.get("microbatches", 1))

  def policy_forward(params, mb):
    """The sampled tokens' log-probs and the per-token entropy [B, N], both of softmax(logits / T): the
    distribution sampled from (the ratio's log-probs are at T too)."""
    logits = response_view(model_cfg, params, "lm", mb["seq"], mb["positions"], mb["kv_mask"], P)
    logp = jnp.take_along_axis(process_logits(logits, cfg.temperature), mb["seq"][:, P:, None], axis=-1)[..., 0]
    return logp, objectives.token_entropy(logits, cfg.temperature)

  def ptx_sums(params, ptx):
    if not ptx_enabled(cfg):
      return jnp.float32(0.0), jnp.float32(0.0)
    ptx_logits, _ = Decoder(model_cfg, head="lm").apply({"params": params}, ptx["inputs"])
    return objectives.ptx_loss(ptx_logits, ptx["targets"], ptx["mask"])

  def policy_objective(logp, ent, mb, nll_sum, ptx_count, tokens=None):
    """(loss, metrics) of the policy's outputs; tokens and ptx_count: the counts the two means divide by."""
    pg, m = objectives.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], cfg.clip, tokens)
    m = {**m, "entropy": objectives.mean_entropy(ent, mb["mask"])}
    ptx_nll = nll_sum / jnp.maximum(ptx_count, 1.0) if ptx_enabled(cfg) else jnp.float32(0.0)
    # Paper C.4: PPO and pretraining gradients accumulated, the latter times gamma — the gradient
    # of this sum, by linearity.
    return pg + cfg.ptx_coef * ptx_nll, {**m, "pg_loss": pg, "ptx_loss": ptx_nll}

  def policy_loss(params, mb, ptx):
    logp, ent = policy_forward(params, mb)
    return policy_objective(logp, ent, mb, *ptx_sums(params, ptx))

  def value_forward(params, mb):
    return response_view(value_cfg, params, "scalar", mb["seq"], mb["positions"], mb["kv_mask"], P)

  def value_objective(values, mb, tokens=None):
    return objectives.value_loss(values, mb["old_values"], mb["returns"], mb["mask"], cfg.value_clip, tokens)

  def value_loss(params, mb):
    return value_objective(value_forward(params, mb), mb)

  def losses_and_grads(policy, value, mb, ptx):
    """((policy loss, metrics), policy grads, (value loss, metrics), value grads) of one minibatch."""
    if n_micro == 1:
      (ploss, pm), pgrads = jax.value_and_grad(policy_loss, has_aux=True)(policy, mb, ptx)
      (vloss, vm), vgrads = jax.value_and_grad(value_loss, has_aux=True)(value, mb)
      return (ploss, pm), pgrads, (vloss, vm), vgrads
    # Every mean divides by the minibatch's count (tokens, ptx tokens: labels, not params), so the
    # micro-batches' shares add up to the minibatch's losses and gradients. Policy and value share a pass:
    # the sum's gradient is each model's own (neither loss reads the other's params).
    tokens = jnp.sum(mb["mask"].astype(jnp.float32))
    ptx_count = jnp.sum(ptx["mask"].astype(jnp.float32)) if ptx_enabled(cfg) else jnp.float32(0.0)

    def share(params, micro, key):
      (p, v), (m, x) = params, micro
      logp, ent = policy_forward(p, m)
      nll_sum, _ = ptx_sums(p, x)
      values = value_forward(v, m)
      ploss = policy_objective(logp, ent, m, nll_sum, ptx_count, tokens)[0]
      return ploss + value_objective(values, m, tokens)[0], (logp, ent, values, nll_sum)

    # Without ptx the update still receives a one-row stand-in per minibatch (ppo.run): nothing to split.
    (pgrads, vgrads), _, (logp, ent, values, nll_sums) = microbatch.accumulate(
        share, (policy, value), (mb, ptx if ptx_enabled(cfg) else None), n_micro, shardings=grad_shardings)
    # The minibatch's losses and metrics from the micro-batches' outputs, by the same functions.
    logp, ent, values = microbatch.join((logp, ent, values))
    return (policy_objective(logp, ent, mb, jnp.sum(nll_sums), ptx_count), pgrads,
            value_objective(values, mb), vgrads)

  ema_every = cfg.get("ema_every", "iteration")
  if ema_every not in ("update", "iteration"):
    raise ValueError(f"ppo.ema_every={ema_every!r}: expected 'update' or 'iteration'")

  def update(state, batch, ptx_mbs, rng):
    B = batch["seq"].shape[0]
    n_mb = B // cfg.minibatch_size
    n_ptx = jax.tree.leaves(ptx_mbs)[0].shape[0]
    if n_ptx != cfg.ppo_epochs * n_mb:
      raise ValueError(f"ppo update: {n_ptx} pretraining minibatches, expected one per optimizer update: "
                       f"ppo.ppo_epochs x minibatches = {cfg.ppo_epochs} x {n_mb} (ptx_indices)")
    perms = jnp.concatenate([jax.random.permutation(jax.random.fold_in(rng, e), B) for e in range(cfg.ppo_epochs)])
    order = perms.reshape(cfg.ppo_epochs * n_mb, cfg.minibatch_size)

    def one(carry, xs):
      idx, ptx = xs
      mb = jax.tree.map(lambda x: x[idx], batch)
      pol = {"step": carry["step"], "params": carry["params"], "opt_state": carry["opt_state"]}
      (ploss, pm), pgrads, (vloss, vm), vgrads = losses_and_grads(carry["params"], carry["value"], mb, ptx)
      pol, pfinite, pnorm = guarded_update(pol, pgrads, ploss, policy_tx)
      val = {"step": carry["step"], "params": carry["value"], "opt_state": carry["value_opt"]}
      val, vfinite, vnorm = guarded_update(val, vgrads, vloss, value_tx)
      carry = {**carry, "params": pol["params"], "opt_state": pol["opt_state"], "value": val["params"],
               "value_opt": val["opt_state"]}
      if ema_every == "update":
        carry["ema"] = objectives.ema_update(carry["ema"], carry["params"], cfg.ema_decay)
      m = {**{f"ppo/policy/{k}": v for k, v in pm.items()}, **{f"ppo/val/{k}": v for k, v in vm.items()},
           "ppo/policy/grad_norm": pnorm, "ppo/val/grad_norm": vnorm, "finite": pfinite & vfinite}
      return carry, m

    # Each update its own pretraining minibatch, every epoch fresh ones (ptx_indices): the paper mixes
    # new pretraining gradients into every PPO step.
    state, ms = jax.lax.scan(one, state, (order, ptx_mbs))
    metrics = {k: (jnp.all(v) if k == "finite" else v.mean()) for k, v in ms.items()}
    # Paper C.4: an EMA of the policy weights (decay 0.992), the model that is evaluated; here once per
    # iteration (ppo.ema_every = "iteration"), else after every update inside the scan.
    if ema_every == "iteration":
      state = {**state, "ema": objectives.ema_update(state["ema"], state["params"], cfg.ema_decay)}
    state = {**state, "step": state["step"] + metrics["finite"].astype(jnp.int32)}
    return state, metrics

  return update


# ----------------------------------------------------------------------------- programs

def ptx_enabled(block) -> bool:
  """Whether PPO adds the pretraining term (PPO-ptx); ptx_coef 0 is the paper's plain PPO.

  block: the ppo config block, or a PPO stage's checkpoint meta (which records its ptx_coef)."""
  return float(block.get("ptx_coef", 0.0)) > 0


def ptx_minibatches(cfg) -> int:
  """Pretraining minibatches one iteration's update takes: one per optimizer update, epochs x minibatches."""
  return cfg.ppo_epochs * (cfg.batch_size // cfg.minibatch_size)


def ptx_indices(n_windows: int, cfg, step: int, seed: int) -> np.ndarray:
  """[ptx_minibatches, ptx_batch_size] pretraining windows of iteration `step`: consecutive draws of the
  seeded epoch permutations (batching.batch_indices), so no window repeats within an iteration (while the
  corpus has enough) and a resumed run draws the same ones. With ppo_epochs 1 these are the windows the
  single-epoch update always took."""
  rows = ptx_minibatches(cfg)
  return batch_indices(n_windows, rows * cfg.ptx_batch_size, step, seed).reshape(rows, cfg.ptx_batch_size)


def without_ptx(config):
  """The `ppo_noptx` stage's config: the paper's "PPO" beside PPO-ptx, the same with the pretraining mix off."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.ppo.ptx_coef = 0.0
  return config


def stage_config(config, stage: str):
  """The config a PPO stage trains under: `ppo` the config as given, `ppo_noptx` without_ptx(config)."""
  return without_ptx(config) if stage == "ppo_noptx" else config


def rm_members(config) -> int:
  """How many RMs score the rollouts: the RM stage's ensemble, then ppo.rm_runs' (rm_ensemble.member_dirs)."""
  return int(config.rm.get("ensemble_size", 1)) + len(rm_ensemble.rm_run_names(config))


@dataclasses.dataclass
class Programs:
  """PPO's two jitted programs and the state they run on, as `build` makes them for one mesh."""
  model_cfg: ModelConfig        # the policy's (and the reference's) model
  rm_cfg: ModelConfig           # the RM's and the value function's (a larger model with rm.base_workdir)
  policy_tx: optax.GradientTransformation
  value_tx: optax.GradientTransformation
  policy_schedule: Callable     # the policy's lr at an update count
  updates_per_iter: int         # optimizer updates per iteration: epochs x minibatches
  shardings: dict               # of the state: policy, value, both optimizer states, EMA, kl_coef, score_gain
  abstract: dict                # that state as jax.ShapeDtypeStruct carrying the shardings
  ptx_sharding: object          # of the pretraining batch [minibatches, rows, L] with ptx on
  n_rm: int                     # RM ensemble members the rollout takes (0 with a score_fn)
  rollout: Callable             # rollout(policy, value, ref, rm members, prompt, prompt_mask, rng, kl_coef, score_gain)
  update: Callable              # update(state, batch, ptx, rng) -> (state, metrics); the state donated


def build(config, mesh, rules, *, eos_id: int, pad_id: int, rm_model: dict | None = None,
          n_rm: int | None = None, score_fn: ScoreFn | None = None) -> Programs:
  """PPO's rollout and update jitted for `mesh`, with the state's shardings and abstract shapes.

  The one place they are made: the stage, tools/plan.py and the benchmarks all run these programs.
  rm_model: the RM's model fields (default rm_models.rm_model(config): the policy's, or rm.base_workdir's);
  n_rm: RM ensemble members (default rm_members(config)); with score_fn (ppo.reward=gold) no RM scores.
  """
  cfg = config.ppo
  model_cfg = ModelConfig.from_dict(config.model)
  rm_cfg = ModelConfig.from_dict(rm_models.rm_model(config) if rm_model is None else rm_model)
  updates_per_iter = cfg.ppo_epochs * (cfg.batch_size // cfg.minibatch_size)
  policy_tx, policy_sched = make_optimizer(cfg.learning_rate, cfg.warmup_iterations * updates_per_iter,
                                           cfg.grad_clip, cfg.b1, cfg.b2)
  value_tx, _ = make_optimizer(cfg.value_learning_rate, cfg.warmup_iterations * updates_per_iter,
                               cfg.grad_clip, cfg.b1, cfg.b2)
  pol_sh = state_shardings(model_cfg, policy_tx, mesh, rules, "lm")
  val_sh = state_shardings(rm_cfg, value_tx, mesh, rules, "scalar")
  repl = parallel.replicated(mesh)
  shardings = {"step": repl, "params": pol_sh["params"], "opt_state": pol_sh["opt_state"],
               "value": val_sh["params"], "value_opt": val_sh["opt_state"], "ema": pol_sh["params"],
               "kl_coef": repl, "score_gain": repl}
  pol_abs = abstract_state(model_cfg, policy_tx, pol_sh, "lm")
  val_abs = abstract_state(rm_cfg, value_tx, val_sh, "scalar")
  abstract = {"step": pol_abs["step"], "params": pol_abs["params"], "opt_state": pol_abs["opt_state"],
              "value": val_abs["params"], "value_opt": val_abs["opt_state"], "ema": pol_abs["params"],
              "kl_coef": jax.ShapeDtypeStruct((), jnp.float32, sharding=repl),
              "score_gain": jax.ShapeDtypeStruct((), jnp.float32, sharding=repl)}

  ptx_sharding = parallel.stacked_batch_sharding(mesh, rules)
  axes = ptx_sharding.spec[1] if len(ptx_sharding.spec) > 1 else None
  n_shards = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))
  if ptx_enabled(cfg) and cfg.ptx_batch_size % n_shards:
    raise ValueError(f"ppo.ptx_batch_size={cfg.ptx_batch_size} must be divisible by the {n_shards} batch shards "
                     f"of mesh {dict(mesh.shape)}")

  if score_fn is None and cfg.prompt_len + cfg.max_new_tokens + 1 > rm_cfg.max_len:
    raise ValueError(f"ppo.prompt_len + ppo.max_new_tokens + 1 = {cfg.prompt_len + cfg.max_new_tokens + 1} exceeds "
                     f"the RM's max_len={rm_cfg.max_len}: the RM scores a truncated response with an EOS after it")
  rows = parallel.batch_sharding(mesh, rules)
  n_rm = 0 if score_fn is not None else rm_members(config) if n_rm is None else n_rm
  members = (val_sh["params"],) * n_rm if score_fn is None else None
  rollout = jax.jit(make_rollout(model_cfg, cfg, eos_id, pad_id, score_fn, rm_cfg),
                    in_shardings=(pol_sh["params"], val_sh["params"], pol_sh["params"], members, rows, rows, repl,
                                  repl, repl))
  update = jax.jit(make_update(model_cfg, cfg, policy_tx, value_tx, cfg.prompt_len, rm_cfg,
                               (pol_sh["params"], val_sh["params"])),
                   out_shardings=(shardings, repl), donate_argnums=0)
  return Programs(model_cfg=model_cfg, rm_cfg=rm_cfg, policy_tx=policy_tx, value_tx=value_tx,
                  policy_schedule=policy_sched, updates_per_iter=updates_per_iter, shardings=shardings,
                  abstract=abstract, ptx_sharding=ptx_sharding, n_rm=n_rm, rollout=rollout, update=update)


# ----------------------------------------------------------------------------- stage

def run(config, workdir: Path, mesh, rules, score_fn: ScoreFn | None = None, name: str = "ppo", progress=None,
        out: Path | None = None):
  """Train and save under out/<name> (the `ppo_noptx` stage is this with ptx_coef 0); progress(done,
  total) after each iteration (main.py: the pipeline's bar). out: where the RM is read from (out/rm) and the
  stage written, default the workdir (W/round1 for round one, stages/rounds.py); the policy stages and the
  data are always the workdir's."""
  cfg = config.ppo
  workdir = Path(workdir)
  out = Path(out) if out is not None else workdir
  src = open_source(config, workdir)   # the task world, or public files (stages/source.py)
  world_dir, tokenizer, world = src.dir, src.tokenizer, src.world
  model_dict = ModelConfig.from_dict(config.model).to_dict()
  rm_dict = rm_models.trained_rm_model(config, out)   # the RM's and the value's model (larger: rm.base_workdir)
  world_id = world_fingerprint(workdir)

  # ------------------------------------------------------------------ data: prompts and pretraining windows
  records = load_jsonl(world_dir / "prompts_ppo.jsonl", "eval")[:cfg.n_prompts]
  prompts, prompt_mask, keep = left_pad_prompts(tokenizer, [src.format_prompt(r["prompt"]) for r in records],
                                                cfg.prompt_len)
  records = [records[i] for i in keep]
  reward_source = cfg.get("reward", "rm")
  if reward_source not in ("rm", "gold"):
    raise ValueError(f"ppo.reward={reward_source!r}: expected 'rm' (the trained reward model) or 'gold' (the "
                     f"task world's gold judge, an oracle for diagnostics)")
  if reward_source == "gold" and not src.has_gold:
    raise ValueError("ppo.reward=gold needs the task world's gold judge; public data has none (data.source=files)")
  if reward_source == "gold" and score_fn is None:
    if jax.process_count() > 1:
      raise ValueError("ppo.reward=gold scores on the host of a single process; run it without multi-host")
    score_fn = gold_score_fn(world, tokenizer, records, prompts, prompt_mask)
  ptx = pack_texts(tokenizer.encode_batch([r["text"] for r in load_jsonl(world_dir / "corpus_train.jsonl", "text")]),
                   cfg.ptx_seq_len, tokenizer)
  stage_cfg = ml_collections.ConfigDict(cfg.to_dict())
  stage_cfg.steps = steps(config)
  logging.info("ppo: %d prompts, %d iterations of %d episodes (minibatch %d, %d epoch(s)), ptx_coef %g",
               len(records), stage_cfg.steps, cfg.batch_size, cfg.minibatch_size, cfg.ppo_epochs, cfg.ptx_coef)

  # ------------------------------------------------------------------ programs and state
  # The RM ensemble (its first member: out/rm).
  rm = rm_ensemble.load_members(config, workdir, mesh, rules, rm_root=out) if score_fn is None else None
  programs = build(config, mesh, rules, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, rm_model=rm_dict,
                   n_rm=len(rm) if rm is not None else 0, score_fn=score_fn)
  rollout, update, shardings, abstract = programs.rollout, programs.update, programs.shardings, programs.abstract
  policy_tx, value_tx, policy_sched = programs.policy_tx, programs.value_tx, programs.policy_schedule
  updates_per_iter = programs.updates_per_iter
  repl = parallel.replicated(mesh)
  load = lambda stage, abs_params, step=None: checkpoints.load_params(
      (out if stage == "rm" else workdir) / stage, abs_params, rm_dict if stage == "rm" else model_dict, world_id,
      step=step)[0]
  init_step = None   # the policy stage's final step, or the SFT candidate the RM scores best (paper C.1)
  if cfg.select_sft_by_rm and cfg.policy_init == "sft" and score_fn is None:
    init_step = select.select_sft(config, workdir, mesh, rules, abstract["params"], abstract["value"], rm_root=out)
  ref = load(cfg.policy_init, abstract["params"], init_step)     # frozen: the KL anchor (paper: the SFT model)
  stage_cfg.rm_ensemble_size = len(rm) if rm is not None else 0     # checked on resume/skip with the ppo block
  if cfg.rm_uncertainty_coef and (rm is None or len(rm) < 2):
    raise ValueError(f"ppo.rm_uncertainty_coef={cfg.rm_uncertainty_coef} needs an RM ensemble "
                     f"(rm.ensemble_size >= 2 or ppo.rm_runs): one RM has no disagreement to penalise")

  def initial_state():
    policy = load(cfg.policy_init, abstract["params"], init_step)
    value = load("rm", abstract["value"])                          # paper C.4: value function from the RM
    gain = score_gain(policy, value) if cfg.normalize_score else 1.0
    # The value head predicts normalised returns from the start: the RM's head times the gain.
    value = {**value, "score": value["score"] * gain, "score_bias": value["score_bias"] * gain}
    with jax.set_mesh(mesh):
      popt = jax.jit(policy_tx.init, out_shardings=shardings["opt_state"])(policy)
      vopt = jax.jit(value_tx.init, out_shardings=shardings["value_opt"])(value)
    return {"step": jax.device_put(jnp.int32(0), repl), "params": policy, "opt_state": popt, "value": value,
            "value_opt": vopt, "ema": jax.tree.map(jnp.copy, policy),
            "kl_coef": jax.device_put(jnp.float32(cfg.kl_coef), repl),
            "score_gain": jax.device_put(jnp.float32(gain), repl)}

  def score_gain(policy, value) -> float:
    """lm-human-preferences' reward normalisation: RM scores of the initial policy's samples get std 1.

    Measured once on ppo.normalize_batches rollouts (their own key, no KL), then fixed and
    checkpointed, so a resumed run uses the same gain.
    """
    key = jax.random.key(config.seed + 9)
    stds = [float(rollout(policy, value, ref, rm, *[batch_at(i)[k] for k in ("prompt", "prompt_mask")],
                          jax.random.fold_in(key, i), jnp.float32(0.0), jnp.float32(1.0))[1]["objective/score_std"])
            for i in range(cfg.normalize_batches)]
    gain = 1.0 / max(float(np.mean(stds)), 1e-6)
    logging.info("ppo: RM score std on the initial policy %.4g: score gain %.4g", float(np.mean(stds)), gain)
    return gain

  # ------------------------------------------------------------------ steps
  seed = config.seed + 7
  judge = None if world is not None else rm_models.RMScorer(config, workdir, "rm_judge", tokenizer, mesh, rules)
  gold_key = "objective/gold_score" if world is not None else "objective/judge_score"

  def iteration(state, batch, rng):
    key = jax.random.fold_in(rng, state["step"])
    t0 = time.perf_counter()
    ro, ro_metrics, tokens = rollout(state["params"], state["value"], ref, rm, batch["prompt"],
                                     batch["prompt_mask"], key, state["kl_coef"], state["score_gain"])
    jax.block_until_ready(ro)
    t1 = time.perf_counter()
    lr = policy_sched(state["step"] * updates_per_iter)       # of this iteration's first update (as lm/rm log it)
    state, metrics = update(state, ro, batch["ptx"], jax.random.fold_in(key, 1))
    if cfg.adaptive_kl:
      state = {**state, "kl_coef": objectives.adaptive_kl_coef(state["kl_coef"], ro_metrics["objective/kl"],
                                                               cfg.target_kl, cfg.kl_horizon, cfg.batch_size)}
    jax.block_until_ready(metrics)
    t2 = time.perf_counter()
    texts = [tokenizer.decode(t) for t in distributed.to_host(tokens)]
    # The reference judge of the samples, never trained on: the world's gold judge, or the judge RM that
    # stands in for it on public data (the over-optimisation curve: RM score up, this down).
    gold = ([world.judge(records[i], a).score for i, a in zip(batch["index"], texts)] if world is not None else
            judge.score([records[i]["prompt"] for i in batch["index"]], texts))
    if cfg.sample_every and int(state["step"]) % cfg.sample_every == 0:
      # A few samples in the log: reward hacking shows here long before the gold curve is plotted.
      raw = distributed.to_host(ro["score"])
      for j in range(min(2, len(texts))):
        logging.info("ppo: sample (iteration %d) RM %.4f gold %.2f | %r -> %r", int(state["step"]), raw[j], gold[j],
                     records[batch["index"][j]]["prompt"], texts[j])
    return state, {**metrics, **ro_metrics, gold_key: float(np.mean(gold)),
                   "ppo/policy/lr": lr,
                   "time/rollout_s": t1 - t0, "time/update_s": t2 - t1}

  def batch_at(step):
    idx = batch_indices(len(records), cfg.batch_size, step, seed)
    p_idx = ptx_indices(len(ptx), cfg, step, seed + 1)
    ptx_b = {k: v.reshape(*p_idx.shape, -1) for k, v in ptx.batch(p_idx.reshape(-1)).items()}
    out = process_batch(lambda i: {"prompt": prompts[i], "prompt_mask": prompt_mask[i]}, idx, mesh, rules)
    if ptx_enabled(cfg):
      # Sharded like the episodes (each minibatch's rows over 'batch'), not replicated: at paper
      # scale the 8x-larger pretraining batch is most of the PPO update's activation memory.
      out["ptx"] = {k: jax.make_array_from_callback(v.shape, programs.ptx_sharding, lambda index, v=v: v[index])
                    for k, v in ptx_b.items()}
    else:
      out["ptx"] = jax.tree.map(lambda x: x[:, :1], ptx_b)
    out["index"] = idx
    return out

  # ------------------------------------------------------------------ end-of-stage eval (the EMA policy)
  def after_training(ema_params):
    eval_records = load_jsonl(world_dir / "prompts_dev.jsonl", "eval")[:config.eval.n_prompts]   # monitoring: dev
    out = measures.gold_eval(ema_params, programs.model_cfg, tokenizer, world, eval_records,
                               rng=jax.random.key(config.seed + 102), eval_cfg=config.eval)
    logging.info("ppo: gold %.3f (acceptable %.1f%%, correct %.1f%%)", out["gold_score"],
                 100 * out["acceptable_rate"], 100 * out["correct_rate"])
    return out

  stage = loop.Stage(name=name, cfg=stage_cfg, workdir=out, model_dict=model_dict, world_id=world_id,
                     rng=jax.random.key(seed), tx=policy_tx, shardings=shardings, abstract=abstract,
                     settings_section="ppo", progress=progress)
  return loop.run(stage, mesh, rules, initial_state=initial_state, train_step=iteration, batch_at=batch_at,
                  after_training=after_training if config.eval.n_prompts and src.has_gold else None,
                  items_per_step=cfg.batch_size, item_name="episodes", result="ema",
                  extra_meta={"ptx_coef": cfg.ptx_coef, "kl_coef": cfg.kl_coef, "policy_init_step": init_step,
                              "reward": reward_source, "rm_ensemble_size": len(rm) if rm is not None else 0})


# ----------------------------------------------------------------------------- the pipeline's ETA

def steps(config) -> int:
  """The training loop's step count: iterations of ppo.batch_size episodes (ppo and ppo_noptx alike)."""
  return max(1, int(config.ppo.total_episodes) // int(config.ppo.batch_size))


def cost(config, stage: str = "ppo") -> tuple[float, float, float]:
  """(before, during, after the loop) in token passes (stages/costs.py): the score normalisation's samples;
  per iteration the rollout, the forwards of policy, reference, value and every RM, the policy and value
  updates, and with ptx (stage "ppo" only) a pretraining batch per minibatch; the EMA policy's judged samples."""
  p = config.ppo
  seq = p.prompt_len + p.max_new_tokens
  per_iter = (p.batch_size * p.max_new_tokens * costs.SAMPLE_COST              # rollout
              + (3.0 + rm_members(config)) * p.batch_size * seq                 # policy, ref, value, RMs
              + 2 * costs.TRAIN_COST * p.ppo_epochs * p.batch_size * seq)      # policy and value updates
  if ptx_enabled(stage_config(config, stage).ppo):
    per_iter += costs.TRAIN_COST * p.ppo_epochs * (p.batch_size // p.minibatch_size) * p.ptx_batch_size * p.ptx_seq_len
  normalize = p.normalize_batches * p.batch_size * p.max_new_tokens * costs.SAMPLE_COST if p.normalize_score else 0.0
  return normalize, per_iter * steps(config), costs.gold_eval(config, 1)
