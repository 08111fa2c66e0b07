"""The paper presets (configs/instructgpt.py:1.3b, :6b, :175b) against Ouyang et al. 2022's numbers
(arXiv 2203.02155, appendix C, as ../shared/DESIGN.md lists them), and accepted by check_config on a
mesh of their own shape. Config only: nothing is traced or compiled."""

import math

import jax
import pytest

from configs import instructgpt
from instructrl import parallel
from instructrl.config_check import check_config
from instructrl.errors import ConfigError
from instructrl.stages import ppo, rm_models

# Written out from the paper, not from the config: a preset that drifts fails here.
GPT3 = {  # paper C: GPT-3 architecture; Brown et al. 2020 table 2.1 (head size 128)
    "1.3b": dict(n_layers=24, d_model=2048, n_heads=24),
    "6b": dict(n_layers=32, d_model=4096, n_heads=32),
    "175b": dict(n_layers=96, d_model=12288, n_heads=96),
}
SIX_B = dict(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, head_dim=128, d_ff=16384)
LENGTHS = {  # paper C: 2k context; prompts over 1k tokens dropped; responses capped at 1k tokens
    "model.max_len": 2048,
    "pretrain.seq_len": 2048, "sft.seq_len": 2048, "rm.seq_len": 2048, "ppo.ptx_seq_len": 2048,
    # 1024 prompt positions (BOS included) and 1024 response positions (EOS included, the RM's read-out).
    "rm.prompt_len": 1024, "rm.max_new_tokens": 1023, "ppo.prompt_len": 1024, "ppo.max_new_tokens": 1023,
    "eval.prompt_len": 1024, "eval.max_new_tokens": 1024, "eval.prefix_len": 0,
}
SETTINGS = {
    "sft.final_lr_fraction": 0.1, "sft.warmup_steps": 0, "sft.model_overrides.resid_dropout": 0.2,   # C.1
    "sft.b1": 0.9, "sft.b2": 0.95,                                                                  # C
    "sft.pretrain_mix": 0.1, "ppo.policy_init": "sft",                                              # C.3
    "rm.learning_rate": 9e-6, "rm.final_lr_fraction": 0.1, "rm.batch_size": 64, "rm.epochs": 1.0,  # C.2
    "rm.formulation": "per_prompt", "rm.k_choices": (4, 5, 6, 7, 8, 9),                             # 3.5, C.2
    "ppo.kl_coef": 0.02, "ppo.adaptive_kl": False, "ppo.ptx_coef": 27.8,                            # C.4
    "ppo.total_episodes": 256_000, "ppo.batch_size": 512, "ppo.minibatch_size": 64, "ppo.ppo_epochs": 1,
    "ppo.ptx_batch_size": 8 * 64,                # C.4: 8x more pretraining examples than RL episodes
    "ppo.warmup_iterations": 10, "ppo.ema_decay": 0.992, "ppo.discount": 1.0, "ppo.clip": 0.2,
    "ppo.temperature": 1.0, "ppo.b1": 0.9, "ppo.b2": 0.95,
    "eval.temperature": 1.0, "eval.baseline_temperature": 0.7,
}
PER_SIZE = {  # C.1: SFT batch and lr; C.4: value lr
    "1.3b": {"sft.batch_size": 32, "sft.learning_rate": 9.65e-6, "ppo.value_learning_rate": 9e-6},
    "6b": {"sft.batch_size": 32, "sft.learning_rate": 9.65e-6, "ppo.value_learning_rate": 9e-6},
    "175b": {"sft.batch_size": 8, "sft.learning_rate": 5.03e-6, "ppo.value_learning_rate": 5e-6},
}
# Chips each preset is checked on: its mesh has to split every batch (175b: SFT batch 8 over fsdp 8).
DEVICES = {"1.3b": (8, 16, 32), "6b": (8, 16, 32), "175b": (64, 128)}


def field(config, path):
  for part in path.split("."):
    config = config[part]
  return tuple(config) if isinstance(config, list) else config


