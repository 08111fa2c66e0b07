"""Two rounds of comparisons in one workdir (rm.rounds = 2; the presets' `,round2` option).

Paper, section 3.5: comparisons were collected over time, the later ones ranking samples of the RL
policies. Round one is the usual RM and PPO-ptx, written under W/round1 (comparisons, rm, ppo) by the
stages `rm_round1` and `ppo_round1`. Round two is the pipeline's own `rm`, `ppo`, `ppo_noptx` and `eval`
in their usual places, so everything downstream reads the final round unchanged: its RM ranks responses
drawn by rm.round2_mix, whose `ppo` share samples round one's PPO-ptx policy (W/round1/ppo), and trains
on round one's comparisons added to its own.

The stages are reward.run and ppo.run with another output root and the config of their round
(`stage_config`); nothing else differs.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

ROUND1 = "round1"                                   # W/round1: round one's comparisons, rm and ppo
ROUND_ONE_STAGES = {"rm_round1": "rm", "ppo_round1": "ppo"}   # stage -> the stage it runs in W/round1
ROUND_FIELDS = ("rounds", "round2_mix", "round1_ppo_episodes")   # config only: no stage records them
# A path in rm.ppo_source / rm.extra_comparisons may start with this: the run's own workdir. Round two records
# round one's outputs so (not as absolute paths), so its settings and comparisons match wherever the workdir
# is: a moved workdir resumes, and sweep members sharing one round two (tools/sweep.py) agree on them.
WORKDIR = "{workdir}"
ROUND1_PPO = f"{WORKDIR}/{ROUND1}/ppo"
ROUND1_COMPARISONS = f"{WORKDIR}/{ROUND1}/comparisons"


def n_rounds(config) -> int:
  """rm.rounds (configs without the field: one round)."""
  return int(config.rm.get("rounds", 1))


def base_stage(stage: str) -> str:
  """The stage a pipeline stage runs: rm_round1 -> rm, ppo_round1 -> ppo, any other itself."""
  return ROUND_ONE_STAGES.get(stage, stage)


def out_root(workdir: Path, stage: str) -> Path:
  """Where a stage's outputs go (and where PPO reads its RM): W/round1 for round one's stages, else W."""
  return Path(workdir) / ROUND1 if stage in ROUND_ONE_STAGES else Path(workdir)


def stage_dir(workdir: Path, stage: str) -> Path:
  """A checkpointed stage's directory: W/round1/rm for rm_round1, W/<stage> otherwise."""
  return out_root(workdir, stage) / base_stage(stage)


def expand(path: str, workdir: Path) -> Path:
  """A ppo_source / extra_comparisons entry as a path: a leading {workdir} is the run's workdir."""
  path = str(path)
  if path == WORKDIR or path.startswith(WORKDIR + "/"):
    return Path(workdir).absolute() / path[len(WORKDIR):].lstrip("/")
  return Path(path)


def portable(saved: dict, asked: dict) -> dict:
  """Recorded rm settings (or a comparisons key) with round one's outputs in the {workdir} form where the
  config asks for that form: round two as recorded before the form existed named them by absolute path,
  and any such path is round one of the run being checked (its own rm_round1 and ppo_round1 are checked
  on their own), so the two agree."""
  saved = dict(saved)
  legacy = {ROUND1_PPO: "/" + ROUND1 + "/ppo", ROUND1_COMPARISONS: "/" + ROUND1 + "/comparisons"}
  if str(asked.get("ppo_source", "")) == ROUND1_PPO and str(saved.get("ppo_source", "")).endswith(legacy[ROUND1_PPO]):
    saved["ppo_source"] = ROUND1_PPO
  if ROUND1_COMPARISONS in str(asked.get("extra_comparisons", "")).split(",") and saved.get("extra_comparisons"):
    saved["extra_comparisons"] = ",".join(
        ROUND1_COMPARISONS if p.endswith(legacy[ROUND1_COMPARISONS]) and p.startswith("/") else p
        for p in str(saved["extra_comparisons"]).split(","))
  return saved


def stage_config(config, stage: str):
  """The config a stage runs under. Without the round fields in the rm block, so a one-round run and round
  one record the settings an RM always recorded (and a changed rm.round2_mix leaves round one finished).
  Round two (rm.rounds = 2, the stages after round one): rm.source_mix is rm.round2_mix, rm.ppo_source round
  one's PPO-ptx, and round one's comparisons join rm.extra_comparisons, both named from {workdir} (WORKDIR)
  and recorded so with the RM's settings. Round one's PPO-ptx (ppo_round1) runs rm.round1_ppo_episodes
  episodes where that is set (its policy only supplies round two's samples), recorded as its ppo.total_episodes."""
  if "rm" not in config or not any(f in config.rm for f in ROUND_FIELDS):
    return config
  out = ml_collections.ConfigDict(config.to_dict())
  for f in ROUND_FIELDS:
    if f in out.rm:
      del out.rm[f]
  episodes = int(config.rm.get("round1_ppo_episodes", 0))
  if n_rounds(config) == 2 and stage == "ppo_round1" and episodes:
    out.ppo.total_episodes = episodes
  if n_rounds(config) == 2 and stage not in ROUND_ONE_STAGES:
    out.rm.source_mix = ml_collections.ConfigDict(dict(config.rm.round2_mix))
    out.rm.ppo_source = ROUND1_PPO
    extra = [p.strip() for p in str(config.rm.get("extra_comparisons", "")).split(",") if p.strip()]
    out.rm.extra_comparisons = ",".join(extra + [ROUND1_COMPARISONS])
  return out
