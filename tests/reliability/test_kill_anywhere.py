"""Kill anywhere, resume exactly (tests/reliability/kill_harness.py): the smoke pipeline SIGKILLed at
seeded random events and rerun with the same command ends with the same final params of every stage,
the same metrics (wall-clock rates aside), the same data files and the same eval outputs (the report, and
byte for byte the cached answers and judged_checkpoints.json, whose checkpoint ids are content digests)
as an uninterrupted run.

The fast variant kills world generation and pretraining 3 times (~1 minute); the slow one runs world to
eval and kills 8 times (a few minutes). test_main.py, test_reward.py and test_ppo.py add one kill each
after a checkpoint of pretrain/SFT, RM and PPO.
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


def test_kills_during_world_and_pretrain_resume_exactly(tmp_path):
  out = campaign(tmp_path, STAGES[:2], kills=3, seed=2)   # world files, inside a pretrain save, pretrain steps
  assert out["kills"] == 3


@pytest.mark.slow
def test_kills_anywhere_in_the_whole_pipeline_resume_exactly(tmp_path):
  campaign(tmp_path, STAGES, kills=8, seed=7)   # every stage, 3 inside-write targets


def test_eval_outputs_are_compared_byte_for_byte(tmp_path):
  """differences() on two hand-made eval directories: the report without its timings, the rest byte for byte."""
  ref, w = tmp_path / "reference", tmp_path / "killed"
  for d in (ref, w):
    (d / "eval" / "answers").mkdir(parents=True)
    (d / "eval" / "judged_checkpoints.json").write_text('{"model_ids": {"SFT": "0123"}}\n')
    (d / "eval" / "answers" / "sft.json").write_text('{"key": {"id": "0123"}, "answers": ["a"]}\n')
  (ref / "eval" / "report.json").write_text('{"results": 1, "seconds": 5}')
  (w / "eval" / "report.json").write_text('{"results": 1, "seconds": 7}')
  assert kill_harness.differences(ref, w, ["eval"]) == []
  (w / "eval" / "judged_checkpoints.json").write_text('{"model_ids": {"SFT": "4567"}}\n')
  (w / "eval" / "answers" / "sft.json").write_text('{"answers": ["a"], "key": {"id": "0123"}}\n')   # same JSON
  (w / "eval" / "answers" / "ppo.json").write_text("{}\n")
  assert kill_harness.differences(ref, w, ["eval"]) == [
      "eval/judged_checkpoints.json differs", "eval/answers/ppo.json: only in the killed run",
      "eval/answers/sft.json differs"]
