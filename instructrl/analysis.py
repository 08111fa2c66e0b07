"""Read a finished (or running) run directory for notebooks: curves, the report, samples, sweeps.

  from instructrl import analysis
  run = analysis.load_run("runs/tiny")
  steps, loss = run.curve("pretrain", "train/loss")
  analysis.report_rows(run.report)                          # the eval table as plain dicts
  analysis.samples(run.workdir, ["SFT", "PPO-ptx"], n=10)   # side by side, with the gold verdict
  analysis.over_seeds([analysis.load_report(w) for w in ("W0", "W1", "W2")])   # means and intervals over seeds
  python -m instructrl.analysis --workdir=W [--items=other_cloze_eval.jsonl]   # cloze accuracy by kind
  python -m instructrl.analysis --seeds=W0,W1,W2 [--split=dev]               # the over-seeds table

Plain dicts, lists and NumPy arrays (no pandas), so the notebooks stay thin and this is unit-tested
(tests/test_analysis.py); notebooks/ uses it, tests/test_notebooks.py executes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

STAGE_ORDER = ("pretrain", "sft", "rm", "ppo", "ppo_noptx")
# The curves worth a first look, per stage (the rest are in run.metrics / TensorBoard).
KEY_CURVES = {
    "pretrain": ("train/loss", "valid/loss"),
    "sft": ("train/loss", "valid/loss"),
    "rm": ("train/loss", "train/accuracy", "valid/accuracy", "valid/heldout_group/accuracy"),
    "ppo": ("train/objective/score", "train/objective/gold_score", "train/objective/kl", "train/ppo/policy/ptx_loss"),
    "ppo_noptx": ("train/objective/score", "train/objective/gold_score", "train/objective/kl"),
}


def _read_jsonl(path: Path) -> list[dict]:
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:   # a run killed mid-append leaves a partial last line
      continue
  return rows


def _number(v) -> float | None:
  """Metric values: numbers, or "nan"/"inf" strings (metrics.py writes non-finite values so)."""
  if isinstance(v, bool) or v is None:
    return None
  if isinstance(v, (int, float)):
    return float(v)
  if isinstance(v, str):
    try:
      x = float(v)
    except ValueError:
      return None
    return x if not math.isfinite(x) else None
  return None


@dataclasses.dataclass
class Run:
  workdir: Path
  config: dict                    # config.json as written by main.py ({} if missing)
  metrics: dict                   # stage -> [row, ...] from metrics/<stage>.jsonl, in file order
  report: dict | None             # eval/report.json, None until the eval stage finished

  @property
  def stages(self) -> list[str]:
    """Stages with metrics, in pipeline order (then any others, sorted)."""
    known = [s for s in STAGE_ORDER if self.metrics.get(s)]
    return known + sorted(s for s in self.metrics if s not in STAGE_ORDER and self.metrics[s])

  def keys(self, stage: str) -> list[str]:
    """Numeric metric names logged per step by `stage` (the end-of-stage "final/" ones excluded)."""
    out = set()
    for r in self.metrics.get(stage, []):
      out |= {k for k, v in r.items() if k != "step" and not k.startswith("final/") and _number(v) is not None}
    return sorted(out)

  def curve(self, stage: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric; rows without it are left out; non-finite values are NaN."""
    steps, values = [], []
    for r in self.metrics.get(stage, []):
      if key in r and not isinstance(r[key], (list, dict)):
        steps.append(r["step"])
        x = _number(r[key])
        values.append(np.nan if x is None else x)
    return np.asarray(steps, np.int64), np.asarray(values, np.float64)

  def final(self, stage: str) -> dict:
    """The end-of-stage ("final/...") metrics, prefix removed (gold scores, RM accuracies, examples)."""
    out = {}
    for r in self.metrics.get(stage, []):
      out.update({k[len("final/"):]: v for k, v in r.items() if k.startswith("final/")})
    return out


def load_run(workdir: str | Path) -> Run:
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise FileNotFoundError(f"{workdir}: no such run directory (make one with "
                            f"`python -m instructrl.main --config=configs/instructgpt.py:smoke --workdir={workdir}`)")
  config = json.loads((workdir / "config.json").read_text()) if (workdir / "config.json").exists() else {}
  metrics = {p.stem: _read_jsonl(p) for p in sorted((workdir / "metrics").glob("*.jsonl"))}
  report_path = workdir / "eval" / "report.json"
  report = json.loads(report_path.read_text()) if report_path.exists() else None
  return Run(workdir, config, metrics, report)


