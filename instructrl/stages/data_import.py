"""The `import` stage: a released checkpoint and public files become W/pretrain and W/data.

With `data.source="files"` this stage takes the world stage's place. It reads every file named by
`config.data` through `data/readers.py` (errors name file:line and the field), loads the checkpoint's
tokenizer and checks it against the checkpoint's config, and only then writes anything:

- W/data/: the splits, in the layout the stages read (stages/source.py), the tokenizer files, and
  last a COMPLETE marker (the data config, special ids, counts, file digests). Written under
  W/data.tmp and renamed, so a refused or killed import leaves no W/data behind.
- W/pretrain: the checkpoint, imported once (`tools/convert.import_hf`).

Splits (all seeded by `config.seed`, so a rerun writes the same files):
- the report's held-out prompts: `data.eval_prompts`, or `data.eval_fraction` of the prompt pool
  (`data.prompts`, or the rankings' prompts when that is empty); `data.dev_fraction` of the rest
  is the dev split. Their rankings are dropped: neither RM nor PPO trains on a held-out or dev prompt.
- rankings are split by conversation (a transcript's first Human turn: the turns of one OpenAssistant
  tree go together): `data.judge_fraction` of them train the judge RM (the proxy gold of
  stages/proxy_eval.py), the rest the policy's RM; each side keeps `data.valid_fraction` for validation.
  No conversation is on both sides, and the held-out and dev splits take whole conversations too.
- PPO prompts: the rest of `data.prompts`, or the policy RM's prompts when that is empty.
- demonstrations and ptx text: `data.valid_fraction` held out.

Bare prompts (instructions, the prompt lottery) are put in the model's format with
`data.prompt_template`; prompts that are already Human/Assistant transcripts (HH-RLHF, OpenAssistant
contexts, as the readers make them) are kept. Responses start with one space, as the readers'
transcript answers do, so every response follows "Assistant:" the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from instructrl.data import readers
from instructrl.data.rankings import HH_ASSISTANT
from instructrl.data.readers import HH_HUMAN
from instructrl.data.records import write_jsonl
from instructrl.errors import ConfigError, UserError

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Whose fields decide the files: a change to any of these is a different import.
MARKER_FIELDS = ("data", "seed")


class DataMismatch(UserError, ValueError):
  """W/data was imported under another data config."""


def paths(field: str, value: str) -> list[Path]:
  """A comma-separated list of files (config strings stay plain so --config.data.x=... works)."""
  out = [Path(p.strip()).expanduser() for p in str(value).split(",") if p.strip()]
  for p in out:
    if not p.exists():
      raise ConfigError(f"data.{field}={value!r}: {p} does not exist")
  return out


def read_all(field: str, value: str, kind: str, on_invalid: str) -> list[dict]:
  out = []
  for p in paths(field, value):
    with named_field(f"data.{field}"):
      out += readers.read(p, kind=kind, on_invalid=on_invalid)
  return out


@contextlib.contextmanager
def named_field(field: str):
  """The readers' and tokenizer loaders' plain ValueError / OSError (a .txt file of prompts, a folder that is no
  TFDS dataset, a tokenizer without the ids asked for) as a ConfigError naming the field: one `error:` line."""
  try:
    yield
  except UserError:
    raise
  except (ValueError, OSError) as e:
    raise ConfigError(f"{field}: {e}") from e


def is_transcript(prompt: str) -> bool:
  return prompt.startswith(HH_HUMAN) and prompt.rstrip().endswith(HH_ASSISTANT.strip())


def model_prompt(prompt: str, template: str) -> str:
  return prompt if is_transcript(prompt) else template.format(prompt=prompt)


def model_response(response: str) -> str:
  return " " + response.lstrip() if response.strip() else response


def split(items: list, fraction: float, rng: np.random.Generator) -> tuple[list, list]:
  """(kept, held out): a seeded shuffle, `fraction` held out (at least one each side when there are two)."""
  order = rng.permutation(len(items))
  n_out = int(round(fraction * len(items)))
  if len(items) >= 2:
    n_out = min(len(items) - 1, max(1, n_out))
  return [items[i] for i in order[n_out:]], [items[i] for i in order[:n_out]]


def conversation(prompt: str) -> str:
  """What the splits keep on one side: a transcript's first Human turn, so that the turns of one
  OpenAssistant tree, and HH-RLHF conversations that open alike, are not trained on one side of a split and
  held out (or judged) on the other; a prompt in another format is its own conversation."""
  return prompt.split(HH_ASSISTANT, 1)[0] if prompt.startswith(HH_HUMAN) else prompt


def split_conversations(items: list, fraction: float, rng, key=conversation) -> tuple[list, list]:
  """Like split, over distinct conversations (key(item)): the items of one land on one side."""
  keep, out = split(sorted({key(x) for x in items}), fraction, rng)
  out = set(out)
  return [x for x in items if key(x) not in out], [x for x in items if key(x) in out]


def split_by_prompt(records: list[dict], fraction: float, rng) -> tuple[list[dict], list[dict]]:
  """Ranking records split by conversation: records of one prompt, or of one conversation, land on one side."""
  return split_conversations(records, fraction, rng, key=lambda r: conversation(r["prompt"]))


# ----------------------------------------------------------------------------- tokenizer and model


def tokenizer_source(d) -> Path:
  path = Path(d.tokenizer or d.hf_dir).expanduser()
  if not str(d.tokenizer or d.hf_dir):
    raise ConfigError("data.tokenizer and data.hf_dir are empty: give the checkpoint directory (data.hf_dir)")
  return path


def special_ids(d) -> dict:
  return {k: int(d[k]) for k in ("bos_id", "eos_id", "pad_id") if int(d.get(k, -1)) >= 0}


def load_tokenizer(data_dir: Path):
  """The tokenizer the import copied into W/data, with the special ids it recorded."""
  from instructrl.data import pretrained_tokenizer
  m = json.loads((Path(data_dir) / "COMPLETE").read_text())
  tok = m["tokenizer"]
  return pretrained_tokenizer.load(Path(data_dir) / TOKENIZER_DIR / tok["file"],
                                   **{k: tok[k] for k in ("bos_id", "eos_id", "pad_id")})


def hf_model_config(hf_dir: Path):
  """The ModelConfig of a transformers checkpoint directory, from its config.json alone."""
  from instructrl.models import hf
  cfg_path = Path(hf_dir) / hf.CONFIG
  if not cfg_path.is_file():
    raise ConfigError(f"data.hf_dir={str(hf_dir)!r}: no {hf.CONFIG} there (expected a transformers "
                      f"save_pretrained directory)")
  return hf.config_from_hf(json.loads(cfg_path.read_text()), str(cfg_path)), json.loads(cfg_path.read_text())


def check_tokenizer(tokenizer, model_cfg, hf_config: dict, where: str) -> None:
  """A tokenizer that does not belong to the checkpoint: ids past its vocabulary, or another EOS."""
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the checkpoint's vocabulary "
                      f"{model_cfg.vocab_size}; expected a tokenizer of at most {model_cfg.vocab_size} "
                      f"(the checkpoint's own)")
  eos = hf_config.get("eos_token_id")
  eos = eos if isinstance(eos, int) else (eos[0] if isinstance(eos, list) and eos else None)
  if eos is not None and tokenizer.eos_id != eos:
    raise ConfigError(f"{where}: the tokenizer's EOS is id {tokenizer.eos_id}, the checkpoint's config.json "
                      f"says eos_token_id={eos}; expected the checkpoint's tokenizer (or set data.eos_id={eos})")


# ----------------------------------------------------------------------------- the stage


def wanted_marker(config) -> dict:
  return json.loads(json.dumps({"data": config.data.to_dict(), "seed": config.seed}))


def check_marker(config, out: Path) -> None:
  have = json.loads((out / "COMPLETE").read_text())
  wanted = wanted_marker(config)
  if {k: have.get(k) for k in MARKER_FIELDS} != wanted:
    diff = sorted(k for k in set(wanted["data"]) | set(have.get("data", {}))
                  if wanted["data"].get(k) != have.get("data", {}).get(k))
    diff = [f"data.{k}: imported {have.get('data', {}).get(k)!r}, config {wanted['data'].get(k)!r}" for k in diff]
    if have.get("seed") != config.seed:
      diff.append(f"seed: imported {have.get('seed')}, config {config.seed}")
    raise DataMismatch(f"{out} was imported under another data config ({'; '.join(diff)}); use a new --workdir "
                       f"or the original values")


def build(config) -> tuple[dict[str, list[dict]], object, Path, dict]:
  """Every split, the tokenizer and its file, and the model config, read and checked; nothing written."""
  d = config.data
  if not d.hf_dir:
    raise ConfigError("data.hf_dir is empty: give a transformers save_pretrained directory")
  model_cfg, hf_config = hf_model_config(Path(d.hf_dir).expanduser())
  for field in ("demos", "rankings"):
    if not d[field]:
      raise ConfigError(f"data.{field} is empty: give the file(s), comma-separated")
  demos = read_all("demos", d.demos, "demo", d.on_invalid)
  rankings = read_all("rankings", d.rankings, "ranked", d.on_invalid)
  prompts = read_all("prompts", d.prompts, "prompt", d.on_invalid) if d.prompts else None
  eval_prompts = read_all("eval_prompts", d.eval_prompts, "prompt", d.on_invalid) if d.eval_prompts else None
  ptx = read_all("ptx", d.ptx, "text", d.on_invalid) if d.ptx else []

  from instructrl.data import pretrained_tokenizer
  tok_path = tokenizer_source(d)
  with named_field("data.tokenizer" + "".join(f", data.{k}={v}" for k, v in special_ids(d).items())):
    tokenizer = pretrained_tokenizer.load(tok_path, **special_ids(d))
  check_tokenizer(tokenizer, model_cfg, hf_config, f"data.tokenizer={str(tok_path)!r}")

  t = d.prompt_template
  rng = np.random.default_rng(config.seed + 31)
  demos = [{"prompt": model_prompt(r["prompt"], t), "response": model_response(r["response"])} for r in demos]
  rankings = [{**r, "prompt": model_prompt(r["prompt"], t), "responses": [model_response(x) for x in r["responses"]]}
              for r in rankings]
  # Held-out prompts first (data.eval_prompts, or a share of the prompt pool), then the dev split: their
  # rankings are dropped, so neither RM, nor PPO, trains on a prompt the report or the tuning reads.
  from_rankings = prompts is None
  pool = sorted({r["prompt"] for r in rankings}) if from_rankings else \
      list({model_prompt(r["prompt"], t): None for r in prompts})
  if eval_prompts is not None:
    held = list({model_prompt(r["prompt"], t): None for r in eval_prompts})
    rest = pool
  else:
    rest, held = split_conversations(pool, d.eval_fraction, rng)
  rest, dev = split_conversations(rest, d.dev_fraction, rng)
  kept_out = {conversation(p) for p in held + dev}
  rankings = [r for r in rankings if conversation(r["prompt"]) not in kept_out]
  policy_rankings, judge_rankings = split_by_prompt(rankings, d.judge_fraction, rng)
  # PPO's prompts: the file's, or the policy RM's own training prompts.
  judged = {conversation(r["prompt"]) for r in judge_rankings} if from_rankings else set()
  ppo_pool = [p for p in rest if conversation(p) not in kept_out | judged]
  trained = {conversation(p) for p in [r["prompt"] for r in rankings] + ppo_pool}
  held = [p for p in held if conversation(p) not in trained]
  dev = [p for p in dev if conversation(p) not in trained | {conversation(p) for p in held}]
  if not held:
    raise ConfigError(f"data.eval_prompts={d.eval_prompts!r}: no held-out prompt is left once the prompts of "
                      f"the rankings and of PPO are removed; expected prompts that no stage trains on")
  if not ppo_pool:
    raise ConfigError(f"data.prompts={d.prompts!r}: no PPO prompt is left after the held-out and dev splits")
  files = {}
  files["demos_train"], files["demos_valid"] = split(demos, d.valid_fraction, rng)
  files["rankings_train"], files["rankings_valid"] = split_by_prompt(policy_rankings, d.valid_fraction, rng)
  files["rankings_judge_train"], files["rankings_judge_valid"] = split_by_prompt(judge_rankings, d.valid_fraction,
                                                                                 rng)
  family = "public"
  files["prompts_ppo"] = [{"prompt": p, "family": family} for p in ppo_pool]
  files["prompts_dev"] = [{"prompt": p, "family": family} for p in dev]
  files["prompts_eval"] = [{"prompt": p, "family": family} for p in held]
  if ptx:
    files["corpus_train"], files["corpus_valid"] = split(ptx, d.valid_fraction, rng)
  else:
    files["corpus_train"], files["corpus_valid"] = [], []
  for name in ("demos_train", "demos_valid", "rankings_train", "rankings_valid", "rankings_judge_train",
               "rankings_judge_valid"):
    if not files[name]:
      raise ConfigError(f"data: the {name} split is empty ({len(demos)} demos, {len(rankings)} rankings read); "
                        f"expected more records or other data.valid_fraction / data.judge_fraction")
  return files, tokenizer, tok_path, model_cfg


def copy_tokenizer(tok_path: Path, out: Path) -> str:
  """The tokenizer files into out/tokenizer; returns the file load_tokenizer opens."""
  dest = out / TOKENIZER_DIR
  dest.mkdir(parents=True)
  if tok_path.is_dir() and not (tok_path / "tokenizer.json").is_file() and (tok_path / "tokenizer.model").is_file():
    tok_path = tok_path / "tokenizer.model"
  if tok_path.suffix == ".model":
    shutil.copy2(tok_path, dest / tok_path.name)
    return tok_path.name
  src = tok_path if tok_path.is_dir() else tok_path.parent
  main = tok_path.name if tok_path.is_file() else "tokenizer.json"
  for name in {main, *TOKENIZER_FILES}:
    if (src / name).is_file():
      shutil.copy2(src / name, dest / name)
  return main


def _digests(out: Path) -> dict:
  return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(out.rglob("*")) if p.is_file() and p.name != "COMPLETE"}


def run(config, workdir: Path) -> Path:
  from instructrl import checkpoints
  from instructrl.tools import convert
  workdir = Path(workdir)
  out = workdir / "data"
  if (out / "COMPLETE").exists():
    check_marker(config, out)
    logging.info("import: data complete in %s", out)
  else:
    files, tokenizer, tok_path, model_cfg = build(config)   # every file read and checked: nothing written yet
    tmp = workdir / "data.tmp"
    if tmp.exists():
      shutil.rmtree(tmp)   # an interrupted import: start over
    tmp.mkdir(parents=True)
    for name, records in files.items():
      write_jsonl(tmp / f"{name}.jsonl", records)
    tok_file = copy_tokenizer(tok_path, tmp)
    counts = {name: len(records) for name, records in files.items()}
    marker = {**wanted_marker(config), "counts": counts, "model": model_cfg.to_dict(),
              "tokenizer": {"file": tok_file, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
              "files": _digests(tmp)}
    (tmp / "COMPLETE").write_text(json.dumps(marker, sort_keys=True, indent=1))
    tmp.rename(out)
    logging.info("import: %s into %s", ", ".join(f"{k} {v}" for k, v in counts.items()), out)
  meta = checkpoints.recorded_meta(workdir / "pretrain")
  if not (meta and meta.get("complete")):
    if (workdir / "pretrain").exists():
      shutil.rmtree(workdir / "pretrain")   # a killed import: the checkpoint is rewritten from the files
    convert.import_hf(Path(config.data.hf_dir).expanduser(), workdir, "pretrain")
  return out


def imported_model(config, workdir: Path) -> dict:
  """The model config a files run trains: what the import recorded, else the checkpoint's config.json."""
  path = Path(workdir) / "data" / "COMPLETE"
  m = json.loads(path.read_text()) if path.exists() else None
  if m and m.get("model"):
    return m["model"]
  return hf_model_config(Path(config.data.hf_dir).expanduser())[0].to_dict()


# The model fields a run chooses for itself (precision, memory, dropout); the checkpoint decides the rest.
RUN_FIELDS = ("dtype", "param_dtype", "remat", "remat_policy", "scan_layers", "attention", "embed_dropout",
              "attn_dropout", "resid_dropout")


def fill_model(config, workdir: Path) -> None:
  """config.model := the checkpoint's architecture, with the config's own RUN_FIELDS (before any check)."""
  import dataclasses

  import ml_collections

  from instructrl.models.config import ModelConfig
  arch = dataclasses.asdict(ModelConfig.from_dict(imported_model(config, workdir)))
  keep = {k: config.model[k] for k in RUN_FIELDS if k in config.model}
  with config.unlocked():
    config.model = ml_collections.ConfigDict({**arch, **keep})
