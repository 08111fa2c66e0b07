r"""instructrl command line: run the InstructGPT stages on one config and one run directory.

  python -m instructrl.main --config=configs/instructgpt.py:smoke --workdir=runs/smoke \
      --stages=world,pretrain,sft --config.sft.learning_rate=3e-4

A stage whose checkpoint is complete is skipped; an interrupted one resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from instructrl import cli_flags, config_check, errors
from instructrl.config_check import check_config  # noqa: F401 -- also imported from here by tests and tools
from instructrl.errors import ConfigError

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
_VERBOSE = cli_flags.define(flags.DEFINE_bool, "verbose", False, "Show the traceback of an expected error (a bad "
                            "config value, a mismatched checkpoint, ...) instead of one `error:` line; or env "
                            "INSTRUCTRL_VERBOSE=1.")
flags.mark_flags_as_required(["config", "workdir"])

STAGES = config_check.STAGES
# Where the pipeline's stages write, and what each one reads of the stages before it (checked by the pre-flight).
_READS = {"pretrain": (), "sft": ("pretrain",), "ppo_round1": ("rm_round1",), "ppo": ("rm",), "ppo_noptx": ("rm",),
          "eval": ("pretrain", "sft", "ppo", "ppo_noptx")}


def parse_stages(text: str) -> list[str]:
  stages = [s.strip() for s in text.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise ConfigError(f"--stages={text}: unknown stage(s) {unknown}; expected names among {','.join(STAGES)} "
                      f"(run in that order)")
  return sorted(stages, key=STAGES.index)


class _QuietLibraries(logging.Filter):
  """Orbax logs every save at INFO through absl; keep ours, drop theirs below WARNING."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def preflight(config, workdir: Path, stages: list[str]) -> None:
  """Refuse, before anything under `workdir` changes, a run whose config differs from what the workdir
  records: the world's marker, and the checkpoints' metas (model, world, training settings) of every
  stage to run and of every finished stage they read. Reads files only; the stages check again."""
  from instructrl import checkpoints
  from instructrl.models.config import ModelConfig
  from instructrl.stages import data_import, rm_models, rounds, source, world
  files = source.kind(config) == "files"
  check_round_one(config, workdir, stages)
  if files and "import" in stages and not (workdir / "data" / "COMPLETE").exists():
    data_import.build(config)   # every data file read and checked: a bad record is refused before any write
  if not workdir.is_dir():
    return
  if "world" in stages and (workdir / "world" / "COMPLETE").exists():
    world.check_marker(config, workdir / "world")
  if files and (workdir / "data" / "COMPLETE").exists():
    data_import.check_marker(config, workdir / "data")
  world_id = world.world_fingerprint(workdir)
  policy = ModelConfig.from_dict(config.model).to_dict()
  rm = config.rm
  # The RM's model: the policy's, or the size rm.model_shape declares.
  rm_model = ModelConfig.from_dict({**config.model, **rm_models.rm_shape(config)}).to_dict()
  if rm.get("base_workdir", ""):
    # A larger RM: the model of rm.base_workdir's finished policy stage (absent: the RM stage says so).
    base = checkpoints.recorded_meta(Path(rm.base_workdir) / rm.policy)
    rm_model = ModelConfig.from_dict(base["model"]).to_dict() if base and base.get("complete") else None

  def check(where: Path, model: dict | None, settings: dict | None = None, section: str = "",
            finished_only: bool = False):
    meta = checkpoints.recorded_meta(where)
    if meta is None or (finished_only and not meta.get("complete")):
      return
    where = str(where.absolute())
    if model is not None and "model" in meta:
      checkpoints.check_model(meta["model"], model, where)
    checkpoints.check_world(meta, world_id, where)
    if settings is not None and meta.get("settings") is not None:
      # Only the fields of the config block: what a stage derives (rm/ppo steps, the ensemble's size) is
      # checked by the stage itself.
      saved = {k: v for k, v in checkpoints.current_names(meta["settings"], settings).items() if k in settings}
      checkpoints.check_settings({**meta, "settings": saved}, settings, where, section)

  block = lambda cfg, *drop: {k: v for k, v in cfg.to_dict().items() if k not in drop}
  reads = set()
  for stage in stages:
    # Round one's stages (rm_round1, ppo_round1) are the rm and ppo stages under W/round1 (stages/rounds.py).
    base, root = rounds.base_stage(stage), rounds.out_root(workdir, stage)
    cfg = rounds.stage_config(config, stage)
    rm, ppo = cfg.rm, cfg.ppo
    if stage in ("pretrain", "sft"):
      check(workdir / stage, policy, block(config[stage]), stage)
    elif base == "rm":
      # W/rm, then the ensemble's other members (W/rm_ensemble/member{i}, as the RM stage names them).
      members = [root / "rm"] + [root / "rm_ensemble" / f"member{i}" for i in range(1, rm.ensemble_size)]
      if files:   # the policy's RM and the judge RM (stages/rm_files.py)
        for where in (workdir / "rm", workdir / "rm_judge"):
          check(where, rm_model, block(rm, "steps"), "rm")
      for i, where in enumerate([] if files else members):
        # The stage records the group it holds out (world.heldout_group) with its settings.
        check(where, rm_model, {**block(rm, "steps", "ensemble_size", *(() if i else ("ensemble_bootstrap",))),
                                "heldout_group": config.world.heldout_group}, "rm")
      if not rm.get("base_workdir", ""):
        reads |= {rm.get("init_stage", "") or rm.policy, rm.policy}
      if stage == "rm" and rounds.n_rounds(config) == 2:
        reads.add("ppo_round1")   # round two samples it
    elif base in ("ppo", "ppo_noptx"):
      from instructrl.stages.ppo import stage_config
      from instructrl.stages.rm_ensemble import n_members
      # ppo_noptx: ptx off. The stage records how many RMs scored it beside its config block.
      settings = {**block(stage_config(cfg, base).ppo, "steps"), "rm_ensemble_size": n_members(cfg)}
      check(rounds.stage_dir(workdir, stage), policy, settings, "ppo")
      reads.add(ppo.policy_init)
    reads |= set(_READS.get(stage, ()))
  for stage in sorted(reads - set(stages)):
    # The RM's (and value's) model is read from its own checkpoint by the stages after it: world only.
    check(rounds.stage_dir(workdir, stage), None if rounds.base_stage(stage) == "rm" else policy, finished_only=True)


