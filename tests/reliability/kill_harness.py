"""Kill anywhere, resume exactly: SIGKILL the smoke pipeline at seeded random events, rerun the same
command each time, and compare everything it leaves with an uninterrupted run.

Kill points are *events*, not wall-clock times: a new path matching a glob appearing in the workdir
(a world file, Orbax's temporary checkpoint folder, a committed step, the RM's comparisons...), then
a seeded random delay. Kills aimed at Orbax's `*.orbax-checkpoint-tmp*` folders land inside
checkpoint writes on purpose; whether a kill did is observed, not assumed (a tmp folder the killed
process left behind, or a committed step without its manifest).

  python -m tests.reliability.kill_harness --kills=8 --seed=0 --stages=world,pretrain,sft,rm,ppo,eval

Adding a stage = a line in EVENTS (and OUTPUTS for files it writes besides checkpoints and metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# A shortened smoke pipeline: every stage runs and checkpoints several times.
FLAGS = ["--config.eval.n_prompts=0", "--config.pretrain.steps=20", "--config.pretrain.checkpoint_every=5",
         "--config.sft.steps=10", "--config.sft.checkpoint_every=5", "--config.rm.checkpoint_every=1",
         "--config.ppo.total_episodes=64", "--config.ppo.checkpoint_every=1"]
TMP = "*.orbax-checkpoint-tmp*"
# (stage, glob under the workdir whose new appearance arms the kill, max random delay in seconds).
EVENTS = [
    ("world", "world/*.jsonl", 0.05),                  # world generation
    ("world", "world/tokenizer.model*", 0.0),          # tokenizer training / marker
    ("pretrain", f"pretrain/{TMP}", 0.03),             # inside a checkpoint write
    ("pretrain", "pretrain/[0-9]*", 1.0),              # after a commit, during the next steps
    ("sft", f"sft/{TMP}", 0.03),
    ("sft", "sft/[0-9]*", 1.0),
    ("rm", "sft/10", 4.0),                             # SFT done: RM sampling/ranking (collection)
    ("rm", "comparisons/*.jsonl*", 0.3),               # comparisons being written
    ("rm", f"rm/{TMP}", 0.03),
    ("rm", "rm/[0-9]*", 0.5),
    ("ppo", f"ppo/{TMP}", 0.03),
    ("ppo", "ppo/[0-9]*", 1.5),                        # during the next rollouts/updates
    ("ppo_noptx", f"ppo_noptx/{TMP}", 0.03),
    ("ppo_noptx", "ppo_noptx/[0-9]*", 1.5),
    ("eval", "eval/answers/*", 1.0),                   # between models' answers
    ("eval", "eval/report.md", 0.0),                   # report written, report.json (the marker) not yet
]
# Files compared (besides every stage's final params and metrics): byte for byte, except JSON reports, which
# are compared without their wall-clock entries. A glob compares the set of files it matches and each one.
OUTPUTS = {"world": ["world/COMPLETE", "world/tokenizer.model", "world/corpus_train.jsonl", "world/demos_train.jsonl"],
           "rm": ["comparisons/train.jsonl", "comparisons/valid.jsonl"],
           "eval": ["eval/report.json", "eval/judged_checkpoints.json", "eval/answers/*.json"]}
REPORTS = ("eval/report.json",)   # the only outputs holding wall-clock entries
CHECKPOINTED = ("pretrain", "sft", "rm", "ppo", "ppo_noptx")
TIMING = ("_per_sec", "time/")   # metrics that are wall-clock, not results


def cli_cmd(workdir: Path, stages: str, extra=()) -> list[str]:
  return [sys.executable, "-m", "instructrl.main", "--config=configs/instructgpt.py:smoke", f"--workdir={workdir}",
          f"--stages={stages}", *FLAGS, *extra]


def cli_env() -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "JAX_COMPILATION_CACHE_DIR": os.environ.get("INSTRUCTRL_JAX_CACHE",
                                                      os.path.join(tempfile.gettempdir(), "instructrl-jax-cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def run(workdir: Path, stages: str, log: Path, timeout: float = 600) -> None:
  with open(log, "ab") as f:
    p = subprocess.run(cli_cmd(workdir, stages), cwd=ROOT, env=cli_env(), stdout=f, stderr=f, timeout=timeout)
  if p.returncode:
    raise RuntimeError(f"{' '.join(cli_cmd(workdir, stages))} failed; log: {log}\n{log.read_text()[-3000:]}")


def matches(workdir: Path, glob: str) -> set[str]:
  """Paths matching `glob`; a step glob ("[0-9]*") means committed steps only, not Orbax's tmp folders."""
  hits = workdir.glob(glob)
  if glob.endswith("[0-9]*"):
    hits = (p for p in hits if p.name.isdigit())
  return set(map(str, hits))


def _in_write(workdir: Path) -> tuple[set, set]:
  """Orbax tmp folders, and committed steps lacking a manifest: what a kill inside a save leaves."""
  tmp = {str(p) for s in CHECKPOINTED for p in (workdir / s).glob(TMP)}
  unsealed = {p for s in CHECKPOINTED for p in matches(workdir, f"{s}/[0-9]*")
              if not (Path(p) / "instructrl_manifest.json").exists()}
  return tmp, unsealed


