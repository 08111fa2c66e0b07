r"""SFT or reward-model training on public data, from an imported Hugging Face checkpoint.

  python -m instructrl.tools.finetune --config=configs/alpaca_sft.py --workdir=runs/alpaca \
      --config.init.hf_dir=path/to/gpt2 --config.data.train=path/to/alpaca_data.json
  python -m instructrl.tools.finetune --config=configs/hh_rlhf.py --workdir=runs/hh \
      --config.init.hf_dir=path/to/gpt2 --config.data.train=path/to/harmless-base/train.jsonl.gz

The task world's stages (`instructrl.main`) train on generated data; this runs the same train
steps, loop, checkpoints and resume on files read by `data/readers.py`, tokenised by the
checkpoint's own tokenizer (tokenizer.json or a sentencepiece .model). The HF checkpoint is
imported once into `workdir/pretrain` (`instructrl.tools.convert`), and the model config is taken from
it, so --config.model is never typed by hand. `config.task` is "sft" (writes `workdir/sft`) or
"rm" (writes `workdir/rm`, from `config.rm.init_stage`: "pretrain" or a finished "sft").
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import jax
import ml_collections
import numpy as np
from instructrl import cli_flags
from absl import flags
from ml_collections import config_flags


def _define_flags():
  """Only when run as a program: importing this module (tests, instructrl.main) defines no flags."""
  config = cli_flags.define(config_flags.DEFINE_config_file, "config", None, "configs/alpaca_sft.py or configs/hh_rlhf.py",
                                           lock_config=False)
  workdir = cli_flags.define(flags.DEFINE_string, "workdir", None, "Run directory (created if missing).")
  flags.mark_flags_as_required(["config", "workdir"])
  return config, workdir


def split_valid(records: list, fraction: float, seed: int) -> tuple[list, list]:
  """A seeded shuffle, then the last `fraction` for validation (at least one record each side)."""
  if len(records) < 2:
    raise ValueError(f"{len(records)} records: need at least 2 to split off validation")
  order = np.random.default_rng(seed).permutation(len(records))
  n_valid = min(len(records) - 1, max(1, int(round(fraction * len(records)))))
  return [records[i] for i in order[:-n_valid]], [records[i] for i in order[-n_valid:]]


def load_data(config, kind: str):
  from instructrl.data import readers
  d = config.data
  read = lambda path: readers.read(path, d.schema, kind=kind, on_invalid=d.on_invalid)
  if not d.train:
    raise ValueError("config.data.train is empty: give the training file (--config.data.train=...)")
  train = read(d.train)
  if d.valid:
    return train, read(d.valid)
  return split_valid(train, d.valid_fraction, config.seed)


def _imported(config, workdir: Path) -> Path:
  """workdir/<init.stage>/model.json; an error (before anything is written) if it is missing and there is
  no init.hf_dir to import from."""
  from instructrl.tools import convert
  imported = workdir / config.init.stage / convert.MODEL_JSON
  if not imported.is_file() and not config.init.hf_dir:
    raise ValueError(f"{imported.parent}: no imported checkpoint; give --config.init.hf_dir=<save_pretrained dir>")
  return imported


def prepare(config, workdir: Path, kind: str):
  """(train, valid, tokenizer): the data files and the tokenizer are read and checked first, then the HF
  checkpoint is imported (once) and config.model filled from it. A bad data file thus stops the run
  before workdir/<init.stage> exists: a rerun with the file fixed starts clean."""
  from instructrl.tools import convert
  from instructrl.data import pretrained_tokenizer
  imported = _imported(config, workdir)
  train, valid = load_data(config, kind)
  tok_path = config.tokenizer.path or config.init.hf_dir
  if not tok_path:
    raise ValueError("config.tokenizer.path is empty (and no init.hf_dir to find a tokenizer.json in)")
  special = {k: v for k, v in (("bos_id", config.tokenizer.bos_id), ("eos_id", config.tokenizer.eos_id),
                               ("pad_id", config.tokenizer.pad_id)) if v >= 0}
  tokenizer = pretrained_tokenizer.load(tok_path, **special)
  if not imported.is_file():
    convert.import_hf(config.init.hf_dir, workdir, config.init.stage)
  with config.unlocked():
    config.model = ml_collections.ConfigDict(json.loads(imported.read_text()))
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"{tok_path}: tokenizer has {tokenizer.vocab_size} tokens, the model only "
                     f"{config.model.vocab_size}; they do not belong together")
  return train, valid, tokenizer


def run_sft(config, workdir: Path, mesh, rules):
  from instructrl import checkpoints
  from instructrl.data.batching import prompt_response_examples
  from instructrl.models.config import ModelConfig
  from instructrl.stages import lm
  train, valid, tokenizer = prepare(config, workdir, "demo")
  fmt = lambda recs: [config.prompt_template.format(prompt=r["prompt"]) for r in recs]
  ex = lambda recs, what: prompt_response_examples(tokenizer, fmt(recs), [r["response"] for r in recs],
                                                   config.sft.seq_len, what=what)
  train_ex, valid_ex = ex(train, "sft train"), ex(valid, "sft valid")
  logging.info("sft: %d train / %d valid demonstrations after the length filter", len(train_ex), len(valid_ex))
  model_cfg = ModelConfig.from_dict(config.model)

  def initial_params(shardings, abstract):
    return checkpoints.load_params(workdir / config.init.stage, abstract, model_cfg.to_dict())[0]

  return lm.run("sft", config, workdir, train_ex, valid_ex, initial_params, mesh, rules)


def run_rm(config, workdir: Path, mesh, rules):
  from instructrl import checkpoints
  from instructrl.data.batching import batch_indices
  from instructrl.data.rankings import ranked_examples
  from instructrl.models.config import ModelConfig
  from instructrl.stages import loop, reward
  from instructrl.stages.train_state import (abstract_state, device_batch, init_params, make_optimizer,
                                             state_shardings)
  cfg = config.rm
  train, valid, tokenizer = prepare(config, workdir, "ranked")
  fmt = lambda p: config.prompt_template.format(prompt=p) if config.rm.format_prompts else p
  k_max = max(len(r["responses"]) for r in train + valid)
  train_ex = ranked_examples(tokenizer, train, cfg.seq_len, k_max, fmt, what="rm train")
  valid_ex = ranked_examples(tokenizer, valid, cfg.seq_len, k_max, fmt, what="rm valid")
  stage_cfg = ml_collections.ConfigDict(cfg.to_dict())
  stage_cfg.steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(train_ex) / cfg.batch_size))
  logging.info("rm: %d train / %d valid rankings (K <= %d), %d steps", len(train_ex), len(valid_ex), k_max,
               stage_cfg.steps)
  model_cfg = ModelConfig.from_dict({**config.model, **cfg.get("model_overrides", {})})
  model_dict = ModelConfig.from_dict(config.model).to_dict()
  tx, schedule = make_optimizer(stage_cfg, stage_cfg.steps)
  shardings = state_shardings(model_cfg, tx, mesh, rules, head="scalar")
  stage = loop.Stage(name="rm", cfg=stage_cfg, workdir=workdir, model_dict=model_dict, world_id=None,
                     rng=jax.random.key(config.seed + 4), tx=tx, shardings=shardings,
                     abstract=abstract_state(model_cfg, tx, shardings, head="scalar"))

  def initial_params():
    rm = init_params(model_cfg, jax.random.key(config.seed + 5), shardings["params"], mesh, rules, head="scalar")
    lm_shardings = state_shardings(model_cfg, tx, mesh, rules)
    lm_abstract = abstract_state(model_cfg, tx, lm_shardings)["params"]
    trunk, _ = checkpoints.load_params(workdir / cfg.init_stage, lm_abstract, model_dict)
    return {k: trunk[k] if k in trunk else v for k, v in rm.items()}   # the unembedding is dropped

  train_step, eval_step, _ = reward.make_steps(model_cfg, "per_prompt", tx, schedule, shardings, mesh, rules,
                                               microbatches=int(cfg.get("microbatches", 1)))
  seed = config.seed + 6
  return loop.run(
      stage, mesh, rules, initial_params=initial_params, train_step=train_step,
      batch_at=lambda step: device_batch(train_ex.batch(batch_indices(len(train_ex), cfg.batch_size, step, seed)),
                                         mesh, rules),
      evaluate=lambda params: reward.evaluate(eval_step, params, valid_ex, min(cfg.eval_batch_size, len(valid_ex)),
                                              mesh, rules),
      items_per_step=cfg.batch_size, item_name="prompts", extra_meta={"seed": seed})


def run(config, workdir) -> None:
  from instructrl import parallel
  from instructrl.config_check import check_finetune_config
  check_finetune_config(config)   # before any file is written
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = parallel.make_mesh(tuple(config.mesh.shape))
  rules = parallel.rules_from_config(config.mesh.rules)
  out = (run_sft if config.task == "sft" else run_rm)(config, workdir, mesh, rules)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  return out


if __name__ == "__main__":
  _config, _workdir = _define_flags()

  def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    for h in logging.getLogger().handlers:   # Orbax logs every save at INFO: keep its warnings only
      h.addFilter(lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
    run(_config.value, _workdir.value)

  from instructrl import errors
  errors.run_app(main)   # a bad config value or data file: one `error:` line, exit 2
