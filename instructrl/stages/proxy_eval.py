"""The `eval` stage on public data: proxy measures, judged by a reward model PPO never saw.

Public data has no gold judge. The judge RM (W/rm_judge, stages/rm_files.py) is trained like the
policy's RM on rankings of disjoint prompts and stands in for it, as the "gold" RM of Gao et al. 2022
("Scaling Laws for Reward Model Overoptimization"). Every number here is a proxy: it says how a
second RM, trained on the same kind of human rankings, ranks the answers, not what people prefer.

On held-out prompts (W/data/prompts_eval.jsonl; eval.split="dev": prompts_dev, into W/eval_dev), for
GPT (the imported checkpoint, at eval.baseline_temperature), SFT, PPO and PPO-ptx (their EMA policies,
at eval.temperature):
- win rate against SFT by the judge RM (the higher score wins, ties count 1/2), with a 95% interval;
  the SFT row is a second SFT sample against the first (the noise floor);
- mean judge-RM and policy-RM scores of the answers;
- KL to SFT: log pi(y|x) - log pi_SFT(y|x) summed over each answer's tokens, averaged over the
  model's own samples (an unbiased estimate of KL(pi || pi_SFT) for models sampled at T = 1);
- response length in tokens;
- the alignment tax: LM loss on held-out text (W/data/corpus_valid.jsonl);
- along PPO: the policy RM's score and the judge RM's score of each iteration's samples
  (over-optimisation shows as the first rising while the second falls) and the KL.
Answers are cached per model in <out>/answers/ (keyed on checkpoint and decoding), report.json last.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from instructrl import checkpoints, measures, parallel
from instructrl.data.batching import TokenExamples, pack_texts, prompt_response_examples
from instructrl.data.records import load_jsonl
from instructrl.metrics import read_metrics
from instructrl.models.config import ModelConfig
from instructrl.stages.rm_models import RMScorer
from instructrl.stages.train_state import abstract_state, make_optimizer, state_shardings
from instructrl.stages.world import world_fingerprint

JUDGE, POLICY_RM = "rm_judge", "rm"   # the judge RM (stages/rm_files.py) and PPO's reward


def win_rate(scores: list[float], baseline: list[float]) -> dict:
  """How often the judge scores an answer above the baseline's to the same prompt; ties count 1/2."""
  a, b = np.asarray(scores), np.asarray(baseline)
  return measures.mean_ci(np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0)), bounds=(0.0, 1.0))


def kl_to_reference(params, ref_params, model_cfg: ModelConfig, examples: TokenExamples, batch_size: int) -> float:
  """Mean over rows of sum_t [log pi(y_t) - log pi_ref(y_t)] on the response tokens (the samples are pi's)."""
  nll, _ = measures.sequence_nll(params, model_cfg, examples, batch_size)
  ref_nll, _ = measures.sequence_nll(ref_params, model_cfg, examples, batch_size)
  return float(np.mean(ref_nll - nll))


def ppo_curve(path: Path) -> dict:
  rows = [r for r in read_metrics(path) if "train/objective/score" in r]
  pick = lambda k: [r.get(f"train/{k}") for r in rows]
  return {"step": [r["step"] for r in rows], "rm_score": pick("objective/score"),
          "gold_score": pick("objective/judge_score"), "kl": pick("objective/kl")}


