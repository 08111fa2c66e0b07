"""Convert between Hugging Face checkpoints and instructrl stage checkpoints.

  # a GPT-2 / LLaMA save_pretrained directory -> workdir/pretrain, a completed stage that the
  # sft / rm stages start from (their --config.model must equal the printed model config)
  python -m instructrl.tools.convert import --hf_dir=path/to/gpt2 --workdir=runs/hh --stage=pretrain
  # a finished instructrl stage -> a directory transformers loads: an LM-head stage (pretrain, sft) as
  # *ForCausalLM; a PPO stage's EMA policy (the model it evaluates; --entry=params for the last iterate)
  python -m instructrl.tools.convert export --workdir=runs/hh --stage=sft --out=exported/sft
  python -m instructrl.tools.convert export --workdir=runs/hh --stage=ppo --out=exported/ppo
  # the reward model as *ForSequenceClassification, scored at each row's last token that is not --pad_id
  python -m instructrl.tools.convert export --workdir=runs/hh --stage=rm --out=exported/rm --pad_id=0

An export carries the run's tokenizer (the world's tokenizer.model, or the one a public-data run
imported) and, unless --bos_id / --eos_id say otherwise, its special ids: the directory is a checkpoint
`configs/public.py` starts from (`--config.data.hf_dir=exported/...`).

The same from Python: `import_hf(hf_dir, workdir, stage)` and `export_hf(workdir, stage, out, ...)`;
`instructrl.models.hf.load / save` work on params directly. Neither needs torch or transformers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import logging
import sys
from pathlib import Path

import flax.linen as nn
import jax

from instructrl import checkpoints, parallel
from instructrl.models import hf
from instructrl.models.config import ModelConfig
from instructrl.models.transformer import abstract_params

MODEL_JSON = "hf_model_config.json"   # written next to an imported stage: the --config.model to use


def import_hf(hf_dir: str | Path, workdir: str | Path, stage: str = "pretrain", mesh=None, rules=None) -> ModelConfig:
  """Write the HF checkpoint as the completed instructrl stage `workdir/stage`; returns its ModelConfig."""
  mesh = mesh if mesh is not None else parallel.make_mesh((-1, 1, 1))
  params, cfg = hf.load(hf_dir, mesh=mesh, rules=rules or parallel.DEFAULT_RULES)
  out = Path(workdir) / stage
  ckpt = checkpoints.StageCheckpoints(out)
  try:
    if ckpt.latest_step() is not None:
      raise FileExistsError(f"{out}: already holds a checkpoint; import into a new workdir or stage")
    ckpt.save(0, {"params": params}, {"complete": True, "model": cfg.to_dict(), "imported_from": str(hf_dir)})
  finally:
    ckpt.close()
  (out / MODEL_JSON).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
  logging.info("imported %s (%s, %d params) into %s", hf_dir, cfg.style, cfg.num_params(), out)
  return cfg


RM_STAGES = ("rm", "rm_ensemble", "rm_judge")   # scalar-head stages: W/rm, W/rm_ensemble/member{i}, W/rm_judge
ENTRIES = ("params", "ema")


def stage_head(stage: str) -> str:
  return "scalar" if Path(stage).parts[0] in RM_STAGES else "lm"


def stage_entry(stage: str) -> str:
  """Which params of a stage's state to export by default: a PPO stage's EMA policy (the one its end-of-stage
  eval and the report judge), every other stage's only params."""
  return "ema" if Path(stage).parts[0].startswith("ppo") else "params"


def load_stage_params(workdir: str | Path, stage: str, mesh=None, rules=None, *, head: str = "lm",
                      entry: str = "params"):
  """(params, ModelConfig) of a completed stage, with the model config its checkpoint records.

  head: "lm" or "scalar" (an RM); entry: which params of the saved state ("ema": PPO's averaged policy).
  """
  directory = Path(workdir) / stage
  ckpt = checkpoints.StageCheckpoints(directory)
  try:
    meta = ckpt.meta()
  finally:
    ckpt.close()
  if meta is None:
    raise FileNotFoundError(f"{directory}: no checkpoint")
  cfg = ModelConfig.from_dict(meta["model"])
  mesh = mesh if mesh is not None else parallel.make_mesh((-1, 1, 1))
  rules = rules or parallel.DEFAULT_RULES
  boxed = abstract_params(cfg, head)
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)
  params, _ = checkpoints.load_params(directory, abstract, cfg.to_dict(), entry=entry)
  return params, cfg


