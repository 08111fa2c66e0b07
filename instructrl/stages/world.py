"""The `world` stage: generate the task world's JSONL files and train the tokenizer on them.

Writes workdir/world/ and, last, a `COMPLETE` marker holding the world config; a rerun with the
same config skips, a rerun with a different one is refused (delete the folder or use another
workdir), and an interrupted one starts over (generation takes seconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from instructrl.data import tokenizer as tokenizer_lib
from instructrl.data import world as world_lib
from instructrl.data.records import read_jsonl
from instructrl.errors import UserError

TOKENIZER_FILE = "tokenizer.model"


class WorldMismatch(UserError, ValueError):
  """workdir/world was generated under another config, or its files changed since."""


def check_marker(config, out: Path) -> None:
  """Refuse a finished world generated under another world/tokenizer config (reads the marker only)."""
  wanted = json.loads(json.dumps({"world": config.world.to_dict(), "tokenizer": config.tokenizer.to_dict()}))
  have = json.loads((out / "COMPLETE").read_text())
  if {k: have.get(k) for k in wanted} != wanted:
    diff = [f"{part}.{k}: world has {have.get(part, {}).get(k)!r}, config has {wanted[part].get(k)!r}"
            for part in wanted for k in sorted(set(wanted[part]) | set(have.get(part, {})))
            if wanted[part].get(k) != have.get(part, {}).get(k)]
    raise WorldMismatch(f"{out} was generated with a different world/tokenizer config ({'; '.join(diff)}); "
                        f"use a new --workdir, or the original values, or delete {out}")


def run(config, workdir: Path) -> Path:
  out = Path(workdir) / "world"
  marker = out / "COMPLETE"
  wanted = {"world": config.world.to_dict(), "tokenizer": config.tokenizer.to_dict()}
  if marker.exists():
    check_marker(config, out)
    verify(out)
    logging.info("world: complete in %s, skipping", out)
    return out
  if out.exists():
    shutil.rmtree(out)   # an interrupted generation: start over
  t0 = time.perf_counter()
  world_lib.generate(config.world, out)
  # The tokenizer learns the internet only, as GPT's BPE learned its pretraining data: the labelers'
  # demonstrations are tuned (world.demo_*) without changing the tokenizer, hence the pretrained model.
  # The labelers' fixed phrases ("Sure! ...") are added so their characters have pieces (no UNK).
  texts = [r["text"] for r in read_jsonl(out / "corpus_train.jsonl", "text")] + list(world_lib.PHRASES)
  tokenizer_lib.train(texts, config.tokenizer.vocab_size, out / TOKENIZER_FILE, config.tokenizer.byte_fallback)
  tmp = marker.with_suffix(".tmp")
  tmp.write_text(json.dumps({**wanted, "files": _digests(out)}, sort_keys=True, indent=1))
  tmp.replace(marker)
  logging.info("world: generated in %.1fs into %s", time.perf_counter() - t0, out)
  return out


def _digests(out: Path) -> dict[str, list]:
  """{file: [size, sha256]} of the generated world, recorded in the marker."""
  return {str(p.relative_to(out)): [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
          for p in sorted(out.rglob("*")) if p.is_file() and not p.name.startswith("COMPLETE")}


def verify(out: Path) -> None:
  """Refuse a world whose files changed after generation (a truncated JSONL cut at a line end parses fine)."""
  files = json.loads((out / "COMPLETE").read_text()).get("files")   # absent in worlds made before the check
  have = _digests(out) if files else {}
  for name, (size, digest) in (files or {}).items():
    if have.get(name) != [size, digest]:
      now = f"{have[name][0]} bytes" if name in have else "missing"
      raise WorldMismatch(f"{out / name}: changed since the world was generated ({now}; it had {size} bytes and "
                       f"sha256 {digest[:12]}...): truncated or edited; delete {out} and rerun the world stage "
                       f"(it regenerates the same files from the config)")


def world_fingerprint(workdir: Path) -> str | None:
  """Short hash of the generated world's marker and tokenizer: what every later stage was trained on.
  The world's files are checked against the marker first. A public-data run: its W/data marker (which
  holds the digests of every file and of the tokenizer)."""
  out = Path(workdir) / "world"
  if not (out / "COMPLETE").exists():
    data = Path(workdir) / "data" / "COMPLETE"   # a public-data run (stages/data_import.py): its marker
    return hashlib.sha256(data.read_bytes()).hexdigest()[:16] if data.exists() else None
  verify(out)
  h = hashlib.sha256((out / "COMPLETE").read_bytes() + (out / TOKENIZER_FILE).read_bytes())
  return h.hexdigest()[:16]


def load_tokenizer(workdir: Path) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.Tokenizer(Path(workdir) / "world" / TOKENIZER_FILE)