# ----------------------------------------------------------------------------- the eval report

def report_rows(report: dict) -> list[dict]:
  """One flat dict per model, in the report's order: the numbers of report.md's table."""
  rows = []
  for name in report["models"]:
    r = report["results"][name]
    w, g = r["win_rate_vs_sft"], r["gold"]
    rows.append({"model": name, "temperature": r["temperature"], "win_rate": w["mean"],
                 "win_rate_ci": (w["ci_low"], w["ci_high"]), "likert": r["likert"]["mean"],
                 "gold_score": g["gold_score"], "acceptable": g["acceptable_rate"],
                 "truthful": r["truthfulness"]["truthful"],
                 "rude_plain": r["toxicity"]["rude_rate/plain"],
                 "rude_respectful": r["toxicity"]["rude_rate/respectful"],
                 "heldout_lm_loss": r["heldout_lm_loss"], "cloze_accuracy": r["cloze_accuracy"]})
  return rows


def load_report(workdir: str | Path, split: str = "test") -> dict:
  """A run's eval report of `split`: W/eval/report.json (test) or W/eval_dev/report.json (dev)."""
  if split not in ("test", "dev"):
    raise ValueError(f"split={split!r}: expected 'test' or 'dev'")
  path = Path(workdir) / ("eval" if split == "test" else "eval_dev") / "report.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: no {split} report (run the eval stage"
                            f"{' with --config.eval.split=dev' if split == 'dev' else ''} on {workdir})")
  return json.loads(path.read_text())


def over_seeds(reports: list[dict]) -> list[dict]:
  """One row per model over several seeds' eval reports: each seed's win rate vs SFT, the mean over seeds with
  a 95% Student-t interval (the seeds are the samples: n - 1 degrees of freedom, so it widens the prompt-level
  intervals by seed-to-seed variation), the lowest lower bound of a seed's own interval, and the means of the
  held-out LM loss, cloze accuracy and each behaviour's compliance. The reports must share their split and
  judging labeler group; a model missing from one report is left out."""
  from scipy import stats
  if not reports:
    raise ValueError("over_seeds: no reports")
  keys = {(r.get("split", "test"), (r.get("judged_by") or {}).get("group")) for r in reports}
  if len(keys) > 1:
    raise ValueError(f"over_seeds: the reports differ in (split, judging group): {sorted(keys, key=str)}")
  n = len(reports)
  t = float(stats.t.ppf(0.975, n - 1)) if n > 1 else float("nan")
  rows = []
  for name in reports[0]["models"]:
    if not all(name in r["results"] for r in reports):
      continue
    res = [r["results"][name] for r in reports]
    wins = np.array([x["win_rate_vs_sft"]["mean"] for x in res])
    half = t * wins.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    row = {"model": name, "temperature": res[0]["temperature"], "seeds": n, "win_rates": wins.tolist(),
           "win_rate": float(wins.mean()), "win_rate_ci": (float(wins.mean() - half), float(wins.mean() + half)),
           "lowest_seed_ci_low": min(x["win_rate_vs_sft"]["ci_low"] for x in res),
           "heldout_lm_loss": float(np.mean([x["heldout_lm_loss"] for x in res])),
           "cloze_accuracy": float(np.mean([x["cloze_accuracy"] for x in res]))}
    behaviours = sorted(set.intersection(*(set(x["gold"].get("by_behaviour", {})) for x in res)))
    for b in behaviours:
      row[f"compliant/{b}"] = float(np.mean([x["gold"]["by_behaviour"][b]["compliant"] for x in res]))
    rows.append(row)
  return rows


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
  """A markdown table of `rows` (floats to 3 decimals): for IPython.display.Markdown or print."""
  if not rows:
    return "(no rows)"
  columns = columns or list(rows[0])

  def cell(v):
    if isinstance(v, float):
      return f"{v:.3f}"
    if isinstance(v, tuple):
      return "[" + ", ".join(cell(x) for x in v) + "]"
    if isinstance(v, list):   # one value per seed
      return " / ".join(cell(x) for x in v)
    return "-" if v is None else str(v).replace("|", "\\|").replace("\n", " / ")

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def over_optimisation(run: Run) -> dict:
  """Per PPO stage: RM score, gold score and KL per iteration (from the metrics, so a running PPO
  shows too). The paper's over-optimisation is the RM score rising while the gold score falls."""
  out = {}
  for stage in ("ppo", "ppo_noptx"):
    steps, rm = run.curve(stage, "train/objective/score")
    if len(steps):
      out[stage] = {"step": steps, "rm_score": rm, "gold_score": run.curve(stage, "train/objective/gold_score")[1],
                    "kl": run.curve(stage, "train/objective/kl")[1]}
  return out


