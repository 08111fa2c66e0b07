"""instructrl.analysis on hand-made run directories: curves, the report table, samples with the gold
verdict, sweeps (the notebooks on a real smoke run: tests/test_notebooks.py)."""

import json

import numpy as np
import pytest

from instructrl import analysis
from instructrl.data import world as world_lib


def write_jsonl(path, rows, tail=""):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def fake_report(models=("SFT", "PPO-ptx")):
  res = {}
  for i, m in enumerate(models):
    res[m] = {"temperature": 1.0, "win_rate_vs_sft": {"mean": 0.5 + 0.1 * i, "ci_low": 0.4, "ci_high": 0.7, "n": 10},
              "likert": {"mean": 4.0 + i}, "gold": {"gold_score": 0.6, "acceptable_rate": 0.5},
              "truthfulness": {"truthful": 0.9}, "toxicity": {"rude_rate/plain": 0.1, "rude_rate/respectful": 0.0},
              "heldout_lm_loss": 2.0 - 0.5 * i, "cloze_accuracy": 0.75}
  return {"models": list(models), "results": res}


def test_load_run_reads_curves_finals_and_tolerates_a_cut_last_line(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"preset": "smoke"}))
  write_jsonl(tmp_path / "metrics" / "pretrain.jsonl",
              [{"step": 10, "train/loss": 3.0}, {"step": 20, "train/loss": "nan", "valid/loss": 2.5},
               {"step": 20, "final/gold_score": 0.1, "final/examples": [{"prompt": "p"}]}], tail='{"step": 30, "tr')
  write_jsonl(tmp_path / "metrics" / "ppo.jsonl", [{"step": 1, "train/objective/score": 0.1,
                                                    "train/objective/gold_score": 0.5, "train/objective/kl": 0.0}])
  write_jsonl(tmp_path / "metrics" / "zeta.jsonl", [{"step": 1, "x": 1}])
  run = analysis.load_run(tmp_path)
  assert run.config["preset"] == "smoke" and run.report is None
  assert run.stages == ["pretrain", "ppo", "zeta"]
  steps, loss = run.curve("pretrain", "train/loss")
  assert steps.tolist() == [10, 20] and loss[0] == 3.0 and np.isnan(loss[1])
  assert run.curve("pretrain", "valid/loss")[0].tolist() == [20]
  assert run.keys("pretrain") == ["train/loss", "valid/loss"]          # no final/ rows, no lists
  assert run.final("pretrain")["gold_score"] == 0.1
  assert run.curve("sft", "train/loss")[0].size == 0                    # a stage that has not run
  oo = analysis.over_optimisation(run)
  assert list(oo) == ["ppo"] and oo["ppo"]["gold_score"].tolist() == [0.5]
  with pytest.raises(FileNotFoundError, match="no such run directory"):
    analysis.load_run(tmp_path / "missing")


def test_report_rows_and_markdown_table():
  rows = analysis.report_rows(fake_report())
  assert [r["model"] for r in rows] == ["SFT", "PPO-ptx"]
  assert rows[1]["win_rate"] == pytest.approx(0.6) and rows[1]["win_rate_ci"] == (0.4, 0.7)
  assert rows[1]["heldout_lm_loss"] == 1.5
  md = analysis.format_table(rows, ["model", "win_rate", "win_rate_ci", "rude_plain"])
  assert md.splitlines()[0] == "| model | win_rate | win_rate_ci | rude_plain |"
  assert "| PPO-ptx | 0.600 | [0.400, 0.700] | 0.100 |" in md
  assert analysis.format_table([{"a": "x|y", "b": None}]).splitlines()[-1] == "| x\\|y | - |"


