"""The `rm` stage: collect K-way rankings of SFT samples, then train the reward model on them.

Paper, section 3.5 and appendix C.2: labelers rank K = 4..9 responses per prompt; all C(K,2)
comparisons of a prompt are ONE batch element (each response forwarded once), trained for a
single epoch; the RM is the SFT model with the unembedding replaced by a scalar head; after
training a bias makes the labelers' demonstrations score 0 on average.

Reads top to bottom: collection -> data -> state -> steps -> loop -> bias.

Labeler groups: rankings come from every group for every prompt (ranking is cheap; sampling is
shared), so one collection serves every fold of the labeler-group cross-validation. Training
uses one ranking per prompt, from a training group assigned round-robin; validation reports
accuracy against training-group labelers and against `rm.heldout_group`, and the labelers' own
agreement (the ceiling an RM can reach).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from instructrl import checkpoints, distributed, measures, objectives, parallel, progress
from instructrl.data import world as world_lib
from instructrl.data.batching import batch_indices, prompt_response_examples
from instructrl.data.rankings import load_ranked, pairs_from_ranked, ranked_examples
from instructrl.data.records import load_jsonl, write_jsonl
from instructrl.metrics import MetricWriter, logged_final, read_metrics
from instructrl.models.config import ModelConfig
from instructrl.models.transformer import Decoder
from instructrl.stages import loop
from instructrl.stages.train_state import (abstract_state, device_batch, guarded_update, init_params, make_optimizer,
                                           process_batch, state_shardings)
from instructrl.stages.world import load_tokenizer, world_fingerprint

COMPARISONS = "comparisons"


# ----------------------------------------------------------------------------- collection

def load_policy(config, workdir: Path, mesh, rules, stage: str = "sft", directory: Path | None = None,
                entry: str = "params", model: dict | None = None):
  """A finished LM stage's params (directory: another run's stage, checked against this run's world;
  model: its model fields when they are not config.model's)."""
  model_cfg = ModelConfig.from_dict(model or config.model)
  tx, _ = make_optimizer(config.sft, 1)
  abstract = abstract_state(model_cfg, tx, state_shardings(model_cfg, tx, mesh, rules))
  params, _ = checkpoints.load_params(directory or Path(workdir) / stage, abstract["params"], model_cfg.to_dict(),
                                      world_fingerprint(workdir), entry=entry)
  return params


def _finished_model(where: Path) -> dict | None:
  """The model fields a finished stage was trained with, or None if it has not finished."""
  ckpt = checkpoints.StageCheckpoints(where)
  try:
    meta = ckpt.meta() if ckpt.latest_step() is not None else None
  finally:
    ckpt.close()
  if not meta or not meta.get("complete"):
    return None
  return ModelConfig.from_dict(meta["model"]).to_dict()


def rm_model(config) -> dict:
  """The model fields the RM stage trains: the policy's (config.model), or with rm.base_workdir set,
  those of the model the RM starts from there — an RM larger than the policy, as the paper's 6B RM for
  its 1.3B-175B policies."""
  base = config.rm.get("base_workdir", "")
  if not base:
    return ModelConfig.from_dict(config.model).to_dict()
  where = Path(base) / config.rm.policy
  model = _finished_model(where)
  if model is None:
    raise FileNotFoundError(
        f"rm.base_workdir={base}: no finished {config.rm.policy!r} stage at {where}. Train the RM's base model there "
        f"on this run's world first: copy W/world to {base}/world, then `python -m instructrl.main "
        f"--config=... --config.model.d_model=... --workdir={base} --stages=pretrain,{config.rm.policy}`")
  return model


def trained_rm_model(config, workdir: Path) -> dict:
  """The model fields of the RM in workdir/rm (PPO's value function has them too): read from its
  checkpoint, so the stages after the RM need neither rm.base_workdir nor the base run any more.
  Before the RM has finished, what the RM stage would train."""
  return _finished_model(Path(workdir) / "rm") or rm_model(config)


def initial_rm_params(config, workdir: Path, mesh, rules, model_cfg: ModelConfig, shardings, key):
  """The RM before training: a fresh scalar head on the trunk of a finished LM stage, rm.init_stage
  ("" = rm.policy, the paper's SFT init; "pretrain": the pretrained GPT's), of this run or of
  rm.base_workdir's run. The LM's unembedding is dropped."""
  cfg = config.rm
  base = Path(cfg.base_workdir) if cfg.get("base_workdir", "") else None
  trunk = cfg.get("init_stage", "") or cfg.policy
  rm = init_params(model_cfg, key, shardings["params"], mesh, rules, head="scalar")
  lm = load_policy(config, workdir, mesh, rules, trunk, model=rm_model(config),
                   directory=base / trunk if base is not None else None)
  return {k: lm[k] if k in lm else v for k, v in rm.items()}


SOURCES = ("policy", "pretrain", "pretrain_few_shot", "ppo", "mismatched")
SPARE = 2   # extra samples per prompt and source, for the duplicates and empty answers dropped before ranking