def run(config, workdir: Path, mesh, rules) -> dict:
  from instructrl.stages import evaluate
  from instructrl.stages.source import open_source
  workdir = Path(workdir)
  split = config.eval.get("split", "test")
  out_dir = evaluate.report_dir(workdir, split)
  ms = evaluate.proxy_models(workdir)
  if not any(m["name"] == "SFT" for m in ms):
    raise checkpoints.StageMissing(f"{workdir}/sft: no finished SFT checkpoint; the eval stage compares against SFT")
  if evaluate.is_judged(config, workdir):
    logging.info("eval: report for %s exists, skipping", [m["name"] for m in ms])
    return json.loads((out_dir / "report.json").read_text())
  ecfg = config.eval
  src = open_source(config, workdir)
  tok = src.tokenizer
  model_cfg = ModelConfig.from_dict(config.model)
  records = load_jsonl(src.dir / ("prompts_eval.jsonl" if split == "test" else "prompts_dev.jsonl"),
                       "eval")[:ecfg.report_prompts]
  prompts = [src.format_prompt(r["prompt"]) for r in records]
  tx, _ = make_optimizer(config.sft, 1)
  abstract = abstract_state(model_cfg, tx, state_shardings(model_cfg, tx, mesh, rules))["params"]
  load = lambda m: checkpoints.load_params(workdir / m["stage"], abstract, model_cfg.to_dict(),
                                           world_fingerprint(workdir), entry=m["entry"], step=m["step"])[0]
  judge = RMScorer(config, workdir, JUDGE, tok, mesh, rules)
  policy_rm = RMScorer(config, workdir, POLICY_RM, tok, mesh, rules)
  texts = [r["text"] for r in load_jsonl(src.dir / "corpus_valid.jsonl", "text")]
  valid_lm = pack_texts(tok.encode_batch(texts), min(config.ppo.ptx_seq_len, model_cfg.max_len - 1), tok) if texts else None
  seq_len = ecfg.prompt_len + ecfg.max_new_tokens

  answers, rows, sft_params = {}, {}, None
  with parallel.activate(mesh, rules):
    sft_model = next(m for m in ms if m["name"] == "SFT")
    sft_params = load(sft_model)
    for m in tqdm(ms, desc="eval: models", unit="model", disable=jax.process_index() != 0):
      params = sft_params if m is sft_model else load(m)
      t = evaluate._temperature(m, ecfg)
      answers[m["name"]] = _answers(out_dir, m, params, model_cfg, tok, prompts, config, m["index"], t)
      if m is sft_model:
        answers["SFT resample"] = _answers(out_dir, {**m, "name": "SFT resample"}, params, model_cfg, tok, prompts,
                                           config, len(ms), t)
      a = answers["SFT resample" if m is sft_model else m["name"]]
      keep = [i for i, x in enumerate(a) if x is not None]
      ex = prompt_response_examples(tok, [prompts[i] for i in keep], [a[i] for i in keep], seq_len, truncate=True)
      rows[m["name"]] = {
          "stage": m["stage"], "temperature": t,
          "heldout_lm_loss": measures.heldout_lm_loss(params, model_cfg, valid_lm, ecfg.batch_size)
          if valid_lm is not None else None,
          # An unbiased estimate only for answers sampled at T = 1 from this model.
          "kl_to_sft": kl_to_reference(params, sft_params, model_cfg, ex, ecfg.batch_size) if t == 1.0 else None,
          "response_tokens": float(np.mean([len(x) for x in tok.encode_batch([a[i] for i in keep])])),
          **{k: m[k] for k in ("ptx_coef", "kl_coef") if k in m}}

  judged = {name: _scores(judge, prompts, a) for name, a in answers.items()}
  rm_judged = {name: _scores(policy_rm, prompts, a) for name, a in answers.items()}
  for m in ms:
    name = "SFT resample" if m["name"] == "SFT" else m["name"]
    both = [i for i in range(len(prompts)) if judged[name][i] is not None and judged["SFT"][i] is not None]
    rows[m["name"]].update(
        win_rate_vs_sft=win_rate([judged[name][i] for i in both], [judged["SFT"][i] for i in both]),
        judge_score=measures.mean_ci([x for x in judged[name] if x is not None]),
        rm_score=measures.mean_ci([x for x in rm_judged[name] if x is not None]))
  out = {"proxy": True, "models": [m["name"] for m in ms], "results": rows, "split": split,
         "n_prompts": {"eval": len(prompts), "answered": {k: sum(x is not None for x in v) for k, v in answers.items()}},
         "judged_by": "judge RM (W/rm_judge): rankings of prompts disjoint from the policy RM's",
         "ppo_curves": {m["name"]: ppo_curve(workdir / "metrics" / f"{m['stage']}.jsonl")
                        for m in ms if m["stage"] in evaluate.PPO_STAGES}}
  write(out, out_dir)
  evaluate._write_json(out_dir / evaluate.JUDGED, evaluate.judged_record(config, ms))
  evaluate._write_json(out_dir / "report.json", out)
  logging.info("eval: wrote %s", out_dir)
  return out


def _scores(scorer: RMScorer, prompts: list[str], answers: list) -> list:
  keep = [i for i, a in enumerate(answers) if a is not None]
  got = dict(zip(keep, scorer.score([prompts[i] for i in keep], [answers[i] for i in keep])))
  return [got.get(i) for i in range(len(prompts))]


