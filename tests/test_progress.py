"""The whole-pipeline progress bar: cost model, what a stage's checkpoints say, the bar's bookkeeping
(no training here; tests/test_pipeline.py runs it end to end)."""

import json

import pytest

from configs import instructgpt
from instructrl import progress
from instructrl.checkpoints import MANIFEST
from instructrl.stages import costs


def fake_checkpoint(stage_dir, step, complete, manifest=True):
  d = stage_dir / str(step)
  (d / "meta").mkdir(parents=True)
  (d / "meta" / "metadata").write_text(json.dumps({"step": step, "complete": complete}))
  if manifest:
    (d / MANIFEST).write_text("{}")


def test_loop_steps_are_what_the_stages_derive():
  smoke, tiny = instructgpt.get_config("smoke"), instructgpt.get_config("tiny")
  # smoke, from the stages' own log lines: "rm: 32 train prompts ..., 4 steps of 8", "ppo: ... 4 iterations"
  assert progress.stage_steps("rm", smoke) == 4 and progress.stage_steps("ppo", smoke) == 4
  rm = tiny.rm   # the RM stage: ceil(epochs * train prompts / batch), a valid_fraction of the prompts held out
  n = min(rm.n_prompts, tiny.world.n_rm_prompts)
  assert progress.stage_steps("rm", tiny) == -(-(n - round(rm.valid_fraction * n)) // rm.batch_size)
  assert progress.stage_steps("ppo", tiny) == tiny.ppo.total_episodes // tiny.ppo.batch_size
  assert progress.stage_steps("pretrain", tiny) == 1500 and progress.stage_steps("eval", tiny) == 0
  one = progress.stage_steps("rm", tiny)
  tiny.rm.ensemble_size = 3            # the ensemble's members train in turn, each a whole RM run
  assert progress.stage_steps("rm", tiny) == 3 * one


def test_rm_state_sums_the_ensemble_members(tmp_path):
  tiny = instructgpt.get_config("tiny")
  tiny.rm.ensemble_size = 3
  one = progress.stage_steps("rm", tiny) // 3
  assert progress.stage_state("rm", tmp_path, False, tiny) == ("new", 0)
  fake_checkpoint(tmp_path / "rm", one, complete=True)
  assert progress.stage_state("rm", tmp_path, False, tiny) == ("resume", one)   # members 1 and 2 to train
  fake_checkpoint(tmp_path / "rm_ensemble" / "member1", one, complete=True)
  fake_checkpoint(tmp_path / "rm_ensemble" / "member2", 25, complete=False)
  assert progress.stage_state("rm", tmp_path, False, tiny) == ("resume", 2 * one + 25)
  fake_checkpoint(tmp_path / "rm_ensemble" / "member2", one, complete=True)
  assert progress.stage_state("rm", tmp_path, False, tiny) == ("complete", 3 * one)


def test_costs_scale_with_the_work_and_ptx_costs_extra():
  c = instructgpt.get_config("tiny")
  pre, loop, post = progress.stage_cost("pretrain", c)
  assert pre == 0 and loop == 3 * 1500 * 32 * 96 and post == 2 * 256 * 32 * costs.SAMPLE_COST
  c.pretrain.steps = 3000
  assert progress.stage_cost("pretrain", c)[1] == 2 * loop
  assert progress.stage_cost("ppo", c)[1] > progress.stage_cost("ppo_noptx", c)[1] > 0
  assert progress.stage_cost("eval", c, n_models=6)[1] == 2 * progress.stage_cost("eval", c, n_models=3)[1]
  assert progress.stage_cost("world", c) == (0.0, 0.0, 0.0)
  # Every stage of tiny costs something, and pretraining is not most of the run.
  total = {s: sum(progress.stage_cost(s, c, n_models=6)) for s in ("pretrain", "sft", "rm", "ppo", "ppo_noptx", "eval")}
  assert total["pretrain"] < 0.6 * sum(total.values()) and min(total.values()) > 0


def test_two_rounds_count_round_one_under_its_own_directory(tmp_path):
  one, two = instructgpt.get_config("smoke"), instructgpt.get_config("smoke,round2")
  # Round one's stages are the rm and ppo stages again: the same steps; round two's RM samples the extra
  # "ppo" source (one more source's spare samples per prompt) on top of round one's four.
  assert progress.stage_steps("rm_round1", two) == progress.stage_steps("rm", one)
  # Round two's RM trains on both rounds' comparisons: "rm: 64 train prompts ..., 8 steps of 8" in the log.
  assert progress.stage_steps("rm", two) == 2 * progress.stage_steps("rm", one) == 8
  assert progress.stage_steps("ppo_round1", two) == progress.stage_steps("ppo", one)
  assert progress.stage_cost("rm_round1", two) == progress.stage_cost("rm", one)
  assert progress.stage_cost("ppo_round1", two) == progress.stage_cost("ppo", one)
  assert progress.stage_cost("rm", two)[1] == 2 * progress.stage_cost("rm", one)[1]
  sampling = lambda c, s: progress.stage_cost(s, c)[0]
  sources = lambda mix: sum(1 for w in dict(mix).values() if w > 0)
  k = sum(two.rm.k_choices) / len(two.rm.k_choices)
  per_source = two.rm.n_prompts * 2 * two.rm.max_new_tokens * costs.SAMPLE_COST   # SPARE = 2 a source
  assert sampling(two, "rm") - sampling(two, "rm_round1") == pytest.approx(
      per_source * (sources(two.rm.round2_mix) - sources(two.rm.source_mix)))
  assert sampling(two, "rm_round1") == pytest.approx(two.rm.n_prompts * (k + 2) * two.rm.max_new_tokens
                                                     * costs.SAMPLE_COST)
  # Their checkpoints are read under W/round1, the final round's under W.
  fake_checkpoint(tmp_path / "round1" / "rm", 4, complete=True)
  fake_checkpoint(tmp_path / "round1" / "ppo", 2, complete=False)
  assert progress.stage_state("rm_round1", tmp_path, False, two) == ("complete", 4)
  assert progress.stage_state("ppo_round1", tmp_path, False, two) == ("resume", 2)
  assert progress.stage_state("rm", tmp_path, False, two) == ("new", 0)
  # The bar's total counts both rounds: what is left of round one, then all of round two.
  stages = ["rm_round1", "ppo_round1", "rm", "ppo"]
  with progress.Pipeline(two, tmp_path, stages, enabled=False) as p:
    pre, loop, post = progress.stage_cost("ppo", two)
    assert p.left["rm_round1"] == 0.0 and p.left["ppo_round1"] == pytest.approx(loop / 2 + post)
    assert p.left["rm"] == pytest.approx(sum(progress.stage_cost("rm", two)))
    assert p.bar.total == pytest.approx(sum(p.left.values()))


def test_checkpoint_state_reads_the_newest_committed_step(tmp_path):
  d = tmp_path / "sft"
  assert progress.checkpoint_state(d) == ("new", 0)
  fake_checkpoint(d, 5, complete=False)
  assert progress.checkpoint_state(d) == ("resume", 5)
  fake_checkpoint(d, 10, complete=False, manifest=False)     # an unfinished save is not a checkpoint
  assert progress.checkpoint_state(d) == ("resume", 5)
  fake_checkpoint(d, 20, complete=True)
  assert progress.checkpoint_state(d) == ("complete", 20)
  assert not (tmp_path / "ppo").exists() and progress.checkpoint_state(tmp_path / "ppo") == ("new", 0)


def test_bar_counts_only_the_work_left_and_reaches_its_total(tmp_path, capsys):
  c = instructgpt.get_config("smoke")
  (tmp_path / "world").mkdir()
  (tmp_path / "world" / "COMPLETE").write_text("{}")
  fake_checkpoint(tmp_path / "pretrain", 60, complete=True)
  fake_checkpoint(tmp_path / "sft", 20, complete=False)      # half of smoke's 40 steps
  stages = ["world", "pretrain", "sft"]
  with progress.Pipeline(c, tmp_path, stages) as p:
    pre, loop, post = progress.stage_cost("sft", c)
    assert p.left == {"world": 0.0, "pretrain": 0.0, "sft": pytest.approx(loop / 2 + post)}
    assert p.bar.total == pytest.approx(loop / 2 + post)
    for s in stages:
      p.start(s)
      if s == "sft":
        for done in range(21, 41):
          p.reporter("sft")(done, 40)         # what loop.run reports
        assert p.bar.n == pytest.approx(loop / 2)   # the loop's share; the final sampling is still to come
        p.reporter("pretrain")(5, 60)         # another stage's report is ignored
        assert p.bar.n == pytest.approx(loop / 2)
      p.finish(s)
    assert p.bar.n == pytest.approx(p.bar.total)
  err = capsys.readouterr().err
  assert "pipeline [1/3] world: complete, skipping" in err and "pipeline [2/3] pretrain: complete, skipping" in err
  assert "pipeline [3/3] sft: resuming from step 20 of 40" in err
  n = p.bar.n
  p.reporter("sft")(40, 40)      # after the pipeline: a no-op
  assert p.bar.n == n


def test_only_process_zero_prints(tmp_path, capsys):
  with progress.Pipeline(instructgpt.get_config("smoke"), tmp_path, ["world"], enabled=False) as p:
    p.start("world")
    p.finish("world")
  assert "pipeline" not in capsys.readouterr().err
