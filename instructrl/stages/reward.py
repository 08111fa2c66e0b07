"""The `rm` stage: collect K-way rankings of SFT samples, then train the reward model on them.

Paper, section 3.5 and appendix C.2: labelers rank K = 4..9 responses per prompt; all C(K,2)
comparisons of a prompt are ONE batch element (each response forwarded once), trained for a
single epoch; the RM is the SFT model with the unembedding replaced by a scalar head; after
training a bias makes the labelers' demonstrations score 0 on average.

Reads top to bottom: data -> steps -> the stage (collection, state, loop, bias, members). The parts
it calls: rm_collect.py (sampling and ranking), rm_models.py (which models), rm_probes.py (what the
RM can judge), rm_ensemble.py (the ensemble's members).

Labeler groups: training uses one ranking per prompt, from a training group assigned round-robin;
validation reports accuracy against training-group labelers and against the held-out group
(`world.heldout_group`: the group whose labelers also judge the evaluation, never trained on), and the
labelers' own agreement (the ceiling an RM can reach).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instructrl import objectives, parallel
from instructrl.errors import ConfigError
from instructrl.data import world as world_lib
from instructrl.data.batching import batch_indices, prompt_response_examples
from instructrl.data.packing import rows_needed
from instructrl.data.rankings import load_ranked, pairs_from_ranked, ranked_examples
from instructrl.data.records import load_jsonl
from instructrl.metrics import MetricWriter, logged_final
from instructrl.models.config import ModelConfig
from instructrl.models.transformer import Decoder
from instructrl.stages import costs, loop, microbatch, source
from instructrl.stages.rm_collect import SPARE, collect, earlier_rounds
from instructrl.stages.rm_ensemble import (evaluate_ensemble, load_members, logged_ensemble_size, make_ensemble_eval,
                                           trained_member_dirs)
from instructrl.stages.rm_models import (eos_index, initial_rm_params, packed_rm_scores, rm_model, rm_scores,
                                        row_scores)
from instructrl.stages.rm_probes import (example_scores, family_accuracy, gold_probe_pairs, labeler_agreement,
                                         padded_batches, run_gold_probe, second_labeler)
from instructrl.stages.train_state import (abstract_state, batch_shards, device_batch, guarded_update, make_optimizer,
                                           process_batch, process_packed_batch, state_shardings)
from instructrl.stages.world import load_tokenizer, world_fingerprint


# ----------------------------------------------------------------------------- data


def select(records: list[dict], groups: list[int], per_prompt: int = 1) -> list[dict]:
  """`per_prompt` rankings of each prompt, by different groups: prompt i gets the rankings of groups
  groups[(i + j) % len(groups)] for j < per_prompt. One (the default) is the paper's setting: each
  comparison labelled once; more spends more labels on the same samples (independent noise)."""
  if not 1 <= per_prompt <= len(groups):
    raise ValueError(f"rm.rankings_per_prompt={per_prompt}: expected 1..{len(groups)} (the training groups)")
  ids = sorted({r["id"] for r in records})
  want = {pid: {groups[(i + j) % len(groups)] for j in range(per_prompt)} for i, pid in enumerate(ids)}
  return [r for r in records if r["group"] in want[r["id"]]]


def response_sources(record: dict, default: str = "policy") -> list[str]:
  """Each response's source; records without a `sources` field (a user's own data, older
  collections) are all `default`."""
  return record.get("sources") or [default] * len(record["responses"])


def restrict(records: list[dict], source: str) -> list[dict]:
  """The records cut down to the responses of one source (ranking order kept); < 2 left: dropped.

  Records without a `sources` field (a user's own data, older collections) are all `source`.
  """
  out = []
  for r in records:
    keep = [i for i, s in enumerate(response_sources(r, source)) if s == source]
    if len(keep) < 2:
      continue
    new = {old: j for j, old in enumerate(keep)}
    out.append({**r, "responses": [r["responses"][i] for i in keep],
                "ranking": [new[i] for i in r["ranking"] if i in new], "sources": [source] * len(keep)})
  return out


# ----------------------------------------------------------------------------- steps


def make_steps(model_cfg: ModelConfig, formulation: str, tx, schedule, shardings, mesh, rules,
               policy_pair_weight: float = 1.0, microbatches: int = 1):
  """Jitted (train_step, eval_step). eval_step always uses the per-prompt form (validation is per prompt).

  policy_pair_weight (rm.policy_pair_weight): in training batches that carry `own` ([B, K] bool: the
  response is rm.policy's sample), pairs of two own responses weigh this much, every other pair 1.
  microbatches (rm.microbatches): the train step accumulates the gradient over that many micro-batches
  of prompts (or pairs) (stages/microbatch.py), then makes one update; 1: the whole batch at once."""
  model = Decoder(model_cfg, head="scalar")

  # Each formulation as scores (the model: [B, K] per prompt, or the chosen and rejected rows' [P] each)
  # and a loss of those scores; `total` is what the loss divides by when it is not this batch's own.
  def per_prompt_scores(params, batch, rng):
    if "gather" in batch:   # rm.packing: the responses packed end to end, the same scores
      return packed_rm_scores(model, params, batch, rng)
    B, K, T = batch["tokens"].shape
    return rm_scores(model, params, batch["tokens"].reshape(B * K, T), batch["last_index"].reshape(B * K),
                     rng).reshape(B, K)

  def per_prompt_loss(r_bk, batch, total=None):
    weight = None
    if "own" in batch and policy_pair_weight != 1.0:
      both = batch["own"][:, :, None] & batch["own"][:, None, :]
      weight = jnp.where(both, policy_pair_weight, 1.0)
    return objectives.ranking_loss(r_bk, batch["ranks"], batch["mask"], weight, total)

  def pair_scores(params, batch, rng):
    P = batch["chosen"].shape[0]
    r = rm_scores(model, params, jnp.concatenate([batch["chosen"], batch["rejected"]]),
                  jnp.concatenate([batch["chosen_last"], batch["rejected_last"]]), rng)
    return r[:P], r[P:]

  def pair_loss(r, batch, total=None):
    return objectives.pairwise_loss(r[0], r[1], None, total)

  scores, loss_of = {"per_prompt": (per_prompt_scores, per_prompt_loss),
                     "shuffled_pairs": (pair_scores, pair_loss)}[formulation]
  # What the batch's loss divides by (labels only, not params): prompts with a pair, or pairs (weight 1 each).
  batch_total = {"per_prompt": lambda b: objectives.ranked_prompts(b["ranks"], b["mask"]),
                 "shuffled_pairs": lambda b: jnp.float32(b["chosen"].shape[0])}[formulation]

  def loss_fn(params, batch, rng):
    return loss_of(scores(params, batch, rng), batch)

  def loss_and_grads(params, batch, rng):
    if microbatches == 1:
      return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
    total = batch_total(batch)
    share = lambda p, mb, key: (lambda r: (loss_of(r, mb, total)[0], r))(scores(p, mb, key))
    grads, _, r = microbatch.accumulate(share, params, batch, microbatches, rng, shardings["params"])
    # The metrics (and the loss) of the whole batch's scores: the full batch's, by the same function.
    return loss_of(microbatch.join(r), batch), grads

  def train_step(state, batch, rng):
    with nn.logical_axis_rules(rules):
      rng = jax.random.fold_in(rng, state["step"])
      (loss, metrics), grads = loss_and_grads(state["params"], batch, rng)
      new_state, finite, grad_norm = guarded_update(state, grads, loss, tx)
      return new_state, {**metrics, "grad_norm": grad_norm, "lr": schedule(state["step"]), "finite": finite}

  def eval_step(params, batch):
    with nn.logical_axis_rules(rules):
      return per_prompt_loss(per_prompt_scores(params, batch, None), batch)[1]

  def score_step(params, tokens, last):
    with nn.logical_axis_rules(rules):
      return rm_scores(model, params, tokens, last)

  repl = parallel.replicated(mesh)
  # Every batch array (2-3 dims by formulation) is sharded on its leading 'batch' dim: one prefix sharding.
  rows = parallel.batch_sharding(mesh, rules, 1)
  train = jax.jit(train_step, in_shardings=(shardings, rows, repl), out_shardings=(shardings, repl),
                  donate_argnums=0)
  return (train, jax.jit(eval_step, in_shardings=(shardings["params"], rows), out_shardings=repl),
          jax.jit(score_step, in_shardings=(shardings["params"], rows, rows)))


def evaluate(eval_step, params, examples, batch_size: int, mesh, rules) -> dict:
  """Pooled pairwise accuracy and the per-prompt loss's mean over EVERY prompt of a ranked set (the last
  batch filled with masked rows, rm_probes.padded_batches)."""
  hits = pairs = loss = prompts = 0.0
  for batch in padded_batches(examples, batch_size):
    m = eval_step(params, device_batch(batch, mesh, rules))
    hits += float(m["accuracy"]) * float(m["pairs"])
    pairs += float(m["pairs"])
    loss += float(m["loss"]) * float(m["prompts"])    # the batch's mean over its prompts with a pair
    prompts += float(m["prompts"])
  return {"accuracy": hits / max(pairs, 1.0), "loss": loss / max(prompts, 1.0), "pairs": pairs}


def mean_score(score_step, params, tokens, last, batch_size: int, mesh, rules) -> float:
  """Mean score over every row (not over whole batches only)."""
  return float(np.mean(row_scores(score_step, params, tokens, last, batch_size, mesh, rules)))


# ----------------------------------------------------------------------------- stage


def stage_settings(config, steps: int, heldout_group: int) -> ml_collections.ConfigDict:
  """What the RM stage trains under, recorded in its checkpoints and checked on resume or rerun: the rm block,
  the step count derived from it (paper C.2: a single epoch), and the held-out group. The group is recorded
  under the name it had while it was the rm block's own field, so those checkpoints still resume when it
  equals world.heldout_group and are refused otherwise."""
  out = ml_collections.ConfigDict(config.rm.to_dict())
  out.steps = steps
  out.heldout_group = heldout_group
  return out


def heldout_group_of(config, world=None) -> int:
  """The labeler group the RM never trains on: world.heldout_group, the group whose labelers judge the
  evaluation (one field, so the RM cannot be trained on the eval raters' rankings). Refused: a config that
  still sets rm.heldout_group (config_check refuses it before any work too), and one whose
  world.heldout_group is not the held-out group of the generated `world` (a `--stages=rm` run with the
  field overridden would otherwise hold out a group the evaluation does not use)."""
  if "heldout_group" in config.rm:
    raise ConfigError(f"rm.heldout_group={config.rm.heldout_group!r}: this field was removed; the RM holds out "
                      f"world.heldout_group (the evaluation's labeler group): set world.heldout_group instead")
  group = int(config.world.heldout_group)
  held = sorted({l.group for l in world.labelers if l.heldout}) if world is not None else []
  if held and held != [group]:
    raise ConfigError(f"world.heldout_group={group}, but the generated world holds out group {held[0]} (its "
                      f"evaluators); use the world's value, or a new --workdir to generate a world with this one")
  return group


def run(config, workdir: Path, mesh, rules, progress=None, heldout_group: int | None = None, out: Path | None = None):
  """progress(done, total): called after each step, over every member's steps in turn (main.py: the
  pipeline's bar). heldout_group: the group to hold out instead of the world's (tools/rm_cv.py's folds,
  which measure every group held out in turn and evaluate nothing else). out: where the comparisons, the
  RM's checkpoints and its metrics go (default the workdir; W/round1 for round one, stages/rounds.py)."""
  cfg = config.rm
  workdir = Path(workdir)
  out = Path(out) if out is not None else workdir
  comparisons = collect(config, workdir, mesh, rules, out=out)
  world = world_lib.World.load(workdir / "world")
  tokenizer = load_tokenizer(workdir)
  model_dict = rm_model(config)     # the policy's model, or rm.base_workdir's (a larger RM)
  model_cfg = ModelConfig.from_dict({**model_dict, **cfg.get("model_overrides", {})})
  base = Path(cfg.base_workdir) if cfg.get("base_workdir", "") else None
  if base is not None and world_fingerprint(base) != world_fingerprint(workdir):
    raise ValueError(f"rm.base_workdir={base}: its world ({world_fingerprint(base)}) is not this run's "
                     f"({world_fingerprint(workdir)}); copy {workdir / 'world'} there before training its base model")

  # ------------------------------------------------------------------ data
  groups = sorted({l.group for l in world.labelers})
  if heldout_group is None:
    heldout_group = heldout_group_of(config, world)
  elif "heldout_group" in config.rm:
    heldout_group_of(config)      # the removed field: refused
  if heldout_group not in groups:
    raise ValueError(f"world.heldout_group={heldout_group}: expected one of the labeler groups {groups}")
  # The dev group rates the dev split that every tuning decision reads: never trained on either.
  dev_group = world.cfg.get("dev_group")
  train_groups = [g for g in groups if g not in (heldout_group, dev_group)]
  # Collected by this stage (or an earlier round of it): an empty response is a sample the labelers ranked.
  read = lambda d, split: load_ranked(d / f"{split}.jsonl", allow_empty_response=True)
  train_all, valid_all = read(comparisons, "train"), read(comparisons, "valid")
  for extra in earlier_rounds(config, workdir, out=out):
    train_all, valid_all = train_all + read(extra, "train"), valid_all + read(extra, "valid")
  k_max = max(cfg.k_choices)
  as_examples = lambda recs, what: ranked_examples(tokenizer, recs, cfg.seq_len, k_max, world.format_prompt,
                                                   what=what)
  train_recs = select(train_all, train_groups, cfg.get("rankings_per_prompt", 1))
  train = as_examples(train_recs, "rm train")
  valid_train_groups = select(valid_all, train_groups)
  valid = as_examples(valid_train_groups, "rm valid")
  heldout_recs = [r for r in valid_all if r["group"] == heldout_group]
  valid_heldout = as_examples(heldout_recs, "rm valid (held-out group)")
  # With a source mix, accuracy on comparisons among the policy's own samples is the number that
  # matters for PPO (easy policy-vs-pretrain pairs inflate the pooled one): reported separately.
  policy_only = restrict(valid_train_groups, "policy")
  mixed = len(policy_only) != len(valid_train_groups) or any(
      len(a["responses"]) != len(b["responses"]) for a, b in zip(policy_only, valid_train_groups))
  valid_policy = as_examples(policy_only, "rm valid (policy samples only)") if mixed and policy_only else None
  data = pairs_from_ranked(train) if cfg.formulation == "shuffled_pairs" else train
  if cfg.formulation not in ("per_prompt", "shuffled_pairs"):
    raise ValueError(f"rm.formulation={cfg.formulation!r}: expected 'per_prompt' or 'shuffled_pairs'")
  batch_size = cfg.batch_size if cfg.formulation == "per_prompt" else cfg.pair_batch_size
  stage_cfg = stage_settings(config, max(1, math.ceil(cfg.epochs * len(data) / batch_size)), heldout_group)
  logging.info("rm: %d train prompts (%d comparisons), %d valid; %s, %d steps of %d", len(train),
               len(pairs_from_ranked(train)), len(valid), cfg.formulation, stage_cfg.steps, batch_size)

  # ------------------------------------------------------------------ state: SFT trunk + a new scalar head
  tx, schedule = make_optimizer(stage_cfg, stage_cfg.steps)
  shardings = state_shardings(model_cfg, tx, mesh, rules, head="scalar")

  policy_pair_weight = float(cfg.get("policy_pair_weight", 1.0))
  if not policy_pair_weight > 0 or (policy_pair_weight != 1.0 and cfg.formulation != "per_prompt"):
    raise ValueError(f"rm.policy_pair_weight={policy_pair_weight}: expected > 0, and 1 unless "
                     f"rm.formulation='per_prompt' (got {cfg.formulation!r})")
  train_step, eval_step, score_step = make_steps(model_cfg, cfg.formulation, tx, schedule, shardings, mesh, rules,
                                                 policy_pair_weight, int(cfg.get("microbatches", 1)))
  read_rows = data.batch
  if policy_pair_weight != 1.0:   # which training responses are rm.policy's own samples
    own = np.zeros(train.mask.shape, bool)
    for n, r in enumerate(train.index):
      srcs = response_sources(train_recs[int(r)])
      own[n, :len(srcs)] = [x == "policy" for x in srcs]
    read_rows = lambda idx: {**data.batch(idx), "own": own[idx]}
  seed = config.seed + 6

  def validation(params):
    a = evaluate(eval_step, params, valid, cfg.eval_batch_size, mesh, rules)
    h = evaluate(eval_step, params, valid_heldout, cfg.eval_batch_size, mesh, rules)
    out = {"accuracy": a["accuracy"], "loss": a["loss"], "pairs": a["pairs"],
           "heldout_group/accuracy": h["accuracy"], "heldout_group/loss": h["loss"]}
    if valid_policy is not None and len(valid_policy):
      out["policy_pairs/accuracy"] = evaluate(eval_step, params, valid_policy, cfg.eval_batch_size, mesh,
                                              rules)["accuracy"]
    return out

  # ------------------------------------------------------------------ bias: demonstrations score 0 on average
  demos = load_jsonl(workdir / "world" / "demos_valid.jsonl", "demo")
  demo_ex = prompt_response_examples(tokenizer, [world.format_prompt(r["prompt"]) for r in demos],
                                     [r["response"] for r in demos], cfg.seq_len - 1, what="rm bias demos")
  demo_last = eos_index(demo_ex)

  def normalise(params):
    bias = mean_score(score_step, params, demo_ex.tokens, demo_last, cfg.eval_batch_size, mesh,
                      rules)
    logging.info("rm: demonstrations score %.4f on average; subtracting it", bias)
    return {**params, "score_bias": params["score_bias"] - bias}

  # ------------------------------------------------------------------ the gold probe (final metrics only)
  n_members = int(cfg.get("ensemble_size", 1))
  if n_members < 1:
    raise ValueError(f"rm.ensemble_size={n_members}: expected >= 1 (1: a single RM, the paper's setting)")
  steps_per_member = stage_cfg.steps
  ensemble_due = n_members > 1 and logged_ensemble_size(out, steps_per_member) != n_members
  # Sampled up front, outside the training loop's mesh context (restoring a checkpoint inside it fails),
  # and only when member 0's end-of-stage metrics or the ensemble's are still to be written.
  probe = (gold_probe_pairs(config, workdir, mesh, rules, world, tokenizer)
           if ensemble_due or not logged_final(out, "rm", steps_per_member) else None)

  def gold_probe(score_rows) -> dict:
    out = run_gold_probe(probe, score_rows)
    if out:
      logging.info("rm: gold probe: %s", {k: round(v, 4) for k, v in out.items()})
    return out

  def by_family(params) -> dict:
    # Which families the RM can judge: the pooled accuracy hides an RM that checks one family well and
    # the rest not at all (tiny's RM judged false premises well, little else). Records and examples align
    # through valid.index.
    # With a source mix, the same over the pairs among the policy's own samples: easy policy-vs-pretrain
    # pairs make the pooled rows look better than what PPO meets.
    score = lambda t, l: row_scores(score_step, params, t, l, cfg.eval_batch_size, mesh, rules)
    out = {}
    for what, recs, examples in (("valid", valid_train_groups, valid),
                                 ("valid/policy_pairs", policy_only, valid_policy)):
      if examples is None:
        continue
      fams = family_accuracy(recs, examples, example_scores(score, examples), world)
      logging.info("rm: %s by family (accuracy / utility ceiling / vs gold):\n%s", what, "\n".join(
          f"  {f:14s} {m['accuracy']:.3f} / {m['utility_accuracy']:.3f} / {m['gold_accuracy']:.3f}  "
          f"({m['pairs']} pairs, {m['gold_pairs']} gold-untied)" for f, m in fams.items()))
      out.update({f"{what}/by_family/{f}/{k}": v for f, m in fams.items() for k, v in m.items()})
    return out

  def after_training(params):
    return {**labeler_agreement(valid_all, train_groups, heldout_group, second_labeler(world, config.seed + 409)),
            "demo_mean_score": mean_score(score_step, params, demo_ex.tokens, demo_last,
                                          cfg.eval_batch_size, mesh, rules),
            **{f"valid/{k}": v for k, v in validation(params).items()},
            **by_family(params),
            **gold_probe(lambda t, l: row_scores(score_step, params, t, l, cfg.eval_batch_size, mesh, rules))}

  # ------------------------------------------------------------------ members: W/rm, then the ensemble's others
  def member_order(i):
    return (np.random.default_rng([config.seed, 407, i]).integers(len(data), size=len(data))
            if i > 0 and cfg.get("ensemble_bootstrap", True) else np.arange(len(data)))

  def member_batches(i):   # the examples of each training step of member i
    order = member_order(i)
    return (order[batch_indices(len(data), batch_size, step, seed + 1000 * i)] for step in range(steps_per_member))

  if cfg.get("packing", False):
    # One row count for the whole run (one compiled step): the most any batch of any member packs into.
    shards = batch_shards(batch_size, mesh, rules)
    pack_rows = max(rows_needed(train.last_index[idx], train.mask[idx], cfg.seq_len, shards)
                    for i in range(n_members) for idx in member_batches(i))
    k_rows = batch_size // shards * k_max
    logging.info("rm: packing each batch's responses into %d rows of %d per data shard, not %d (%.0f%% of the "
                 "positions)", pack_rows, cfg.seq_len, k_rows, 100 * pack_rows / k_rows)
    batch_of = lambda idx: process_packed_batch(read_rows, idx, pack_rows, tokenizer.pad_id, mesh, rules)
  else:
    batch_of = lambda idx: process_batch(read_rows, idx, mesh, rules)

  result = None
  for i in range(n_members):
    # Member 0 is the single RM of the paper, unchanged by the ensemble's size (W/rm: PPO's value function
    # starts from it). The others differ in head init and data order, and with rm.ensemble_bootstrap each
    # trains on its own resample (with replacement) of the training prompts: more diversity, the same labels.
    fold = (lambda k: k) if i == 0 else (lambda k, i=i: jax.random.fold_in(k, i))
    order, member_seed = member_order(i), seed + 1000 * i
    where = trained_member_dirs(config, out)[i]
    # The settings a member's checkpoint is checked against: the ensemble's size changes no member, and
    # bootstrapping only the members after the first (so a finished single RM joins a larger ensemble).
    member_cfg = ml_collections.ConfigDict({k: v for k, v in stage_cfg.to_dict().items()
                                            if k != "ensemble_size" and (i > 0 or k != "ensemble_bootstrap")})
    # The members report to the pipeline as one stage: their steps in turn.
    report = None if progress is None else (
        lambda done, total, i=i: progress(i * steps_per_member + done, n_members * steps_per_member))
    stage = loop.Stage(name=where.name, cfg=member_cfg, workdir=where.parent, model_dict=model_dict,
                       world_id=world_fingerprint(workdir), rng=fold(jax.random.key(config.seed + 4)), tx=tx,
                       shardings=shardings, abstract=abstract_state(model_cfg, tx, shardings, head="scalar"),
                       progress=report)

    def initial_params(fold=fold):
      return initial_rm_params(config, workdir, mesh, rules, model_cfg, shardings,
                               fold(jax.random.key(config.seed + 5)))

    params = loop.run(
        stage, mesh, rules, initial_params=initial_params, train_step=train_step,
        batch_at=lambda step, order=order, member_seed=member_seed: batch_of(
            order[batch_indices(len(data), batch_size, step, member_seed)]),
        evaluate=validation, finalize=normalise, after_training=after_training if i == 0 else None,
        items_per_step=batch_size, item_name="prompts" if cfg.formulation == "per_prompt" else "pairs",
        extra_meta={"seed": member_seed, "formulation": cfg.formulation, "heldout_group": heldout_group,
                    "member": i})
    result = params if i == 0 else result
  if ensemble_due:
    members = load_members(config, workdir, mesh, rules, rm_root=out)
    ens_eval = make_ensemble_eval(model_cfg, mesh, rules)
    summary = {"size": n_members}
    for what, examples in (("valid", valid), ("valid/heldout_group", valid_heldout), ("valid/policy_pairs", valid_policy)):
      if examples is not None and len(examples):
        summary[f"{what}/accuracy"] = evaluate_ensemble(ens_eval, members, examples, cfg.eval_batch_size, mesh,
                                                        rules)
    # The ensemble's mean score (PPO's reward with ppo.rm_uncertainty_coef = 0) on the same probe pairs.
    summary.update(gold_probe(lambda t, l: np.mean(
        [row_scores(score_step, p, t, l, cfg.eval_batch_size, mesh, rules) for p in members], axis=0)))
    logging.info("rm: ensemble of %d: %s", n_members, summary)
    writer = MetricWriter(out, "rm", resume_step=steps_per_member)
    writer.write(steps_per_member, summary, prefix="final/ensemble/")
    writer.close()
  return result


# ----------------------------------------------------------------------------- the pipeline's ETA

def steps(config) -> int:
  """The training loop's step count as `run` derives it, from the config alone: the world's RM prompts cut
  to rm.n_prompts, less the validation share, for rm.epochs; the ensemble's members in turn. Each set of
  rm.extra_comparisons counts as one more of this size (exact for round one of the same run)."""
  rm = config.rm
  if source.kind(config) == "files":   # the policy's RM and the judge RM, each rm.steps or ~ n_prompts / 2
    return 2 * (int(rm.steps) if rm.get("steps", 0) else max(1, math.ceil(rm.epochs * rm.n_prompts / 2 / rm.batch_size)))
  n = min(rm.n_prompts, config.world.n_rm_prompts)
  train = (n - int(round(rm.valid_fraction * n))) * comparison_sets(config)
  per = rm.batch_size if rm.formulation == "per_prompt" else rm.pair_batch_size
  if rm.formulation != "per_prompt":   # shuffled pairs: every comparison of every prompt, C(K, 2) of them
    k = sum(rm.k_choices) / len(rm.k_choices)
    train = train * k * (k - 1) / 2
  return max(1, math.ceil(rm.epochs * train / per)) * int(rm.get("ensemble_size", 1))


def cost(config) -> tuple[float, float, float]:
  """(before, during, after the loop) in token passes (stages/costs.py): the comparisons' samples (each
  source its share of the K responses plus SPARE spares per prompt), then every member's training."""
  rm = config.rm
  k = sum(rm.k_choices) / len(rm.k_choices)
  if source.kind(config) == "files":   # nothing sampled: the two RMs' training on the files' rankings
    return 0.0, costs.TRAIN_COST * steps(config) * rm.batch_size * k * rm.seq_len, 0.0
  sources = sum(1 for w in dict(rm.get("source_mix", {"policy": 1.0})).values() if w > 0)
  sampling = rm.n_prompts * (k + SPARE * sources) * rm.max_new_tokens * costs.SAMPLE_COST
  members = int(rm.get("ensemble_size", 1))
  train = rm.n_prompts * comparison_sets(config) * (1 - rm.valid_fraction)
  return sampling, costs.TRAIN_COST * members * rm.epochs * train * k * rm.seq_len, 0.0


def comparison_sets(config) -> int:
  """The comparison sets the RM trains on: its own and those of rm.extra_comparisons (earlier rounds)."""
  return 1 + sum(1 for p in str(config.rm.get("extra_comparisons", "")).split(",") if p.strip())