def mismatched_prompts(prompts: list[str], pool: list[dict], key, same_family: float = 0.5) -> list[str]:
  """For each prompt, another prompt of `pool` to answer instead: with probability `same_family` one of
  the same task family (a hard negative: "3" to a four-word count), else any other (an easy one: a
  colour to "which is larger"). Deterministic in `key`; never the prompt itself (pool has >= 2 prompts)."""
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
  family = {r["prompt"]: r["family"] for r in pool}
  by_family = {}
  for r in pool:
    by_family.setdefault(r["family"], []).append(r["prompt"])
  every = [r["prompt"] for r in pool]
  if len(set(every)) < 2:
    raise ValueError(f"rm.source_mix.mismatched needs at least 2 distinct RM prompts to swap; got {len(set(every))}")
  out = []
  for p in prompts:
    same = by_family.get(family.get(p), [])
    cands = same if rng.random() < same_family and len(set(same)) > 1 else every
    q = p
    while q == p:
      q = cands[int(rng.integers(len(cands)))]
    out.append(q)
  return out


def _source_sampler(config, params, world, tokenizer, model_cfg, source: str, pool: list[dict] | None = None):
  """texts(prompts, key) -> one sampled answer per prompt, from one of the SOURCES.

  policy: rm.policy (SFT) at rm.sample_temperature; pretrain: the pretrained model on the bare
  prompt, and pretrain_few_shot: with a few-shot prefix, both at eval.baseline_temperature (the
  paper's comparisons also rank outputs of several models, its GPT-3 baselines included); ppo: an
  earlier PPO policy (rm.ppo_source, its EMA) at rm.sample_temperature — the paper's later
  comparisons ranked its RL policies' samples, which is how an RM learns to score what PPO writes;
  mismatched: rm.policy's answer (at rm.sample_temperature) to ANOTHER prompt of `pool`
  (`mismatched_prompts`), ranked against this prompt's answers — not in the paper: negatives that make
  the RM check that an answer answers its prompt, the check PPO's drift exploits (docs/STATUS.md, session 7).
  """
  cfg = config.rm
  few_shot = source == "pretrain_few_shot"
  prefix = world.few_shot_prefix(np.random.default_rng(config.seed), k=config.eval.few_shot) if few_shot else ""
  temperature = cfg.sample_temperature if source in ("policy", "ppo", "mismatched") else config.eval.baseline_temperature

  def texts(prompts: list[str], key) -> list[str]:
    if source == "mismatched":
      prompts = mismatched_prompts(prompts, pool, jax.random.fold_in(key, 7))
    full = [prefix + f"Q: {p}\nA:" for p in prompts] if few_shot else [world.format_prompt(p) for p in prompts]
    out = measures.generate(params, model_cfg, tokenizer, full, rng=key, batch_size=len(full),
                              prompt_len=cfg.prompt_len + (config.eval.prefix_len if few_shot else 0),
                              max_new_tokens=cfg.max_new_tokens, temperature=temperature)
    if any(o is None for o in out):
      raise ValueError(f"rm.prompt_len={cfg.prompt_len} is too short for some prompts_rm.jsonl prompts")
    return [o.split("\n")[0] if few_shot else o for o in out]

  return texts


