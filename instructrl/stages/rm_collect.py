"""The RM stage's comparisons: sample K responses per RM prompt and have every labeler group rank them.

Paper, section 3.5 and appendix C.2: labelers rank K = 4..9 responses per prompt. Rankings come from every
group for every prompt (ranking is cheap; sampling is shared), so one collection serves every fold of the
labeler-group cross-validation (tools/rm_cv.py). Responses come from rm.source_mix: the SFT policy (the
paper's setting) and optionally other models' samples. Writes workdir/comparisons; a finished set is reused
while the settings that decide it (collection_key) match.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from instructrl import measures, parallel
from instructrl.data import world as world_lib
from instructrl.data.records import load_jsonl, write_jsonl
from instructrl.models.config import ModelConfig
from instructrl.stages import rounds
from instructrl.stages.rm_models import load_policy
from instructrl.stages.world import load_tokenizer, world_fingerprint

COMPARISONS = "comparisons"


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
  the RM check that an answer answers its prompt (on tiny they did not lift PPO-ptx: docs/results.md).
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


def collect(config, workdir: Path, mesh, rules, out: Path | None = None) -> Path:
  """Sample K responses per RM prompt and have every labeler group rank them.

  Responses come from rm.source_mix (default: the SFT policy only); each of a prompt's K slots
  draws its source by those weights, and the record's `sources` field says which. Writes
  workdir/comparisons/{train,valid}.jsonl in the `ranked` schema (one line per prompt and labeler
  group) and a COMPLETE marker. Policy: duplicate samples are dropped before ranking (a labeler cannot
  rank a response against itself), empty ones too unless rm.keep_empty; a prompt left with < 2 is skipped.
  out: the directory to write `comparisons` under instead of the workdir (W/round1 for round one).
  """
  cfg = config.rm
  out = Path(out if out is not None else workdir) / COMPARISONS
  wanted = collection_key(config)
  if (out / "COMPLETE").exists():
    have = json.loads((out / "COMPLETE").read_text()).get("key")   # absent in sets collected before the check
    if have is not None:
      # keep_empty came later: sets collected before it dropped empty samples
      have = rounds.portable({"keep_empty": False, **have, "source_mix": _used_sources(have.get("source_mix", {}))},
                             wanted)
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
  params = {st: load_policy(config, workdir, mesh, rules, directory=rounds.expand(cfg.ppo_source, workdir), entry="ema")
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
  # The world it was collected on: a set outside a run's root (W/round1/comparisons) is checked by it.
  (out / "COMPLETE").write_text(json.dumps({"prompts": len(records), "skipped": skipped, "key": wanted,
                                            "world": world_fingerprint(workdir)}) + "\n")
  return out


def earlier_rounds(config, workdir: Path, out: Path | None = None) -> list[Path]:
  """rm.extra_comparisons as checked paths: complete comparison sets collected on this run's world (out: where
  this round's own set is, as for collect)."""
  own = (Path(out if out is not None else workdir) / COMPARISONS).resolve()
  found = []
  for part in (p.strip() for p in str(config.rm.get("extra_comparisons", "")).split(",")):
    if not part:
      continue
    d = rounds.expand(part, workdir)
    if not (d / "COMPLETE").exists():
      raise FileNotFoundError(f"rm.extra_comparisons: {d} is not a finished comparisons set (no {d / 'COMPLETE'}); "
                              f"expected the `comparisons` dir of an earlier run's rm stage")
    if d.resolve() == own:
      raise ValueError(f"rm.extra_comparisons: {d} is this run's own comparisons set")
    # Sets collected before the marker recorded their world: the world of the run they sit in (W/round1's: W's).
    run = d.parent.parent if d.parent.name == rounds.ROUND1 else d.parent
    world = json.loads((d / "COMPLETE").read_text()).get("world") or world_fingerprint(run)
    if world != world_fingerprint(workdir):
      raise ValueError(f"rm.extra_comparisons: {d} was collected on world {world}, "
                       f"not this run's {world_fingerprint(workdir)}")
    found.append(d)
  return found


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
