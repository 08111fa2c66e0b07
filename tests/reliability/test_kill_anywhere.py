"""Kill anywhere, resume exactly (tests/reliability/kill_harness.py): the smoke pipeline SIGKILLed at
seeded random events and rerun with the same command ends with the same final params of every stage,
the same metrics (wall-clock rates aside) and the same data files as an uninterrupted run.

The fast variant (CI) kills world/pretrain/SFT 3 times; the slow one runs world to eval and kills 8
times, one seed each.
"""

import json

import pytest

from tests.reliability import kill_harness

STAGES = ["world", "pretrain", "sft", "rm", "ppo", "eval"]   # ppo_noptx too works (kill_harness.EVENTS), slower


def campaign(tmp_path, stages, kills, seed):
  ref, w = tmp_path / "reference", tmp_path / "killed"
  kill_harness.run(ref, ",".join(stages), tmp_path / "reference.log")
  out = kill_harness.campaign(ref, w, stages, kills, seed, tmp_path)
  print("KILL HARNESS " + json.dumps({k: v for k, v in out.items() if k != "events"}))
  for e in out["events"]:
    print("  ", json.dumps(e))
  assert out["differences"] == [], out
  assert out["kills"] >= kills - 1, out        # a planned kill may miss only if its run ended first
  return out


def test_kills_during_world_pretrain_sft_resume_exactly(tmp_path):
  out = campaign(tmp_path, STAGES[:3], kills=3, seed=6)   # world files, pretrain steps, an SFT save
  assert out["kills"] == 3


@pytest.mark.slow
def test_kills_anywhere_in_the_whole_pipeline_resume_exactly(tmp_path):
  campaign(tmp_path, STAGES, kills=8, seed=7)   # every stage, 3 inside-write targets
