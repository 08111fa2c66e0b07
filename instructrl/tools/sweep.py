r"""Ablation sweeps: run the members of a sweep, sharing every stage they have in common, and
aggregate their eval reports into one table and plot.

  python -m instructrl.tools.sweep --sweep=configs/sweeps/kl_coef.py --workdir=runs/sweep_kl
  python -m instructrl.tools.sweep --sweep=configs/sweeps/kl_coef.py:smoke --workdir=W --dry_run   # commands only

A sweep file has `get_sweep(arg) -> ConfigDict` with `base` (a config spec such as
"configs/instructgpt.py:tiny"), `stages`, `seeds`, `members` (each a `name` and `overrides`, a
dict of dotted config paths) and `metrics` (label -> path into eval/report.json).

Sharing: a stage's outputs depend on its own config block, every earlier stage's, and the seed.
Members whose chains agree up to a stage get that stage's outputs from one place
(workdir/_shared/<stage>-<hash>/), linked into each member's run directory, so the world, the
pretrained model, SFT and often the RM are computed once. Members run serially here; on a
cluster, run the printed commands in the order given (a member's command finds the shared
stages the earlier ones made).

  --seeds=0          run these seeds instead of the sweep file's (one seed first, the rest later)
  --aggregate_only   run nothing, rebuild the table and plot from the reports that exist
  --adopt=W1,W2      reuse finished runs: each of their stages whose hash matches a member's is
                     copied into the shared dir instead of computed again (a beta sweep on top of
                     three finished tiny seed runs trains only the PPO stages of the new members)

Two rounds (a base such as "configs/instructgpt.py:tiny,round2"): round one's stages join before `rm`;
with the sweep field round1 = "base" every member of a seed shares the base preset's round one (see plan()).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
from instructrl import checkpoints, cli_flags
from absl import app, flags, logging

_SWEEP = cli_flags.define(flags.DEFINE_string, "sweep", None, "Sweep file, e.g. configs/sweeps/kl_coef.py[:arg].", required=True)
_WORKDIR = cli_flags.define(flags.DEFINE_string, "workdir", None, "Sweep directory (members under it).", required=True)
_DRY_RUN = cli_flags.define(flags.DEFINE_bool, "dry_run", False, "Print the per-member commands and the sharing, run nothing.")
_ONLY = cli_flags.define(flags.DEFINE_list, "only", [], "Run only these members (names); aggregation still reads every member.")
_AGGREGATE = cli_flags.define(flags.DEFINE_bool, "aggregate_only", False, "Run nothing; rebuild sweep.{json,md,png} from the "
                              "members' reports that exist (e.g. after members ran as separate jobs).")
_SEEDS = cli_flags.define(flags.DEFINE_list, "seeds", [], "Run these seeds instead of the sweep file's (e.g. one seed first).")
_ADOPT = cli_flags.define(flags.DEFINE_list, "adopt", [], "Finished run dirs whose stages the sweep reuses where their "
                          "config hashes match a member's (e.g. the tiny runs the sweep starts from).")

# Where each stage's outputs live in a run directory (OPTIONAL: absent in runs without them, e.g. rm_ensemble
# with rm.ensemble_size 1 or from before ensembles existed).
STAGE_OUTPUTS = {"world": ("world",), "pretrain": ("pretrain", "metrics/pretrain.jsonl"),
                 "sft": ("sft", "metrics/sft.jsonl"),
                 # round one of two (rm.rounds = 2, stages/rounds.py): its RM and PPO-ptx under W/round1
                 "rm_round1": ("round1/comparisons", "round1/rm", "round1/rm_ensemble", "round1/metrics/rm.jsonl"),
                 "ppo_round1": ("round1/ppo", "round1/metrics/ppo.jsonl"),
                 "rm": ("comparisons", "rm", "rm_ensemble", "metrics/rm.jsonl"),
                 "ppo": ("ppo", "metrics/ppo.jsonl"), "ppo_noptx": ("ppo_noptx", "metrics/ppo_noptx.jsonl"),
                 "eval": ("eval", "eval_dev")}
# eval / eval_dev: a run judged one split (the sweep's eval_split is in the eval stage's hash).
OPTIONAL_OUTPUTS = frozenset({"rm_ensemble", "round1/rm_ensemble", "eval", "eval_dev"})
ROUND_ONE = ("world", "pretrain", "sft", "rm_round1", "ppo_round1")   # the stages round one runs (and needs)


def load_module(path: str):
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load_sweep(spec: str) -> ml_collections.ConfigDict:
  path, _, arg = spec.partition(":")
  if not Path(path).exists():
    raise FileNotFoundError(f"--sweep={spec}: no such file {path}")
  sweep = load_module(path).get_sweep(arg or None)
  for field in ("base", "stages", "seeds", "members"):
    if field not in sweep:
      raise ValueError(f"{path}: get_sweep() has no {field!r}")
  names = [m["name"] for m in sweep["members"]]
  if len(set(names)) != len(names):
    raise ValueError(f"{path}: member names must be unique, got {names}")
  return sweep


def member_config(base: str, overrides: dict, seed: int) -> ml_collections.ConfigDict:
  path, _, arg = base.partition(":")
  config = load_module(path).get_config(arg or None)
  flat = dict(overrides, seed=seed)
  for key, value in flat.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"override {key}: the config has no field {leaf!r} there")
    node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], (int, float)) and not isinstance(
        node[leaf], bool) else value
  return config


def stage_keys(config, stages: list[str], round1_config=None) -> dict[str, str]:
  """A hash per stage of everything its outputs depend on: its config blocks and its inputs' keys.

  The world depends on the world/tokenizer blocks only (it has its own seed); the top-level seed
  enters at pretrain. ppo_noptx is the ppo block with ptx_coef 0, so it is shared by members that
  differ only in ptx_coef. With two rounds (rm.rounds = 2), round one's stages hash their round's
  config (round1_config: the one they run under, default `config`) and round two's RM hashes round
  one's PPO-ptx as an input.
  """
  from instructrl.stages import rounds
  from instructrl.stages.ppo import without_ptx
  def block(cfg, name):
    # without the fields that change how a stage logs, evaluates or saves, not what it computes: a finished
    # stage is reused across them (as a resume is), so a cadence change never makes a sweep retrain
    b = cfg[name].to_dict() if hasattr(cfg[name], "to_dict") else cfg[name]
    return {k: v for k, v in b.items() if k not in checkpoints.CADENCE_FIELDS} if isinstance(b, dict) else b
  h = lambda *parts: hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
  first = config if round1_config is None else round1_config
  k = {"world": h(block(first, "world"), block(first, "tokenizer"))}
  k["pretrain"] = h(k["world"], first.seed, block(first, "model"), block(first, "pretrain"))
  k["sft"] = h(k["pretrain"], block(first, "sft"))
  if rounds.n_rounds(config) == 2:
    # round one's stages under their own config (no round fields; round one's PPO-ptx length)
    one = lambda stage: rounds.stage_config(first, stage)
    k["rm_round1"] = h(k["sft"], block(one("rm_round1"), "rm"))
    k["ppo_round1"] = h(k["rm_round1"], block(one("ppo_round1"), "ppo"))
    # round one's PPO-ptx length enters through its key (left out here: keys made before the field match)
    rm = {f: v for f, v in block(config, "rm").items() if f != "round1_ppo_episodes"}
    k["rm"] = h(k["sft"], k["ppo_round1"], rm)
  else:
    k["rm"] = h(k["sft"], block(config, "rm"))
  k["ppo"] = h(k["rm"], block(config, "ppo"))
  k["ppo_noptx"] = h(k["rm"], block(without_ptx(config), "ppo"))
  k["eval"] = h(k["ppo"], k["ppo_noptx"], block(config, "eval"), stages)
  return {s: k[s] for s in stages}


def sweep_stages(sweep, config) -> list[str]:
  """The sweep's stages, with round one's (rm_round1, ppo_round1) before `rm` when the base runs two rounds."""
  from instructrl.stages import rounds
  stages = [s.strip() for s in sweep["stages"].split(",") if s.strip()]
  if rounds.n_rounds(config) == 2 and "rm" in stages and "rm_round1" not in stages:
    i = stages.index("rm")
    stages[i:i] = ["rm_round1", "ppo_round1"]
  return stages


def overrides_as_flags(overrides: dict, seed: int) -> list[str]:
  def fmt(v):
    return "(" + ", ".join(map(str, v)) + ",)" if isinstance(v, (list, tuple)) else str(v)
  return [f"--config.{k}={fmt(v)}" for k, v in {**overrides, "seed": seed}.items()]


def member_overrides(sweep, member) -> dict:
  """The member's overrides plus the sweep's eval split: sweeps choose settings, so their members are
  judged on the dev split by the dev group (sweep field eval_split, "dev" in configs/sweeps/common.py)."""
  return {**dict(member.get("overrides", {})), "eval.split": sweep.get("eval_split", "test")}


def plan(sweep, workdir: Path) -> list[dict]:
  """One entry per (member, seed): its run dir, commands, and the shared stage dirs it links.

  Two rounds (a `,round2` base): with the sweep field round1 = "base" (the default) every member of a seed
  shares one round one, the base preset's: the members' overrides apply to round two's stages (rm, ppo,
  ppo_noptx, eval), so a beta sweep varies the final PPO only. A member's run is then two commands, round one
  under the base config and the rest under the member's. round1 = "member": each member's overrides apply
  to both rounds (one command). A pinned sweep refuses a member that changes the world, pretraining or SFT.
  """
  pin = sweep.get("round1", "base")
  if pin not in ("base", "member"):
    raise ValueError(f"sweep field round1={pin!r}: expected 'base' (one round one per seed, the base "
                     f"preset's) or 'member' (each member's overrides in both rounds)")
  runs, owners = [], {}
  for seed in sweep["seeds"]:
    base_cfg = member_config(sweep["base"], {"eval.split": sweep.get("eval_split", "test")}, seed)
    for m in sweep["members"]:
      overrides = member_overrides(sweep, m)
      cfg = member_config(sweep["base"], overrides, seed)
      stages = sweep_stages(sweep, cfg)
      pinned = pin == "base" and "rm_round1" in stages
      keys = stage_keys(cfg, stages, round1_config=base_cfg if pinned else None)
      if pinned:
        own = stage_keys(cfg, [s for s in ("world", "pretrain", "sft") if s in stages])
        changed = [s for s, k in own.items() if keys[s] != k]
        if changed:
          raise ValueError(f"sweep member {m['name']} changes {','.join(changed)}, which round one reads: with a "
                           f"two-round base its round one is the base preset's (sweep field round1='base'); set "
                           f"round1='member' to run both rounds at each member's settings")
      run_dir = workdir / m["name"] / f"seed{seed}"
      shared = {s: workdir / "_shared" / f"{s}-{k}" for s, k in keys.items()}
      first = {s: owners.setdefault(f"{s}-{k}", f"{m['name']}/seed{seed}") for s, k in keys.items()}
      main = [sys.executable, "-m", "instructrl.main", f"--config={sweep['base']}", f"--workdir={run_dir}"]
      if pinned:
        one = [s for s in stages if s in ROUND_ONE]
        cmds = [main + [f"--stages={','.join(one)}", f"--config.seed={seed}"],
                main + [f"--stages={','.join(s for s in stages if s not in one)}",
                        *overrides_as_flags(overrides, seed)]]
      else:
        cmds = [main + [f"--stages={','.join(stages)}", *overrides_as_flags(overrides, seed)]]
      runs.append({"member": m["name"], "seed": seed, "run_dir": run_dir, "shared": shared, "computes": first,
                   "cmds": cmds, "cmd": cmds[-1]})
  return runs


def run_config(run_dir: Path, base: str) -> ml_collections.ConfigDict:
  """A finished run's config: the sweep's base preset overlaid with the run's config.json, so a field
  added to the code after the run keeps its default (what the run used) and a field the code no
  longer has stays in and changes the hashes (the run is then not adopted)."""
  path, _, arg = base.partition(":")
  config = load_module(path).get_config(arg or None).to_dict()
  def overlay(dst: dict, src: dict):
    for k, v in src.items():
      if isinstance(v, dict) and isinstance(dst.get(k), dict):
        overlay(dst[k], v)
      else:
        dst[k] = tuple(v) if isinstance(v, list) else v
  saved = json.loads((run_dir / "config.json").read_text())
  if isinstance(saved.get("ppo"), dict):
    # A run from before a ppo field was renamed recorded it under the old name: read it under the new one.
    saved["ppo"] = checkpoints.current_names(saved["ppo"], config["ppo"])
  rm = saved.get("rm")
  if isinstance(rm, dict) and "heldout_group" in rm:
    # rm.heldout_group is now world.heldout_group: a run that held out its world's group reads as one made
    # without the field (adopted); one that held out another group keeps it and matches no member.
    if rm["heldout_group"] == (saved.get("world") or {}).get("heldout_group", config["world"]["heldout_group"]):
      del rm["heldout_group"]
  overlay(config, saved)
  return ml_collections.ConfigDict(config)


def _has_outputs(path: Path) -> bool:
  if path.is_dir():
    return any(path.iterdir())
  return path.exists() and path.stat().st_size > 0


def _judged_every_ppo_stage(src: Path, stages: list[str]) -> bool:
  """Whether each eval report of a finished run has a row for every PPO stage among `stages` (its config
  hash does not say which stages it ran: a beta sweep's run has no ppo_noptx, a gamma sweep's needs it)."""
  need = sum(s in stages for s in ("ppo", "ppo_noptx"))
  reports = [src / o / "report.json" for o in STAGE_OUTPUTS["eval"] if (src / o / "report.json").exists()]
  return bool(reports) and all(
      sum(str(m).startswith("PPO") for m in json.loads(r.read_text()).get("models", [])) >= need for r in reports)


def adopt(runs: list[dict], sweep, finished: list[Path], copy: bool = True) -> dict[str, Path]:
  """Copy the stage outputs of finished runs into the shared dirs whose hashes they match.

  A shared dir that already has outputs is left alone. Returns {shared dir name: source run}; with
  copy=False (--dry_run) only says what would be copied.
  """
  wanted = {shared.name: (stage, shared) for r in runs for stage, shared in r["shared"].items()}
  adopted = {}
  for src in finished:
    if not (src / "config.json").exists():
      raise FileNotFoundError(f"--adopt={src}: no config.json there (not a run directory)")
    config = run_config(src, sweep["base"])
    stages = sweep_stages(sweep, config)
    for stage, key in stage_keys(config, stages).items():
      name = f"{stage}-{key}"
      if name not in wanted or name in adopted:
        continue
      outs = STAGE_OUTPUTS[stage]
      shared = wanted[name][1]
      if any(_has_outputs(shared / o) for o in outs):
        continue   # computed (or started) by the sweep itself
      if not (all((src / o).exists() for o in outs if o not in OPTIONAL_OUTPUTS)
              and any((src / o).exists() for o in outs)):
        continue   # the run stopped before this stage
      if stage == "eval" and not _judged_every_ppo_stage(src, stages):
        continue   # its report lacks a model the member's eval judges (a run without ppo_noptx)
      for o in (o for o in outs if copy and (src / o).exists()):
        (shared / o).parent.mkdir(parents=True, exist_ok=True)
        if (src / o).is_dir():
          if (shared / o).exists():
            shutil.rmtree(shared / o)
          shutil.copytree(src / o, shared / o, symlinks=False)
        else:
          shutil.copyfile(src / o, shared / o)
      adopted[name] = src
      if copy:
        logging.info("sweep: adopted %s from %s", name, src)
  return adopted


def link_shared(run: dict) -> None:
  """Point the member's stage outputs at the shared copies (made on first use)."""
  run_dir = run["run_dir"]
  (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
  for stage, shared in run["shared"].items():
    shared.mkdir(parents=True, exist_ok=True)
    for out in STAGE_OUTPUTS[stage]:
      link, target = run_dir / out, shared / out
      link.parent.mkdir(parents=True, exist_ok=True)
      if out.endswith(".jsonl"):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
      else:
        target.mkdir(parents=True, exist_ok=True)
      if link.is_symlink() and Path(os.readlink(link)) == target:
        continue
      if link.exists() or link.is_symlink():
        raise FileExistsError(f"{link}: exists and is not the link to {target}; was this run dir made by hand?")
      link.symlink_to(target)


def get_path(obj, path: str):
  """The value at a /-separated path into a report; a last part `lastN` on a list (a PPO curve) is the mean
  of its last N values."""
  for part in path.split("/"):
    if isinstance(obj, list) and part.startswith("last") and part[4:].isdigit() and obj:
      tail = [v for v in obj[-int(part[4:]):] if isinstance(v, (int, float))]
      return float(np.mean(tail)) if tail else None
    if not isinstance(obj, dict) or part not in obj:
      return None
    obj = obj[part]
  return obj


def aggregate(sweep, runs: list[dict], workdir: Path) -> dict:
  """Mean, std and per-seed values of every sweep metric for every member."""
  table = {}
  for m in sweep["members"]:
    # evaluate.report_dir's rule, without importing the stage (this process only runs subprocesses)
    where = "eval_dev" if sweep.get("eval_split", "test") == "dev" else "eval"
    reports = [json.loads((r["run_dir"] / where / "report.json").read_text())
               for r in runs if r["member"] == m["name"] and (r["run_dir"] / where / "report.json").exists()]
    row = {}
    for label, path in sweep.get("metrics", {}).items():
      vals = [v for v in (get_path(rep, path) for rep in reports) if isinstance(v, (int, float))]
      row[label] = {"mean": float(np.mean(vals)) if vals else None,
                    "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "values": vals}
    table[m["name"]] = {"overrides": dict(m.get("overrides", {})), "seeds_done": len(reports), **row}
  out = {"sweep": _SWEEP.value if _SWEEP.present else None, "members": table}
  (workdir / "sweep.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
  (workdir / "sweep.md").write_text(markdown(sweep, table))
  plot(sweep, table, workdir / "sweep.png")
  return out


def markdown(sweep, table: dict) -> str:
  labels = list(sweep.get("metrics", {}))
  lines = ["| member | overrides | seeds | " + " | ".join(labels) + " |", "|---" * (3 + len(labels)) + "|"]
  for name, row in table.items():
    cells = []
    for label in labels:
      v = row[label]
      cells.append("-" if v["mean"] is None else f"{v['mean']:.3f}" + (f" ± {v['std']:.3f}" if v["std"] else ""))
    ov = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "(base)"
    lines.append(f"| {name} | {ov} | {row['seeds_done']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _numeric_axis(table: dict) -> tuple[str, list[float]] | None:
  """(key, values) when every member overrides the same one field with a number (beta, gamma, ...)."""
  keys = {tuple(row["overrides"]) for row in table.values()}
  if len(keys) != 1 or len(next(iter(keys))) != 1:
    return None
  key = next(iter(keys))[0]
  values = [row["overrides"][key] for row in table.values()]
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
    return None
  return key, [float(v) for v in values]


def plot(sweep, table: dict, path: Path) -> None:
  """One panel per metric: mean +- std over seeds against the swept value when it is one number
  (symlog x, so 0 fits beside 0.01), else a bar per member."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = list(sweep.get("metrics", {}))
  if not labels:
    return
  fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.2), squeeze=False)
  names = list(table)
  axis = _numeric_axis(table)
  for ax, label in zip(axes[0], labels):
    means = [table[n][label]["mean"] for n in names]
    errs = [table[n][label]["std"] or 0.0 for n in names]
    if axis is not None:
      key, xs = axis
      pts = sorted((x, m, e) for x, m, e in zip(xs, means, errs) if m is not None)
      if pts:
        x, m, e = zip(*pts)
        ax.errorbar(x, m, yerr=e, marker="o", capsize=4, color="#4c72b0")
      positive = [v for v in xs if v > 0]
      ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
      ax.set_xlabel(key)
    else:
      ax.bar(names, [m or 0.0 for m in means], yerr=errs, capsize=4, color="#4c72b0")
      ax.tick_params(axis="x", rotation=30)
    ax.set_title(label)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  sweep = load_sweep(_SWEEP.value)
  if _SEEDS.value:
    sweep.seeds = tuple(int(s) for s in _SEEDS.value)
  workdir = Path(_WORKDIR.value)
  runs = plan(sweep, workdir)
  unknown = sorted(set(_ONLY.value) - {m["name"] for m in sweep["members"]})
  if unknown:
    raise app.UsageError(f"--only: no member named {unknown}; the sweep has {[m['name'] for m in sweep['members']]}")
  if not _DRY_RUN.value:
    workdir.mkdir(parents=True, exist_ok=True)
  # Adopted first (with --dry_run: only looked up), so that the lines below say what is really computed.
  adopted = {} if _AGGREGATE.value else adopt(runs, sweep, [Path(p) for p in _ADOPT.value], copy=not _DRY_RUN.value)
  if _ADOPT.value:
    print(f"# {'would adopt' if _DRY_RUN.value else 'adopted'} {len(adopted)} stage outputs: "
          + (", ".join(f"{k} <- {v}" for k, v in adopted.items()) or "none matched"))
  for r in runs:
    mine = [s for s, who in r["computes"].items() if who == f"{r['member']}/seed{r['seed']}"]
    taken = [s for s in mine if r["shared"][s].name in adopted]
    mine = [s for s in mine if s not in taken]
    print(f"# {r['member']} seed {r['seed']}: computes {','.join(mine) or 'nothing new'}; "
          + (f"adopts {','.join(taken)}; " if taken else "")
          + f"shares {','.join(s for s in r['shared'] if s not in mine and s not in taken) or 'nothing'}")
    for cmd in r["cmds"]:
      print(" ".join(cmd))
  if _DRY_RUN.value:
    return
  for r in runs:
    if _AGGREGATE.value or (_ONLY.value and r["member"] not in _ONLY.value):
      continue
    link_shared(r)
    logging.info("sweep: %s seed %d", r["member"], r["seed"])
    for cmd in r["cmds"]:
      subprocess.run(cmd, check=True)
  out = aggregate(sweep, runs, workdir)
  print((workdir / "sweep.md").read_text())
  logging.info("sweep: wrote %s/sweep.{json,md,png} (%d members)", workdir, len(out["members"]))


if __name__ == "__main__":
  from instructrl import errors
  errors.run_app(main)   # a bad config, file or checkpoint: one `error:` line, exit 2