def collect(config, workdir: Path, mesh, rules) -> Path:
  """Sample K responses per RM prompt and have every labeler group rank them.

  Responses come from rm.source_mix (default: the SFT policy only); each of a prompt's K slots
  draws its source by those weights, and the record's `sources` field says which. Writes
  workdir/comparisons/{train,valid}.jsonl in the `ranked` schema (one line per prompt and labeler
  group) and a COMPLETE marker. Policy: duplicate samples are dropped before ranking (a labeler cannot
  rank a response against itself), empty ones too unless rm.keep_empty; a prompt left with < 2 is skipped.
  """
  cfg = config.rm
  out = Path(workdir) / COMPARISONS
  wanted = collection_key(config)
  if (out / "COMPLETE").exists():
    have = json.loads((out / "COMPLETE").read_text()).get("key")   # absent in sets collected before the check
    if have is not None:
      # keep_empty came later: sets collected before it dropped empty samples
      have = {"keep_empty": False, **have, "source_mix": _used_sources(have.get("source_mix", {}))}
    if have is not None and have != wanted:
      diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
      raise ValueError(f"{out} was collected with different settings ({', '.join(diff)}: "
                       f"{ {k: have.get(k) for k in diff} } there, { {k: wanted.get(k) for k in diff} } asked); "
                       f"use a new --workdir or delete {out} and the rm stage")
    return out
  world_dir = Path(workdir) / "world"
  world = world_lib.World.load(world_dir)
  tokenizer = load_tokenizer(workdir)
  model_cfg = ModelConfig.from_dict(config.model)
  mix = {s: float(cfg.source_mix[s]) for s in SOURCES if float(cfg.source_mix.get(s, 0.0)) > 0}
  unknown = sorted(set(cfg.source_mix) - set(SOURCES))
  if unknown or not mix:
    raise ValueError(f"rm.source_mix={dict(cfg.source_mix)}: expected positive weights on some of {SOURCES}")
  names, weights = list(mix), np.array(list(mix.values())) / sum(mix.values())
  stage_of = lambda s: {"policy": cfg.policy, "mismatched": cfg.policy, "ppo": "ppo_source"}.get(s, "pretrain")
  if "ppo" in names and not cfg.ppo_source:
    raise ValueError("rm.source_mix.ppo > 0 needs rm.ppo_source: the directory of a finished ppo stage of an "
                     "earlier run on the same world (e.g. runs/round1/ppo)")
  params = {st: load_policy(config, workdir, mesh, rules, directory=Path(cfg.ppo_source), entry="ema")
            if st == "ppo_source" else load_policy(config, workdir, mesh, rules, st)
            for st in {stage_of(s) for s in names}}   # each model loaded once
  records = load_jsonl(world_dir / "prompts_rm.jsonl", "eval")[:cfg.n_prompts]
  samplers = {s: _source_sampler(config, params[stage_of(s)], world, tokenizer, model_cfg, s, records) for s in names}
  rng = np.random.default_rng([config.seed, 404])
  n_valid = int(round(cfg.valid_fraction * len(records)))
  groups = sorted({l.group for l in world.labelers})
  by_group = {g: [l.id for l in world.labelers if l.group == g] for g in groups}
  P = cfg.collect_batch_prompts
  # Each prompt gets exactly its draws of a source plus SPARE extra samples (duplicates and empty
  # answers are dropped), sampled in calls of a fixed row count (static shapes: one compile per
  # source) sized for the expected need; an unlucky chunk just takes one more call.
  mean_k = float(np.mean(cfg.k_choices))
  rows_per_call = {s: P * (math.ceil(mean_k * w) + SPARE) for s, w in zip(names, weights)}
  rows = {"train": [], "valid": []}
  skipped = 0
  key = jax.random.key(config.seed + 405)
  with parallel.activate(mesh, rules):
    for start in tqdm(range(0, len(records), P), desc="rm: sampling", unit="batch",
                      disable=jax.process_index() != 0):
      chunk = records[start:start + P]
      plans = [[names[int(j)] for j in rng.choice(len(names), size=int(rng.choice(cfg.k_choices)), p=weights)]
               for _ in chunk]                                       # K, then each slot's source
      pools = [{s: [] for s in names} for _ in chunk]
      for j, s in enumerate(names):
        want = [(i, rec["prompt"]) for i, (rec, plan) in enumerate(zip(chunk, plans)) if s in plan
                for _ in range(plan.count(s) + SPARE)]
        R = rows_per_call[s]
        for c in range(0, len(want), R):
          part = want[c:c + R]
          texts = samplers[s]([p for _, p in part] + [part[0][1]] * (R - len(part)),
                              jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, start), j), c))
          for (i, _), t in zip(part, texts):
            pools[i][s].append(t.strip())
      for i, rec in enumerate(chunk):
        responses, sources = pick_responses(plans[i], pools[i], cfg.get("keep_empty", False))
        if len(responses) < 2:
          skipped += 1
          continue
        split = "valid" if start + i < n_valid else "train"
        for g in groups:
          labeler = by_group[g][int(rng.integers(len(by_group[g])))]
          rows[split].append({"prompt": rec["prompt"], "responses": responses,
                              "ranking": [int(x) for x in world.rank(rec, responses, labeler, rng)],
                              "labeler": labeler, "group": int(g), "family": rec["family"], "params": rec["params"],
                              "id": rec["id"], "sources": sources})
  if skipped:
    logging.warning("rm: skipped %d prompts with fewer than 2 distinct non-empty samples", skipped)
  for split, recs in rows.items():
    write_jsonl(out / f"{split}.jsonl", recs)
  (out / "COMPLETE").write_text(json.dumps({"prompts": len(records), "skipped": skipped, "key": wanted}) + "\n")
  return out


def earlier_rounds(config, workdir: Path) -> list[Path]:
  """rm.extra_comparisons as checked paths: complete comparison sets collected on this run's world."""
  out = []
  for part in (p.strip() for p in str(config.rm.get("extra_comparisons", "")).split(",")):
    if not part:
      continue
    d = Path(part)
    if not (d / "COMPLETE").exists():
      raise FileNotFoundError(f"rm.extra_comparisons: {d} is not a finished comparisons set (no {d / 'COMPLETE'}); "
                              f"expected the `comparisons` dir of an earlier run's rm stage")
    if d.resolve() == (Path(workdir) / COMPARISONS).resolve():
      raise ValueError(f"rm.extra_comparisons: {d} is this run's own comparisons set")
    if world_fingerprint(d.parent) != world_fingerprint(workdir):
      raise ValueError(f"rm.extra_comparisons: {d} was collected on world {world_fingerprint(d.parent)}, "
                       f"not this run's {world_fingerprint(workdir)}")
    out.append(d)
  return out


def _used_sources(mix: dict) -> dict:
  """The sources a collection drew from: zero weights do not change what is sampled (nor do sources added
  to the code after a set was collected)."""
  return {k: v for k, v in mix.items() if float(v) > 0}


