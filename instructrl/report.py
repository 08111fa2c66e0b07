"""Turn the eval stage's report dict into report.md and PNG plots (also usable from a notebook:
`report.write(json.load(open("W/eval/report.json")), "somewhere")`, or `report.win_rates_figure(rep)` and its
siblings for one Figure)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter


def _pct(x) -> str:
  x = float(x) if isinstance(x, str) else x   # metrics files write non-finite floats as "nan"
  return "-" if x is None or x != x else f"{100 * x:.1f}%"   # None or nan: not measured


def _num(x, fmt=".3f") -> str:
  return "-" if x is None else format(x, fmt)


def _model_by_column(rep: dict, key: str, title: str, intro: str, cell) -> list[str]:
  """A table of models (rows) by the keys of each model's gold[key] (columns); [] when none has them."""
  res = rep["results"]
  cols = sorted({c for name in rep["models"] for c in (res[name]["gold"].get(key) or {})})
  if not cols:
    return []
  lines = ["", f"## {title}", "", intro, "", "| model | T | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
  for name in rep["models"]:
    by = res[name]["gold"].get(key) or {}
    lines.append(f"| {name} | {res[name]['temperature']:g} | " + " | ".join(cell(by[c]) if c in by else "-" for c in cols)
                 + " |")
  return lines


def markdown(rep: dict) -> str:
  res = rep["results"]
  lines = [
      "# Evaluation report",
      "",
      (f"Held-out prompts: {rep['n_prompts']['eval']} (truthful {rep['n_prompts']['truthful']}, toxicity "
       f"{rep['n_prompts']['toxicity']}); judged by the held-out labeler group {rep['judged_by']['group']} "
       if rep.get("split", "test") == "test" else
       f"DEV split (for tuning, not for reporting): {rep['n_prompts']['eval']} dev prompts; judged by the dev "
       f"labeler group {rep['judged_by']['group']} ") +
      f"({len(rep['judged_by']['labelers'])} labelers). Win rate is against SFT with a 95% interval; the SFT "
      "row is a second SFT sample against the first (the noise floor).",
      "",
      "| model | T | win rate vs SFT | Likert (1-7) | gold score | acceptable | truthful | truthful+inf. | "
      "false premise rejected | rude (plain / respectful) | held-out LM loss | cloze acc. |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name in rep["models"]:
    r = res[name]
    w, lk, g = r["win_rate_vs_sft"], r["likert"], r["gold"]
    tr, tx = r.get("truthfulness") or {}, r.get("toxicity") or {}   # a dev report has neither
    lines.append(
        f"| {name} | {r['temperature']:g} | {_pct(w['mean'])} [{_pct(w['ci_low'])}, {_pct(w['ci_high'])}] | "
        f"{lk['mean']:.2f} [{lk['ci_low']:.2f}, {lk['ci_high']:.2f}] | {g['gold_score']:.3f} | {_pct(g['acceptable_rate'])} | "
        f"{_pct(tr.get('truthful'))} | {_pct(tr.get('truthful_and_informative'))} | "
        f"{_pct(tr.get('false_premise_rejected'))} | "
        f"{_pct(tx.get('rude_rate/plain'))} / {_pct(tx.get('rude_rate/respectful'))} | {r['heldout_lm_loss']:.3f} | "
        f"{_pct(r['cloze_accuracy'])} |")
  lines += _model_by_column(rep, "by_family", "Gold score by task family",
                            "Mean gold score of each model's answers to the held-out prompts of each family (where a "
                            "model's win rate comes from).", lambda m: _num(m["gold_score"], ".2f"))
  lines += _model_by_column(rep, "by_behaviour", "Compliance by behaviour",
                            "Share of each model's answers whose behaviour is right (constraints obeyed, premise "
                            "rejected, hedged where the world has no answer, no insult; the judge's behaviour part), "
                            "by prompt slot.", lambda m: _pct(m["compliant"]))
  rm = rep.get("rm") or {}
  if rm:
    lines += ["", "## Reward model", "",
              f"- validation accuracy, training labeler groups: {_pct(rm.get('accuracy_train_groups'))} (paper: 72.4%)",
              f"- validation accuracy, held-out group: {_pct(rm.get('accuracy_heldout_group'))} (paper: 69.6%)",
              f"- labeler agreement, training groups: {_pct(rm.get('labeler_agreement_train_groups'))} (paper: 72.6%); "
              f"held-out group: {_pct(rm.get('labeler_agreement_heldout'))} (paper: 77.3%); held-out vs training: "
              f"{_pct(rm.get('labeler_agreement_heldout_vs_train'))}"]
    if rm.get("ensemble_size"):
      lines += [f"- ensemble of {rm['ensemble_size']} RMs (mean score; the lines above are member 0's): "
                f"{_pct(rm.get('ensemble_accuracy_train_groups'))} training groups, "
                f"{_pct(rm.get('ensemble_accuracy_heldout_group'))} held-out group"]
    if rm.get("gold_agreement") is not None:
      ens = rm.get("ensemble_gold_agreement")
      lines += [f"- gold probe (pairs of SFT's greedy answer and a sample at PPO's temperature, RM validation prompts, "
                f"{rm.get('gold_pairs')} pairs gold does not tie): the RM prefers gold's choice "
                f"{_pct(rm['gold_agreement'])}" + (f" (ensemble mean {_pct(ens)})" if ens is not None else "") +
                f"; the greedy answers score {_num(rm.get('gold_score_gap'), '.2f')} std above the samples"]
    fam = rm.get("by_family")
    if fam:
      lines += ["", f"RM validation pairs by task family ({fam['pairs']}, training groups): accuracy on the labelers' "
                "order; the ceiling an RM that knew each group's noise-free utility would reach; agreement with "
                "the gold judge on pairs gold does not tie.", "",
                "| family | pairs | accuracy | utility ceiling | agrees with gold |", "|---|---|---|---|---|"]
      lines += [f"| {f} | {m.get('pairs')} | {_pct(m.get('accuracy'))} | {_pct(m.get('utility_accuracy'))} | "
                f"{_pct(m.get('gold_accuracy'))} |"
                for f, m in sorted(fam["families"].items(), key=lambda kv: (kv[0] == "all", kv[0]))]
  for name, c in (rep.get("ppo_curves") or {}).items():
    if c["step"]:
      lines += ["", f"## {name} over training", "",
                f"{len(c['step'])} iterations: RM score {_num(c['rm_score'][0])} -> {_num(c['rm_score'][-1])}, "
                f"gold score {_num(c['gold_score'][0])} -> {_num(c['gold_score'][-1])}, KL to SFT "
                f"{_num(c['kl'][0])} -> {_num(c['kl'][-1])} nats per episode (ppo_curves.png)."]
  lines += ["", "Plots: win_rates.png, alignment_tax.png, ppo_curves.png.", ""]
  return "\n".join(lines)


def _figure(width: float, height: float) -> Figure:
  """A Figure outside pyplot, drawn by Agg: no global backend is chosen (a notebook importing this keeps
  its inline one), nothing is left open, and canvas.draw() lays it out for a test."""
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def _height(n: int) -> float:
  return 1.3 + 0.38 * max(n, 1)   # one bar row per model, room for the title and the x axis


def _width(plot: float, names) -> float:
  return plot + 0.08 * max(map(len, names), default=0)   # the plot keeps its width beside long names


def _nan(x) -> float:
  return float("nan") if x is None else x   # not measured: no bar


def win_rates_figure(rep: dict, title: str = "Preference of held-out labelers",
                     xlabel: str = "win rate against SFT (95% interval)") -> Figure:
  """Win rate against SFT by model (the paper's Fig. 1), horizontal bars in the report's order from the
  top, the 95% interval as error bars, the SFT baseline (50%) dashed. Names on the y axis stay readable
  however long they are."""
  names = rep["models"]
  w = [rep["results"][n]["win_rate_vs_sft"] for n in names]
  mean = [_nan(x["mean"]) for x in w]
  err = [[m - _nan(x["ci_low"]) for m, x in zip(mean, w)], [_nan(x["ci_high"]) - m for m, x in zip(mean, w)]]
  fig = _figure(_width(5, names), _height(len(names)))
  ax = fig.add_subplot()
  y = range(len(names))
  ax.barh(y, mean, xerr=err, capsize=3, height=0.6, color="#4c72b0", error_kw={"lw": 1})
  for i, (m, x) in enumerate(zip(mean, w)):
    if m == m:   # the mean beside the interval's right end; 1.12 below leaves room for it
      right = _nan(x["ci_high"])
      ax.text((right if right == right else m) + 0.015, i, f"{100 * m:.1f}%", va="center", fontsize="small",
              bbox={"fc": "white", "ec": "none", "pad": 1})   # legible over the dashed line
  ax.axvline(0.5, color="grey", lw=1, ls="--")
  ax.set_yticks(y, names)
  ax.invert_yaxis()
  ax.set_xlim(0, 1.12)
  ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
  ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
  ax.set_xlabel(f"{xlabel}; dashed: SFT, 50%")
  ax.set_title(title)
  fig.tight_layout()
  return fig


def plot_win_rates(rep: dict, path: Path) -> None:
  win_rates_figure(rep).savefig(path, dpi=120)


def alignment_tax_figure(rep: dict) -> Figure:
  """Held-out pretraining loss and cloze accuracy by model, side by side with the names once on the left."""
  names = rep["models"]
  fig = _figure(_width(7, names), _height(len(names)))
  axes = fig.subplots(1, 2, sharey=True)
  y = range(len(names))
  axes[0].barh(y, [_nan(rep["results"][n]["heldout_lm_loss"]) for n in names], height=0.6, color="#dd8452")
  axes[0].set_xlabel("held-out pretraining loss (nats/token)")
  axes[1].barh(y, [_nan(rep["results"][n]["cloze_accuracy"]) for n in names], height=0.6, color="#55a868")
  axes[1].set_xlabel("cloze accuracy")
  axes[1].set_xlim(0, 1)
  axes[1].xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
  axes[0].set_yticks(y, names)
  axes[0].invert_yaxis()   # shared: both panels list the report's order from the top
  fig.suptitle("Alignment tax")
  fig.tight_layout()
  return fig


def plot_alignment_tax(rep: dict, path: Path) -> None:
  alignment_tax_figure(rep).savefig(path, dpi=120)


def ppo_curves_figure(rep: dict, titles=("RM score", "gold score of samples", "KL to SFT (nats/episode)")) -> Figure:
  curves = {k: v for k, v in (rep.get("ppo_curves") or {}).items() if v["step"]}
  fig = _figure(11, 3.2)
  axes = fig.subplots(1, 3)
  for name, c in curves.items():
    for ax, key in zip(axes, ("rm_score", "gold_score", "kl")):
      ax.plot(c["step"], c[key], label=name)
  for ax, title in zip(axes, titles):
    ax.set_title(title)
    ax.set_xlabel("PPO iteration")
  if curves:
    axes[0].legend()
  fig.tight_layout()
  return fig


def plot_ppo_curves(rep: dict, path: Path) -> None:
  ppo_curves_figure(rep).savefig(path, dpi=120)


def write(rep: dict, out_dir: str | Path) -> None:
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "report.md").write_text(markdown(rep))
  plot_win_rates(rep, out_dir / "win_rates.png")
  plot_alignment_tax(rep, out_dir / "alignment_tax.png")
  plot_ppo_curves(rep, out_dir / "ppo_curves.png")
