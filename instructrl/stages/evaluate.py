"""The `eval` stage: the paper's comparisons (section 4) in miniature, written to workdir/eval/.

Models (each evaluated if its stage finished): GPT (the pretrained model, bare prompt), GPT
prompted (a few-shot prefix), SFT, PPO (ptx_coef 0) and PPO-ptx. The GPT baselines sample at
eval.baseline_temperature (0.7), the rest at eval.temperature (1), as in the paper. On held-out
prompts, judged by the held-out labeler group (never seen in demonstrations or RM data):
- win rate against SFT with a 95% interval (the main metric) and a 1-7 Likert score; the SFT row
  is a second SFT sample against the first, so it shows the noise floor (~50%);
- gold score / acceptable rate (what the paper could only ask humans);
- truthfulness analog (fact and false-premise questions) and toxicity analog (prompts that
  invite rudeness, with and without "Be respectful.");
- alignment tax: held-out pretraining loss and a multiple-choice cloze benchmark;
- the RM's accuracy on training vs held-out labeler groups, and RM score vs gold over PPO.

Resumable: each model's answers are cached in eval/answers/<model>.json (written atomically),
and report.json is written last; a rerun with the same set of models skips the stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from instructrl import checkpoints, measures, parallel, report
from instructrl.data import world as world_lib
from instructrl.data.batching import pack_texts
from instructrl.data.records import load_jsonl
from instructrl.metrics import read_metrics
from instructrl.models.config import ModelConfig
from instructrl.stages import costs
from instructrl.stages.ppo import ptx_enabled
from instructrl.stages.train_state import abstract_state, make_optimizer, state_shardings
from instructrl.stages.world import load_tokenizer, world_fingerprint

PPO_STAGES = ("ppo", "ppo_noptx")
SETS = {"eval": "prompts_eval.jsonl", "truthful": "truthful_eval.jsonl", "toxicity": "toxicity_eval.jsonl"}
# eval.split="dev": the dev prompts, judged by the dev labeler group, into W/eval_dev/. Every tuning decision
# reads these; the test report (W/eval/) is computed once per final configuration. The truthfulness and
# toxicity sets are test sets, so a dev report has neither.
DEV_SETS = {"eval": "prompts_dev.jsonl"}
SPLITS = ("test", "dev")


def report_dir(workdir: Path, split: str = "test") -> Path:
  """Where the eval stage writes: W/eval for the test split, W/eval_dev for the dev split."""
  if split not in SPLITS:
    raise ValueError(f"eval.split={split!r}: expected one of {SPLITS}")
  return Path(workdir) / ("eval" if split == "test" else "eval_dev")


def stage_meta(workdir: Path, stage: str) -> dict | None:
  ckpt = checkpoints.StageCheckpoints(workdir / stage)
  try:
    meta = ckpt.meta()
  finally:
    ckpt.close()
  return meta if meta and meta.get("complete") else None


JUDGED = "judged_checkpoints.json"


def judged_record(config, models: list[dict]) -> dict:
  """What a report depends on besides the world: the checkpoints it judged and the eval settings
  (temperatures, prompt counts, ...): a change of either makes the stage run again."""
  return json.loads(json.dumps({"model_ids": {m["name"]: m["id"] for m in models},
                                "eval_settings": config.eval.to_dict()}, default=list))


def is_judged(config, workdir: Path) -> bool:
  """Whether workdir/eval/report.json judged exactly these checkpoints under these eval settings."""
  out_dir = report_dir(workdir, config.eval.get("split", "test"))
  if not (out_dir / "report.json").exists() or not (out_dir / JUDGED).exists():
    return False
  from instructrl.stages import source
  models = proxy_models(workdir) if source.kind(config) == "files" else eval_models(config, workdir)
  return json.loads((out_dir / JUDGED).read_text()) == judged_record(config, models)


def checkpoint_id(workdir: Path, stage: str, step: int, entry: str = "params") -> str:
  """A fingerprint of the params `entry` of one saved step: the content digest its save recorded in the
  meta (checkpoints.StageCheckpoints.save, array_digest.digest: the arrays' values, dtypes, shapes and
  tree paths). It is the same for a killed-and-resumed run and an uninterrupted one, on any mesh shape:
  a hash of the files would not be, Orbax names its data files at random. It is computed where the
  shards are at save time (no process gathers the arrays) and read here from the JSON meta, so telling
  whether the report is current restores no arrays. A stage rerun under the same workdir saves the same
  step numbers, so the step alone cannot tell its checkpoints apart; the digest can.

  A step saved before digests were recorded keeps its old id, the hash of its manifest (or, without
  one, of Orbax's metadata): an older workdir's judged_checkpoints.json and cached answers still match,
  so its report is accepted as it is, not judged again."""
  ckpt = checkpoints.StageCheckpoints(Path(workdir) / stage)
  try:
    meta = ckpt.meta(step)
  except Exception:   # noqa: BLE001 -- unreadable: the file hashes below, or "unknown"
    meta = None
  finally:
    ckpt.close()
  digest = ((meta or {}).get("digests") or {}).get(entry)
  if digest:
    return digest[:16]
  step_dir = Path(workdir) / stage / str(step)
  for name in (checkpoints.MANIFEST, "_CHECKPOINT_METADATA"):
    if (step_dir / name).exists():
      return hashlib.sha256((step_dir / name).read_bytes()).hexdigest()[:16]
  return "unknown"


def prompted_twice(ecfg) -> bool:
  """Whether prompted GPT is also judged at the policies' temperature (a second answer set)."""
  return bool(ecfg.get("prompted_at_policy_temperature", False)) and ecfg.baseline_temperature != ecfg.temperature


def sft_twice(ecfg) -> bool:
  """Whether SFT is also judged at the baselines' temperature (eval.sft_at_baseline_temperature)."""
  return bool(ecfg.get("sft_at_baseline_temperature", False)) and ecfg.baseline_temperature != ecfg.temperature


def eval_models(config, workdir: Path) -> list[dict]:
  """The models the eval stage judges: every finished stage (available_models), and with
  eval.prompted_at_policy_temperature the few-shot GPT once more at eval.temperature, with
  eval.sft_at_baseline_temperature SFT once more at eval.baseline_temperature, so the report also
  compares the baselines with SFT at each single temperature (the paper's 0.7 vs 1 mixes prompting
  with sharpening). Each model carries the `index` its sampling and rater draws are keyed on: the
  extra rows come after the SFT resample, so adding them changes no other model's answers."""
  models = available_models(workdir)
  for i, m in enumerate(models):
    m["index"] = i
  n, ecfg = len(models), config.eval
  if prompted_twice(ecfg):
    at = [i for i, m in enumerate(models) if m["name"] == "GPT prompted"]
    if at:
      extra = {**models[at[0]], "name": f"GPT prompted (T={ecfg.temperature:g})", "temperature": ecfg.temperature,
               "index": n + 1}
      models.insert(at[0] + 1, extra)
  if sft_twice(ecfg):
    at = [i for i, m in enumerate(models) if m["name"] == "SFT"]
    if at:
      t = ecfg.baseline_temperature
      models.insert(at[0] + 1, {**models[at[0]], "name": f"SFT (T={t:g})", "temperature": t, "index": n + 2})
  return models


def proxy_models(workdir: Path) -> list[dict]:
  """The public-data eval's models (stages/proxy_eval.py): GPT, SFT, PPO, PPO-ptx, the finished ones."""
  out = [m for m in available_models(workdir) if m["name"] != "GPT prompted"]
  for i, m in enumerate(out):
    m["index"] = i
  return out


def available_models(workdir: Path) -> list[dict]:
  """[{name, stage, step, id, entry, few_shot}] for every finished stage, in the paper's order."""
  models = _available_models(workdir)
  for m in models:
    m["id"] = checkpoint_id(workdir, m["stage"], m["step"], m["entry"])
  return models


def _available_models(workdir: Path) -> list[dict]:
  models = []
  meta = stage_meta(workdir, "pretrain")
  if meta:
    models += [{"name": "GPT", "stage": "pretrain", "step": meta["step"], "entry": "params", "few_shot": False},
               {"name": "GPT prompted", "stage": "pretrain", "step": meta["step"], "entry": "params",
                "few_shot": True}]
  meta = stage_meta(workdir, "sft")
  if meta:
    # The SFT baseline is the SFT model PPO started from: the RM-selected candidate if there was a choice.
    sel = workdir / "sft_selection.json"
    step = json.loads(sel.read_text())["chosen"] if sel.exists() else meta["step"]
    models.append({"name": "SFT", "stage": "sft", "step": step, "entry": "params", "few_shot": False})
  for stage in PPO_STAGES:
    meta = stage_meta(workdir, stage)
    if meta:
      name = "PPO-ptx" if ptx_enabled(meta) else "PPO"
      if meta.get("reward", "rm") != "rm":      # an oracle-reward diagnostic run says so in every table
        name += f" [{meta['reward']} reward]"
      elif int(meta.get("rm_ensemble_size", 1) or 1) > 1:   # rewarded by an RM ensemble, not the paper's one RM
        name += f" [{meta['rm_ensemble_size']} RMs]"
      if any(m["name"] == name for m in models):
        name += f" ({stage})"
      models.append({"name": name, "stage": stage, "step": meta["step"], "entry": "ema", "few_shot": False,
                     "ptx_coef": meta.get("ptx_coef"), "kl_coef": meta.get("kl_coef")})
  return models


def slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name.lower())


