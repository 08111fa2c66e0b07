"""Best-of-n against the gold judge: how far the RM can be trusted before RL touches it.

  python -m instructrl.tools.best_of_n --config=configs/instructgpt.py:tiny --workdir=W [--n=32] [--policy=sft]

Samples n answers per held-out eval prompt from a finished policy stage (default SFT, at ppo.temperature),
scores them with the trained RM (as PPO does: the ensemble's mean minus ppo.rm_uncertainty_coef x its
std), and for each n' = 1, 2, 4, ..., n reports the gold score of the answer the RM picks among n' of them
and of the one the gold judge picks (the ceiling), plus how often the held-out labelers would prefer the
pick to an independent sample of the same policy (the expected Bradley-Terry preference, no sampling
noise). Disjoint groups of n' samples are averaged. Gao et al. (2022) use this curve to measure
over-optimisation without RL: where the RM's curve turns down, its top-scored answers are ones it gets
wrong, and PPO at a low KL penalty heads there too. Writes W/analysis/best_of_n.json (and .png).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from instructrl import cli_flags, measures, objectives, parallel
from instructrl.data import world as world_lib
from instructrl.data.batching import prompt_response_examples
from instructrl.data.records import load_jsonl
from instructrl.models.config import ModelConfig
from instructrl.models.transformer import Decoder
from instructrl.stages import rm_ensemble, rm_models
from instructrl.stages.world import load_tokenizer


def curve(rm_scores, gold, win, ns) -> dict:
  """[P, N] arrays (one row per prompt) -> per n in ns: the mean gold / win of the RM's pick and of
  gold's pick among n samples, averaged over the N // n disjoint groups (first max wins ties)."""
  rm_scores, gold, win = (np.asarray(x, np.float64) for x in (rm_scores, gold, win))
  P, N = rm_scores.shape
  rows = np.arange(P)
  out = {"n": [], "rm_pick_gold": [], "rm_pick_win": [], "gold_pick_gold": [], "gold_pick_win": []}
  for n in ns:
    if not 1 <= n <= N:
      raise ValueError(f"best_of_n: n={n} outside 1..{N} samples")
    acc = np.zeros(4)
    groups = N // n
    for g in range(groups):
      sl = slice(g * n, (g + 1) * n)
      by_rm, by_gold = np.argmax(rm_scores[:, sl], 1), np.argmax(gold[:, sl], 1)
      acc += [gold[:, sl][rows, by_rm].mean(), win[:, sl][rows, by_rm].mean(),
              gold[:, sl][rows, by_gold].mean(), win[:, sl][rows, by_gold].mean()]
    for k, v in zip(("rm_pick_gold", "rm_pick_win", "gold_pick_gold", "gold_pick_win"), acc / groups):
      out[k].append(float(v))
    out["n"].append(int(n))
  return out


def preference(world, record, a: str, b: str, labeler) -> float:
  """P(the labeler ranks a above b): Plackett-Luce on two items is logistic in the utility gap."""
  if a.strip() == b.strip():
    return 0.5
  gap = world.utility(record, a, labeler.id) - world.utility(record, b, labeler.id)
  return float(1.0 / (1.0 + np.exp(-gap / labeler.temperature)))


def run(config, workdir: Path, n: int, policy: str = "sft", temperature: float | None = None) -> dict:
  workdir = Path(workdir)
  temperature = config.ppo.temperature if temperature is None else temperature
  mesh = parallel.make_mesh(config.mesh.shape)
  rules = parallel.rules_from_config(config.mesh.rules)
  world = world_lib.World.load(workdir / "world")
  tokenizer = load_tokenizer(workdir)
  model_cfg = ModelConfig.from_dict(config.model)
  rm_cfg = ModelConfig.from_dict(rm_models.trained_rm_model(config, workdir))
  members = rm_ensemble.load_members(config, workdir, mesh, rules)
  params = rm_models.load_policy(config, workdir, mesh, rules, policy, entry="ema" if policy.startswith("ppo") else "params")
  records = load_jsonl(workdir / "world" / "prompts_eval.jsonl", "eval")[:config.eval.report_prompts]
  raters = world.heldout_labelers
  if not raters:
    raise ValueError("best_of_n: the world has no held-out labeler group")
  key = jax.random.key(config.seed + 777)
  with parallel.activate(mesh, rules):
    draws = [measures.answer(params, model_cfg, tokenizer, world, records, rng=jax.random.fold_in(key, j),
                               eval_cfg=config.eval, temperature=temperature) for j in range(n + 1)]
  baseline, samples = draws[0], draws[1:]
  prompts = [world.format_prompt(r["prompt"]) for r in records]
  fits = lambda i, a: a is not None and len(tokenizer.encode(prompts[i])) + len(tokenizer.encode(a)) + 2 <= config.rm.seq_len
  keep = [i for i in range(len(records)) if fits(i, baseline[i]) and all(fits(i, s[i]) for s in samples)]
  if not keep:
    raise ValueError(f"best_of_n: no eval prompt whose answers all fit rm.seq_len={config.rm.seq_len}")

  model = Decoder(rm_cfg, head="scalar")
  score = jax.jit(lambda ps, t, l: objectives.ensemble_score(
      jnp.stack([rm_models.rm_scores(model, p, t, l) for p in ps]), config.ppo.rm_uncertainty_coef)[0])
  bs = config.rm.eval_batch_size
  scores = np.zeros((len(keep), n))
  gold = np.zeros((len(keep), n))
  win = np.zeros((len(keep), n))
  for j, answers in enumerate(samples):
    ex = prompt_response_examples(tokenizer, [prompts[i] for i in keep], [answers[i] for i in keep],
                                  config.rm.seq_len - 1, what="best-of-n samples")
    with parallel.activate(mesh, rules):
      scores[:, j] = rm_models.row_scores(score, members, ex.tokens, rm_models.eos_index(ex), bs, mesh, rules)
    for row, i in enumerate(keep):
      gold[row, j] = world.judge(records[i], answers[i]).score
      win[row, j] = preference(world, records[i], answers[i], baseline[i], raters[i % len(raters)])
  ns = [1 << k for k in range(int(np.log2(n)) + 1)]
  out = {"policy": policy, "temperature": temperature, "samples": n, "prompts": len(keep),
         "judged_by": raters[0].group, **curve(scores, gold, win, ns),
         "rm_gold_correlation_within_prompt": _within_prompt_corr(scores, gold),
         "by_family": by_family(scores, gold, win, [records[i]["family"] for i in keep], n)}
  dest = workdir / "analysis"
  dest.mkdir(exist_ok=True)
  (dest / "best_of_n.json").write_text(json.dumps(out, indent=1) + "\n")
  _plot(out, dest / "best_of_n.png")
  return out