# ----------------------------------------------------------------------------- samples

def slug(name: str) -> str:
  """The eval stage's answer file name of a model (instructrl/stages/evaluate.py)."""
  return "".join(c if c.isalnum() else "_" for c in name.lower())


SET_FILES = {"eval": "prompts_eval.jsonl", "truthful": "truthful_eval.jsonl", "toxicity": "toxicity_eval.jsonl"}


def samples(workdir: str | Path, models: list[str], split: str = "eval", n: int | None = None,
            families: list[str] | None = None) -> list[dict]:
  """Side by side: each held-out prompt of `split` with each model's cached answer (eval/answers/)
  and its gold verdict from the world's judge.

  Returns [{"prompt", "family", "gold", "id", <model>: {"answer", "score", "acceptable", "correct"}}];
  a model's entry is None where its answer was skipped (prompt too long).
  """
  from instructrl.data.world import World
  workdir = Path(workdir)
  answers = {}
  for m in models:
    path = workdir / "eval" / "answers" / f"{slug(m)}.json"
    if not path.exists():
      have = sorted(p.stem for p in (workdir / "eval" / "answers").glob("*.json"))
      raise FileNotFoundError(f"{path}: no cached answers of {m!r} (answer files here: {have}); run the eval stage")
    answers[m] = json.loads(path.read_text())["answers"][split]
  world = World.load(workdir / "world")
  records = _read_jsonl(workdir / "world" / SET_FILES[split])[:min(len(a) for a in answers.values())]
  out = []
  for i, rec in enumerate(records):
    if families and rec["family"] not in families:
      continue
    row = {"id": rec["id"], "family": rec["family"], "prompt": rec["prompt"], "gold": rec["gold"]}
    for m in models:
      a = answers[m][i]
      if a is None:
        row[m] = None
        continue
      v = world.judge(rec, a)
      row[m] = {"answer": a, "score": float(v.score), "acceptable": bool(v.acceptable), "correct": bool(v.correct)}
    out.append(row)
    if n is not None and len(out) >= n:
      break
  return out


def sample_rows(side_by_side: list[dict], models: list[str]) -> list[dict]:
  """Flatten `samples` for format_table: one column per model ("answer  [score, ok]")."""
  rows = []
  for s in side_by_side:
    row = {"family": s["family"], "prompt": s["prompt"], "gold": s["gold"]}
    for m in models:
      v = s[m]
      row[m] = "(skipped)" if v is None else f"{v['answer']}  [{v['score']:.2f}{', ok' if v['acceptable'] else ''}]"
    rows.append(row)
  return rows


def win_loss(side_by_side: list[dict], a: str, b: str) -> dict:
  """How often model a's gold score beats, ties or loses to b's on the same prompts (the gold judge,
  not the labelers: an exact, noise-free view beside the report's win rates)."""
  diff = [s[a]["score"] - s[b]["score"] for s in side_by_side if s[a] is not None and s[b] is not None]
  return {"better": int(sum(d > 1e-9 for d in diff)), "tie": int(sum(abs(d) <= 1e-9 for d in diff)),
          "worse": int(sum(d < -1e-9 for d in diff)), "n": len(diff)}


def by_family(side_by_side: list[dict], models: list[str]) -> list[dict]:
  """Mean gold score per task family and model, from `samples` (one row per family, then "all"): where
  an RL model gains on its SFT baseline and where it gives ground (e.g. tiny's PPO rejects false premises
  far more often than SFT, gold 0.15 -> 0.72 on seed 0, and loses on sort, 0.61 -> 0.40)."""
  fams = sorted({s["family"] for s in side_by_side})
  rows = []
  for f in fams + ["all"]:
    picked = [s for s in side_by_side if f == "all" or s["family"] == f]
    row = {"family": f, "n": len(picked)}
    for m in models:
      v = [s[m]["score"] for s in picked if s[m] is not None]
      row[m] = float(np.mean(v)) if v else None
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------- sweeps

def load_sweep(path: str | Path) -> dict:
  """W/sweep.json (instructrl.tools.sweep): {"sweep", "members": {name: {overrides, seeds_done, <metric>: {...}}}}."""
  path = Path(path)
  if path.is_dir():
    path = path / "sweep.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: no sweep summary (run `python -m instructrl.tools.sweep --sweep=... --workdir=...`)")
  return json.loads(path.read_text())


