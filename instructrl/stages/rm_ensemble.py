"""The RM ensemble: which members there are (this run's W/rm, the ensemble's other members, other runs'
RMs in ppo.rm_runs), loading them all for PPO and best-of-n, and the ranking accuracy of their mean score.

Not in the paper (one RM there): PPO's reward becomes the members' mean minus ppo.rm_uncertainty_coef times
their disagreement (objectives.ensemble_score).
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from instructrl import checkpoints, objectives, parallel
from instructrl.metrics import read_metrics
from instructrl.models.config import ModelConfig
from instructrl.models.transformer import Decoder
from instructrl.stages.rm_models import rm_scores, trained_rm_model
from instructrl.stages.rm_probes import padded_batches
from instructrl.stages.train_state import abstract_state, device_batch, make_optimizer, state_shardings
from instructrl.stages.world import world_fingerprint

ENSEMBLE = "rm_ensemble"   # W/rm_ensemble/member{i}: the ensemble's members after the first (W/rm)


def logged_ensemble_size(workdir: Path, step: int) -> int | None:
  """The size of the last ensemble evaluated into W/metrics/rm.jsonl at `step` (None: none yet): a run
  asking for another size evaluates its own ensemble again."""
  size = None
  for row in read_metrics(Path(workdir) / "metrics" / "rm.jsonl"):
    if row.get("step") == step and "final/ensemble/size" in row:
      size = int(row["final/ensemble/size"])
  return size


def trained_member_dirs(config, workdir: Path) -> list[Path]:
  """The checkpoint directories of the members this run's RM stage trains: W/rm first (the value function's
  init), then W/rm_ensemble/member{i}."""
  n = int(config.rm.get("ensemble_size", 1))
  return [Path(workdir) / "rm"] + [Path(workdir) / ENSEMBLE / f"member{i}" for i in range(1, n)]


def member_dirs(config, workdir: Path, rm_root: Path | None = None) -> list[Path]:
  """Every member PPO scores with: this run's (trained_member_dirs, under rm_root: default the workdir, W/round1
  for round one), then the `rm` stage of each run in ppo.rm_runs (other runs on the same world)."""
  return trained_member_dirs(config, rm_root if rm_root is not None else workdir) + rm_run_dirs(config, workdir)


def n_members(config) -> int:
  """How many RMs PPO scores with (the `rm_ensemble_size` a PPO checkpoint records): none with the gold
  judge as the reward, else this run's members and those of ppo.rm_runs."""
  if config.ppo.get("reward", "rm") == "gold":
    return 0
  return int(config.rm.get("ensemble_size", 1)) + len(rm_run_names(config))


def rm_run_names(config) -> list[str]:
  """ppo.rm_runs as a list of run directories (no filesystem checks: see rm_run_dirs)."""
  return [r.strip() for r in str(config.ppo.get("rm_runs", "") or "").split(",") if r.strip()]


def rm_run_dirs(config, workdir: Path) -> list[Path]:
  """ppo.rm_runs: the finished `rm` stages of other runs, as extra ensemble members. Their trunks come from
  other pretraining/SFT seeds, so they need not err where this run's RM does (Eisenstein et al. 2023,
  "Helping or herding?": pretrain-seed ensembles beat finetune-seed ones); checked for the same world and
  RM model when loaded."""
  out = []
  for run in rm_run_names(config):
    d = Path(run) / "rm"
    if not d.is_dir():
      raise FileNotFoundError(f"ppo.rm_runs: {run!r} has no rm stage ({d} is missing); expected the run "
                              f"directory of a finished RM on the same world")
    if d.resolve() == (Path(workdir) / "rm").resolve():
      raise ValueError(f"ppo.rm_runs: {run!r} is this run; list other runs only")
    if d.resolve() in {x.resolve() for x in out}:
      raise ValueError(f"ppo.rm_runs: {run!r} is listed twice")
    out.append(d)
  return out


def load_members(config, workdir: Path, mesh, rules, rm_root: Path | None = None) -> tuple:
  """Every member's params (a tuple; one entry for a single RM), checked against W/rm's model and the world.
  rm_root: the directory holding this run's rm (and rm_ensemble) instead of the workdir (W/round1)."""
  root = Path(rm_root) if rm_root is not None else Path(workdir)
  rm_dict = trained_rm_model(config, root)
  model_cfg = ModelConfig.from_dict(rm_dict)
  tx, _ = make_optimizer(config.sft, 1)
  abstract = abstract_state(model_cfg, tx, state_shardings(model_cfg, tx, mesh, rules, head="scalar"),
                            head="scalar")["params"]
  return tuple(checkpoints.load_params(d, abstract, rm_dict, world_fingerprint(workdir))[0]
               for d in member_dirs(config, workdir, root))


def make_ensemble_eval(model_cfg: ModelConfig, mesh, rules):
  """eval_step(members, batch) -> ranking metrics of the members' mean score (per-prompt form)."""
  model = Decoder(model_cfg, head="scalar")

  def step(members, batch):
    with nn.logical_axis_rules(rules):
      B, K, T = batch["tokens"].shape
      r = jnp.stack([rm_scores(model, p, batch["tokens"].reshape(B * K, T), batch["last_index"].reshape(B * K))
                     for p in members]).mean(0).reshape(B, K)
      return objectives.ranking_loss(r, batch["ranks"], batch["mask"])[1]

  return jax.jit(step, out_shardings=parallel.replicated(mesh))


def evaluate_ensemble(step, members, examples, batch_size: int, mesh, rules) -> float:
  """Pooled pairwise accuracy of the ensemble's mean score over every prompt of a ranked set (the last batch
  filled with masked rows, rm_probes.padded_batches)."""
  hits = pairs = 0.0
  for batch in padded_batches(examples, batch_size):
    m = step(members, device_batch(batch, mesh, rules))
    hits += float(m["accuracy"]) * float(m["pairs"])
    pairs += float(m["pairs"])
  return hits / max(pairs, 1.0)