def run(config, workdir: Path, mesh, rules) -> dict:
  workdir = Path(workdir)
  split = config.eval.get("split", "test")
  out_dir = report_dir(workdir, split)
  models = eval_models(config, workdir)
  if not any(m["name"] == "SFT" for m in models):
    raise FileNotFoundError(f"{workdir}/sft: no finished SFT checkpoint; the eval stage compares against SFT, "
                            f"run --stages=sft first")
  done = out_dir / "report.json"
  # Skip only if the report judged these very checkpoints (a rerun stage saves new ones) under these
  # eval settings; answers still come from the cache where their own key (checkpoint, decoding) matches.
  if is_judged(config, workdir):
    logging.info("eval: report for %s exists, skipping", [m["name"] for m in models])
    return json.loads(done.read_text())

  ecfg = config.eval
  world_dir = workdir / "world"
  world = world_lib.World.load(world_dir)
  tokenizer = load_tokenizer(workdir)
  model_cfg = ModelConfig.from_dict(config.model)
  world_id = world_fingerprint(workdir)
  sets = {k: load_jsonl(world_dir / f, "eval")[:ecfg.report_prompts]
          for k, f in (SETS if split == "test" else DEV_SETS).items()}
  raters = world.raters(split)
  if not raters:
    raise ValueError(f"eval: the world has no {'held-out' if split == 'test' else 'dev'} labeler group to judge with")

  # The restore target: every stage's params have the model's shapes (PPO's EMA too).
  tx, _ = make_optimizer(config.sft, 1)
  abstract = abstract_state(model_cfg, tx, state_shardings(model_cfg, tx, mesh, rules))["params"]
  load = lambda m: checkpoints.load_params(workdir / m["stage"], abstract, model_cfg.to_dict(), world_id,
                                           entry=m["entry"], step=m["step"])[0]
  prefix = world.few_shot_prefix(np.random.default_rng(config.seed), k=ecfg.few_shot)
  valid_lm = pack_texts(tokenizer.encode_batch([r["text"] for r in load_jsonl(world_dir / "corpus_valid.jsonl",
                                                                               "text")]), config.pretrain.seq_len)
  cloze = [json.loads(l) for l in (world_dir / "cloze_eval.jsonl").read_text().splitlines() if l.strip()]

  rows, answers, lm_scores = {}, {}, {}
  with parallel.activate(mesh, rules):
    resample = sum(1 for m in models if "temperature" not in m)   # the index after the finished stages
    for m in tqdm(models, desc="eval: models", unit="model", disable=jax.process_index() != 0):
      params = load(m)
      ckpt = (m["stage"], m["step"], m["entry"])    # GPT and GPT prompted share params: score them once
      if ckpt not in lm_scores:
        lm_scores[ckpt] = {
            "heldout_lm_loss": measures.heldout_lm_loss(params, model_cfg, valid_lm, ecfg.batch_size),
            "cloze_accuracy": measures.cloze_accuracy(params, model_cfg, tokenizer, cloze,
                                                        seq_len=ecfg.cloze_seq_len, batch_size=ecfg.batch_size)}
      answers[m["name"]] = _answers(out_dir, m, params, model_cfg, tokenizer, world, sets, config, prefix, m["index"])
      if m["name"] == "SFT":   # a second, independent SFT sample: the noise floor of the win rate
        answers["SFT resample"] = _answers(out_dir, {**m, "name": "SFT resample"}, params, model_cfg, tokenizer,
                                           world, sets, config, prefix, resample)
      rows[m["name"]] = {
          "stage": m["stage"], "temperature": _temperature(m, ecfg),
          **lm_scores[ckpt],
          **{k: m[k] for k in ("ptx_coef", "kl_coef") if k in m}}

  sft = answers["SFT"]
  for m in models:
    a = answers["SFT resample" if m["name"] == "SFT" else m["name"]]
    rng = np.random.default_rng([config.seed, 110, m["index"]])
    rows[m["name"]].update(
        win_rate_vs_sft=measures.win_rate(world, sets["eval"], a["eval"], sft["eval"], raters, rng),
        likert=measures.likert(world, sets["eval"], a["eval"], raters, rng),
        gold=_strip(measures.gold_summary(world, sets["eval"], a["eval"])),
        truthfulness=truthfulness(world, sets["truthful"], a["truthful"]) if "truthful" in sets else None,
        toxicity=toxicity(world, sets["toxicity"], a["toxicity"]) if "toxicity" in sets else None)
  out = {"models": [m["name"] for m in models], "results": rows, "split": split,
         "judged_by": {"group": raters[0].group, "labelers": [l.id for l in raters]},
         "n_prompts": {k: len(v) for k, v in sets.items()}, "rm": rm_summary(workdir),
         "ppo_curves": {m["name"]: ppo_curve(workdir / "metrics" / f"{m['stage']}.jsonl")
                        for m in models if m["stage"] in PPO_STAGES}}
  report.write(out, out_dir)   # report.md and the plots first: report.json marks the stage complete
  # Which checkpoints were judged (content ids: the same for a resumed run and an uninterrupted one) and
  # under which settings: what a rerun compares to skip the stage.
  _write_json(out_dir / JUDGED, judged_record(config, models))
  _write_json(done, out)
  logging.info("eval: wrote %s", out_dir)
  return out


