r"""instructrl command line: run the InstructGPT stages on one config and one run directory.

  python -m instructrl.main --config=configs/instructgpt.py:smoke --workdir=runs/smoke \
      --stages=world,pretrain,sft --config.sft.learning_rate=3e-4

A stage whose checkpoint is complete is skipped; an interrupted one resumes.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import ml_collections
from instructrl import cli_flags
from absl import app, flags
from ml_collections import config_flags

_CONFIG = cli_flags.define(config_flags.DEFINE_config_file, "config", None, "Config file, e.g. configs/instructgpt.py:tiny.",
                                          lock_config=True)
_WORKDIR = cli_flags.define(flags.DEFINE_string, "workdir", None, "Run directory (created if missing).")
_STAGES = cli_flags.define(flags.DEFINE_string, "stages", None, "Comma-separated stages; default: config.stages.")
_DISTRIBUTED = cli_flags.define(flags.DEFINE_enum, "distributed", "auto", ["auto", "on", "off"],
                                 "Multi-host: 'auto' connects the processes when a coordinator is given or a TPU pod / "
                                 "SLURM / Open MPI job is detected (instructrl/distributed.py).")
_COORDINATOR = cli_flags.define(flags.DEFINE_string, "coordinator_address", None, "host:port of process 0, where JAX cannot detect the "
                                   "cluster (GPU nodes without SLURM); or env JAX_COORDINATOR_ADDRESS.")
_NUM_PROCESSES = cli_flags.define(flags.DEFINE_integer, "num_processes", None, "Processes in the job (with --coordinator_address).")
_PROCESS_ID = cli_flags.define(flags.DEFINE_integer, "process_id", None, "This process's index, 0..num_processes-1.")
flags.mark_flags_as_required(["config", "workdir"])

STAGES = ("world", "pretrain", "sft", "rm", "ppo", "ppo_noptx", "eval")


def parse_stages(text: str) -> list[str]:
  stages = [s.strip() for s in text.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise app.UsageError(f"--stages: unknown stage(s) {unknown}; available, in order: {','.join(STAGES)}")
  return sorted(stages, key=STAGES.index)


class _QuietLibraries(logging.Filter):
  """Orbax logs every save at INFO through absl; keep ours, drop theirs below WARNING."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def check_config(config) -> None:
  """Fail before any work on values that would fail (or silently misbehave) later."""
  from instructrl.data import world as world_lib
  from instructrl.models.config import ModelConfig
  from instructrl.stages import train_state
  model = ModelConfig.from_dict(config.model)
  world_lib.validate(config.world)
  if config.tokenizer.vocab_size > model.vocab_size:
    raise ValueError(f"tokenizer.vocab_size={config.tokenizer.vocab_size} exceeds model.vocab_size={model.vocab_size}")
  for name in ("pretrain", "sft"):
    stage = config[name]
    for field in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every", "eval_batch_size"):
      if stage[field] <= 0:
        raise ValueError(f"{name}.{field}={stage[field]}: expected a positive integer")
    if stage.seq_len > model.max_len:
      raise ValueError(f"{name}.seq_len={stage.seq_len} exceeds model.max_len={model.max_len}")
    train_state.make_schedule(stage.learning_rate, stage.steps, stage.warmup_steps, stage.final_lr_fraction)
  rm = config.rm
  for field in ("batch_size", "pair_batch_size", "eval_batch_size", "n_prompts", "seq_len", "log_every",
                "eval_every", "checkpoint_every", "collect_batch_prompts"):
    if rm[field] <= 0:
      raise ValueError(f"rm.{field}={rm[field]}: expected a positive integer")
  if not rm.k_choices or min(rm.k_choices) < 2:
    raise ValueError(f"rm.k_choices={tuple(rm.k_choices)}: every K must be >= 2 (the paper uses 4..9)")
  mix = dict(rm.source_mix)
  if any(float(v) < 0 for v in mix.values()) or not any(float(v) > 0 for v in mix.values()):
    raise ValueError(f"rm.source_mix={mix}: expected non-negative weights, at least one positive "
                     f"(sources: policy, pretrain, pretrain_few_shot, ppo, mismatched)")
  if float(mix.get("ppo", 0.0)) > 0 and not rm.ppo_source:
    raise ValueError("rm.source_mix.ppo > 0 needs rm.ppo_source: an earlier run's finished ppo stage dir")
  if not 0 < rm.valid_fraction < 1:
    raise ValueError(f"rm.valid_fraction={rm.valid_fraction}: expected a fraction in (0, 1)")
  if rm.epochs <= 0:
    raise ValueError(f"rm.epochs={rm.epochs}: expected > 0")
  if rm.ensemble_size < 1:
    raise ValueError(f"rm.ensemble_size={rm.ensemble_size}: expected >= 1 (1: a single RM, the paper's setting)")
  if config.ppo.rm_uncertainty_coef < 0:
    raise ValueError(f"ppo.rm_uncertainty_coef={config.ppo.rm_uncertainty_coef}: expected >= 0 (a penalty on the "
                     f"RM ensemble's disagreement)")
  from instructrl.stages.reward import rm_run_names
  if config.ppo.rm_uncertainty_coef > 0 and rm.ensemble_size + len(rm_run_names(config)) < 2:
    raise ValueError(f"ppo.rm_uncertainty_coef={config.ppo.rm_uncertainty_coef} needs rm.ensemble_size >= 2 or "
                     f"ppo.rm_runs: one RM has no disagreement to penalise")
  if rm.seq_len > model.max_len or rm.prompt_len + rm.max_new_tokens > model.max_len:
    raise ValueError(f"rm.seq_len / rm.prompt_len + rm.max_new_tokens exceed model.max_len={model.max_len}")
  for name in ("pretrain", "sft", "rm", "ppo"):
    if config[name].on_nonfinite not in ("stop", "skip"):
      raise ValueError(f"{name}.on_nonfinite={config[name].on_nonfinite!r}: expected 'stop' or 'skip'")
    if config[name].max_nonfinite_skips < 0:
      raise ValueError(f"{name}.max_nonfinite_skips={config[name].max_nonfinite_skips}: expected >= 0")
  need = config.eval.prompt_len + config.eval.prefix_len + config.eval.max_new_tokens
  if model.style == "gpt" and need > model.max_len:
    raise ValueError(f"eval.prompt_len + eval.prefix_len + eval.max_new_tokens = {need} exceeds "
                     f"model.max_len={model.max_len}")