def sweep_metrics(sweep: dict) -> list[str]:
  labels = set()
  for row in sweep["members"].values():
    labels |= {k for k, v in row.items() if isinstance(v, dict) and "mean" in v}
  return sorted(labels)


def sweep_rows(sweep: dict) -> list[dict]:
  """One row per member: overrides, seeds done, and each metric's mean (± std where several seeds)."""
  rows = []
  for name, row in sweep["members"].items():
    out = {"member": name, "overrides": ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "(base)",
           "seeds": row["seeds_done"]}
    for label in sweep_metrics(sweep):
      v = row.get(label) or {}
      out[label] = None if v.get("mean") is None else (
          f"{v['mean']:.3f}" + (f" ± {v['std']:.3f}" if v.get("std") else ""))
    rows.append(out)
  return rows


# ----------------------------------------------------------------------------- cloze by kind

def cloze_by_kind(workdir: str | Path, items_path: str | Path | None = None) -> dict:
  """{model: {"all": accuracy, <kind>: accuracy}} of every finished model of a run (the eval stage's
  models and checkpoints) on its world's cloze items, or on `items_path` (e.g. a newer world's items
  scored by an older run's models: only the world's facts must agree). Loads the models: seconds on
  smoke, about a minute on tiny (CPU)."""
  import ml_collections
  from instructrl import checkpoints, measures, parallel
  from instructrl.models.config import ModelConfig
  from instructrl.stages import evaluate
  from instructrl.stages.train_state import abstract_state, make_optimizer, state_shardings
  from instructrl.stages.world import load_tokenizer, world_fingerprint
  workdir = Path(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  items = _read_jsonl(Path(items_path or workdir / "world" / "cloze_eval.jsonl"))
  model_cfg = ModelConfig.from_dict(config.model.to_dict())
  mesh, rules = parallel.make_mesh(tuple(config.mesh.shape)), parallel.rules_from_config(config.mesh.rules)
  tx, _ = make_optimizer(config.sft, 1)
  abstract = abstract_state(model_cfg, tx, state_shardings(model_cfg, tx, mesh, rules))["params"]
  tokenizer, world_id = load_tokenizer(workdir), world_fingerprint(workdir)
  ex, owner = measures.cloze_examples(tokenizer, items, config.eval.cloze_seq_len)
  kinds = np.array([it.get("kind", "all") for it in items])
  out = {}
  with parallel.activate(mesh, rules):
    for m in evaluate.available_models(workdir):
      if m["few_shot"]:
        continue   # the same params as GPT: the cloze prompt has no few-shot prefix
      params = checkpoints.load_params(workdir / m["stage"], abstract, model_cfg.to_dict(), world_id,
                                       entry=m["entry"], step=m["step"])[0]
      nll, _ = measures.sequence_nll(params, model_cfg, ex, config.eval.batch_size)
      hit = np.array([int(np.argmin(nll[owner == i])) == it["answer"] for i, it in enumerate(items)])
      out[m["name"]] = {"all": float(hit.mean()), **{k: float(hit[kinds == k].mean()) for k in sorted(set(kinds))}}
  return out


if __name__ == "__main__":
  import argparse
  ap = argparse.ArgumentParser(description="Cloze accuracy by kind of every finished model of a run (--workdir), "
                                           "or the eval reports of several seeds' runs over seeds (--seeds).")
  what = ap.add_mutually_exclusive_group(required=True)
  what.add_argument("--workdir")
  what.add_argument("--seeds", help="comma-separated run directories, one per seed")
  ap.add_argument("--items", default=None, help="with --workdir: a cloze_eval.jsonl (default: the run's world's)")
  ap.add_argument("--split", default="test", choices=("test", "dev"), help="with --seeds: which eval report")
  args = ap.parse_args()
  if args.seeds:
    rows = over_seeds([load_report(w, args.split) for w in args.seeds.split(",")])
    print(format_table(rows, ["model", "temperature", "win_rates", "win_rate", "win_rate_ci", "lowest_seed_ci_low",
                              "heldout_lm_loss", "cloze_accuracy", *[k for k in rows[0] if k.startswith("compliant/")]]))
  else:
    got = cloze_by_kind(args.workdir, args.items)
    print(format_table([{"model": m, **v} for m, v in got.items()]))