def pick_responses(plan: list[str], pools: dict, keep_empty: bool) -> tuple[list[str], list[str]]:
  """A prompt's ranked responses: for each slot of `plan` (its source), the next sample of that source's pool
  that is not already among them (a response cannot be ranked against itself); empty samples only with
  keep_empty. Returns (responses, sources); a slot whose pool runs out is left out."""
  left = {s: iter(pool) for s, pool in pools.items()}
  responses, sources = [], []
  for s in plan:
    t = next((t for t in left[s] if (t or keep_empty) and t not in responses), None)
    if t is not None:
      responses.append(t)
      sources.append(s)
  return responses, sources


def collection_key(config) -> dict:
  """The settings that decide what collect() writes: a finished set is reused only if they match."""
  cfg = config.rm
  keys = ("n_prompts", "valid_fraction", "k_choices", "sample_temperature", "prompt_len", "max_new_tokens",
          "collect_batch_prompts", "policy", "ppo_source", "keep_empty")
  return json.loads(json.dumps({**{k: cfg[k] for k in keys}, "source_mix": _used_sources(cfg.source_mix.to_dict()),
                                "seed": config.seed, "baseline_temperature": config.eval.baseline_temperature,
                                "few_shot": config.eval.few_shot, "prefix_len": config.eval.prefix_len}))


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


def pairwise_agreement(a: list[dict], b: list[dict]) -> float:
  """How often two rankings of the same responses order a pair the same way (the labelers' ceiling)."""
  agree = total = 0
  for ra, rb in zip(a, b):
    pa, pb = {(w, l) for w, l in objectives.ranked_to_pairs(ra["ranking"])}, objectives.ranked_to_pairs(rb["ranking"])
    agree += sum((w, l) in pa for w, l in pb)
    total += len(pb)
  return agree / max(total, 1)


# ----------------------------------------------------------------------------- steps

def rm_scores(model, params, tokens_nt, last_n, rng=None):
  """Scalar reward of each sequence, read at its last real token (the EOS)."""
  scores_nt, _ = model.apply({"params": params}, tokens_nt, deterministic=rng is None,
                             rngs=None if rng is None else {"dropout": rng})
  return jnp.take_along_axis(scores_nt, last_n[:, None], axis=1)[:, 0]


def make_steps(model_cfg: ModelConfig, formulation: str, tx, schedule, shardings, mesh, rules,
               policy_pair_weight: float = 1.0):
  """Jitted (train_step, eval_step). eval_step always uses the per-prompt form (validation is per prompt).

  policy_pair_weight (rm.policy_pair_weight): in training batches that carry `own` ([B, K] bool: the
  response is rm.policy's sample), pairs of two own responses weigh this much, every other pair 1."""
  model = Decoder(model_cfg, head="scalar")

  def per_prompt(params, batch, rng):
    B, K, T = batch["tokens"].shape
    r_bk = rm_scores(model, params, batch["tokens"].reshape(B * K, T), batch["last_index"].reshape(B * K),
                     rng).reshape(B, K)
    weight = None
    if "own" in batch and policy_pair_weight != 1.0:
      both = batch["own"][:, :, None] & batch["own"][:, None, :]
      weight = jnp.where(both, policy_pair_weight, 1.0)
    return objectives.ranking_loss(r_bk, batch["ranks"], batch["mask"], weight)

  def shuffled_pairs(params, batch, rng):
    P = batch["chosen"].shape[0]
    r = rm_scores(model, params, jnp.concatenate([batch["chosen"], batch["rejected"]]),
                  jnp.concatenate([batch["chosen_last"], batch["rejected_last"]]), rng)
    return objectives.pairwise_loss(r[:P], r[P:])

  loss_fn = {"per_prompt": per_prompt, "shuffled_pairs": shuffled_pairs}[formulation]

  def train_step(state, batch, rng):
    with nn.logical_axis_rules(rules):
      rng = jax.random.fold_in(rng, state["step"])
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, rng)
      new_state, finite, grad_norm = guarded_update(state, grads, loss, tx)
      return new_state, {**metrics, "grad_norm": grad_norm, "lr": schedule(state["step"]), "finite": finite}

  def eval_step(params, batch):
    with nn.logical_axis_rules(rules):
      return per_prompt(params, batch, None)[1]

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
  """Pooled pairwise accuracy and mean loss over whole batches of a ranked set."""
  hits = pairs = loss = 0.0
  n = len(examples) // batch_size
  if n == 0:
    raise ValueError(f"{len(examples)} validation prompts: fewer than one batch of rm.eval_batch_size={batch_size}")
  for b in range(n):
    m = eval_step(params, device_batch(examples.batch(np.arange(b * batch_size, (b + 1) * batch_size)), mesh, rules))
    hits += float(m["accuracy"]) * float(m["pairs"])
    pairs += float(m["pairs"])
    loss += float(m["loss"])
  return {"accuracy": hits / max(pairs, 1.0), "loss": loss / max(n, 1), "pairs": pairs}