def main(argv):
  del argv
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  import jax
  from instructrl import parallel, progress, workdir_lock
  from instructrl.stages import evaluate, ppo, pretrain, reward, sft, world

  from instructrl import distributed
  # Before anything touches a device: afterwards jax.devices() spans every host.
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  workdir = Path(_WORKDIR.value)
  stages = parse_stages(_STAGES.value or config.stages)
  check_config(config)
  workdir.mkdir(parents=True, exist_ok=True)
  # One writer per workdir (process 0 speaks for a multi-host run); released at exit, even on SIGKILL.
  lock = workdir_lock.WorkdirLock(workdir)
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except workdir_lock.WorkdirLocked as e:
      sys.exit(f"error: {e}")
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1, sort_keys=True) + "\n")
  mesh = parallel.make_mesh(config.mesh.shape)
  rules = parallel.rules_from_config(config.mesh.rules)
  logging.info("stages %s on mesh %s in %s", stages, dict(mesh.shape), workdir)
  run = {"world": lambda: distributed.primary_first("world", lambda: world.run(config, workdir)),
         "pretrain": lambda: pretrain.run(config, workdir, mesh, rules),
         "sft": lambda: sft.run(config, workdir, mesh, rules),
         "rm": lambda: reward.run(config, workdir, mesh, rules),
         "ppo": lambda: ppo.run(config, workdir, mesh, rules),
         # The paper's "PPO" next to "PPO-ptx": the same config with the pretraining mix off.
         "ppo_noptx": lambda: ppo.run(_without_ptx(config), workdir, mesh, rules, name="ppo_noptx"),
         "eval": lambda: evaluate.run(config, workdir, mesh, rules)}
  try:
    # The outer bar and a line per stage (skipped / resumed / running); process 0 speaks.
    with progress.Pipeline(config, workdir, stages, enabled=jax.process_index() == 0) as pipeline:
      for stage in stages:
        pipeline.start(stage)
        run[stage]()
        pipeline.finish(stage)
  finally:
    lock.release()


def _without_ptx(config):
  config = ml_collections.ConfigDict(config.to_dict())
  config.ppo.ptx_coef = 0.0
  return config


def run():
  """Console-script entry point (`instructrl --config=... --workdir=...`)."""
  app.run(main)


if __name__ == "__main__":
  run()
