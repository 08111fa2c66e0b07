"""The whole pipeline in one command on the smoke preset: world -> pretrain -> sft -> rm ->
ppo -> ppo_noptx -> eval with no --stages flag, a complete report, progress lines per stage, and a
rerun that skips every stage."""

import json
import subprocess

import numpy as np
import pytest
from tests.smoke_pipeline import ROOT, cli_env, command, smoke_run  # noqa: F401 -- smoke_run is a fixture

STAGES = ("world", "pretrain", "sft", "rm", "ppo", "ppo_noptx", "eval")


def test_default_stages_are_the_whole_pipeline():
  from configs import instructgpt
  for preset in ("smoke", "tiny", "1.3b"):
    assert tuple(instructgpt.get_config(preset).stages.split(",")) == STAGES


@pytest.mark.slow
def test_one_command_runs_every_stage_and_writes_a_complete_report(smoke_run):
  w = smoke_run["workdir"]
  rep = json.loads((w / "eval" / "report.json").read_text())
  assert rep["models"] == ["GPT", "GPT prompted", "GPT prompted (T=1)", "SFT", "SFT (T=0.7)", "PPO-ptx", "PPO"]
  assert rep["results"]["GPT prompted"]["temperature"] == 0.7 and rep["results"]["GPT prompted (T=1)"]["temperature"] == 1
  assert rep["results"]["SFT (T=0.7)"]["temperature"] == 0.7 and rep["results"]["SFT"]["temperature"] == 1
  for name in rep["models"]:
    r = rep["results"][name]
    assert 0 <= r["win_rate_vs_sft"]["mean"] <= 1 and 1 <= r["likert"]["mean"] <= 7, name
    assert 0 <= r["cloze_accuracy"] <= 1 and r["heldout_lm_loss"] > 0, name
  for name in rep["models"]:   # per-family gold: counts add up to the answered prompts, the means to the mean
    g = rep["results"][name]["gold"]
    assert sum(f["n"] for f in g["by_family"].values()) == g["n"], name
    np.testing.assert_allclose(sum(f["gold_score"] * f["n"] for f in g["by_family"].values()) / g["n"],
                               g["gold_score"], rtol=1e-6)
  assert {"accuracy_train_groups", "accuracy_heldout_group"} <= set(rep["rm"])
  fam = rep["rm"]["by_family"]
  assert "all" in fam["families"] and len(fam["families"]) >= 2, fam
  assert sum(m["pairs"] for f, m in fam["families"].items() if f != "all") == fam["families"]["all"]["pairs"]
  assert set(rep["ppo_curves"]) == {"PPO-ptx", "PPO"}
  md = (w / "eval" / "report.md").read_text()
  assert "| family | pairs | accuracy | utility ceiling | agrees with gold |" in md and md.count("| all |") == 1
  assert all(f"| {name} |" in md for name in rep["models"])
  # the main table, the family table and the compliance-by-behaviour table
  assert "## Gold score by task family" in md and "## Compliance by behaviour" in md and md.count("| SFT | 1 |") == 3
  for f in ("win_rates.png", "alignment_tax.png", "ppo_curves.png"):
    assert (w / "eval" / f).stat().st_size > 1000, f
  for stage in STAGES[1:-1]:
    assert (w / "metrics" / f"{stage}.jsonl").stat().st_size > 0, stage
  # One line per stage from the outer progress bar, in order, then the whole run's timing.
  err = smoke_run["stderr"]
  lines = [f"pipeline [{i}/7] {s}: {'generating' if s == 'world' else 'running'}" for i, s in enumerate(STAGES, 1)]
  at = [err.find(l) for l in lines]
  assert all(a >= 0 for a in at) and at == sorted(at), [l for l, a in zip(lines, at) if a < 0]
  assert "pipeline: done in" in err
  # The smoke preset's promise: "well under 2 minutes". Bounded in CPU seconds, which other jobs on the cores do not inflate
  # as they do wall time (measured figures: README, "One command").
  assert smoke_run["cpu_seconds"] < 120, (f"the smoke pipeline took {smoke_run['cpu_seconds']:.0f} CPU s "
                                          f"({smoke_run['seconds']:.0f} s wall)")