def row_scores(score_step, params, tokens, last, batch_size: int, mesh, rules) -> np.ndarray:
  """The score of EVERY row: the last batch is filled up with copies of row 0 (static shape), dropped after."""
  n, fill = len(tokens), -len(tokens) % batch_size
  tokens = np.concatenate([tokens, np.repeat(tokens[:1], fill, axis=0)])
  last = np.concatenate([last, np.repeat(last[:1], fill, axis=0)])
  out = []
  for b in range(len(tokens) // batch_size):
    sl = slice(b * batch_size, (b + 1) * batch_size)
    out.append(distributed.to_host(score_step(params, *device_batch({"t": tokens[sl], "l": last[sl]}, mesh, rules).values())))
  return np.concatenate(out)[:n].astype(np.float64)


def mean_score(score_step, params, tokens, last, batch_size: int, mesh, rules) -> float:
  """Mean score over every row (not over whole batches only)."""
  return float(np.mean(row_scores(score_step, params, tokens, last, batch_size, mesh, rules)))


def _order(better, worse) -> float:
  return 1.0 if better > worse else 0.5 if better == worse else 0.0


def family_accuracy(records: list[dict], examples, scores_nk, world) -> dict:
  """Per task family, over ranked validation records (examples = ranked_examples(records)):
  - accuracy: how often the RM orders a ranked pair as the labeler did;
  - utility_accuracy: how often the labeler's own noise-free utility (gold + group taste) does: the
    accuracy of an RM that knew each group's taste exactly (labels are Plackett-Luce draws, so it is
    below 1 and above the labelers' mutual agreement);
  - gold_accuracy: over the pairs gold does not tie, how often the RM orders them as the gold judge does
    (can the RM check this family's answers?);
  plus the pair counts. Families in sorted order; "all" pools them. A tie in score or utility counts half
  (a coin's expected accuracy: a labeler whose utilities tie orders that pair at random), so the utility
  row is the exact expected accuracy of the Bayes-optimal pairwise predictor."""
  ranks, mask, scores = np.asarray(examples.ranks), np.asarray(examples.mask), np.asarray(scores_nk)
  tally = {}
  for n, r in enumerate(np.asarray(examples.index)):
    rec = records[int(r)]
    k = int(mask[n].sum())
    util = [world.utility(rec, x, rec["labeler"]) for x in rec["responses"][:k]]
    gold = [world.judge(rec, x).score for x in rec["responses"][:k]]
    t = tally.setdefault(rec["family"], np.zeros(5))
    for i in range(k):
      for j in range(i + 1, k):
        a, b = (i, j) if ranks[n, i] < ranks[n, j] else (j, i)     # a: the labeler's choice
        t += [1, _order(scores[n, a], scores[n, b]), _order(util[a], util[b]), gold[i] != gold[j],
              _order(*(scores[n, [i, j]] if gold[i] > gold[j] else scores[n, [j, i]])) if gold[i] != gold[j] else 0]
  tally = dict(sorted(tally.items()))
  if tally:
    tally["all"] = np.sum(list(tally.values()), axis=0)
  return {fam: {"pairs": int(t[0]), "accuracy": t[1] / max(t[0], 1), "utility_accuracy": t[2] / max(t[0], 1),
                "gold_pairs": int(t[3]), "gold_accuracy": t[4] / t[3] if t[3] else float("nan")}
          for fam, t in tally.items()}


def example_scores(score_rows, examples) -> np.ndarray:
  """[N, K_max] RM scores of a RankedExamples' real responses (padded slots: nan), one pass over them."""
  mask = np.asarray(examples.mask)
  out = np.full(mask.shape, np.nan)
  if mask.any():
    out[mask] = score_rows(np.asarray(examples.tokens)[mask], np.asarray(examples.last_index)[mask])
  return out


# ----------------------------------------------------------------------------- the gold probe

def gold_agreement(rm_greedy, rm_sampled, gold_greedy, gold_sampled) -> dict:
  """How the RM orders the pairs PPO has to learn to tell apart: each prompt's greedy answer and a sample
  at PPO's temperature, from the policy PPO starts from (the headroom above SFT is mostly sharpening,
  docs/STATUS.md session 4). Over the pairs the gold judge does not tie:
  - agreement: how often the RM prefers the answer gold prefers (an RM tie counts as a miss);
  - score_gap: what sharpening earns, mean RM(greedy) - mean RM(sampled) in units of the sampled answers'
    score std, i.e. in PPO's normalised reward units (ppo.normalize_score) before the KL cost;
  plus the pair count and the two answer sets' mean gold scores (all prompts)."""
  rm_g, rm_s, g_g, g_s = (np.asarray(x, np.float64) for x in (rm_greedy, rm_sampled, gold_greedy, gold_sampled))
  differs = g_g != g_s
  hits = np.sign(rm_g - rm_s)[differs] == np.sign(g_g - g_s)[differs]
  return {"agreement": float(hits.mean()) if differs.any() else float("nan"), "pairs": int(differs.sum()),
          "score_gap": float((rm_g.mean() - rm_s.mean()) / max(float(rm_s.std()), 1e-9)),
          "gold_greedy": float(g_g.mean()), "gold_sampled": float(g_s.mean())}


def gold_probe_pairs(config, workdir: Path, mesh, rules, world, tokenizer) -> dict | None:
  """The probe's answer pairs on RM validation prompts (never trained on): rm.policy greedy and at
  ppo.temperature, tokenised for the RM; None with rm.gold_probe_prompts = 0 or no pair that fits."""
  cfg = config.rm
  n = int(cfg.get("gold_probe_prompts", 0))
  if n <= 0:
    return None
  if _finished_model(Path(workdir) / cfg.policy) is None:   # an RM from rm.base_workdir before this run's policy
    logging.warning("rm: no finished %s stage in %s: no gold probe", cfg.policy, workdir)
    return None
  records = load_jsonl(Path(workdir) / "world" / "prompts_rm.jsonl", "eval")[:cfg.n_prompts]
  records = records[:int(round(cfg.valid_fraction * len(records)))][:n]    # collect(): the validation prompts
  model_cfg = ModelConfig.from_dict(config.model)
  policy = load_policy(config, workdir, mesh, rules, cfg.policy)
  with parallel.activate(mesh, rules):
    greedy, sampled = (measures.answer(policy, model_cfg, tokenizer, world, records, rng=jax.random.key(config.seed + 408),
                                         eval_cfg=config.eval, temperature=t) for t in (0.0, config.ppo.temperature))
  prompts = [world.format_prompt(r["prompt"]) for r in records]
  fits = lambda i, a: a is not None and len(tokenizer.encode(prompts[i])) + len(tokenizer.encode(a)) + 2 <= cfg.seq_len
  keep = [i for i in range(len(records)) if fits(i, greedy[i]) and fits(i, sampled[i])]
  if not keep:
    return None
  out = {}
  for name, answers in (("greedy", greedy), ("sampled", sampled)):
    ex = prompt_response_examples(tokenizer, [prompts[i] for i in keep], [answers[i] for i in keep], cfg.seq_len - 1,
                                  what="rm gold probe")
    out[name] = (ex.tokens, eos_index(ex))
    out[f"gold_{name}"] = [world.judge(records[i], answers[i]).score for i in keep]
  return out


def eos_index(examples) -> np.ndarray:
  """Each prompt + response example's last trained position, its EOS: where the RM reads the score."""
  return (examples.loss_mask.shape[1] - 1 - np.argmax(examples.loss_mask[:, ::-1], axis=1)).astype(np.int32)


def run_gold_probe(pairs: dict | None, score_rows) -> dict:
  """gold_agreement of `score_rows(tokens, last) -> scores` on the probe's pairs ({} without pairs)."""
  if pairs is None:
    return {}
  out = gold_agreement(score_rows(*pairs["greedy"]), score_rows(*pairs["sampled"]), pairs["gold_greedy"],
                       pairs["gold_sampled"])
  return {f"gold_probe/{k}": v for k, v in out.items() if np.isfinite(v)}   # no agreement without a pair


# ----------------------------------------------------------------------------- stage

def run(config, workdir: Path, mesh, rules):
  cfg = config.rm
  workdir = Path(workdir)
  comparisons = collect(config, workdir, mesh, rules)
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
  if cfg.heldout_group not in groups:
    raise ValueError(f"rm.heldout_group={cfg.heldout_group}: expected one of the labeler groups {groups}")
  train_groups = [g for g in groups if g != cfg.heldout_group]
  # Collected by this stage (or an earlier round of it): an empty response is a sample the labelers ranked.
  read = lambda d, split: load_ranked(d / f"{split}.jsonl", allow_empty_response=True)
  train_all, valid_all = read(comparisons, "train"), read(comparisons, "valid")
  for extra in earlier_rounds(config, workdir):
    train_all, valid_all = train_all + read(extra, "train"), valid_all + read(extra, "valid")
  k_max = max(cfg.k_choices)
  as_examples = lambda recs, what: ranked_examples(tokenizer, recs, cfg.seq_len, k_max, world.format_prompt,
                                                   what=what)
  train_recs = select(train_all, train_groups, cfg.get("rankings_per_prompt", 1))
  train = as_examples(train_recs, "rm train")
  valid_train_groups = select(valid_all, train_groups)
  valid = as_examples(valid_train_groups, "rm valid")
  heldout_recs = [r for r in valid_all if r["group"] == cfg.heldout_group]
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
  stage_cfg = ml_collections.ConfigDict(cfg.to_dict())
  stage_cfg.steps = max(1, math.ceil(cfg.epochs * len(data) / batch_size))   # paper C.2: a single epoch
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
                                                 policy_pair_weight)
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
    if valid_policy is not None and len(valid_policy) >= cfg.eval_batch_size:
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
  ensemble_due = n_members > 1 and _logged_ensemble_size(workdir, steps_per_member) != n_members
  # Sampled up front, outside the training loop's mesh context (restoring a checkpoint inside it fails),
  # and only when member 0's end-of-stage metrics or the ensemble's are still to be written.
  probe = (gold_probe_pairs(config, workdir, mesh, rules, world, tokenizer)
           if ensemble_due or not logged_final(workdir, "rm", steps_per_member) else None)

  def gold_probe(score_rows) -> dict:
    out = run_gold_probe(probe, score_rows)
    if out:
      logging.info("rm: gold probe: %s", {k: round(v, 4) for k, v in out.items()})
    return out

  def by_family(params) -> dict:
    # Which families the RM can judge: the pooled accuracy hides an RM that checks one family well and
    # the rest not at all (docs/STATUS.md, session 8). Records and examples align through valid.index.
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
    by_id = lambda recs, g: {r["id"]: r for r in recs if r["group"] == g}
    a, b = by_id(valid_all, train_groups[0]), by_id(valid_all, train_groups[1 % len(train_groups)])
    h = by_id(valid_all, cfg.heldout_group)
    common = sorted(set(a) & set(b) & set(h))
    return {"labeler_agreement/train_groups": pairwise_agreement([a[i] for i in common], [b[i] for i in common]),
            "labeler_agreement/heldout_vs_train": pairwise_agreement([a[i] for i in common], [h[i] for i in common]),
            "demo_mean_score": mean_score(score_step, params, demo_ex.tokens, demo_last,
                                          cfg.eval_batch_size, mesh, rules),
            **{f"valid/{k}": v for k, v in validation(params).items()},
            **by_family(params),
            **gold_probe(lambda t, l: row_scores(score_step, params, t, l, cfg.eval_batch_size, mesh, rules))}

  # ------------------------------------------------------------------ members: W/rm, then the ensemble's others
  result = None
  for i in range(n_members):
    # Member 0 is the single RM of the paper, unchanged by the ensemble's size (W/rm: PPO's value function
    # starts from it). The others differ in head init and data order, and with rm.ensemble_bootstrap each
    # trains on its own resample (with replacement) of the training prompts: more diversity, the same labels.
    fold = (lambda k: k) if i == 0 else (lambda k, i=i: jax.random.fold_in(k, i))
    order = (np.random.default_rng([config.seed, 407, i]).integers(len(data), size=len(data))
             if i > 0 and cfg.get("ensemble_bootstrap", True) else np.arange(len(data)))
    member_seed = seed + 1000 * i
    where = trained_member_dirs(config, workdir)[i]
    # The settings a member's checkpoint is checked against: the ensemble's size changes no member, and
    # bootstrapping only the members after the first (so a finished single RM joins a larger ensemble).
    member_cfg = ml_collections.ConfigDict({k: v for k, v in stage_cfg.to_dict().items()
                                            if k != "ensemble_size" and (i > 0 or k != "ensemble_bootstrap")})
    stage = loop.Stage(name=where.name, cfg=member_cfg, workdir=where.parent, model_dict=model_dict,
                       world_id=world_fingerprint(workdir), rng=fold(jax.random.key(config.seed + 4)), tx=tx,
                       shardings=shardings, abstract=abstract_state(model_cfg, tx, shardings, head="scalar"),
                       progress=lambda done, total, i=i: progress.step("rm", i * steps_per_member + done,
                                                                       n_members * steps_per_member))

    def initial_params(fold=fold):
      return initial_rm_params(config, workdir, mesh, rules, model_cfg, shardings,
                               fold(jax.random.key(config.seed + 5)))

    params = loop.run(
        stage, mesh, rules, initial_params=initial_params, train_step=train_step,
        batch_at=lambda step, order=order, member_seed=member_seed: process_batch(
            read_rows, order[batch_indices(len(data), batch_size, step, member_seed)], mesh, rules),
        evaluate=validation, finalize=normalise, after_training=after_training if i == 0 else None,
        items_per_step=batch_size, item_name="prompts" if cfg.formulation == "per_prompt" else "pairs",
        extra_meta={"seed": member_seed, "formulation": cfg.formulation, "heldout_group": cfg.heldout_group,
                    "member": i})
    result = params if i == 0 else result
  if ensemble_due:
    members = load_members(config, workdir, mesh, rules)
    ens_eval = make_ensemble_eval(model_cfg, mesh, rules)
    out = {"size": n_members}
    for what, examples in (("valid", valid), ("valid/heldout_group", valid_heldout), ("valid/policy_pairs", valid_policy)):
      if examples is not None and len(examples) >= cfg.eval_batch_size:
        out[f"{what}/accuracy"] = evaluate_ensemble(ens_eval, members, examples, cfg.eval_batch_size, mesh, rules)
    # The ensemble's mean score (PPO's reward with ppo.rm_uncertainty_coef = 0) on the same probe pairs.
    out.update(gold_probe(lambda t, l: np.mean([row_scores(score_step, p, t, l, cfg.eval_batch_size, mesh, rules)
                                               for p in members], axis=0)))
    logging.info("rm: ensemble of %d: %s", n_members, out)
    writer = MetricWriter(workdir, "rm", resume_step=steps_per_member)
    writer.write(steps_per_member, out, prefix="final/ensemble/")
    writer.close()
  return result


