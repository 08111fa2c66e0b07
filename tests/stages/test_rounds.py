"""Two rounds of comparisons in one workdir (rm.rounds=2, the `,round2` option; stages/rounds.py): round one's RM
and PPO-ptx under W/round1, round two's RM ranking round one's PPO-ptx samples and training on both rounds'
comparisons, all from one command that a rerun skips."""

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import jax
import numpy as np

from instructrl import checkpoints
from tests.cli_helpers import cli_env, final_params, sigkill_when

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["world", "pretrain", "sft", "rm_round1", "ppo_round1", "rm", "ppo"]
# Cut short: the stages need complete checkpoints, not good ones.
FAST = ["--config.eval.n_prompts=0", "--config.pretrain.steps=20", "--config.pretrain.checkpoint_every=20",
        "--config.sft.steps=10", "--config.sft.checkpoint_every=10", "--config.rm.gold_probe_prompts=0"]


def cmd(workdir, stages=STAGES):
  return [sys.executable, "-m", "instructrl.main", "--config=configs/instructgpt.py:smoke,round2",
          f"--workdir={workdir}", f"--stages={','.join(stages)}", *FAST]


def cli(workdir, stages=STAGES, timeout=300):
  return subprocess.run(cmd(workdir, stages), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=cli_env())


def stage_lines(stderr: str) -> list[str]:
  return re.findall(r"pipeline \[\d+/\d+\] (\w+): (complete, skipping|running|generating)", stderr)


def sources(comparisons: Path) -> Counter:
  rows = [json.loads(l) for split in ("train", "valid") for l in (comparisons / f"{split}.jsonl").read_text().splitlines()]
  return Counter(s for r in rows for s in r["sources"])


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
  """One uninterrupted two-round run: (workdir, its output)."""
  w = tmp_path_factory.mktemp("rounds") / "w"
  out = cli(w)
  assert out.returncode == 0, out.stderr[-3000:]
  return w, out


@pytest.mark.slow
def test_two_rounds_run_into_one_workdir_and_a_rerun_skips_every_stage(two_rounds):
  w, out = two_rounds
  assert [s for s, _ in stage_lines(out.stderr)] == STAGES
  assert all(what != "complete, skipping" for _, what in stage_lines(out.stderr))

  # Round one: the usual RM (smoke ranks SFT samples only) and PPO-ptx, under W/round1.
  for stage in ("rm", "ppo"):
    meta = checkpoints.recorded_meta(w / "round1" / stage)
    assert meta and meta["complete"], stage
    assert (w / "round1" / "metrics" / f"{stage}.jsonl").exists()
  assert set(sources(w / "round1" / "comparisons")) == {"policy"}
  # Round two in the usual places: its comparisons rank round one's PPO-ptx samples among rm.round2_mix's
  # sources, its RM trains on both rounds' comparisons, and records what it was collected with.
  config = json.loads((w / "config.json").read_text())
  got = sources(w / "comparisons")
  assert set(got) == {s for s, v in config["rm"]["round2_mix"].items() if v > 0} and got["ppo"] > 0
  train = [int(n) for n in re.findall(r"rm: (\d+) train prompts", out.stderr)]
  assert len(train) == 2 and train[1] == 2 * train[0], train
  rm = checkpoints.recorded_meta(w / "rm")
  assert rm["complete"] and rm["settings"]["source_mix"] == config["rm"]["round2_mix"]
  # named from the workdir, so a moved workdir (or sweep members sharing round two) still matches
  assert rm["settings"]["ppo_source"] == "{workdir}/round1/ppo"
  assert rm["settings"]["extra_comparisons"] == "{workdir}/round1/comparisons"
  assert "rounds" not in rm["settings"] and "round2_mix" not in rm["settings"]
  assert checkpoints.recorded_meta(w / "ppo")["complete"] and not (w / "round1" / "world").exists()

  again = cli(w)
  assert again.returncode == 0, again.stderr[-3000:]
  assert stage_lines(again.stderr) == [(s, "complete, skipping") for s in STAGES]
  moved = w.parent / "moved"
  shutil.copytree(w, moved, ignore=shutil.ignore_patterns("LOCK"))
  again = cli(moved)
  assert again.returncode == 0, again.stderr[-3000:]
  assert stage_lines(again.stderr) == [(s, "complete, skipping") for s in STAGES]
  shutil.rmtree(moved)