def test_over_seeds_means_with_a_student_t_interval(tmp_path):
  reports = []
  for seed, (w, low, loss) in enumerate([(0.6, 0.55, 1.0), (0.7, 0.66, 1.2), (0.8, 0.76, 1.4)]):
    r = fake_report()
    r["results"]["PPO-ptx"]["win_rate_vs_sft"].update(mean=w, ci_low=low)
    r["results"]["PPO-ptx"]["heldout_lm_loss"] = loss
    r["results"]["PPO-ptx"]["gold"]["by_behaviour"] = {"insult": {"compliant": w - 0.5}, "plain": {"compliant": 1.0}}
    r["results"]["SFT"]["gold"]["by_behaviour"] = {"insult": {"compliant": 0.5}}
    r.update(split="test", judged_by={"group": 4})
    (tmp_path / f"w{seed}" / "eval").mkdir(parents=True)
    (tmp_path / f"w{seed}" / "eval" / "report.json").write_text(json.dumps(r))
    reports.append(analysis.load_report(tmp_path / f"w{seed}"))
  sft, ppo = analysis.over_seeds(reports)
  # mean 0.7, sample std 0.1, t(0.975, 2 dof) = 4.3027: half-width 4.3027 * 0.1 / sqrt(3) = 0.2484
  assert ppo["win_rates"] == [0.6, 0.7, 0.8] and ppo["win_rate"] == pytest.approx(0.7)
  assert ppo["win_rate_ci"] == pytest.approx((0.7 - 0.24841, 0.7 + 0.24841), abs=1e-4)
  assert ppo["lowest_seed_ci_low"] == 0.55 and ppo["heldout_lm_loss"] == pytest.approx(1.2)
  assert ppo["compliant/insult"] == pytest.approx(0.2) and ppo["compliant/plain"] == 1.0
  assert sft["win_rate_ci"] == pytest.approx((0.5, 0.5)) and "compliant/plain" not in sft
  assert "| PPO-ptx | 0.600 / 0.700 / 0.800 |" in analysis.format_table([ppo], ["model", "win_rates"])
  reports[2]["split"] = "dev"
  with pytest.raises(ValueError, match="differ in"):
    analysis.over_seeds(reports)
  with pytest.raises(FileNotFoundError, match="--config.eval.split=dev"):
    analysis.load_report(tmp_path / "w0", "dev")


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("run") / "world"
  world_lib.generate(world_lib.get_config("smoke"), d)
  return d


def test_samples_pair_answers_with_prompts_and_judge_them(world_dir):
  w = world_dir.parent
  recs = [json.loads(l) for l in (world_dir / "prompts_eval.jsonl").read_text().splitlines()][:6]
  gold = [r["gold"] for r in recs]
  wrong = ["Zarzar" for _ in recs]
  wrong[1] = None   # a prompt skipped as too long
  for name, ans in (("SFT", wrong), ("PPO-ptx", gold)):
    p = w / "eval" / "answers" / f"{analysis.slug(name)}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"key": {}, "answers": {"eval": ans, "truthful": [], "toxicity": []}}))
  side = analysis.samples(w, ["SFT", "PPO-ptx"])
  assert len(side) == 6 and [s["prompt"] for s in side] == [r["prompt"] for r in recs]
  assert all(s["PPO-ptx"]["score"] == 1.0 and s["PPO-ptx"]["acceptable"] for s in side)
  assert side[1]["SFT"] is None and all(not s["SFT"]["acceptable"] for s in side if s["SFT"])
  assert analysis.win_loss(side, "PPO-ptx", "SFT") == {"better": 5, "tie": 0, "worse": 0, "n": 5}
  assert len(analysis.samples(w, ["SFT"], n=2)) == 2
  fam = recs[0]["family"]
  assert all(s["family"] == fam for s in analysis.samples(w, ["SFT"], families=[fam]))
  rows = analysis.sample_rows(side[:2], ["SFT", "PPO-ptx"])
  assert rows[1]["SFT"] == "(skipped)" and rows[0]["PPO-ptx"].endswith("[1.00, ok]")
  with pytest.raises(FileNotFoundError, match="no cached answers of 'PPO'"):
    analysis.samples(w, ["PPO"])


def test_sweep_rows(tmp_path):
  sweep = {"sweep": "x", "members": {
      "beta0": {"overrides": {"ppo.kl_coef": 0.0}, "seeds_done": 2,
                "win rate": {"mean": 0.5, "std": 0.02, "values": [0.48, 0.52]}},
      "beta0.02": {"overrides": {}, "seeds_done": 0, "win rate": {"mean": None, "std": None, "values": []}}}}
  (tmp_path / "sweep.json").write_text(json.dumps(sweep))
  s = analysis.load_sweep(tmp_path)
  assert analysis.sweep_metrics(s) == ["win rate"]
  rows = analysis.sweep_rows(s)
  assert rows[0] == {"member": "beta0", "overrides": "ppo.kl_coef=0.0", "seeds": 2, "win rate": "0.500 ± 0.020"}
  assert rows[1]["overrides"] == "(base)" and rows[1]["win rate"] is None
  with pytest.raises(FileNotFoundError, match="no sweep summary"):
    analysis.load_sweep(tmp_path / "nope")


def test_by_family_means_gold_per_family_and_overall():
  rows = [{"family": "add", "SFT": {"score": 0.2}, "PPO": {"score": 1.0}},
          {"family": "add", "SFT": {"score": 0.4}, "PPO": None},
          {"family": "sort", "SFT": {"score": 1.0}, "PPO": {"score": 0.5}}]
  got = analysis.by_family(rows, ["SFT", "PPO"])
  assert [r["family"] for r in got] == ["add", "sort", "all"]
  assert got[0] == {"family": "add", "n": 2, "SFT": pytest.approx(0.3), "PPO": 1.0}
  assert got[1]["PPO"] == 0.5 and got[2]["SFT"] == pytest.approx(1.6 / 3) and got[2]["PPO"] == pytest.approx(0.75)
