"""Refused before any work: every user-settable config field with a bad value (sign, range, type,
divisibility, length) is refused by check_config naming the field; through the CLI a refused run is
one `error:` line, exit status 2, and leaves the workdir byte for byte as it was (no config.json
rewrite, no LOCK, no folder created)."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from configs import instructgpt
from instructrl.config_check import check_config
from instructrl.errors import ConfigError
from tests.cli_helpers import cli_env

ROOT = Path(__file__).resolve().parents[2]

# field -> bad values, each to be refused naming the field. Written out by hand (not derived from the
# rules in config_check.py), so a rule that is missing or too lenient fails here.
LM = {"steps": [0, -5], "batch_size": [0], "seq_len": [0], "learning_rate": [-1e-3, 0.0],
      "warmup_steps": [-1], "final_lr_fraction": [-0.1, 1.5], "b1": [1.0, -0.1], "b2": [1.5],
      "weight_decay": [-0.01], "grad_clip": [0.0, -1.0], "log_every": [0], "eval_every": [0],
      "eval_batch_size": [0], "checkpoint_every": [0], "keep_checkpoints": [0], "keep_period": [-1],
      "max_nonfinite_skips": [-1], "microbatches": [0, 3]}
BAD = {
    "seed": [-1],
    "tokenizer.vocab_size": [0],
    "model.vocab_size": [0], "model.max_len": [0], "model.d_model": [0], "model.n_layers": [0],
    "model.n_heads": [0], "model.n_kv_heads": [0, 3], "model.head_dim": [0], "model.d_ff": [-1],
    "model.norm_eps": [0.0], "model.rope_theta": [-1.0], "model.embed_dropout": [1.0],
    "model.attn_dropout": [-0.1], "model.resid_dropout": [1.5],
    "model.sliding_window": [-1], "model.rope_factor": [0.5], "model.rope_low_freq_factor": [0.0],
    "model.rope_high_freq_factor": [-4.0], "model.rope_original_max_len": [-1],
    "model.attn_softcap": [-1.0], "model.final_softcap": [-30.0], "model.query_pre_attn_scalar": [-1.0],
    **{f"pretrain.{k}": v for k, v in LM.items()},
    **{f"sft.{k}": v for k, v in LM.items()},
    "sft.pretrain_mix": [-0.1, 1.0],
    **{f"{s}.model_overrides.resid_dropout": [1.0, -0.2] for s in ("pretrain", "sft", "rm")},
    **{f"rm.source_mix.{s}": [-1.0] for s in ("policy", "pretrain", "pretrain_few_shot", "ppo", "mismatched")},
    **{f"rm.{k}": v for k, v in LM.items() if k != "steps"},
    "rm.epochs": [0.0, -1.0], "rm.pair_batch_size": [0], "rm.n_prompts": [0], "rm.valid_fraction": [0.0, 1.0],
    "rm.sample_temperature": [0.0], "rm.prompt_len": [0], "rm.max_new_tokens": [0], "rm.collect_batch_prompts": [0],
    "rm.rankings_per_prompt": [0], "rm.policy_pair_weight": [0.0],
    "rm.gold_probe_prompts": [-1], "rm.ensemble_size": [0],
    "rm.rounds": [0, 3], "rm.round1_ppo_episodes": [-1], **{f"rm.round2_mix.{s}": [-1.0] for s in ("policy", "pretrain", "pretrain_few_shot",
                                                                       "ppo", "mismatched")},
    "ppo.select_prompts": [0], "ppo.n_prompts": [0], "ppo.total_episodes": [0], "ppo.batch_size": [0],
    "ppo.minibatch_size": [0, 7], "ppo.ppo_epochs": [0], "ppo.learning_rate": [-1e-5, 0.0],
    "ppo.value_learning_rate": [0.0], "ppo.warmup_iterations": [-1], "ppo.kl_coef": [-1.0],
    "ppo.target_kl": [0.0], "ppo.kl_horizon": [0], "ppo.ptx_coef": [-1.0], "ppo.ptx_batch_size": [0],
    "ppo.ptx_seq_len": [0, 1000], "ppo.ema_decay": [1.0, -0.5], "ppo.gae_lambda": [1.5, -0.1],
    "ppo.clip": [0.0, 1.0], "ppo.value_clip": [0.0], "ppo.normalize_batches": [0], "ppo.temperature": [0.0],
    "ppo.prompt_len": [0, 180], "ppo.max_new_tokens": [0, 170], "ppo.rm_uncertainty_coef": [-1.0, 0.5],
    "ppo.grad_clip": [0.0], "ppo.b1": [1.0], "ppo.b2": [-0.5], "ppo.log_every": [0], "ppo.sample_every": [-1],
    "ppo.eval_every": [0], "ppo.checkpoint_every": [0], "ppo.keep_checkpoints": [0],
    "ppo.max_nonfinite_skips": [-1], "ppo.missing_eos_penalty": [float("nan")], "ppo.microbatches": [0, 3],
    "eval.n_prompts": [-1], "eval.batch_size": [0], "eval.prompt_len": [0, 150], "eval.prefix_len": [-1],
    "eval.max_new_tokens": [0], "eval.temperature": [0.0, -1.0], "eval.baseline_temperature": [0.0],
    "eval.few_shot": [-1], "eval.report_prompts": [-1], "eval.cloze_seq_len": [0, 500], "eval.split": ["valid"],
}
BAD["ppo.discount"] = [1.5, -0.1]
# Fields that are not numbers of a stage block, checked by their own rules and cases below.
NOT_NUMERIC = {"mesh.shape", "rm.k_choices"}
CASES = [(field, value) for field, values in BAD.items() for value in values]


def smoke_with(field: str, value):
  c = instructgpt.get_config("smoke")
  *blocks, name = field.split(".")
  section = c
  for b in blocks:
    section = section[b]
  section[name] = value
  return c


def numeric_leaves(config, prefix="") -> set:
  out = set()
  for k, v in config.items():
    path = f"{prefix}{k}"
    if hasattr(v, "items"):
      out |= numeric_leaves(v, path + ".")
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out.add(path)
  return out


def test_the_table_covers_every_numeric_field_of_the_config():
  # The world's fields are validated by instructrl.data.world.validate (tests/data); everything else here.
  fields = {f for f in numeric_leaves(instructgpt.get_config("smoke")) if not f.startswith("world.")}
  missing = sorted(fields - set(BAD) - NOT_NUMERIC)
  assert not missing, f"config fields without a bad-value case: {missing}"


def test_the_smoke_and_tiny_presets_pass():
  for preset in ("smoke", "tiny", "small"):
    check_config(instructgpt.get_config(preset), n_devices=1)


@pytest.mark.parametrize("field, value", CASES, ids=[f"{f}={v}" for f, v in CASES])
def test_bad_value_is_refused_naming_the_field(field, value):
  with pytest.raises(ConfigError) as e:
    check_config(smoke_with(field, value), n_devices=1)
  assert field in str(e.value), str(e.value)


OTHER = [
    ("rm.k_choices", (1,), ["rm.k_choices=(1,)", ">= 2"]),
    ("rm.k_choices", (), ["rm.k_choices"]),
    ("rm.source_mix.policy", 0.0, ["rm.source_mix", "at least one positive"]),
    ("rm.source_mix.ppo", 0.5, ["rm.ppo_source"]),
    ("mesh.shape", (3, 1, 1), ["mesh.shape=(3, 1, 1)", "needs 3 devices, 1 available"]),
    ("mesh.shape", (-1, -1, 1), ["mesh.shape", "at most one -1"]),
    ("mesh.shape", (0, 1, 1), ["mesh.shape", "positive integers"]),
    ("mesh.shape", (1, 1), ["mesh.shape", "3 positive integers"]),
    ("stages", "world,rlhf", ["stages='world,rlhf'"]),
    ("stages", "", ["stages=''"]),
    ("ppo.reward", "oracle", ["ppo.reward='oracle'", "'rm' or 'gold'"]),
    ("ppo.policy_init", "rm", ["ppo.policy_init='rm'"]),
    ("rm.formulation", "pairs", ["rm.formulation='pairs'"]),
    ("rm.init_stage", "ppo", ["rm.init_stage='ppo'"]),
    ("sft.model_overrides.resid_dropout", 1.0, ["sft.model_overrides.resid_dropout=1.0"]),
    ("model.style", "gpt3", ["model.style='gpt3'"]),
    ("model.glu_activation", "relu", ["model.glu_activation='relu'"]),
    ("model.rope_scaling", "yarn", ["model.rope_scaling='yarn'"]),
    ("pretrain.on_nonfinite", "ignore", ["pretrain.on_nonfinite='ignore'", "'stop' or 'skip'"]),
    # The held-out labeler group is one field, the world's: the RM's old copy is refused even at a valid group.
    ("rm.heldout_group", 4, ["rm.heldout_group=4", "removed", "set world.heldout_group"]),
    ("world.heldout_group", 5, ["world.heldout_group"]),
    ("ppo.ema_every", "step", ["ppo.ema_every='step'", "'update' or 'iteration'"]),
    # One position past the response for the EOS the RM reads a truncated response at: 176 + 16 + 1 > 192.
    ("ppo.prompt_len", 176, ["ppo.prompt_len + ppo.max_new_tokens + 1 = 193", "model.max_len=192"]),
]


@pytest.mark.parametrize("change, needles", [
    # Round two ranks round one's PPO-ptx: a mix without it is refused, naming the field.
    ({"rm.round2_mix.ppo": 0.0}, ["rm.round2_mix.ppo=0.0", "> 0 with rm.rounds=2"]),
    ({"rm.round2_mix.judge": 0.5}, ["rm.round2_mix=", "not ['judge']"]),
    # Round one's stages without two rounds.
    ({"rm.rounds": 1}, ["rm.rounds=1", "2 to run the stages ['rm_round1', 'ppo_round1']"]),
])
def test_two_rounds_are_checked(change, needles):
  check_config(instructgpt.get_config("smoke,round2"), n_devices=1)
  c = instructgpt.get_config("smoke,round2")
  for path, value in change.items():
    smoke_field(c, path, value)
  with pytest.raises(ConfigError) as e:
    check_config(c, n_devices=1)
  for needle in needles:
    assert needle in str(e.value), str(e.value)


def smoke_field(c, field, value):
  *blocks, name = field.split(".")
  section = c
  for b in blocks:
    section = section[b]
  section[name] = value


def test_round_options_parse_for_every_preset():
  for preset in ("smoke", "tiny", "small", "1.3b"):
    c = instructgpt.get_config(f"{preset},round2")
    assert c.rm.rounds == 2 and c.stages.split(",")[3:6] == ["rm_round1", "ppo_round1", "rm"]
  assert instructgpt.get_config("tiny").rm.rounds == 1   # one round stays the default


@pytest.mark.parametrize("field, value, needles", OTHER, ids=[f"{f}={v!r}" for f, v, _ in OTHER])
def test_other_bad_values(field, value, needles):
  with pytest.raises(ConfigError) as e:
    check_config(smoke_with(field, value), n_devices=1)
  for needle in needles:
    assert needle in str(e.value), (needle, str(e.value))


def test_adaptive_kl_needs_a_positive_start():
  c = smoke_with("ppo.kl_coef", 0.0)
  check_config(c, n_devices=1)     # a fixed beta of 0 is plain reward maximisation: allowed
  c.ppo.adaptive_kl = True
  with pytest.raises(ConfigError, match=r"ppo.kl_coef=0.0: expected > 0 with ppo.adaptive_kl"):
    check_config(c, n_devices=1)


def test_batches_must_split_over_the_data_parallel_devices():
  c = instructgpt.get_config("smoke")
  check_config(c, n_devices=2)                  # (-1, 1, 1) on 2 devices: every batch is even
  c.sft.batch_size = 15
  with pytest.raises(ConfigError, match=r"sft.batch_size=15 is not divisible by the 2 data-parallel shards"):
    check_config(c, n_devices=2)
  c = instructgpt.get_config("smoke")
  c.mesh.shape = (1, 1, -1)                     # tensor parallel only: batches are not split
  c.ppo.batch_size, c.ppo.minibatch_size = 15, 5
  check_config(c, n_devices=2)
  c.mesh.shape = (-1, 1, 1)
  with pytest.raises(ConfigError, match=r"ppo.batch_size=15 is not divisible by the 2"):
    check_config(c, n_devices=2)


def test_microbatches_divide_the_batch_and_their_rows_split_over_the_devices():
  c = instructgpt.get_config("smoke")           # pretrain/sft 16 rows, rm 8 prompts, ppo minibatch 8 + ptx 8
  c.rm.packing = False                          # packed RM batches go without micro-batches (test_rm_packing.py)
  c.pretrain.microbatches = c.sft.microbatches = c.rm.microbatches = c.ppo.microbatches = 4
  check_config(c, n_devices=2)                  # 2 rows a micro-batch at least: one a device
  c.rm.microbatches = 8
  with pytest.raises(ConfigError, match=r"rm.microbatches=8: micro-batches of 1 rows \(rm.batch_size / 8\) do "
                                        r"not split over the 2 data-parallel shards"):
    check_config(c, n_devices=2)
  check_config(c, n_devices=1)
  c.rm.microbatches, c.ppo.ptx_batch_size = 4, 4
  with pytest.raises(ConfigError, match=r"ppo.microbatches=4: micro-batches of 1 rows \(ppo.ptx_batch_size / 4\)"):
    check_config(c, n_devices=2)
  c.ppo.ptx_coef = 0.0                          # plain PPO: no pretraining rows to split
  check_config(c, n_devices=2)
  c.rm.formulation, c.rm.pair_batch_size = "shuffled_pairs", 6
  with pytest.raises(ConfigError, match=r"rm.microbatches=4 does not divide rm.pair_batch_size=6"):
    check_config(c, n_devices=2)


PUBLIC = [
    ("data.source", "web", "data.source='web'"),
    ("data.valid_fraction", 1.0, "data.valid_fraction=1.0"),
    ("data.judge_fraction", 0.0, "data.judge_fraction=0.0"),
    ("data.on_invalid", "ignore", "data.on_invalid='ignore'"),
    ("rm.rounds", 2, "rm.rounds=2: expected 1 with data.source='files'"),
    ("data.prompt_template", "Human: ", "data.prompt_template"),
    ("data.prompt_template", "{user}: {prompt}", "data.prompt_template"),
    ("data.eos_id", -2, "data.eos_id=-2"),
    ("data.rankings", "", "data.rankings"),
    ("data.ptx", "", "data.ptx"),
    ("rm.formulation", "shuffled_pairs", "rm.formulation"),
    ("ppo.reward", "gold", "ppo.reward"),
    ("stages", "import,pretrain,sft", "stages"),
    ("sft.learning_rate", -2e-5, "sft.learning_rate=-2e-05"),
    ("rm.epochs", 0.0, "rm.epochs=0.0"),
    ("rm.microbatches", 0, "rm.microbatches=0"),
    ("rm.microbatches", 3, "rm.microbatches=3 does not divide rm.batch_size"),
    ("sft.microbatches", 3, "sft.microbatches=3 does not divide sft.batch_size"),
]


def public_config():
  from configs import public
  c = public.get_config("smoke")
  c.data.update(hf_dir="gpt2", demos="d.jsonl", rankings="r.jsonl", ptx="t.txt")
  c.model.max_len = 512   # what main's fill_model would set from a GPT-2 checkpoint with 512 positions
  return c


@pytest.mark.parametrize("field, value, needle", PUBLIC, ids=[f"{f}={v!r}" for f, v, _ in PUBLIC])
def test_public_data_configs_are_checked(field, value, needle):
  check_config(public_config(), n_devices=1)
  c = public_config()
  *blocks, name = field.split(".")
  section = c
  for b in blocks:
    section = section[b]
  section[name] = value
  with pytest.raises(ConfigError) as e:
    check_config(c, n_devices=1)
  assert needle in str(e.value), str(e.value)


def test_import_stage_needs_a_data_block():
  with pytest.raises(ConfigError, match="import"):
    check_config(instructgpt.get_config("smoke"), n_devices=1, stages=["import", "sft"])


# ----------------------------------------------------------------------------- through the CLI

def tree(root: Path) -> dict:
  """Every path under root: files with their size and sha256, folders as 'dir'."""
  out = {}
  for p in sorted(root.rglob("*")):
    rel = str(p.relative_to(root))
    out[rel] = "dir" if p.is_dir() else (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
  return out


def cli(workdir, *flags, config="configs/instructgpt.py:smoke", env=None):
  cmd = [sys.executable, "-m", "instructrl.main", f"--config={config}", f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**cli_env(), **(env or {})})


def assert_one_error_line(out, *needles):
  """Exit 2; the last stderr line is the only `error:` one (log lines of JAX's start-up may precede it)."""
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2, out.stderr[-3000:]
  assert [l for l in lines if l.startswith("error: ")] == lines[-1:], out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  for needle in needles:
    assert needle in lines[-1], (needle, lines[-1])


@pytest.fixture(scope="module")
def world_workdir(tmp_path_factory):
  """A workdir after `--stages=world`: a world, config.json, and the LOCK a finished run leaves."""
  w = tmp_path_factory.mktemp("refusals") / "w"
  out = cli(w, "--stages=world")
  assert out.returncode == 0, out.stderr[-3000:]
  return w


REFUSED = [
    # (flags, what the one line names)
    (["--stages=world", "--config.world.seed=3"], ["world.seed: world has 0, config has 3", "new --workdir"]),
    (["--stages=world", "--config.sft.learning_rate=-1e-3"], ["sft.learning_rate=-0.001", "expected a number > 0"]),
    (["--stages=world", "--config.ppo.kl_coef=-1"], ["ppo.kl_coef=-1.0", ">= 0"]),
    (["--stages=world", "--config.ppo.minibatch_size=7"], ["ppo.minibatch_size=7", "ppo.batch_size=16"]),
    (["--stages=world", "--config.ppo.max_new_tokens=0"], ["ppo.max_new_tokens=0"]),
    (["--stages=world", "--config.rm.k_choices=(1,)"], ["rm.k_choices=(1,)"]),
    (["--stages=world", "--config.mesh.shape=(3,1,1)"], ["mesh.shape=(3, 1, 1) needs 3 devices, 1 available"]),
    (["--stages=world,rlhf"], ["rlhf", "expected names among world,import,pretrain"]),
]


def test_refused_runs_leave_the_workdir_unchanged(world_workdir, tmp_path):
  """Each refusal: exit 2, one `error:` line, and every path and byte under the workdir as before."""
  w = tmp_path / "w"
  import shutil
  shutil.copytree(world_workdir, w)
  (w / "LOCK").write_text('{"pid": 1, "host": "old"}\n')   # a stale holder's record must survive too
  before = tree(w)
  for flags, needles in REFUSED:
    out = cli(w, *flags)
    assert_one_error_line(out, *needles)
    assert tree(w) == before, flags
  # A bad preset comes out of absl's flag parsing: the same one line.
  out = cli(w, "--stages=world", config="configs/instructgpt.py:nope")
  assert_one_error_line(out, "unknown preset 'nope'", "smoke")
  assert tree(w) == before


def test_refused_run_on_a_new_workdir_creates_nothing(tmp_path):
  out = cli(tmp_path / "new" / "w", "--stages=world", "--config.ppo.kl_coef=-1")
  assert_one_error_line(out, "ppo.kl_coef")
  assert not (tmp_path / "new").exists()


def test_workdir_a_file_or_lock_a_folder_is_one_line(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  assert_one_error_line(cli(f, "--stages=world"), f"--workdir={f} is a file")
  (tmp_path / "w" / "LOCK").mkdir(parents=True)
  before = tree(tmp_path / "w")
  assert_one_error_line(cli(tmp_path / "w", "--stages=world"), "LOCK is a directory")
  assert tree(tmp_path / "w") == before


def test_verbose_shows_the_traceback(tmp_path):
  out = cli(tmp_path / "w", "--stages=world", "--config.ppo.kl_coef=-1", env={"INSTRUCTRL_VERBOSE": "1"})
  assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError: ppo.kl_coef" in out.stderr


def test_public_cli_bad_value_is_one_line(tmp_path):
  """The public-data pipeline shares main's error path: one `error:` line, exit 2, nothing written."""
  cmd = [sys.executable, "-m", "instructrl.main", "--config=configs/public.py:smoke", f"--workdir={tmp_path / 'w'}",
         f"--config.data.hf_dir={tmp_path / 'missing'}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
  assert_one_error_line(out, "data.hf_dir")
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("tool, flags", [
    ("best_of_n", ["--config=configs/instructgpt.py:smoke", "--workdir={w}"]),
    ("rm_cv", ["--config=configs/instructgpt.py:smoke", "--workdir={w}"]),
    ("plan", ["--config=configs/instructgpt.py:nope"]),
])
def test_tools_print_expected_errors_as_one_line(tool, flags, tmp_path):
  """The tools share main's error path: a workdir without a world, or an unknown preset, is one line."""
  (tmp_path / "w").mkdir()
  cmd = [sys.executable, "-m", f"instructrl.tools.{tool}", *[f.format(w=tmp_path / "w") for f in flags]]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
  assert_one_error_line(out, "nope" if tool == "plan" else "no world there")
  assert not any((tmp_path / "w").iterdir())