# ----------------------------------------------------------------------------- ensemble

ENSEMBLE = "rm_ensemble"   # W/rm_ensemble/member{i}: the ensemble's members after the first (W/rm)


def _logged_ensemble_size(workdir: Path, step: int) -> int | None:
  """The size of the last ensemble evaluated into W/metrics/rm.jsonl at `step` (None: none yet): a run
  asking for another size evaluates its own ensemble again."""
  size = None
  for row in read_metrics(Path(workdir) / "metrics" / "rm.jsonl"):
    if row.get("step") == step and "final/ensemble/size" in row:
      size = int(row["final/ensemble/size"])
  return size


def trained_member_dirs(config, workdir: Path) -> list[Path]:
  """The checkpoint directories of the members this run's RM stage trains: W/rm first (the value function's
  init), then W/rm_ensemble/member{i}."""
  n = int(config.rm.get("ensemble_size", 1))
  return [Path(workdir) / "rm"] + [Path(workdir) / ENSEMBLE / f"member{i}" for i in range(1, n)]


def member_dirs(config, workdir: Path) -> list[Path]:
  """Every member PPO scores with: this run's (trained_member_dirs), then the `rm` stage of each run in
  ppo.rm_runs (other runs on the same world)."""
  return trained_member_dirs(config, workdir) + rm_run_dirs(config, workdir)