def kill_at(workdir: Path, stages: str, glob: str, delay: float, log: Path, timeout: float) -> dict:
  """Run the pipeline; SIGKILL it `delay` s after a new path matching `glob` appears. Returns what happened."""
  from tests.cli_helpers import sigkill_when
  before, hits = matches(workdir, glob), []
  tmp0, unsealed0 = _in_write(workdir)

  def ready():
    hits.extend(sorted(matches(workdir, glob) - before))
    return bool(hits)
  killed = sigkill_when(cli_cmd(workdir, stages), ready, cwd=ROOT, env=cli_env(), timeout=timeout, delay=delay,
                        log=log)
  if not hits:   # ended first: fine only if it finished the pipeline
    run(workdir, stages, log, timeout)   # a failed run raises here, with its log
    return {"event": glob, "killed": False}
  tmp1, unsealed1 = _in_write(workdir)
  return {"event": glob, "at": os.path.relpath(hits[0], workdir), "delay_s": round(delay, 3), "killed": killed,
          "inside_orbax_write": sorted(os.path.relpath(p, workdir) for p in tmp1 - tmp0),
          "between_commit_and_manifest": sorted(os.path.relpath(p, workdir) for p in unsealed1 - unsealed0)}


def final_params(stage_dir: Path):
  sys.path.insert(0, str(ROOT))
  from tests.cli_helpers import final_params as read
  return read(stage_dir)


def metric_rows(workdir: Path, stage: str) -> list[dict]:
  path = workdir / "metrics" / f"{stage}.jsonl"
  rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
  return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def _results(tree):
  """A JSON report without its wall-clock entries."""
  if isinstance(tree, dict):
    return {k: _results(v) for k, v in tree.items() if not any(t in k for t in TIMING + ("seconds",))}
  if isinstance(tree, list):
    return [_results(v) for v in tree]
  return tree


def differences(ref: Path, w: Path, stages: list[str]) -> list[str]:
  """Everything that differs between the two run directories (empty: identical results)."""
  import jax
  out = []
  for stage in stages:
    if stage in CHECKPOINTED:
      (sa, a), (sb, b) = final_params(ref / stage), final_params(w / stage)
      if sa != sb:
        out.append(f"{stage}: final step {sb} != {sa}")
      elif not jax.tree.all(jax.tree.map(np.array_equal, a, b)):
        out.append(f"{stage}: final params differ")
      if metric_rows(ref, stage) != metric_rows(w, stage):
        out.append(f"{stage}: metrics/{stage}.jsonl differs")
    for pattern in OUTPUTS.get(stage, []):
      names = sorted({str(p.relative_to(d)) for d in (ref, w) for p in d.glob(pattern)})
      if not names:
        out.append(f"{pattern}: in neither run")
      for f in names:
        if not (ref / f).is_file() or not (w / f).is_file():
          out.append(f"{f}: only in the {'killed' if (w / f).is_file() else 'uninterrupted'} run")
          continue
        a, b = (ref / f).read_bytes(), (w / f).read_bytes()
        if f in REPORTS:
          a, b = _results(json.loads(a)), _results(json.loads(b))
        if a != b:
          out.append(f"{f} differs")
  return out


def campaign(ref: Path, w: Path, stages: list[str], kills: int, seed: int, log_dir: Path,
             timeout: float = 600) -> dict:
  """`kills` kill points drawn (seeded) from the events of `stages`, in pipeline order; the same command
  is rerun after each, then once more to the end; returns the figures and the differences to `ref`."""
  rng = random.Random(seed)
  pool = [e for e in EVENTS if e[0] in stages]
  idx = sorted(rng.sample(range(len(pool)), min(kills, len(pool))))
  # More kills than events: repeat events (a later appearance of the same glob, e.g. the next checkpoint).
  idx = sorted(idx + [rng.randrange(len(pool)) for _ in range(kills - len(idx))])
  plan = [(pool[i][1], rng.uniform(0, pool[i][2])) for i in idx]
  log = log_dir / "killed_runs.log"
  t0 = time.perf_counter()
  results = [kill_at(w, ",".join(stages), glob, delay, log, timeout) for glob, delay in plan]
  run(w, ",".join(stages), log, timeout)
  seconds = time.perf_counter() - t0
  landed = [r for r in results if r["killed"]]
  return {"kills_planned": len(plan), "kills": len(landed),
          "inside_checkpoint_write": sum(bool(r["inside_orbax_write"]) for r in landed),
          "between_commit_and_manifest": sum(bool(r["between_commit_and_manifest"]) for r in landed),
          "quarantined": sorted(str(p.relative_to(w)) for s in CHECKPOINTED for p in (w / s).glob("corrupt/*")),
          "seconds": round(seconds, 1), "events": results, "differences": differences(ref, w, stages)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--kills", type=int, default=8)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--stages", default="world,pretrain,sft,rm,ppo,eval")
  ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "kill_harness"))
  args = ap.parse_args()
  base = Path(args.dir)
  base.mkdir(parents=True, exist_ok=True)
  stages = args.stages.split(",")
  ref = base / "reference"
  if not (ref / "LOCK").exists():
    run(ref, args.stages, base / "reference.log")
  w = base / f"killed_seed{args.seed}"
  out = campaign(ref, w, stages, args.kills, args.seed, base)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