@pytest.mark.parametrize("preset", list(GPT3))
def test_paper_numbers(preset):
  c = instructgpt.get_config(preset)
  expected = {**{f"model.{k}": v for k, v in GPT3[preset].items()}, "model.head_dim": 128,
              "model.d_ff": 4 * GPT3[preset]["d_model"], **LENGTHS, **SETTINGS, **PER_SIZE[preset]}
  wrong = {p: (field(c, p), v) for p, v in expected.items() if field(c, p) != pytest.approx(v)}
  assert not wrong, f"{preset}: (config, paper) {wrong}"
  # C.1: 16 epochs over ~13k demos, with the pretraining windows a tenth of each batch on top.
  assert c.sft.steps == math.ceil(16 * 13000 / 0.9 / c.sft.batch_size)
  assert dict(c.rm.model_shape) == {}                     # the RM is the policy's size unless asked


def test_pod_presets_scan_their_layers_and_the_cpu_presets_do_not():
  """The paper presets run on pods: one scanned block, so the sampler gathers one layer's weights at a time."""
  assert all(instructgpt.get_config(p).model.scan_layers for p in GPT3)
  assert not any(instructgpt.get_config(p).model.scan_layers for p in ("smoke", "tiny", "small"))


@pytest.mark.parametrize("preset", list(GPT3))
def test_every_sequence_fits_the_context(preset):
  c = instructgpt.get_config(preset)
  n = c.model.max_len
  assert c.ppo.prompt_len + c.ppo.max_new_tokens + 1 == n        # + the EOS the RM reads a cut response at
  assert c.rm.prompt_len + c.rm.max_new_tokens + 1 <= c.rm.seq_len == n   # a cut sample still trains the RM
  assert c.eval.prompt_len + c.eval.prefix_len + c.eval.max_new_tokens == n


@pytest.mark.parametrize("preset", list(GPT3))
def test_check_config_accepts_the_preset_on_its_mesh(preset):
  c = instructgpt.get_config(preset)
  for n in DEVICES[preset]:
    if n == 32:   # the RM's and PPO's 4 micro-batches of 16 rows cannot split 32 ways: 2 of 32 can
      with pytest.raises(ConfigError, match=r"rm.microbatches=4: micro-batches of 16 rows .* 32 data-parallel"):
        check_config(c, n_devices=n)
      c = instructgpt.get_config(preset)
      c.rm.microbatches = c.ppo.microbatches = 2
    check_config(c, n_devices=n)


@pytest.mark.parametrize("preset", list(GPT3))
def test_paper_presets_accumulate_the_rm_and_ppo_steps_over_one_row_a_device(preset):
  """docs/scaling.md: one pass of the RM step or the PPO update does not fit a chip at the paper's lengths."""
  c = instructgpt.get_config(preset)
  dp = {"175b": 8}.get(preset, 16)   # the docs' meshes: (1,16,1), and 175b's fsdp 8
  assert c.rm.batch_size // c.rm.microbatches == dp and c.ppo.minibatch_size // c.ppo.microbatches == dp
  assert c.sft.microbatches == c.pretrain.microbatches == 1


def test_175b_splits_its_batches_over_fsdp_only():
  c = instructgpt.get_config("175b")
  assert tuple(c.mesh.shape) == (1, 8, -1)
  c.mesh.shape = (1, -1, 1)                     # a 64-way batch split: the batches of 8 and 32 cannot
  with pytest.raises(ConfigError, match="is not divisible by the 64 data-parallel shards"):
    check_config(c, n_devices=64)


@pytest.mark.parametrize("preset", list(GPT3))
def test_rm6b_gives_the_rm_the_6b_shape(preset):
  c = instructgpt.get_config(f"{preset},rm6b")
  assert c.preset == f"{preset},rm6b"
  assert dict(c.rm.model_shape) == SIX_B                 # paper C.2: one 6B RM for every policy size
  model = rm_models.declared_rm_model(c)
  assert {k: model[k] for k in SIX_B} == SIX_B
  assert model["max_len"] == 2048 and model["vocab_size"] == c.model.vocab_size
  plain = instructgpt.get_config(preset)
  plain.rm.model_shape.update(SIX_B)
  plain.preset = c.preset
  assert plain.to_dict() == c.to_dict()                  # the option changes nothing else