def rm_run_names(config) -> list[str]:
  """ppo.rm_runs as a list of run directories (no filesystem checks: see rm_run_dirs)."""
  return [r.strip() for r in str(config.ppo.get("rm_runs", "") or "").split(",") if r.strip()]


def rm_run_dirs(config, workdir: Path) -> list[Path]:
  """ppo.rm_runs: the finished `rm` stages of other runs, as extra ensemble members. Their trunks come from
  other pretraining/SFT seeds, so they need not err where this run's RM does (Eisenstein et al. 2023,
  "Helping or herding?": pretrain-seed ensembles beat finetune-seed ones); checked for the same world and
  RM model when loaded."""
  out = []
  for run in rm_run_names(config):
    d = Path(run) / "rm"
    if not d.is_dir():
      raise FileNotFoundError(f"ppo.rm_runs: {run!r} has no rm stage ({d} is missing); expected the run "
                              f"directory of a finished RM on the same world")
    if d.resolve() == (Path(workdir) / "rm").resolve():
      raise ValueError(f"ppo.rm_runs: {run!r} is this run; list other runs only")
    if d.resolve() in {x.resolve() for x in out}:
      raise ValueError(f"ppo.rm_runs: {run!r} is listed twice")
    out.append(d)
  return out


def load_members(config, workdir: Path, mesh, rules) -> tuple:
  """Every member's params (a tuple; one entry for a single RM), checked against W/rm's model and the world."""
  rm_dict = trained_rm_model(config, workdir)
  model_cfg = ModelConfig.from_dict(rm_dict)
  tx, _ = make_optimizer(config.sft, 1)
  abstract = abstract_state(model_cfg, tx, state_shardings(model_cfg, tx, mesh, rules, head="scalar"),
                            head="scalar")["params"]
  return tuple(checkpoints.load_params(d, abstract, rm_dict, world_fingerprint(workdir))[0]
               for d in member_dirs(config, workdir))


