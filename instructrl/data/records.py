"""Typed JSONL records and their validation: errors name file, line, field and what was expected.

The schemas (one JSON object a line) are the project's own, shared by the task world and by
real data (DESIGN.md, "Record schemas"):
  text:   {"text": str}
  demo:   {"prompt": str, "response": str, ...}
  ranked: {"prompt": str, "responses": [str, ...], "ranking": [int, ...], ...}
  pair:   {"prompt": str, "chosen": str, "rejected": str}
  eval:   {"prompt": str, "family": str, ...}
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path
from typing import Any, Iterator

from instructrl.errors import UserError

SCHEMAS: dict[str, dict[str, type]] = {
    "text": {"text": str},
    "demo": {"prompt": str, "response": str},
    "ranked": {"prompt": str, "responses": list, "ranking": list},
    "pair": {"prompt": str, "chosen": str, "rejected": str},
    "eval": {"prompt": str, "family": str},
}
# Fields that must be non-empty strings (an empty prompt or demonstration teaches nothing).
NONEMPTY = {"text": ("text",), "demo": ("prompt", "response"), "pair": ("prompt", "chosen", "rejected"),
            "eval": ("prompt",), "ranked": ("prompt",)}


class RecordError(UserError, ValueError):
  """A bad record: the message starts with `file:line:`."""


def _open(path: Path):
  """Plain or compressed (.gz, .bz2, .xz) bytes, chosen by the suffix; json_lines decodes each line
  itself, so bad UTF-8 is reported with its line number."""
  opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix)
  return opener(path, "rb") if opener else open(path, "rb")


def _unpaired_surrogate(value: Any) -> int | None:
  """Index of a lone UTF-16 surrogate in a string (JSON's "\\ud800" decodes to one; no tokenizer takes it)."""
  for i, ch in enumerate(value if isinstance(value, str) else ""):
    if "\ud800" <= ch <= "\udfff":
      return i
  return None


def validate(record: Any, schema: str, where: str) -> dict:
  if schema not in SCHEMAS:
    raise ValueError(f"unknown schema {schema!r}; known: {sorted(SCHEMAS)}")
  if not isinstance(record, dict):
    raise RecordError(f"{where}: expected a JSON object for a {schema!r} record, got {type(record).__name__}")
  for field, typ in SCHEMAS[schema].items():
    if field not in record:
      raise RecordError(f"{where}: missing field {field!r} (a {schema!r} record needs {sorted(SCHEMAS[schema])})")
    if not isinstance(record[field], typ):
      raise RecordError(f"{where}: field {field!r} should be {typ.__name__}, got {type(record[field]).__name__}")
  for field in NONEMPTY[schema]:
    if not record[field].strip():
      raise RecordError(f"{where}: field {field!r} is empty")
  for field in SCHEMAS[schema]:
    values = record[field] if isinstance(record[field], list) else [record[field]]
    for j, v in enumerate(values):
      at = _unpaired_surrogate(v)
      if at is not None:
        name = f"{field}[{j}]" if isinstance(record[field], list) else field
        raise RecordError(f"{where}: field {name!r} has an unpaired UTF-16 surrogate {v[at]!r} at character {at} "
                          f"(not valid Unicode text)")
  return record


def json_lines(path: str | Path, what: str) -> Iterator[tuple[Any, str]]:
  """(parsed object, "file:line") for every non-blank line. A truncated line or bad JSON is an
  error naming file and line, never skipped."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file (expected {what}, JSONL)")
  with _open(path) as f:
    for lineno, raw in enumerate(f, 1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise RecordError(f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at byte {e.start + 1} of the line)") \
            from None
      if not line.strip():
        continue
      try:
        yield json.loads(line), where
      except json.JSONDecodeError as e:
        raise RecordError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_jsonl(path: str | Path, schema: str) -> Iterator[dict]:
  """Yield validated records of `schema`."""
  for record, where in json_lines(path, f"{schema!r} records"):
    yield validate(record, schema, where)


def load_jsonl(path: str | Path, schema: str) -> list[dict]:
  return list(read_jsonl(path, schema))


def write_jsonl(path: str | Path, records) -> None:
  """Write atomically (temp file + rename), so a killed run never leaves half a file behind."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")
  tmp.replace(path)