def export_hf(workdir: str | Path, stage: str, out: str | Path, *, bos_id: int | None = None,
              eos_id: int | None = None, pad_id: int | None = None, entry: str | None = None,
              max_shard_bytes: int = 5 << 30) -> ModelConfig:
  """Write a completed stage as a save_pretrained directory: an LM-head stage (pretrain, sft, imported, and
  ppo / ppo_noptx, their EMA policy unless entry="params") as *ForCausalLM, an RM stage (rm,
  rm_ensemble/member<i>) as *ForSequenceClassification (pad_id required; see hf.save_rm)."""
  head = stage_head(stage)
  entry = entry or stage_entry(stage)
  if entry not in ENTRIES:
    raise ValueError(f"entry={entry!r}: expected one of {ENTRIES}")
  if entry == "ema" and not Path(stage).parts[0].startswith("ppo"):
    raise ValueError(f"entry='ema': only PPO stages keep an EMA policy; stage {stage!r} has 'params' only")
  params, cfg = load_stage_params(workdir, stage, head=head, entry=entry)
  tokenizer = run_tokenizer(workdir)
  if tokenizer is not None:   # the run's own special ids unless told otherwise
    bos_id = tokenizer[1]["bos_id"] if bos_id is None else bos_id
    eos_id = tokenizer[1]["eos_id"] if eos_id is None else eos_id
  if head == "scalar":
    left = hf.save_rm(out, params, cfg, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, max_shard_bytes=max_shard_bytes)
    logging.info("exported the RM %s/%s to %s (transformers' score = ours - %g)", workdir, stage, out, left)
  else:
    hf.save(out, params, cfg, bos_id=bos_id, eos_id=eos_id, max_shard_bytes=max_shard_bytes)
    logging.info("exported %s/%s (%s) to %s", workdir, stage, entry, out)
  if tokenizer is not None:   # beside the weights, so the directory is a checkpoint another run can start from
    for f in tokenizer[0]:
      shutil.copy2(f, Path(out) / f.name)
  return cfg


def run_tokenizer(workdir: str | Path) -> tuple[list[Path], dict] | None:
  """(files, special ids) of the tokenizer a run trained with: the world's sentencepiece model, or the
  one a public-data run imported (W/data/tokenizer); None for a workdir with neither."""
  workdir = Path(workdir)
  world = workdir / "world" / "tokenizer.model"
  if world.is_file():
    from instructrl.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
    return [world], {"bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID}
  marker = workdir / "data" / "COMPLETE"
  if marker.is_file():
    tok = json.loads(marker.read_text())["tokenizer"]
    return sorted(p for p in (workdir / "data" / "tokenizer").iterdir() if p.is_file()), tok
  return None


def _exported_bias(out) -> dict:
  hf_cfg = json.loads((Path(out) / hf.CONFIG).read_text())
  return {hf.SCORE_BIAS_KEY: hf_cfg[hf.SCORE_BIAS_KEY]} if hf.SCORE_BIAS_KEY in hf_cfg else {}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m instructrl.tools.convert", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF save_pretrained directory -> instructrl stage checkpoint")
  imp.add_argument("--hf_dir", required=True)
  imp.add_argument("--workdir", required=True)
  imp.add_argument("--stage", default="pretrain", help="stage name to write (default: pretrain)")
  exp = sub.add_parser("export", help="instructrl stage checkpoint -> HF save_pretrained directory")
  exp.add_argument("--workdir", required=True)
  exp.add_argument("--stage", default="sft")
  exp.add_argument("--out", required=True)
  exp.add_argument("--bos_id", type=int, default=None)
  exp.add_argument("--eos_id", type=int, default=None)
  exp.add_argument("--pad_id", type=int, default=None,
                   help="RM stages: the pad id transformers skips to find each row's last token (required)")
  exp.add_argument("--entry", choices=ENTRIES, default=None,
                   help="which params of the stage: default 'ema' for ppo stages, else 'params'")
  exp.add_argument("--max_shard_bytes", type=int, default=5 << 30)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    if args.command == "import":
      cfg = import_hf(args.hf_dir, args.workdir, args.stage)
      print(json.dumps({"stage": str(Path(args.workdir) / args.stage), "model": cfg.to_dict()}))
    else:
      cfg = export_hf(args.workdir, args.stage, args.out, bos_id=args.bos_id, eos_id=args.eos_id,
                      pad_id=args.pad_id, entry=args.entry, max_shard_bytes=args.max_shard_bytes)
      print(json.dumps({"out": str(args.out), "model": cfg.to_dict(), **_exported_bias(args.out)}))
  except (hf.ConvertError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