def ensemble_score(scores_nb, uncertainty_coef):
  """The members' scores [N, B] -> mean - coef * std over members (Coste et al. 2023's uncertainty-weighted
  objective; coef 0: the plain mean) and the std. With one member the std is 0 and this is its score."""
  mean, std = scores_nb.mean(0), scores_nb.std(0)
  return mean - uncertainty_coef * std, std


def make_ensemble_eval(model_cfg: ModelConfig, mesh, rules):
  """eval_step(members, batch) -> ranking metrics of the members' mean score (per-prompt form)."""
  model = Decoder(model_cfg, head="scalar")

  def step(members, batch):
    with nn.logical_axis_rules(rules):
      B, K, T = batch["tokens"].shape
      r = jnp.stack([rm_scores(model, p, batch["tokens"].reshape(B * K, T), batch["last_index"].reshape(B * K))
                     for p in members]).mean(0).reshape(B, K)
      return objectives.ranking_loss(r, batch["ranks"], batch["mask"])[1]

  return jax.jit(step, out_shardings=parallel.replicated(mesh))


def evaluate_ensemble(step, members, examples, batch_size: int, mesh, rules) -> float:
  """Pooled pairwise accuracy of the ensemble's mean score over whole batches of a ranked set."""
  hits = pairs = 0.0
  for b in range(len(examples) // batch_size):
    m = step(members, device_batch(examples.batch(np.arange(b * batch_size, (b + 1) * batch_size)), mesh, rules))
    hits += float(m["accuracy"]) * float(m["pairs"])
    pairs += float(m["pairs"])
  return hits / max(pairs, 1.0)
