"""The sweep runner: which stages members share, the links, and the aggregate table (no training here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructrl.tools import sweep

ROOT = Path(__file__).resolve().parents[1]


def load(name, arg="smoke"):
  return sweep.load_sweep(str(ROOT / "configs" / "sweeps" / f"{name}.py") + f":{arg}")


def by_member(runs):
  return {r["member"]: r for r in runs}


def test_members_share_exactly_the_stages_upstream_of_their_overrides(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  kl = by_member(sweep.plan(load("kl_coef"), tmp_path))
  a, b = kl["beta0.01"], kl["beta0.02"]
  for stage in ("world", "pretrain", "sft", "rm"):
    assert a["shared"][stage] == b["shared"][stage], stage
  for stage in ("ppo", "eval"):
    assert a["shared"][stage] != b["shared"][stage], stage
  assert "ppo_noptx" not in a["shared"]   # the beta sweep is PPO-ptx's
  assert b["computes"]["rm"] == "beta0.01/seed0" and b["computes"]["ppo"] == "beta0.02/seed0"
  # gamma only changes PPO-ptx: the gamma = 0 reference (ppo_noptx) is computed once for all members
  ptx = by_member(sweep.plan(load("ptx_coef"), tmp_path))
  assert len({r["shared"]["ppo_noptx"] for r in ptx.values()}) == 1
  assert len({r["shared"]["ppo"] for r in ptx.values()}) == len(ptx)
  # model size: only the world is shared
  size = by_member(sweep.plan(load("model_size"), tmp_path))
  assert len({r["shared"]["world"] for r in size.values()}) == 1
  assert len({r["shared"]["pretrain"] for r in size.values()}) == len(size)


def test_seeds_share_the_world_only(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  runs = sweep.plan(load("rm_k", "tiny"), tmp_path)
  k4 = [r for r in runs if r["member"] == "K4"]
  assert [r["seed"] for r in k4] == [0, 1, 2]
  assert len({r["shared"]["world"] for r in k4}) == 1 and len({r["shared"]["pretrain"] for r in k4}) == 3
  assert "--config.seed=2" in k4[2]["cmd"] and "--config.rm.k_choices=(4,)" in k4[2]["cmd"]


def test_member_config_applies_overrides_and_rejects_unknown_fields():
  cfg = sweep.member_config(f"{ROOT}/configs/instructgpt.py:smoke", {"ppo.kl_coef": 0.05, "rm.k_choices": (2,)}, 3)
  assert cfg.ppo.kl_coef == 0.05 and tuple(cfg.rm.k_choices) == (2,) and cfg.seed == 3
  with pytest.raises(KeyError, match="ppo.no_such_field"):
    sweep.member_config(f"{ROOT}/configs/instructgpt.py:smoke", {"ppo.no_such_field": 1}, 0)


def test_links_point_every_member_at_the_shared_outputs(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  runs = by_member(sweep.plan(load("kl_coef"), tmp_path))
  for r in runs.values():
    sweep.link_shared(r)
    sweep.link_shared(r)   # idempotent
  a, b = runs["beta0.01"]["run_dir"], runs["beta0.02"]["run_dir"]
  assert (a / "sft").resolve() == (b / "sft").resolve() and (a / "metrics/rm.jsonl").resolve() == \
      (b / "metrics/rm.jsonl").resolve()
  assert (a / "ppo").resolve() != (b / "ppo").resolve()
  (a / "sft" / "marker").write_text("written by one member")
  assert (b / "sft" / "marker").read_text() == "written by one member"


def test_aggregate_means_and_stds_over_seeds(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  s = load("rm_k", "tiny")
  runs = sweep.plan(s, tmp_path)
  for r in runs:
    if r["member"] == "K9" and r["seed"] == 2:
      continue   # a member with a missing seed is averaged over what exists
    acc = {"K2": 0.6, "K4": 0.62, "K9": 0.64, "K4-9": 0.63}[r["member"]] + 0.01 * r["seed"]
    assert "--config.eval.split=dev" in r["cmd"]   # sweeps choose settings: they read the dev split
    (r["run_dir"] / "eval_dev").mkdir(parents=True)
    (r["run_dir"] / "eval_dev" / "report.json").write_text(json.dumps({"rm": {"accuracy_train_groups": acc}}))
  monkeypatch.setattr(sweep, "_SWEEP", type("F", (), {"present": False, "value": None})())
  out = sweep.aggregate(s, runs, tmp_path)["members"]
  k4 = out["K4"]["RM accuracy (training groups)"]
  assert k4["mean"] == pytest.approx(0.63) and k4["std"] == pytest.approx(0.01) and len(k4["values"]) == 3
  assert out["K9"]["seeds_done"] == 2 and out["K9"]["RM accuracy (training groups)"]["mean"] == pytest.approx(0.645)
  assert out["K2"]["RM accuracy (held-out group)"]["mean"] is None
  md = (tmp_path / "sweep.md").read_text()
  assert "| K4 | rm.k_choices=(4,) | 3 | - | 0.630 ± 0.010 |" in md   # columns in the ConfigDict's (sorted) order
  assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_dry_run_prints_one_command_per_member_and_seed(tmp_path):
  out = subprocess.run([sys.executable, "-m", "instructrl.tools.sweep", "--sweep=configs/sweeps/ptx_coef.py:tiny",
                        f"--workdir={tmp_path}", "--dry_run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  cmds = [l for l in out.stdout.splitlines() if "instructrl.main" in l]
  assert len(cmds) == 4 * 3
  assert "# gamma1 seed 0: computes ppo,eval; shares world,pretrain,sft,rm,ppo_noptx" in out.stdout
  assert not any(tmp_path.iterdir()), "a dry run must not create run directories"


def _fake_run(run_dir: Path, config, stages):
  """A run directory with a config.json and a marker file in each stage's outputs."""
  run_dir.mkdir(parents=True)
  cfg = config.to_dict()
  del cfg["rm"]["base_workdir"]          # written before this field existed: it had its default
  (run_dir / "config.json").write_text(json.dumps(cfg, default=list))
  for stage in stages:
    for out in sweep.STAGE_OUTPUTS[stage]:
      p = run_dir / out
      if out.endswith(".jsonl"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f'{{"stage": "{stage}"}}\n')
      else:
        p.mkdir(parents=True, exist_ok=True)
        (p / "marker").write_text(f"{run_dir.name}:{stage}")
        if stage == "eval":   # the models its report judged
          models = ["GPT", "SFT"] + [{"ppo": "PPO-ptx", "ppo_noptx": "PPO"}[s] for s in stages if s in ("ppo", "ppo_noptx")]
          (p / "report.json").write_text(json.dumps({"models": models}))