def _temperature(m: dict, ecfg) -> float:
  if "temperature" in m:
    return m["temperature"]
  return ecfg.baseline_temperature if m["stage"] == "pretrain" else ecfg.temperature


def _answers(out_dir: Path, m: dict, params, model_cfg, tokenizer, world, sets, config, prefix, index) -> dict:
  path = out_dir / "answers" / f"{slug(m['name'])}.json"
  # Reuse cached answers only if they came from the same checkpoint, decoding and prompts.
  key = {"stage": m["stage"], "step": m["step"], "id": m["id"], "index": index, "seed": config.seed, "few_shot": m["few_shot"],
         "temperature": _temperature(m, config.eval), "max_new_tokens": config.eval.max_new_tokens,
         "n": {k: len(v) for k, v in sets.items()}}
  if path.exists():
    cached = json.loads(path.read_text())
    if cached.get("key") == key:
      return cached["answers"]
  rng = jax.random.fold_in(jax.random.key(config.seed + 110), index)
  got = {k: measures.answer(params, model_cfg, tokenizer, world, recs, rng=jax.random.fold_in(rng, j),
                              eval_cfg=config.eval, prefix=prefix if m["few_shot"] else "",
                              stop_at_newline=m["few_shot"], temperature=_temperature(m, config.eval))
         for j, (k, recs) in enumerate(sets.items())}
  _write_json(path, {"key": key, "answers": got})
  return got


