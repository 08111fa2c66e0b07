"""The public-data pipeline as a user runs it: `instructrl.main --config=configs/public.py:smoke` from a
transformers GPT-2 directory and the public excerpts in tests/fixtures/public, through import, sft,
rm (+ the judge RM), ppo, ppo_noptx and eval; killed once and rerun; rerun again (nothing left to
do); its PPO policy and RM exported and reloaded in transformers with our logits and scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers", reason="needs the `hf` extra (a local GPT-2 is made with transformers)")
sys.path.insert(0, str(Path(__file__).parent))

import hf_fixtures as helpers  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PUB = helpers.FIX / "public"
STAGES = ("pretrain", "sft", "rm", "rm_judge", "ppo", "ppo_noptx")


def data_flags(hf_dir: Path) -> list[str]:
  return [f"--config.data.hf_dir={hf_dir}",
          f"--config.data.demos={PUB / 'self_instruct_seed_tasks_first10.jsonl'},"
          f"{PUB / 'self_instruct_user_oriented_first5.jsonl'}",
          f"--config.data.rankings={PUB / 'oasst_en_5_trees.jsonl'},{PUB / 'hh_harmless_base_test_first8.jsonl.gz'}",
          f"--config.data.prompts={PUB / 'oasst_prompt_lottery_first10.jsonl'}",
          f"--config.data.ptx={PUB / 'tinyshakespeare_head.txt'}"]


def cli(workdir: Path, hf_dir: Path) -> list[str]:
  return [sys.executable, "-m", "instructrl.main", "--config=configs/public.py:smoke", f"--workdir={workdir}",
          *data_flags(hf_dir)]


def env() -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def metric_steps(workdir: Path, stage: str) -> list[int]:
  path = workdir / "metrics" / f"{stage}.jsonl"
  return [json.loads(l)["step"] for l in path.read_text().splitlines() if "train/loss" in l or "train/objective" in l]


def complete(workdir: Path, stage: str) -> bool:
  from instructrl import checkpoints
  meta = checkpoints.recorded_meta(workdir / stage)
  return bool(meta and meta.get("complete"))


@pytest.mark.slow
def test_public_pipeline_runs_resumes_skips_and_exports(tmp_path):
  from tests.cli_helpers import sigkill_when
  hf_dir = helpers.gpt2_with_tokenizer(tmp_path / "gpt2")
  w = tmp_path / "run"
  log = tmp_path / "log.txt"
  # Killed while the judge RM trains (the policy's RM finished), then rerun to the end.
  killed = sigkill_when(cli(w, hf_dir), lambda: any((w / "rm_judge").glob("[0-9]*")), cwd=ROOT, env=env(),
                        timeout=600, log=log)
  assert killed, log.read_text()[-3000:]
  assert complete(w, "rm") and not complete(w, "ppo")
  p = subprocess.run(cli(w, hf_dir), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  assert all(complete(w, s) for s in STAGES)
  assert "rm: resuming" in p.stderr, p.stderr[-3000:]
  # The judge RM resumed: its logged steps run 1..N once each, as an uninterrupted run logs them.
  steps = metric_steps(w, "rm_judge")
  assert steps == sorted(set(steps)) and steps[-1] == max(steps), steps
  rep = json.loads((w / "eval" / "report.json").read_text())
  assert rep["proxy"] and rep["models"] == ["GPT", "SFT", "PPO-ptx", "PPO"]
  for name in rep["models"]:
    r = rep["results"][name]
    assert 0.0 <= r["win_rate_vs_sft"]["mean"] <= 1.0 and np.isfinite(r["judge_score"]["mean"])
  assert rep["results"]["SFT"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-6)   # SFT's own samples vs SFT
  curve = rep["ppo_curves"]["PPO-ptx"]
  assert len(curve["step"]) == 2 and all(np.isfinite(curve["gold_score"]))   # the judge RM along PPO
  md = (w / "eval" / "report.md").read_text()
  assert "proxy measure" in md and (w / "eval" / "win_rates.png").stat().st_size > 0
  assert (w / "eval" / "ppo_curves.png").stat().st_size > 0

  # A rerun finds every stage done: no new metrics, nothing rewritten.
  before = {s: (w / "metrics" / f"{s}.jsonl").read_bytes() for s in STAGES if s != "pretrain"}
  p = subprocess.run(cli(w, hf_dir), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert before == {s: (w / "metrics" / f"{s}.jsonl").read_bytes() for s in before}
  assert p.stderr.count("complete, skipping") == 6, p.stderr[-2000:]

  _exports_match_transformers(w, tmp_path)


def _exports_match_transformers(w: Path, tmp_path: Path) -> None:
  """The PPO EMA policy -> GPT2LMHeadModel with our logits; the RM -> GPT2ForSequenceClassification with
  our scores (its score bias folded into the final LayerNorm)."""
  import jax.numpy as jnp
  import torch
  import transformers
  from instructrl.models.transformer import Decoder
  from instructrl.stages.rm_models import rm_scores
  from instructrl.tools import convert
  tok = json.loads((w / "data" / "COMPLETE").read_text())["tokenizer"]
  pad = tok["vocab_size"] - 1   # any id apart from EOS (and from every token below): rows are right-padded with it
  tokens = np.random.default_rng(0).integers(3, pad, size=(3, 20)).astype(np.int64)
  convert.export_hf(w, "ppo", tmp_path / "ppo_hf", eos_id=tok["eos_id"])
  params, cfg = convert.load_stage_params(w, "ppo", entry="ema")
  ours = np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(tokens))[0])
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ppo_hf").eval()
  with torch.no_grad():
    theirs = model(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)

  lengths = np.array([20, 9, 14])
  padded = np.where(np.arange(20)[None] < lengths[:, None], tokens, pad)
  convert.export_hf(w, "rm", tmp_path / "rm_hf", eos_id=tok["eos_id"], pad_id=pad)
  params, cfg = convert.load_stage_params(w, "rm", head="scalar")
  ours = np.asarray(rm_scores(Decoder(cfg, head="scalar"), params, jnp.asarray(padded), jnp.asarray(lengths) - 1))
  model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm_hf").eval()
  with torch.no_grad():
    theirs = model(torch.as_tensor(padded)).logits[:, 0].numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
