"""End to end through the CLI on the smoke preset: files left behind, exact resume after SIGKILL,
a mismatched checkpoint refused, bad flags refused. Each run is a subprocess, as a user runs it."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tests.cli_helpers import cli_env, final_params, sigkill_when_exists

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--config.eval.n_prompts=0", "--config.pretrain.steps=40", "--config.pretrain.checkpoint_every=5",
        "--config.sft.steps=20", "--config.sft.checkpoint_every=5"]


def cli(workdir, *extra, stages="world,pretrain,sft", check=True, timeout=300):
  cmd = [sys.executable, "-m", "instructrl.main", "--config=configs/instructgpt.py:smoke", f"--workdir={workdir}",
         f"--stages={stages}", *extra]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=cli_env())
  if check and out.returncode:
    raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  w = tmp_path_factory.mktemp("ref")
  t0 = time.perf_counter()
  cli(w, *FAST)
  return w, time.perf_counter() - t0


def test_smoke_pipeline_leaves_its_run_directory(reference_run):
  w, seconds = reference_run
  for f in ["config.json", "world/COMPLETE", "world/tokenizer.model", "world/corpus_train.jsonl",
            "world/demos_train.jsonl", "metrics/pretrain.jsonl", "metrics/sft.jsonl"]:
    assert (w / f).is_file(), f
  assert final_params(w / "pretrain")[0] == 40 and final_params(w / "sft")[0] == 20
  rows = [json.loads(l) for l in (w / "metrics/sft.jsonl").read_text().splitlines()]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert losses and all(np.isfinite(losses))
  config = json.loads((w / "config.json").read_text())
  assert config["preset"] == "smoke" and config["sft"]["steps"] == 20
  # A rerun finds every stage complete and changes nothing.
  before = final_params(w / "sft")[1]
  cli(w, *FAST)
  after = final_params(w / "sft")[1]
  import jax
  assert jax.tree.all(jax.tree.map(np.array_equal, before, after))


def test_resume_after_sigkill_gives_identical_params(reference_run, tmp_path):
  ref, _ = reference_run
  w = tmp_path / "killed"
  kills = 0
  for stage, wait_for in (("pretrain", "pretrain/5"), ("sft", "sft/5")):
    cmd = [sys.executable, "-m", "instructrl.main", "--config=configs/instructgpt.py:smoke", f"--workdir={w}",
           "--stages=world,pretrain,sft", *FAST]
    sigkill_when_exists(cmd, w / wait_for, cwd=ROOT, env=cli_env())
    kills += 1
    final = {"pretrain": "40", "sft": "20"}[stage]
    assert not (w / stage / final).exists(), f"the kill landed after {stage} finished"
  cli(w, *FAST)
  import jax
  for stage in ("pretrain", "sft"):
    step_a, a = final_params(ref / stage)
    step_b, b = final_params(w / stage)
    assert step_a == step_b
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b)), f"{stage}: resumed params differ"
  assert kills == 2
  # The metrics file of the resumed run has one line per logged step, as the uninterrupted one.
  steps = lambda d: [json.loads(l)["step"] for l in (d / "metrics/pretrain.jsonl").read_text().splitlines()]
  assert steps(w) == steps(ref)


def test_mismatched_checkpoint_is_refused(reference_run, tmp_path):
  ref, _ = reference_run
  w = tmp_path / "mismatch"
  import shutil
  shutil.copytree(ref / "world", w / "world")
  shutil.copytree(ref / "pretrain", w / "pretrain")
  out = cli(w, *FAST, "--config.model.n_layers=3", stages="sft", check=False)
  assert out.returncode == 2
  assert "n_layers" in out.stderr and "checkpoint has 2" in out.stderr and "config has 3" in out.stderr


def tree(root):
  """Every path under root, with size and sha256 for files."""
  import hashlib
  return {str(p.relative_to(root)): "dir" if p.is_dir() else (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
          for p in sorted(root.rglob("*"))}


def test_a_model_change_on_resume_is_refused_and_changes_nothing(reference_run, tmp_path):
  """Rerunning finished stages with another model shape: refused naming the field and both values, before
  any file changes (config.json, LOCK, checkpoints); no good step is taken for damage and moved to corrupt/."""
  import shutil
  ref, _ = reference_run
  w = tmp_path / "w"
  shutil.copytree(ref, w)
  before = tree(w)
  out = cli(w, *FAST, "--config.model.n_layers=3", stages="world,pretrain", check=False)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and [l for l in lines if l.startswith("error:")] == lines[-1:], out.stderr[-3000:]
  assert "model.n_layers: checkpoint has 2, config has 3" in lines[-1] and "--workdir" in lines[-1], lines[-1]
  assert "Traceback" not in out.stderr
  assert tree(w) == before
  assert not list(w.rglob("corrupt"))


@pytest.mark.parametrize("flag, needle", [
    ("--config.model.style=gpt3", "model.style"),
    ("--config.sft.warmup_steps=500", "warmup_steps"),
    ("--config.mesh.shape=(3,1,1)", "mesh.shape"),
    ("--config.model.nonexistent=1", "nonexistent"),
    ("--config.rm.source_mix.ppo=0.5", "rm.ppo_source"),          # iterated collection needs an earlier PPO run
])
def test_bad_config_values_give_clear_errors(tmp_path, flag, needle):
  out = cli(tmp_path, *FAST, flag, stages="world,pretrain,sft", check=False)
  assert out.returncode != 0
  assert needle in out.stderr, out.stderr[-2000:]


def test_unknown_stage_is_refused(tmp_path):
  out = cli(tmp_path, stages="world,rlhf", check=False)
  assert out.returncode != 0 and "rlhf" in out.stderr
