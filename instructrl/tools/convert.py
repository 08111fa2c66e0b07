"""Convert between Hugging Face checkpoints and instructrl stage checkpoints.

  # a GPT-2 / LLaMA save_pretrained directory -> workdir/pretrain, a completed stage that the
  # sft / rm stages start from (their --config.model must equal the printed model config)
  python -m instructrl.tools.convert import --hf_dir=path/to/gpt2 --workdir=runs/hh --stage=pretrain
  # a finished instructrl stage (LM head: pretrain, sft) -> a directory transformers loads
  python -m instructrl.tools.convert export --workdir=runs/hh --stage=sft --out=exported/sft

The same from Python: `import_hf(hf_dir, workdir, stage)` and `export_hf(workdir, stage, out)`;
`instructrl.models.hf.load / save` work on params directly. Neither needs torch or transformers.
"""

from __future__ import annotations

import argparse
import json
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


def load_stage_params(workdir: str | Path, stage: str, mesh=None, rules=None):
  """(params, ModelConfig) of a completed LM-head stage, with the model config its checkpoint records."""
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
  boxed = abstract_params(cfg)
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)
  params, _ = checkpoints.load_params(directory, abstract, cfg.to_dict())
  return params, cfg


def export_hf(workdir: str | Path, stage: str, out: str | Path, *, bos_id: int | None = None,
              eos_id: int | None = None, max_shard_bytes: int = 5 << 30) -> ModelConfig:
  """Write a completed LM-head stage (pretrain, sft, an imported stage) as a save_pretrained directory."""
  if stage in ("rm", "ppo"):
    raise ValueError(f"stage {stage!r}: only LM-head stages (pretrain, sft, imported) export to a *ForCausalLM "
                     f"checkpoint; the RM has a scalar head and ppo keeps several models")
  params, cfg = load_stage_params(workdir, stage)
  hf.save(out, params, cfg, bos_id=bos_id, eos_id=eos_id, max_shard_bytes=max_shard_bytes)
  logging.info("exported %s/%s to %s", workdir, stage, out)
  return cfg


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
  exp.add_argument("--max_shard_bytes", type=int, default=5 << 30)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    if args.command == "import":
      cfg = import_hf(args.hf_dir, args.workdir, args.stage)
      print(json.dumps({"stage": str(Path(args.workdir) / args.stage), "model": cfg.to_dict()}))
    else:
      cfg = export_hf(args.workdir, args.stage, args.out, bos_id=args.bos_id, eos_id=args.eos_id,
                      max_shard_bytes=args.max_shard_bytes)
      print(json.dumps({"out": str(args.out), "model": cfg.to_dict()}))
  except (hf.ConvertError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