def test_round_two_recorded_with_absolute_paths_still_matches(tmp_path):
  """Round two's RM as recorded before the {workdir} form (absolute paths to its run's round one) is the same
  setting; another ppo_source is not."""
  from configs import instructgpt
  from instructrl.stages import rounds
  asked = rounds.stage_config(instructgpt.get_config("smoke,round2"), "rm").rm
  assert (asked.ppo_source, asked.extra_comparisons) == ("{workdir}/round1/ppo", "{workdir}/round1/comparisons")
  assert rounds.expand(asked.ppo_source, tmp_path) == tmp_path.absolute() / "round1" / "ppo"
  assert rounds.expand("/runs/a/ppo", tmp_path) == Path("/runs/a/ppo")
  legacy = {**checkpoints.settings_of(asked), "ppo_source": "/runs/old/round1/ppo",
            "extra_comparisons": "/runs/old/round1/comparisons"}
  checkpoints.check_settings({"settings": legacy, "complete": True}, asked, "W/rm", "rm")
  for field, value in (("ppo_source", "/runs/old/ppo"), ("extra_comparisons", "/runs/old/comparisons")):
    with pytest.raises(checkpoints.CheckpointMismatch, match=f"rm.{field}: checkpoint has"):
      checkpoints.check_settings({"settings": {**legacy, field: value}}, asked, "W/rm", "rm")
  # a path the user gave (not the {workdir} form) is compared as written
  mine = {**checkpoints.settings_of(asked), "ppo_source": "/runs/b/round1/ppo"}
  with pytest.raises(checkpoints.CheckpointMismatch, match="rm.ppo_source"):
    checkpoints.check_settings({"settings": legacy}, mine, "W/rm", "rm")


@pytest.mark.slow
def test_kills_in_round_one_resume_exactly(two_rounds, tmp_path):
  """SIGKILL at the first checkpoint of round one's RM, then of its PPO-ptx; each rerun of the same command resumes
  under W/round1, and both rounds end as the uninterrupted run did: the same comparisons and final params.

  The kill lands as soon as a step is committed, not a fixed time after: smoke's PPO-ptx is 4 iterations, and a
  fast CPU finishes them inside half a second."""
  ref, w = two_rounds[0], tmp_path / "w"
  for stage in ("rm", "ppo"):
    # committed: our manifest is written last, after Orbax's rename of the step folder
    committed = lambda: any((p / checkpoints.MANIFEST).exists() for p in (w / "round1" / stage).glob("[0-9]*"))
    killed = sigkill_when(cmd(w), committed, cwd=ROOT, env=cli_env(), timeout=300)
    assert killed, f"the run ended before round one's {stage} committed a step"
    meta = checkpoints.recorded_meta(w / "round1" / stage)
    assert not (meta and meta.get("complete")), f"round one's {stage} finished before the kill"
  out = cli(w)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "pipeline [4/7] rm_round1: complete, skipping" in out.stderr
  assert re.search(r"pipeline \[5/7\] ppo_round1: resuming from step \d+", out.stderr), out.stderr[-3000:]
  for sub in ("round1/comparisons", "comparisons"):
    for split in ("train", "valid"):
      assert (w / sub / f"{split}.jsonl").read_bytes() == (ref / sub / f"{split}.jsonl").read_bytes(), (sub, split)
  for stage in ("round1/rm", "round1/ppo", "rm", "ppo"):
    (step, got), (ref_step, want) = final_params(w / stage), final_params(ref / stage)
    assert step == ref_step and jax.tree.all(jax.tree.map(np.array_equal, got, want)), stage


def test_round_two_without_round_one_is_refused_before_any_work(tmp_path):
  w = tmp_path / "w"
  out = cli(w, stages=["rm"], timeout=120)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "rm.rounds=2" in out.stderr and "round1/ppo is not finished" in out.stderr
  assert "rm_round1,ppo_round1" in out.stderr and not w.exists()


def test_round_one_ppo_length_is_its_own_field():
  """rm.round1_ppo_episodes sets round one's PPO-ptx length only; 0 leaves it ppo.total_episodes, and a length
  under one iteration is refused naming the field."""
  from configs import instructgpt
  from instructrl import config_check
  from instructrl.stages import rounds
  config = instructgpt.get_config("tiny,round2")
  assert config.rm.round1_ppo_episodes == 40 * config.ppo.batch_size   # the preset's half-length round one
  config.rm.round1_ppo_episodes = 0
  assert rounds.stage_config(config, "ppo_round1").ppo.total_episodes == config.ppo.total_episodes
  config.rm.round1_ppo_episodes = 40 * config.ppo.batch_size
  assert rounds.stage_config(config, "ppo_round1").ppo.total_episodes == 40 * config.ppo.batch_size
  for stage in ("rm_round1", "rm", "ppo", "ppo_noptx"):
    assert rounds.stage_config(config, stage).ppo.total_episodes == config.ppo.total_episodes, stage
  assert "round1_ppo_episodes" not in rounds.stage_config(config, "ppo_round1").rm   # no stage records it
  config.rm.round1_ppo_episodes = config.ppo.batch_size - 1
  with pytest.raises(config_check.ConfigError, match=r"rm.round1_ppo_episodes=63: expected >= ppo.batch_size=64"):
    config_check.check_config(config, 1, config.stages.split(","))
