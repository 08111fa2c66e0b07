"""Truncated data files through the CLI: a user dataset cut mid-line is an error naming file and line
before any SFT step; a world file cut at a line end (which parses fine) is caught by the world's
marker (sizes and hashes of every file). In both cases no checkpoint of the stage is written."""

import shutil
import subprocess

import pytest

from tests.reliability.kill_harness import ROOT, cli_cmd, cli_env, run


def cli(w, stages, *flags):
  return subprocess.run(cli_cmd(w, stages, list(flags)), cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                        timeout=300)


def steps(stage_dir):
  return [p.name for p in stage_dir.glob("[0-9]*")] if stage_dir.exists() else []


@pytest.mark.slow
def test_truncated_files_stop_the_run_before_training(tmp_path):
  w = tmp_path / "w"
  run(w, "world,pretrain", tmp_path / "log")
  # A user dataset whose last line was cut in half (a copy interrupted, a full disk...).
  user = tmp_path / "user"
  user.mkdir()
  for f in ("demos_train.jsonl", "demos_valid.jsonl"):
    shutil.copy(w / "world" / f, user / f)
  lines = (user / "demos_train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
  (user / "demos_train.jsonl").write_text("".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2], encoding="utf-8")
  out = cli(w, "sft", f"--config.sft.demos_dir={user}")
  assert out.returncode != 0
  assert f"{user / 'demos_train.jsonl'}:{len(lines)}: invalid JSON" in out.stderr, out.stderr[-2000:]
  assert steps(w / "sft") == []
  # A world file cut at a line end: every line is valid JSON, so only the marker's sizes and hashes tell.
  corpus = w / "world" / "corpus_train.jsonl"
  rows = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
  corpus.write_text("".join(rows[:-5]), encoding="utf-8")
  out = cli(w, "sft")
  assert out.returncode != 0
  assert f"{corpus}: changed since the world was generated" in out.stderr, out.stderr[-2000:]
  assert steps(w / "sft") == []
  out = cli(w, "world")                      # the world stage itself refuses to skip over it
  assert out.returncode != 0 and f"{corpus}: changed since" in out.stderr, out.stderr[-2000:]


def test_metrics_of_a_run_killed_mid_append_resume_cleanly(tmp_path):
  """A kill inside MetricWriter.write leaves half a line: the resumed run drops it (and rows past the
  restored step), so the file ends as an uninterrupted run's."""
  import json
  from instructrl.metrics import MetricWriter
  path = tmp_path / "metrics" / "sft.jsonl"
  path.parent.mkdir()
  rows = [json.dumps({"step": s, "train/loss": 1.0 / s}, sort_keys=True) for s in (10, 20, 30)]
  path.write_text("\n".join(rows) + "\n" + rows[0][:9])       # killed while appending step 40
  w = MetricWriter(tmp_path, "sft", resume_step=20)            # the last checkpoint was step 20
  w.write(30, {"loss": 1.0 / 30}, prefix="train/")
  w.close()
  assert path.read_text() == "\n".join(rows) + "\n"
  assert sorted(p.name for p in path.parent.iterdir()) == ["sft.jsonl"]


def test_resumed_metrics_file_behind_a_symlink_stays_a_link(tmp_path):
  """A sweep member's metrics/<stage>.jsonl links into the sweep's shared stage dir: the resume's
  rewrite goes to the link's target, so the member stays linked (a killed sweep resumes) and the
  shared copy holds the rows (a regular file there once stopped the sweep with FileExistsError)."""
  import json
  from instructrl.metrics import MetricWriter
  shared = tmp_path / "_shared" / "ppo-0" / "metrics" / "ppo.jsonl"
  shared.parent.mkdir(parents=True)
  rows = [json.dumps({"step": s, "x": s}, sort_keys=True) for s in (1, 2, 3)]
  shared.write_text("\n".join(rows) + "\n")
  link = tmp_path / "member" / "metrics" / "ppo.jsonl"
  link.parent.mkdir(parents=True)
  link.symlink_to(shared)
  w = MetricWriter(tmp_path / "member", "ppo", resume_step=2)
  w.write(3, {"x": 30})
  w.close()
  assert link.is_symlink() and link.resolve() == shared.resolve()
  assert shared.read_text() == "\n".join(rows[:2] + [json.dumps({"step": 3, "x": 30}, sort_keys=True)]) + "\n"
  assert sorted(p.name for p in shared.parent.iterdir()) == ["ppo.jsonl"]