def by_family(scores, gold, win, families, n: int) -> list[dict]:
  """One row per task family: its prompts, the within-prompt RM-gold correlation and the best-of-n
  endpoints (one sample, the RM's pick among n, gold's pick among n): where the RM cannot tell a family's
  right answers from its wrong ones, its pick is no better than a sample and PPO's gains there are noise."""
  rows = []
  families = np.asarray(families)
  for fam in sorted(set(families.tolist())):
    m = families == fam
    c = curve(scores[m], gold[m], win[m], [1, n])
    rows.append({"family": fam, "prompts": int(m.sum()), "rm_gold_correlation_within_prompt":
                 _within_prompt_corr(scores[m], gold[m]), "sample_gold": c["rm_pick_gold"][0],
                 "rm_pick_gold": c["rm_pick_gold"][1], "gold_pick_gold": c["gold_pick_gold"][1],
                 "rm_pick_win": c["rm_pick_win"][1]})
  return rows


def _within_prompt_corr(scores, gold) -> float:
  s = scores - scores.mean(1, keepdims=True)
  g = gold - gold.mean(1, keepdims=True)
  den = np.sqrt((s ** 2).sum() * (g ** 2).sum())
  return float((s * g).sum() / den) if den > 0 else float("nan")


def _plot(out: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
  for k, label in (("rm_pick", "RM's pick"), ("gold_pick", "gold's pick (ceiling)")):
    ax[0].plot(out["n"], out[f"{k}_gold"], "o-", label=label)
    ax[1].plot(out["n"], out[f"{k}_win"], "o-", label=label)
  for a, t in zip(ax, ("gold score", "preferred to a sample (held-out labelers)")):
    a.set_xscale("log", base=2)
    a.set_xlabel("n samples")
    a.set_title(t)
  ax[1].axhline(0.5, color="grey", lw=0.5)
  ax[0].legend()
  fig.suptitle(f"best of n, {out['policy']} at T={out['temperature']:g}, {out['prompts']} held-out prompts")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# Shared with the other command-line modules (cli_flags): importing this one beside main must not redefine them.
_CONFIG = cli_flags.define(config_flags.DEFINE_config_file, "config", None, "Config file, e.g. configs/instructgpt.py:tiny.",
                           lock_config=True)
_WORKDIR = cli_flags.define(flags.DEFINE_string, "workdir", None, "Run directory (created if missing).")
_N = cli_flags.define(flags.DEFINE_integer, "n", 32, "best_of_n: samples per prompt (a power of two gives every "
                      "power of two up to it)")
_POLICY = cli_flags.define(flags.DEFINE_string, "policy", "sft", "best_of_n: the stage whose answers are picked "
                           "from (sft, ppo, ppo_noptx)")
_TEMPERATURE = cli_flags.define(flags.DEFINE_float, "temperature", None, "best_of_n: sampling temperature "
                                "(default: ppo.temperature)")


def main(argv):
  del argv
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  out = run(_CONFIG.value, Path(_WORKDIR.value), _N.value, _POLICY.value, _TEMPERATURE.value)
  logging.info("best_of_n: wrote %s", Path(_WORKDIR.value) / "analysis" / "best_of_n.json")
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  from instructrl import errors
  errors.run_app(main)   # a bad config, file or checkpoint: one `error:` line, exit 2