def _answers(out_dir: Path, m: dict, params, model_cfg, tokenizer, prompts, config, index, temperature) -> list:
  from instructrl.stages import evaluate
  path = out_dir / "answers" / f"{evaluate.slug(m['name'])}.json"
  key = {"stage": m["stage"], "step": m["step"], "id": m["id"], "index": index, "seed": config.seed,
         "temperature": temperature, "max_new_tokens": config.eval.max_new_tokens, "n": len(prompts)}
  if path.exists():
    cached = json.loads(path.read_text())
    if cached.get("key") == key:
      return cached["answers"]
  rng = jax.random.fold_in(jax.random.key(config.seed + 110), index)
  got = measures.generate(params, model_cfg, tokenizer, prompts, rng=rng, batch_size=config.eval.batch_size,
                          prompt_len=config.eval.prompt_len, max_new_tokens=config.eval.max_new_tokens,
                          temperature=temperature)
  evaluate._write_json(path, {"key": key, "answers": got})
  return got


# ----------------------------------------------------------------------------- report

def _pct(x) -> str:
  return "-" if x is None else f"{100 * x['mean']:.1f}% [{100 * x['ci_low']:.1f}, {100 * x['ci_high']:.1f}]"


def _num(x, fmt=".3f") -> str:
  return "-" if x is None else format(x, fmt)


def markdown(rep: dict) -> str:
  r = rep["results"]
  lines = [f"# Proxy evaluation ({rep['split']} prompts)", "",
           "**Every figure here is a proxy measure.** Public data has no gold judge: answers are judged by a "
           "second reward model (the judge RM), trained on rankings of prompts disjoint from those of the RM "
           "that PPO optimised (Gao et al. 2022). It says how another RM trained on the same kind of human "
           "rankings ranks the answers, not what people prefer.", "",
           f"{rep['n_prompts']['eval']} held-out prompts, {rep['n_prompts']['answered'].get('SFT', 0)} of them within "
           f"eval.prompt_len (the rest are skipped, as the paper drops over-long prompts); the SFT row compares a "
           f"second SFT sample with the first (the noise floor).", "",
           "| model | T | win rate vs SFT (judge RM, 95% CI) | judge RM score | policy RM score | KL to SFT (nats) "
           "| response tokens | held-out text loss |",
           "|---|---|---|---|---|---|---|---|"]
  for name in rep["models"]:
    x = r[name]
    lines.append(f"| {name} | {x['temperature']:g} | {_pct(x['win_rate_vs_sft'])} | {_num(x['judge_score']['mean'])} "
                 f"| {_num(x['rm_score']['mean'])} | {_num(x['kl_to_sft'], '.2f')} | {x['response_tokens']:.1f} "
                 f"| {_num(x['heldout_lm_loss'])} |")
  lines += ["", "KL to SFT: the mean over the model's own answers of the summed log-ratio, shown for models "
            "sampled at T = 1. Held-out text loss: nats per token on W/data/corpus_valid.jsonl (the alignment "
            "tax, as text loss).", "",
            "Along PPO (ppo_curves.png): the policy RM's score, the judge RM's score of each iteration's samples "
            "and the KL. Over-optimisation shows as the first rising while the second falls.", ""]
  for name, c in rep["ppo_curves"].items():
    if c["step"]:
      lines.append(f"- {name}: policy RM {_num(c['rm_score'][0])} -> {_num(c['rm_score'][-1])}, judge RM "
                   f"{_num(c['gold_score'][0])} -> {_num(c['gold_score'][-1])}, KL {_num(c['kl'][-1], '.2f')} "
                   f"over {len(c['step'])} iterations")
  return "\n".join(lines) + "\n"


def write(rep: dict, out_dir: Path) -> None:
  from instructrl import report
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "report.md").write_text(markdown(rep))
  report.win_rates_figure(rep, title="Judge RM's preference (proxy)",
                          xlabel="judge RM win rate vs SFT (95% CI)").savefig(
                              out_dir / "win_rates.png", dpi=120)
  report.ppo_curves_figure(rep, titles=("policy RM score", "judge RM score of samples",
                                        "KL to SFT (nats/episode)")).savefig(out_dir / "ppo_curves.png", dpi=120)
