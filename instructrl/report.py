"""Turn the eval stage's report dict into report.md and PNG plots (also usable from a notebook:
`report.write(json.load(open("W/eval/report.json")), "somewhere")`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only: no display on CI machines or pod workers
import matplotlib.pyplot as plt  # noqa: E402


def _pct(x) -> str:
  return "-" if x is None or x != x else f"{100 * x:.1f}%"   # None or nan: not measured


def _num(x, fmt=".3f") -> str:
  return "-" if x is None else format(x, fmt)


def markdown(rep: dict) -> str:
  res = rep["results"]
  lines = [
      "# Evaluation report",
      "",
      f"Held-out prompts: {rep['n_prompts']['eval']} (truthful {rep['n_prompts']['truthful']}, toxicity "
      f"{rep['n_prompts']['toxicity']}); judged by the held-out labeler group {rep['judged_by']['group']} "
      f"({len(rep['judged_by']['labelers'])} labelers). Win rate is against SFT with a 95% interval; the SFT "
      "row is a second SFT sample against the first (the noise floor).",
      "",
      "| model | T | win rate vs SFT | Likert (1-7) | gold score | acceptable | truthful | truthful+inf. | "
      "false premise rejected | rude (plain / respectful) | held-out LM loss | cloze acc. |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name in rep["models"]:
    r = res[name]
    w, lk, g, tr, tx = r["win_rate_vs_sft"], r["likert"], r["gold"], r["truthfulness"], r["toxicity"]
    lines.append(
        f"| {name} | {r['temperature']:g} | {_pct(w['mean'])} [{_pct(w['ci_low'])}, {_pct(w['ci_high'])}] | "
        f"{lk['mean']:.2f} [{lk['ci_low']:.2f}, {lk['ci_high']:.2f}] | {g['gold_score']:.3f} | {_pct(g['acceptable_rate'])} | "
        f"{_pct(tr['truthful'])} | {_pct(tr['truthful_and_informative'])} | {_pct(tr['false_premise_rejected'])} | "
        f"{_pct(tx['rude_rate/plain'])} / {_pct(tx['rude_rate/respectful'])} | {r['heldout_lm_loss']:.3f} | "
        f"{_pct(r['cloze_accuracy'])} |")
  fams = sorted({f for name in rep["models"] for f in (res[name]["gold"].get("by_family") or {})})
  if fams:
    lines += ["", "## Gold score by task family", "",
              "Mean gold score of each model's answers to the held-out prompts of each family (where a model's "
              "win rate comes from).", "",
              "| model | T | " + " | ".join(fams) + " |", "|---|---|" + "---|" * len(fams)]
    for name in rep["models"]:
      by = res[name]["gold"].get("by_family") or {}
      lines.append(f"| {name} | {res[name]['temperature']:g} | " +
                   " | ".join(_num(by[f]["gold_score"], ".2f") if f in by else "-" for f in fams) + " |")
  rm = rep.get("rm") or {}
  if rm:
    lines += ["", "## Reward model", "",
              f"- validation accuracy, training labeler groups: {_pct(rm.get('accuracy_train_groups'))} (paper: 72.4%)",
              f"- validation accuracy, held-out group: {_pct(rm.get('accuracy_heldout_group'))} (paper: 69.6%)",
              f"- labeler agreement, training groups: {_pct(rm.get('labeler_agreement_train_groups'))}; held-out vs "
              f"training: {_pct(rm.get('labeler_agreement_heldout_vs_train'))}"]
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


def plot_win_rates(rep: dict, path: Path) -> None:
  names = rep["models"]
  w = [rep["results"][n]["win_rate_vs_sft"] for n in names]
  mean = [x["mean"] for x in w]
  err = [[x["mean"] - x["ci_low"] for x in w], [x["ci_high"] - x["mean"] for x in w]]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.bar(names, mean, yerr=err, capsize=4, color="#4c72b0")
  ax.axhline(0.5, color="grey", lw=1, ls="--")
  ax.set_ylabel("win rate vs SFT (95% CI)")
  ax.set_ylim(0, 1)
  ax.set_title("Preference of held-out labelers")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_alignment_tax(rep: dict, path: Path) -> None:
  names = rep["models"]
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
  axes[0].bar(names, [rep["results"][n]["heldout_lm_loss"] for n in names], color="#dd8452")
  axes[0].set_ylabel("held-out pretraining loss (nats/token)")
  axes[1].bar(names, [rep["results"][n]["cloze_accuracy"] for n in names], color="#55a868")
  axes[1].set_ylabel("cloze accuracy")
  axes[1].set_ylim(0, 1)
  for ax in axes:
    ax.tick_params(axis="x", rotation=30)
  fig.suptitle("Alignment tax")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_ppo_curves(rep: dict, path: Path) -> None:
  curves = {k: v for k, v in (rep.get("ppo_curves") or {}).items() if v["step"]}
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
  for name, c in curves.items():
    for ax, key in zip(axes, ("rm_score", "gold_score", "kl")):
      ax.plot(c["step"], c[key], label=name)
  for ax, title in zip(axes, ("RM score", "gold score of samples", "KL to SFT (nats/episode)")):
    ax.set_title(title)
    ax.set_xlabel("PPO iteration")
  if curves:
    axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(rep: dict, out_dir: str | Path) -> None:
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "report.md").write_text(markdown(rep))
  plot_win_rates(rep, out_dir / "win_rates.png")
  plot_alignment_tax(rep, out_dir / "alignment_tax.png")
  plot_ppo_curves(rep, out_dir / "ppo_curves.png")