def test_dry_run_with_adopt_says_what_would_be_adopted_and_copies_nothing(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  # gamma 1 = the tiny default, judged on the dev split as sweeps judge
  base = sweep.member_config("configs/instructgpt.py:tiny", {"eval.split": "dev"}, 0)
  _fake_run(tmp_path / "seed0", base, sweep.STAGE_OUTPUTS)
  out = subprocess.run([sys.executable, "-m", "instructrl.tools.sweep", "--sweep=configs/sweeps/ptx_coef.py:tiny",
                        f"--workdir={tmp_path / 'sweep'}", "--seeds=0", f"--adopt={tmp_path / 'seed0'}", "--dry_run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "# would adopt 7 stage outputs" in out.stdout
  assert "# gamma0.3 seed 0: computes ppo,eval; adopts world,pretrain,sft,rm,ppo_noptx; shares nothing" in out.stdout
  assert "# gamma1 seed 0: computes nothing new; adopts ppo,eval; shares world,pretrain,sft,rm,ppo_noptx" in out.stdout
  assert not (tmp_path / "sweep").exists()


def test_a_run_recorded_with_rm_heldout_group_hashes_as_now_only_when_it_held_out_the_worlds_group(tmp_path,
                                                                                                     monkeypatch):
  """rm.heldout_group is now world.heldout_group: an old config.json holding out the world's group (4) reads
  as one without the field; one that held out another group matches no current run."""
  monkeypatch.chdir(ROOT)
  base = sweep.member_config("configs/instructgpt.py:tiny", {}, 0)
  keys = lambda d: sweep.stage_keys(sweep.run_config(d, "configs/instructgpt.py:tiny"), ["rm", "ppo"])
  for group, same in ((4, True), (2, False)):
    _fake_run(tmp_path / f"g{group}", base, sweep.STAGE_OUTPUTS)
    saved = json.loads((tmp_path / f"g{group}" / "config.json").read_text())
    saved["rm"]["heldout_group"] = group
    (tmp_path / f"g{group}" / "config.json").write_text(json.dumps(saved))
    assert (keys(tmp_path / f"g{group}") == sweep.stage_keys(base, ["rm", "ppo"])) == same, group


def test_a_run_recorded_before_a_ppo_field_was_renamed_is_adopted_whole(tmp_path, monkeypatch):
  """ppo.discount was ppo.gamma: a finished run's config.json under the old name hashes as the new one."""
  monkeypatch.chdir(ROOT)
  s = load("kl_coef", "tiny")
  s.seeds = (0,)
  runs = sweep.plan(s, tmp_path / "sweep")
  base = sweep.member_config(s.base, {"eval.split": "dev"}, 0)
  _fake_run(tmp_path / "old", base, sweep.STAGE_OUTPUTS)
  saved = json.loads((tmp_path / "old" / "config.json").read_text())
  saved["ppo"]["gamma"] = saved["ppo"].pop("discount")
  (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
  assert sweep.stage_keys(sweep.run_config(tmp_path / "old", s.base), ["ppo"]) == sweep.stage_keys(base, ["ppo"])
  (tmp_path / "sweep" / "_shared").mkdir(parents=True)
  got = {name.split("-")[0] for name in sweep.adopt(runs, s, [tmp_path / "old"])}
  assert {"ppo", "eval"} <= got, got


def test_adopt_copies_the_matching_stages_of_finished_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  s = load("kl_coef", "tiny")
  s.seeds = (0, 1)
  runs = sweep.plan(s, tmp_path / "sweep")
  base = sweep.member_config(s.base, {"eval.split": "dev"}, 0)
  _fake_run(tmp_path / "seed0", base, sweep.STAGE_OUTPUTS)          # beta 0.2 = the tiny default
  test_split = sweep.member_config(s.base, {}, 0)                   # the same run judged on the test split
  _fake_run(tmp_path / "seed0_test", test_split, sweep.STAGE_OUTPUTS)
  (tmp_path / "sweep" / "_shared").mkdir(parents=True)
  assert not any(n.startswith("eval-") for n in sweep.adopt(runs, s, [tmp_path / "seed0_test"], copy=False))
  other = sweep.member_config(s.base, {"ppo.kl_coef": 0.2, "sft.learning_rate": 1e-4, "eval.split": "dev"}, 1)
  _fake_run(tmp_path / "seed1_other_sft", other, sweep.STAGE_OUTPUTS)
  got = sweep.adopt(runs, s, [tmp_path / "seed0", tmp_path / "seed1_other_sft"])
  got = sorted((name.split("-")[0], src.name) for name, src in got.items())
  # seed 0: every stage of the default member, world..eval; the seed-1 run differs from SFT on: only its
  # pretrain matches (its world is the same world, already adopted from seed 0: the world has its own seed)
  assert got == sorted([(st, "seed0") for st in s.stages.split(",")] + [("pretrain", "seed1_other_sft")]), got
  for r in runs:
    sweep.link_shared(r)
  r = by_member([r for r in runs if r["seed"] == 0])
  assert (r["beta0.2"]["run_dir"] / "eval" / "marker").read_text() == "seed0:eval"
  assert (r["beta0.01"]["run_dir"] / "rm" / "marker").read_text() == "seed0:rm"
  assert not (r["beta0.01"]["run_dir"] / "ppo" / "marker").exists()       # another beta: trained anew
  r1 = by_member([r for r in runs if r["seed"] == 1])
  assert (r1["beta0.01"]["run_dir"] / "world" / "marker").read_text() == "seed0:world"
  assert (r1["beta0.01"]["run_dir"] / "pretrain" / "marker").read_text() == "seed1_other_sft:pretrain"
  assert not (r1["beta0.01"]["run_dir"] / "sft" / "marker").exists()
  assert (r1["beta0.01"]["run_dir"] / "metrics" / "rm.jsonl").read_text() == ""
  # a shared dir with outputs is never overwritten
  (r["beta0.2"]["run_dir"] / "sft" / "marker").write_text("changed")
  assert sweep.adopt(runs, s, [tmp_path / "seed0"]) == {}
  assert (r["beta0.01"]["run_dir"] / "sft" / "marker").read_text() == "changed"
  with pytest.raises(FileNotFoundError, match="config.json"):
    sweep.adopt(runs, s, [tmp_path])


def test_numeric_sweeps_plot_against_the_swept_value():
  table = {"beta0": {"overrides": {"ppo.kl_coef": 0.0}}, "beta0.1": {"overrides": {"ppo.kl_coef": 0.1}}}
  assert sweep._numeric_axis(table) == ("ppo.kl_coef", [0.0, 0.1])
  assert sweep._numeric_axis({"K4": {"overrides": {"rm.k_choices": (4,)}}}) is None
  assert sweep._numeric_axis({"a": {"overrides": {"x": 1}}, "b": {"overrides": {"y": 2}}}) is None


def test_only_names_unknown_members_and_aggregate_only_runs_nothing(tmp_path):
  base = [sys.executable, "-m", "instructrl.tools.sweep", "--sweep=configs/sweeps/kl_coef.py:smoke", f"--workdir={tmp_path}"]
  out = subprocess.run(base + ["--only=beta0.1,beta9"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "--only: no member named ['beta9']" in out.stderr, out.stderr[-2000:]
  assert not any(tmp_path.iterdir())
  out = subprocess.run(base + ["--aggregate_only"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json", "sweep.md", "sweep.png"]
  assert "| beta0.1 | ppo.kl_coef=0.1 | 0 | - |" in (tmp_path / "sweep.md").read_text()


def test_two_round_sweeps_pin_round_one_to_the_base_preset(tmp_path, monkeypatch):
  """`,round2` base, round1 = "base": a beta sweep's members share one round one per seed (the base preset's) and
  round two's RM, and differ from PPO on; each run is round one's command under the base config, then the
  member's. round1 = "member": each member's overrides reach round one, so nothing after SFT is shared."""
  monkeypatch.chdir(ROOT)
  s = load("kl_coef", "smoke,round2")
  runs = by_member(sweep.plan(s, tmp_path))
  a, b = runs["beta0.01"], runs["beta0.02"]
  assert list(a["shared"]) == ["world", "pretrain", "sft", "rm_round1", "ppo_round1", "rm", "ppo", "eval"]
  for stage in ("world", "pretrain", "sft", "rm_round1", "ppo_round1", "rm"):
    assert a["shared"][stage] == b["shared"][stage], stage
  assert a["shared"]["ppo"] != b["shared"]["ppo"]
  one, two = b["cmds"]
  assert "--stages=world,pretrain,sft,rm_round1,ppo_round1" in one and not any("kl_coef" in f for f in one)
  assert "--stages=rm,ppo,eval" in two and "--config.ppo.kl_coef=0.02" in two and two == b["cmd"]
  # round one's keys are the base preset's: the same as a plain two-round run of the seed
  base = sweep.member_config(s.base, {"eval.split": "dev"}, 0)
  want = sweep.stage_keys(base, sweep.sweep_stages(s, base))
  assert a["shared"]["ppo_round1"].name == f"ppo_round1-{want['ppo_round1']}"
  s.round1 = "member"
  runs = by_member(sweep.plan(s, tmp_path))
  a, b = runs["beta0.01"], runs["beta0.02"]
  assert a["shared"]["rm_round1"] == b["shared"]["rm_round1"] and a["shared"]["ppo_round1"] != b["shared"]["ppo_round1"]
  assert a["shared"]["rm"] != b["shared"]["rm"] and len(b["cmds"]) == 1
  # a pinned round one cannot follow a member that changes what it reads
  s.round1 = "base"
  s.members = [dict(name="lr", overrides={"sft.learning_rate": 1e-4})]
  with pytest.raises(ValueError, match="sweep member lr changes sft, which round one reads"):
    sweep.plan(s, tmp_path)
  s.round1 = "both"
  with pytest.raises(ValueError, match="round1='both'"):
    sweep.plan(s, tmp_path)


def test_two_round_links_reach_round_one_outputs(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  runs = by_member(sweep.plan(load("kl_coef", "smoke,round2"), tmp_path))
  for r in runs.values():
    sweep.link_shared(r)
  a, b = runs["beta0.01"]["run_dir"], runs["beta0.02"]["run_dir"]
  assert (a / "round1").is_dir() and not (a / "round1").is_symlink()   # its own dir: its tensorboard logs
  for out in ("round1/ppo", "round1/comparisons", "round1/metrics/ppo.jsonl", "rm"):
    assert (a / out).is_symlink() and (a / out).resolve() == (b / out).resolve(), out


def test_metric_paths_average_the_tail_of_a_curve():
  report = {"ppo_curves": {"PPO-ptx": {"rm_score": [0.0, 1.0, 2.0, 4.0], "kl": []}}}
  assert sweep.get_path(report, "ppo_curves/PPO-ptx/rm_score/last2") == 3.0
  assert sweep.get_path(report, "ppo_curves/PPO-ptx/rm_score/last10") == 1.75
  assert sweep.get_path(report, "ppo_curves/PPO-ptx/kl/last10") is None
  assert sweep.get_path(report, "ppo_curves/PPO/rm_score/last10") is None


def test_cadence_fields_do_not_change_a_stages_key():
  """A finished stage resumes and skips across log/eval/checkpoint cadences (checkpoints.CADENCE_FIELDS), so a
  sweep must not retrain it when only those change."""
  base = sweep.member_config(f"{ROOT}/configs/instructgpt.py:tiny", {}, 0)
  stages = ["pretrain", "sft", "rm", "ppo"]
  cadence = sweep.member_config(f"{ROOT}/configs/instructgpt.py:tiny",
                                {"rm.eval_every": 7, "pretrain.log_every": 3, "ppo.checkpoint_every": 5}, 0)
  assert sweep.stage_keys(cadence, stages) == sweep.stage_keys(base, stages)
  other = sweep.member_config(f"{ROOT}/configs/instructgpt.py:tiny", {"rm.learning_rate": 1e-4}, 0)
  assert sweep.stage_keys(other, stages)["rm"] != sweep.stage_keys(base, stages)["rm"]


def test_an_eval_without_a_row_the_member_judges_is_not_adopted(tmp_path, monkeypatch):
  """A beta sweep's run (no ppo_noptx) hashes like a gamma sweep's on every stage, but its report has no PPO
  row: the gamma sweep adopts its stages, not its eval."""
  monkeypatch.chdir(ROOT)
  s = load("ptx_coef", "tiny")
  s.seeds = (0,)
  runs = sweep.plan(s, tmp_path / "sweep")
  base = sweep.member_config(s.base, {"eval.split": "dev"}, 0)
  _fake_run(tmp_path / "beta_run", base, ["world", "pretrain", "sft", "rm", "ppo", "eval"])
  (tmp_path / "sweep" / "_shared").mkdir(parents=True)
  got = {name.split("-")[0] for name in sweep.adopt(runs, s, [tmp_path / "beta_run"], copy=False)}
  assert got == {"world", "pretrain", "sft", "rm", "ppo"}, got
  _fake_run(tmp_path / "full_run", base, sweep.STAGE_OUTPUTS)
  assert "eval" in {name.split("-")[0] for name in sweep.adopt(runs, s, [tmp_path / "full_run"], copy=False)}


def test_round_one_ppo_length_keys_round_one_ppo_and_what_follows():
  """rm.round1_ppo_episodes changes round one's PPO-ptx (so round two's RM and PPO) but not round one's RM: a
  sweep never reuses a round one of another length."""
  from configs import instructgpt
  base = instructgpt.get_config("smoke,round2")
  short = instructgpt.get_config("smoke,round2")
  short.rm.round1_ppo_episodes = short.ppo.batch_size
  stages = ["world", "pretrain", "sft", "rm_round1", "ppo_round1", "rm", "ppo"]
  a, b = sweep.stage_keys(base, stages), sweep.stage_keys(short, stages)
  assert [s for s in stages if a[s] != b[s]] == ["ppo_round1", "rm", "ppo"]


@pytest.mark.parametrize("preset", ["smoke", "tiny", "tiny,round2"])
def test_every_shipped_sweep_member_passes_the_config_check(preset):
  """A member the config check refuses would fail only when the sweep reaches it (e.g. shuffled pairs under the
  presets' packed RM batches)."""
  import importlib
  import pkgutil
  import configs.sweeps
  from instructrl import config_check
  from instructrl.tools import sweep as sweep_tool
  names = [m.name for m in pkgutil.iter_modules(configs.sweeps.__path__) if m.name != "common"]
  assert "rm_formulation" in names
  for name in names:
    s = importlib.import_module(f"configs.sweeps.{name}").get_sweep(preset)
    for member in s.members:
      config = sweep_tool.member_config(s.base, dict(member["overrides"]), 0)
      config_check.check_config(config, 1, config.stages.split(","))
