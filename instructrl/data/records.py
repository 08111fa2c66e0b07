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
import logging
import lzma
import zlib
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


# Compressed formats by their first bytes: a file is decompressed by what it holds, not by its name.
MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
OPENERS = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}
SUFFIXES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
# What a damaged or truncated stream raises while it is read (BadGzipFile and bz2's "Invalid data stream"
# are OSErrors).
_STREAM_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)


def compression(path: Path, warn: bool = True) -> str:
  """"gzip", "bzip2", "xz", "zstd" or "plain", from the file's first bytes.

  A file whose name says compressed but whose bytes do not is read as plain text, with a warning: the
  usual cause is a download that was decompressed on the way (HTTP Content-Encoding: gzip) and kept
  its .gz name, and its content is then exactly what the user meant to give. Damaged compressed data
  is still an error, reported while the file is read."""
  with open(path, "rb") as f:
    head = f.read(6)
  fmt = next((name for magic, name in MAGIC if head.startswith(magic)), "plain")
  named = SUFFIXES.get(Path(path).suffix)
  if named and fmt == "plain" and warn:
    logging.warning("%s: named %s but not %s-compressed (first bytes %r): read as plain text", path,
                    Path(path).suffix, named, head)
  return fmt


def text_suffix(path: Path) -> str:
  """The suffix that names the content: "data.jsonl.gz" -> ".jsonl"."""
  path = Path(path)
  return path.with_suffix("").suffix if path.suffix in SUFFIXES else path.suffix


def byte_lines(path: str | Path, warn: bool = True) -> Iterator[bytes]:
  """The file's lines as bytes, decompressed by content (compression()). A truncated or damaged stream
  is a RecordError naming the file and the first line not read whole (the last good line + 1)."""
  path = Path(path)
  fmt = compression(path, warn)
  if fmt == "zstd":
    raise RecordError(f"{path}:1: zstd-compressed data, which the readers do not decompress (Python's "
                      f"standard library has no zstd): decompress it first (zstd -d) or recompress it with gzip")
  if fmt == "plain":
    with open(path, "rb") as f:
      yield from f
    return
  n = 0
  try:
    with OPENERS[fmt](path, "rb") as f:
      for n, line in enumerate(f, 1):
        yield line
  except _STREAM_ERRORS as e:
    what = "ends early (truncated file)" if isinstance(e, EOFError) else f"is damaged ({type(e).__name__}: {e})"
    raise RecordError(f"{path}:{n + 1}: the {fmt} stream {what}; {n} whole line(s) read before it") from None


def read_text(path: str | Path) -> str:
  """A whole (possibly compressed) UTF-8 file; bad UTF-8 is a RecordError naming the line."""
  data = b"".join(byte_lines(path))
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise RecordError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def first_char(path: str | Path) -> bytes:
  """The first non-whitespace byte after decompression (b"" for an empty file): b"[" marks a JSON array."""
  for line in byte_lines(path, warn=False):   # the reading that follows warns
    if line.strip():
      return line.lstrip()[:1]
  return b""


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
  for lineno, raw in enumerate(byte_lines(path), 1):
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