@pytest.mark.slow
def test_rerun_skips_every_stage(smoke_run, tmp_path):
  import shutil
  w = tmp_path / "copy"
  shutil.copytree(smoke_run["workdir"], w, ignore=shutil.ignore_patterns("LOCK"))
  before = (w / "eval" / "report.json").read_bytes()
  out = subprocess.run(command(w), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  for i, s in enumerate(STAGES, 1):
    assert f"pipeline [{i}/7] {s}: complete, skipping" in out.stderr, s
  assert "ETA unknown" in out.stderr     # nothing left to estimate: said, not a made-up time
  assert (w / "eval" / "report.json").read_bytes() == before


@pytest.mark.slow
def test_eval_reruns_when_a_stage_was_retrained(smoke_run, tmp_path):
  """Same model names, new checkpoint: the report must judge the new one, not skip on the old report."""
  import shutil
  w = tmp_path / "copy"
  shutil.copytree(smoke_run["workdir"], w, ignore=shutil.ignore_patterns("LOCK"))
  before = json.loads((w / "eval" / "report.json").read_text())
  ids_before = json.loads((w / "eval" / "judged_checkpoints.json").read_text())["model_ids"]
  shutil.rmtree(w / "ppo_noptx")
  out = subprocess.run(command(w) + ["--stages=ppo_noptx,eval", "--config.ppo.kl_coef=0.5"], cwd=ROOT,
                       env=cli_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "exists, skipping" not in out.stderr
  after = json.loads((w / "eval" / "report.json").read_text())
  assert after["models"] == before["models"]
  ids_after = json.loads((w / "eval" / "judged_checkpoints.json").read_text())["model_ids"]
  changed = [n for n in after["models"] if ids_after[n] != ids_before[n]]
  assert changed == ["PPO"], changed
  assert after["results"]["PPO"]["kl_coef"] == 0.5 and before["results"]["PPO"]["kl_coef"] != 0.5
  # The other models' cached answers were reused: their judged numbers are unchanged.
  assert after["results"]["SFT"]["gold"] == before["results"]["SFT"]["gold"]

  # Other eval settings: the stage runs again (it used to skip on the old report), the GPT baselines
  # are sampled anew at their new temperature, and the other models' cached answers are reused.
  out = subprocess.run(command(w) + ["--stages=eval", "--config.ppo.kl_coef=0.5",
                                     "--config.eval.baseline_temperature=1.0"], cwd=ROOT,
                       env=cli_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "exists, skipping" not in out.stderr
  hot = json.loads((w / "eval" / "report.json").read_text())
  assert hot["results"]["GPT prompted"]["temperature"] == 1.0, hot["results"]["GPT prompted"]
  assert hot["results"]["SFT"]["gold"] == after["results"]["SFT"]["gold"]
  assert json.loads((w / "eval" / "judged_checkpoints.json").read_text())["eval_settings"]["baseline_temperature"] == 1.0


@pytest.mark.slow
def test_a_finished_stage_refuses_new_training_settings(smoke_run, tmp_path):
  """Asking for another PPO lr in a workdir whose PPO finished must not silently keep the old one."""
  import shutil
  w = tmp_path / "copy"
  shutil.copytree(smoke_run["workdir"], w, ignore=shutil.ignore_patterns("LOCK"))
  out = subprocess.run(command(w) + ["--stages=ppo", "--config.ppo.learning_rate=3e-3"], cwd=ROOT,
                       env=cli_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "finished under other training settings (ppo.learning_rate: checkpoint has 0.0001, config has 0.003)" \
      in out.stderr, out.stderr[-3000:]


@pytest.mark.slow
def test_cloze_by_kind_agrees_with_the_report(smoke_run):
  from instructrl import analysis
  from instructrl.data.world.generate import CLOZE_KINDS
  w = smoke_run["workdir"]
  rep = json.loads((w / "eval" / "report.json").read_text())
  got = analysis.cloze_by_kind(w)
  # The few-shot and extra-temperature rows share a finished model's params (and its cloze score).
  assert list(got) == [m for m in rep["models"] if not m.startswith("GPT prompted") and "(T=" not in m]
  for name, acc in got.items():
    assert acc["all"] == pytest.approx(rep["results"][name]["cloze_accuracy"]), name
    assert set(acc) == {"all"} | {k for k, _ in CLOZE_KINDS}, name