def check_round_one(config, workdir: Path, stages: list[str]) -> None:
  """With rm.rounds=2 the rm stage samples round one's PPO-ptx and reads round one's comparisons: refuse a run
  of it without them, finished or run first (stages/rounds.py)."""
  from instructrl import checkpoints
  from instructrl.stages import rounds
  if rounds.n_rounds(config) != 2 or "rm" not in stages or "ppo_round1" in stages:
    return
  meta = checkpoints.recorded_meta(rounds.stage_dir(workdir, "ppo_round1"))
  if not (meta and meta.get("complete")):
    raise ConfigError(f"rm.rounds=2: the rm stage (round two) samples round one's PPO-ptx, but "
                      f"{rounds.stage_dir(workdir, 'ppo_round1')} is not finished; run the stages rm_round1,ppo_round1 "
                      f"first (--stages=...,rm_round1,ppo_round1,rm,...; the presets' `,round2` option lists them)")


def main(argv):
  del argv
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  import jax
  from instructrl import parallel, progress, workdir_lock
  from instructrl.stages import (data_import, evaluate, ppo, pretrain, proxy_eval, reward, rm_files, rounds, sft,
                                 source, world)

  from instructrl import distributed
  # Before anything touches a device: afterwards jax.devices() spans every host.
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  workdir = Path(_WORKDIR.value)
  stages = parse_stages(_STAGES.value or config.stages)
  files = source.kind(config) == "files"
  if files:   # the model is the released checkpoint's (its config.json, or what the import recorded)
    data_import.fill_model(config, workdir)
  check_config(config, stages=stages)
  workdir_lock.check_workdir(workdir)
  # One writer per workdir (process 0 speaks for a multi-host run); released at exit, even on SIGKILL.
  lock = workdir_lock.WorkdirLock(workdir)
  existed = workdir.is_dir()
  if jax.process_index() == 0:
    lock.acquire()
  try:
    preflight(config, workdir, stages)
  except BaseException:
    # A refused run leaves the workdir as it found it: no LOCK it did not have, no folder it made.
    lock.abandon()
    if not existed and workdir.is_dir() and not any(workdir.iterdir()):
      workdir.rmdir()
    raise
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1, sort_keys=True) + "\n")
  mesh = parallel.make_mesh(config.mesh.shape)
  rules = parallel.rules_from_config(config.mesh.rules)
  logging.info("stages %s on mesh %s in %s", stages, dict(mesh.shape), workdir)
  # Each stage's run gets `report`, the (done, total) callback its training loop moves the outer bar with. The RM
  # and PPO stages run under their round's config, writing under their round's root (stages/rounds.py).
  cfg = lambda stage: rounds.stage_config(config, stage)
  out = lambda stage: rounds.out_root(workdir, stage)
  run = {"world": lambda report: distributed.primary_first("world", lambda: world.run(config, workdir)),
         "import": lambda report: distributed.primary_first("import", lambda: data_import.run(config, workdir)),
         "pretrain": lambda report: pretrain.run(config, workdir, mesh, rules, progress=report),
         "sft": lambda report: sft.run(config, workdir, mesh, rules, progress=report),
         "rm_round1": lambda report: reward.run(cfg("rm_round1"), workdir, mesh, rules, progress=report,
                                                out=out("rm_round1")),
         "ppo_round1": lambda report: ppo.run(cfg("ppo_round1"), workdir, mesh, rules, progress=report,
                                              out=out("ppo_round1")),
         "rm": lambda report: (rm_files if files else reward).run(cfg("rm"), workdir, mesh, rules, progress=report),
         "ppo": lambda report: ppo.run(cfg("ppo"), workdir, mesh, rules, progress=report),
         # The paper's "PPO" next to "PPO-ptx": the same config with the pretraining mix off.
         "ppo_noptx": lambda report: ppo.run(ppo.without_ptx(cfg("ppo_noptx")), workdir, mesh, rules,
                                             name="ppo_noptx", progress=report),
         "eval": lambda report: (proxy_eval if files else evaluate).run(config, workdir, mesh, rules)}
  try:
    # The outer bar and a line per stage (skipped / resumed / running); process 0 speaks.
    with progress.Pipeline(config, workdir, stages, enabled=jax.process_index() == 0) as pipeline:
      for stage in stages:
        pipeline.start(stage)
        run[stage](pipeline.reporter(stage))
        pipeline.finish(stage)
  finally:
    lock.release()


def run():
  """Console-script entry point (`instructrl --config=... --workdir=...`); errors.run_app prints an
  expected error as one `error:` line (exit 2)."""
  errors.run_app(main)


if __name__ == "__main__":
  run()