@pytest.mark.parametrize("preset", ["1.3b", "175b"])
def test_a_6b_rm_for_a_smaller_or_larger_policy_needs_a_base_run(preset):
  c = instructgpt.get_config(f"{preset},rm6b")
  n = DEVICES[preset][0]
  with pytest.raises(ConfigError, match=r"rm.model_shape=.*'d_model': 4096.*expected rm.base_workdir"):
    check_config(c, n_devices=n)
  check_config(c, n_devices=n, stages=["ppo", "eval"])   # the RM already trained: nothing to start from
  c.rm.base_workdir = "/runs/6b"
  check_config(c, n_devices=n)


def test_rm6b_on_the_6b_preset_needs_no_base_run():
  check_config(instructgpt.get_config("6b,rm6b"), n_devices=16)


@pytest.mark.parametrize("arg", ["tiny,rm6b", "smoke,rm6b", "1.3b,rm7b", "6b,"])
def test_unknown_options_are_refused(arg):
  with pytest.raises(ValueError, match="options .* not understood"):
    instructgpt.get_config(arg)


@pytest.mark.parametrize("shape, needle", [
    ({"max_len": 4096}, "rm.model_shape sets ['max_len']"),
    ({"vocab_size": 50304}, "rm.model_shape sets ['vocab_size']"),
    ({"n_heads": 0}, "rm.model_shape.n_heads"),
])
def test_rm_model_shape_is_checked(shape, needle):
  c = instructgpt.get_config("smoke")
  c.rm.model_shape.update(shape)
  with pytest.raises(ConfigError) as e:
    check_config(c, n_devices=1, stages=["ppo"])
  assert needle in str(e.value), str(e.value)


def test_the_value_function_follows_the_declared_rm_shape():
  """ppo.build (the stage's and tools/plan's programs) gives the RM and the value function the RM's size
  from rm.model_shape alone, and the policy and reference the policy's."""
  c = instructgpt.get_config("smoke")
  c.rm.model_shape.update(d_model=96, d_ff=384)
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  programs = ppo.build(c, mesh, parallel.rules_from_config(c.mesh.rules), eos_id=3, pad_id=0)
  assert (programs.rm_cfg.d_model, programs.rm_cfg.d_ff) == (96, 384)
  assert programs.model_cfg.d_model == 64
  assert programs.abstract["value"]["embed"].shape[-1] == 96
  assert programs.abstract["params"]["embed"].shape[-1] == 64


def test_a_base_run_of_another_size_than_declared_is_refused(tmp_path):
  from tests.test_plan import finished_stage
  from instructrl.models.config import ModelConfig
  c = instructgpt.get_config("smoke")
  c.rm.model_shape.update(d_model=96, d_ff=384)
  c.rm.base_workdir = str(tmp_path)
  finished_stage(tmp_path / "sft", ModelConfig.from_dict({**c.model, "d_model": 128, "d_ff": 512}).to_dict())
  with pytest.raises(ConfigError, match=r"rm.base_workdir's 'sft' stage .* has \{'d_ff': 512, 'd_model': 128\}"):
    rm_models.rm_model(c)
  c.rm.model_shape.update(d_model=128, d_ff=512)
  assert rm_models.rm_model(c)["d_model"] == 128


def test_an_rm_trained_before_model_shape_existed_resumes_only_at_the_policy_size():
  from instructrl import checkpoints
  c = instructgpt.get_config("smoke")
  saved = {k: v for k, v in checkpoints.settings_of(c.rm).items() if k != "model_shape"}
  meta = {"settings": saved, "complete": True}
  checkpoints.check_settings(meta, c.rm, "/w/rm", "rm")
  c.rm.model_shape.update(d_model=96)
  with pytest.raises(checkpoints.CheckpointMismatch, match=r"rm.model_shape: checkpoint has \{\}, config has"):
    checkpoints.check_settings(meta, c.rm, "/w/rm", "rm")