def _write_json(path: Path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
  tmp.replace(path)   # atomic: a kill leaves the old file or the new one, never half of it


def _strip(summary: dict) -> dict:
  return {k: v for k, v in summary.items() if k != "examples"}


def truthfulness(world, records: list[dict], answers: list) -> dict:
  """TruthfulQA analog: truthful = no invented names and no accepted false premise; informative = correct."""
  v = [(r, world.judge(r, a)) for r, a in zip(records, answers) if a is not None]
  fp = [x for r, x in v if r["family"] == "false_premise"]
  return {"truthful": float(np.mean([x.parts["truthful"] == 1.0 for _, x in v])),
          "truthful_and_informative": float(np.mean([x.parts["truthful"] == 1.0 and x.correct for _, x in v])),
          "false_premise_rejected": float(np.mean([x.parts["truthful"] == 1.0 for x in fp])) if fp else None,
          "n": len(v)}


def toxicity(world, records: list[dict], answers: list) -> dict:
  """RealToxicityPrompts analog: how often the answer is rude, with and without "Be respectful."."""
  out = {}
  for respectful in (False, True):
    v = [world.judge(r, a) for r, a in zip(records, answers) if a is not None and r["respectful"] == respectful]
    key = "respectful" if respectful else "plain"
    out[f"rude_rate/{key}"] = float(np.mean([x.parts["polite"] == 0.0 for x in v])) if v else None
    out[f"gold/{key}"] = float(np.mean([x.score for x in v])) if v else None
  return out


def rm_summary(workdir: Path) -> dict:
  """The RM's end-of-stage accuracies (paper: 72.4% training labelers, 69.6% held-out)."""
  final = {}
  for row in read_metrics(workdir / "metrics" / "rm.jsonl"):
    final.update({k[len("final/"):]: v for k, v in row.items() if k.startswith("final/")})
  names = {"valid/accuracy": "accuracy_train_groups", "valid/heldout_group/accuracy": "accuracy_heldout_group",
           "labeler_agreement/train_groups": "labeler_agreement_train_groups",
           "labeler_agreement/heldout_vs_train": "labeler_agreement_heldout_vs_train",
           "labeler_agreement/heldout": "labeler_agreement_heldout",
           "ensemble/size": "ensemble_size", "ensemble/valid/accuracy": "ensemble_accuracy_train_groups",
           "ensemble/valid/heldout_group/accuracy": "ensemble_accuracy_heldout_group",
           "gold_probe/agreement": "gold_agreement", "gold_probe/pairs": "gold_pairs",
           "gold_probe/score_gap": "gold_score_gap", "ensemble/gold_probe/agreement": "ensemble_gold_agreement"}
  out = {new: final[old] for old, new in names.items() if old in final}
  # Per task family (rm_probes.family_accuracy), over the policy's own pairs when the RM ranked several sources
  for pairs, prefix in (("policy samples", "valid/policy_pairs/by_family/"), ("all sources", "valid/by_family/")):
    rows = {}
    for k, v in final.items():
      if k.startswith(prefix):
        family, field = k[len(prefix):].rsplit("/", 1)
        rows.setdefault(family, {})[field] = v
    if rows:
      out["by_family"] = {"pairs": pairs, "families": rows}
      break
  return out


def ppo_curve(path: Path) -> dict:
  """RM score, gold score and KL per PPO iteration: over-optimisation shows as score up, gold down."""
  rows = [r for r in read_metrics(path) if "train/objective/score" in r]
  pick = lambda k: [r.get(f"train/{k}") for r in rows]
  return {"step": [r["step"] for r in rows], "rm_score": pick("objective/score"),
          "gold_score": pick("objective/gold_score"), "kl": pick("objective/kl")}


# ----------------------------------------------------------------------------- the pipeline's ETA

def answer_sets(config, workdir: Path, stages: list[str]) -> int:
  """Answer sets the eval stage will sample, counting a model whose stage runs now or has run: GPT, GPT
  prompted (twice with eval.prompted_at_policy_temperature), SFT, its resample (and SFT at the baselines'
  temperature with eval.sft_at_baseline_temperature), each PPO stage."""
  have = lambda s: s in stages or (Path(workdir) / s).is_dir()
  return ((2 + prompted_twice(config.eval)) * have("pretrain") + 2 + sft_twice(config.eval)
          + sum(have(s) for s in ("ppo", "ppo_noptx")))


def cost(config, n_models: int) -> tuple[float, float, float]:
  """(before, during, after) in token passes (stages/costs.py): each of `n_models` answer sets (answer_sets)
  samples the report's prompts and scores the cloze items' 4 choices."""
  e, w = config.eval, config.world
  prompts = sum(min(e.report_prompts, n) for n in (w.n_eval_prompts, w.n_truthful, w.n_toxicity))
  cloze = w.n_cloze * 4 * e.cloze_seq_len
  return 0.0, n_models * (prompts * e.max_new_tokens * costs.SAMPLE_COST + cloze), 0.0
