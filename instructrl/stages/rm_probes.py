"""What an RM can judge, beyond its pooled ranking accuracy: the labelers' mutual agreement (the ceiling),
accuracy per task family against the labelers, their noise-free utility and gold, and the gold probe: how
the RM orders the pairs PPO has to learn to tell apart. The RM stage logs them with its final metrics.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import jax
import numpy as np

from instructrl import measures, objectives, parallel
from instructrl.data.batching import prompt_response_examples
from instructrl.data.records import load_jsonl
from instructrl.models.config import ModelConfig
from instructrl.stages.rm_models import eos_index, finished_model, load_policy


def pairwise_agreement(a: list[dict], b: list[dict]) -> float:
  """How often two rankings of the same responses order a pair the same way (the labelers' ceiling)."""
  agree = total = 0
  for ra, rb in zip(a, b):
    pa, pb = {(w, l) for w, l in objectives.ranked_to_pairs(ra["ranking"])}, objectives.ranked_to_pairs(rb["ranking"])
    agree += sum((w, l) in pa for w, l in pb)
    total += len(pb)
  return agree / max(total, 1)


def labeler_agreement(valid: list[dict], train_groups: list[int], heldout_group: int, rerank) -> dict:
  """The labelers' mutual agreement on the validation rankings (the ceiling an RM can reach; paper 3.5:
  72.6 +- 1.5% among training labelers, 77.3 +- 1.3% among held-out ones):
  - train_groups: the mean over every pair of training groups of pairwise_agreement on the prompts both ranked;
  - heldout_vs_train: the mean over training groups of the held-out group's agreement with it;
  - heldout: the held-out group's ranking against a second held-out labeler's ranking of the same responses,
    rerank(record) -> that record ranked again (the collection has one ranking per prompt and group).
  A mean skips a pair of groups with no prompt in common; one with none at all is left out of the dict."""
  by_group = {g: {r["id"]: r for r in valid if r["group"] == g} for g in {*train_groups, heldout_group}}

  def mean_over(pairs) -> float | None:
    rates = []
    for a, b in pairs:
      common = sorted(set(by_group[a]) & set(by_group[b]))
      if common:
        rates.append(pairwise_agreement([by_group[a][i] for i in common], [by_group[b][i] for i in common]))
    return float(np.mean(rates)) if rates else None

  held = list(by_group[heldout_group].values())
  out = {"train_groups": mean_over([(a, b) for i, a in enumerate(train_groups) for b in train_groups[i + 1:]]),
         "heldout_vs_train": mean_over([(heldout_group, g) for g in train_groups]),
         "heldout": pairwise_agreement(held, [rerank(r) for r in held]) if held else None}
  return {f"labeler_agreement/{k}": v for k, v in out.items() if v is not None}


def second_labeler(world, seed: int):
  """rerank(record) for labeler_agreement: the record's responses ranked by another labeler of its group
  (the next one in the world's order after the record's own), with a draw seeded by the record."""
  def rerank(record: dict) -> dict:
    group = [l.id for l in world.labelers if l.group == record["group"]]
    if len(group) < 2:
      raise ValueError(f"labeler group {record['group']} has {len(group)} labeler(s): no second one to agree with")
    other = group[(group.index(record["labeler"]) + 1) % len(group)] if record["labeler"] in group else group[0]
    rng = np.random.default_rng([seed, zlib.crc32(str(record["id"]).encode())])   # stable across processes
    return {**record, "labeler": other,
            "ranking": [int(x) for x in world.rank(record, record["responses"], other, rng)]}
  return rerank


def padded_batches(examples, batch_size: int):
  """Every row of a RankedExamples in batches of batch_size (static shape): the last batch filled up with
  copies of row 0 whose responses are all masked out, so they add no pair, prompt or score to any metric."""
  n = len(examples)
  if n == 0:
    raise ValueError("no validation prompts to evaluate")
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    fill = batch_size - len(idx)
    batch = examples.batch(np.concatenate([idx, np.zeros(fill, idx.dtype)]))
    if fill:
      batch["mask"] = batch["mask"].copy()
      batch["mask"][len(idx):] = False
    yield batch


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
  at PPO's temperature, from the policy PPO starts from (on tiny the headroom above SFT is mostly
  sharpening: SFT cooled to T=0.7 alone wins 58% against SFT at T=1). Over the pairs the gold judge does not tie:
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
  if finished_model(Path(workdir) / cfg.policy) is None:   # an RM from rm.base_workdir before this run's policy
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


def run_gold_probe(pairs: dict | None, score_rows) -> dict:
  """gold_agreement of `score_rows(tokens, last) -> scores` on the probe's pairs ({} without pairs)."""
  if pairs is None:
    return {}
  out = gold_agreement(score_rows(*pairs["greedy"]), score_rows(*pairs["sampled"]), pairs["gold_greedy"],
                       pairs["gold_sampled"])
  return {f"gold_probe/{k}": v for k, v in out.items() if np.isfinite(v)}   # no agreement without a pair
