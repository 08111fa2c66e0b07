"""Readers for public instruction-tuning and preference datasets, with typed validation.

Every source schema becomes one of the project's record kinds (records.py):
  text    {"text"}                       plain .txt files, {"text": ...} JSONL
  demo    {"prompt", "response"}         alpaca (instruction/input/output), dolly (instruction/context/
                                         response), self-instruct (instruction/instances), plain prompt/response
  prompt  {"prompt"}                     bare JSON strings (OpenAssistant prompt lottery), {"prompt": ...}
  ranked  {"prompt", "responses", "ranking"}   pair (prompt/chosen/rejected), HH-RLHF transcripts,
                                         ranked, OpenAssistant message trees (K-way sibling ranks)
  eval    {"prompt", "family", ...}      TruthfulQA (Question/Best Answer/...)
Files: JSONL, one JSON array (alpaca_data.json's form; told from JSONL by its first byte '['), .txt;
each plain or gzip/bzip2/xz-compressed, detected from the content, not the name (records.byte_lines).
A directory is a TFDS-prepared dataset, read by `instructrl.data.tfds_io`.

Errors are RecordErrors starting "file:line:" and naming the field and what was expected. A file
holds one schema (detected from its first record unless given); a record of another shape later
in the file is an error, not silently converted. `on_invalid="skip"` drops bad records instead and
logs each one's file:line (the public AlpacaEval file has two empty outputs, for instance).

Prompt text: alpaca/dolly/self-instruct prompts are the instruction, then a blank line and the
input/context when there is one (the Alpaca template's content without its wording). HH-RLHF
and OpenAssistant keep the "\\n\\nHuman: ...\\n\\nAssistant:" transcript, responses start after it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

from instructrl.data.rankings import HH_ASSISTANT, hh_to_ranked, pair_to_ranked, validate_ranked
from instructrl.data.records import RecordError, first_char, json_lines, read_text, text_suffix, validate

HH_HUMAN = "\n\nHuman:"


# ----------------------------------------------------------------------------- field checks

def _need(record: Any, field: str, typ: type, where: str, schema: str, *, nonempty: bool = False,
          optional: bool = False):
  if not isinstance(record, dict):
    raise RecordError(f"{where}: expected a JSON object for a {schema!r} record, got {type(record).__name__}")
  if field not in record or record[field] is None:
    if optional:
      return None
    raise RecordError(f"{where}: missing field {field!r} (schema {schema!r}: {SCHEMAS[schema].doc})")
  v = record[field]
  if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
    raise RecordError(f"{where}: field {field!r} should be {typ.__name__}, got {type(v).__name__} "
                      f"(schema {schema!r})")
  if nonempty and isinstance(v, str) and not v.strip():
    raise RecordError(f"{where}: field {field!r} is empty (schema {schema!r})")
  return v


def _join(instruction: str, extra: str | None) -> str:
  return instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"


# ----------------------------------------------------------------------------- converters

def _alpaca(r, where):
  instr = _need(r, "instruction", str, where, "alpaca", nonempty=True)
  inp = _need(r, "input", str, where, "alpaca", optional=True)
  out = _need(r, "output", str, where, "alpaca", nonempty=True)
  return [{"prompt": _join(instr, inp), "response": out}]


def _dolly(r, where):
  instr = _need(r, "instruction", str, where, "dolly", nonempty=True)
  ctx = _need(r, "context", str, where, "dolly", optional=True)
  out = _need(r, "response", str, where, "dolly", nonempty=True)
  cat = _need(r, "category", str, where, "dolly", optional=True)
  return [{"prompt": _join(instr, ctx), "response": out, **({"category": cat} if cat else {})}]


def _self_instruct(r, where):
  instr = _need(r, "instruction", str, where, "self_instruct", nonempty=True)
  instances = _need(r, "instances", list, where, "self_instruct")
  if not instances:
    raise RecordError(f"{where}: field 'instances' is empty (schema 'self_instruct' needs >= 1 instance)")
  out = []
  for i, inst in enumerate(instances):
    w = f"{where}: instances[{i}]"
    inp = _need(inst, "input", str, w, "self_instruct", optional=True)
    out.append({"prompt": _join(instr, inp), "response": _need(inst, "output", str, w, "self_instruct",
                                                                 nonempty=True)})
  return out


def _demo(r, where):
  return [{k: v for k, v in validate(r, "demo", where).items()}]


def _text(r, where):
  return [validate(r, "text", where)]


def _prompt(r, where):
  if isinstance(r, str):
    if not r.strip():
      raise RecordError(f"{where}: the prompt string is empty")
    return [{"prompt": r}]
  return [{"prompt": _need(r, "prompt", str, where, "prompt", nonempty=True)}]


def _truthfulqa(r, where):
  q = _need(r, "Question", str, where, "truthfulqa", nonempty=True)
  best = _need(r, "Best Answer", str, where, "truthfulqa", nonempty=True)
  split = lambda s: [a.strip() for a in s.split(";") if a.strip()]
  correct = split(_need(r, "Correct Answers", str, where, "truthfulqa", nonempty=True))
  incorrect = split(_need(r, "Incorrect Answers", str, where, "truthfulqa", nonempty=True))
  return [validate({"prompt": q, "family": _need(r, "Category", str, where, "truthfulqa", nonempty=True),
                    "type": r.get("Type", ""), "best_answer": best, "correct_answers": correct,
                    "incorrect_answers": incorrect}, "eval", where)]


def _oasst(r, where):
  """One ranked record per prompter message with >= 2 ranked assistant replies; the context is the
  path from the root as a Human/Assistant transcript. Replies with no rank (null or absent) and
  deleted ones are left out: they were never ranked against their siblings."""
  root = _need(r, "prompt", dict, where, "oasst")
  out = []

  def walk(msg, context, path):
    text = _need(msg, "text", str, f"{where}: {path}", "oasst")
    role = _need(msg, "role", str, f"{where}: {path}", "oasst")
    if role not in ("prompter", "assistant"):
      raise RecordError(f"{where}: {path}: field 'role' is {role!r}, expected 'prompter' or 'assistant'")
    turn = (HH_HUMAN if role == "prompter" else HH_ASSISTANT) + " " + text
    replies = _need(msg, "replies", list, f"{where}: {path}", "oasst", optional=True) or []
    for i, m in enumerate(replies):   # children checked before any is used as a ranked response
      _need(m, "text", str, f"{where}: {path}.replies[{i}]", "oasst")
    if role == "prompter":
      ranked = [m for m in replies if isinstance(m, dict) and isinstance(m.get("rank"), int)
                and not m.get("deleted") and m.get("role") == "assistant"]
      if len(ranked) >= 2:
        ranked.sort(key=lambda m: m["rank"])
        out.append(validate_ranked({"prompt": context + turn + HH_ASSISTANT,
                                    "responses": [" " + m["text"] for m in ranked],
                                    "ranking": list(range(len(ranked))),
                                    "message_id": msg.get("message_id", "")}, f"{where}: {path}"))
    for i, m in enumerate(replies):
      walk(m, context + turn, f"{path}.replies[{i}]")

  walk(root, "", "prompt")
  return out


def _oasst_prompts(r, where):
  """Every prompter turn of an OpenAssistant tree as a prompt (PPO's prompts: answered or not, ranked or
  not), its context the path from the root as a Human/Assistant transcript, as `_oasst` builds it."""
  out = []

  def walk(msg, context, path):
    text = _need(msg, "text", str, f"{where}: {path}", "oasst")
    role = _need(msg, "role", str, f"{where}: {path}", "oasst")
    turn = (HH_HUMAN if role == "prompter" else HH_ASSISTANT) + " " + text
    if role == "prompter" and not msg.get("deleted") and text.strip():
      out.append({"prompt": context + turn + HH_ASSISTANT})
    for i, m in enumerate(_need(msg, "replies", list, f"{where}: {path}", "oasst", optional=True) or []):
      walk(m, context + turn, f"{path}.replies[{i}]")

  walk(_need(r, "prompt", dict, where, "oasst"), "", "prompt")
  return out


# Schemas read as another kind: an OpenAssistant tree read for prompts gives its prompter turns.
VIEWS = {("oasst", "prompt"): _oasst_prompts}


class Schema:
  def __init__(self, kind: str, convert: Callable[[Any, str], list[dict]], doc: str,
               detect: Callable[[Any], bool]):
    self.kind, self.convert, self.doc, self.detect = kind, convert, doc, detect


def _keys(*need):
  return lambda r: isinstance(r, dict) and all(k in r for k in need)


# Detection order matters: the most specific shapes first.
SCHEMAS: dict[str, Schema] = {
    "oasst": Schema("ranked", _oasst, "{message_tree_id, prompt: message tree with ranked replies}",
                    lambda r: isinstance(r, dict) and isinstance(r.get("prompt"), dict) and "message_tree_id" in r),
    "ranked": Schema("ranked", lambda r, w: [validate_ranked(r, w)], "{prompt, responses: [str], ranking: [int]}",
                     _keys("responses", "ranking")),
    "pair": Schema("ranked", lambda r, w: [pair_to_ranked(r, w)], "{prompt, chosen, rejected}",
                   _keys("prompt", "chosen", "rejected")),
    "hh": Schema("ranked", lambda r, w: [hh_to_ranked(r, w)],
                 "{chosen, rejected}: two '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts", _keys("chosen", "rejected")),
    "self_instruct": Schema("demo", _self_instruct, "{instruction, instances: [{input, output}]}",
                            _keys("instruction", "instances")),
    "dolly": Schema("demo", _dolly, "{instruction, context?, response}", _keys("instruction", "response")),
    "alpaca": Schema("demo", _alpaca, "{instruction, input?, output}", _keys("instruction", "output")),
    "demo": Schema("demo", _demo, "{prompt, response}", _keys("prompt", "response")),
    "truthfulqa": Schema("eval", _truthfulqa, "{Question, Best Answer, Correct Answers, Incorrect Answers, Category}",
                         _keys("Question", "Best Answer")),
    "text": Schema("text", _text, "{text}", _keys("text")),
    "prompt": Schema("prompt", _prompt, "a bare JSON string, or {prompt}",
                     lambda r: isinstance(r, str) or (isinstance(r, dict) and set(r) == {"prompt"})),
}
KINDS = ("text", "demo", "prompt", "ranked", "eval")


def detect_schema(record: Any, where: str) -> str:
  for name, s in SCHEMAS.items():
    if s.detect(record):
      return name
  got = sorted(record) if isinstance(record, dict) else type(record).__name__
  raise RecordError(f"{where}: unknown schema: got {'fields ' if isinstance(record, dict) else ''}{got}; known: "
                    + "; ".join(f"{n} {s.doc}" for n, s in SCHEMAS.items()))


# ----------------------------------------------------------------------------- files

def json_array_items(path: str | Path) -> Iterator[tuple[Any, str]]:
  """(item, "file:line") for each element of a file holding one JSON array (alpaca_data.json's form)."""
  path = Path(path)
  text = read_text(path)
  dec = json.JSONDecoder()
  line_at = lambda pos: text.count("\n", 0, pos) + 1
  i = len(text) - len(text.lstrip())
  if not text[i:i + 1] == "[":
    raise RecordError(f"{path}:{line_at(i)}: expected a JSON array ('['), got {text[i:i + 1]!r}")
  i += 1
  while True:
    while i < len(text) and text[i] in " \t\r\n":
      i += 1
    if text[i:i + 1] == "]":
      rest = text[i + 1:].strip()
      if rest:   # e.g. a JSONL file whose first record is a list: never drop the lines after it silently
        at = line_at(i + 1 + text[i + 1:].index(rest[0]))
        raise RecordError(f"{path}:{at}: text after the JSON array's closing ']' (a file holds one JSON array, "
                          f"or one JSON value a line)")
      return
    try:
      item, end = dec.raw_decode(text, i)
    except json.JSONDecodeError as e:
      raise RecordError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    yield item, f"{path}:{line_at(i)}"
    i = end
    while i < len(text) and text[i] in " \t\r\n":
      i += 1
    if text[i:i + 1] == ",":
      i += 1
    elif text[i:i + 1] != "]":
      raise RecordError(f"{path}:{line_at(i)}: expected ',' or ']' after an array element")


def raw_records(path: str | Path) -> Iterator[tuple[Any, str]]:
  """A file holding one JSON array (its first non-space byte after decompression is '['), else JSONL:
  told apart by content, whatever the name (.json files are often JSONL, .json.gz ones arrays)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file (expected JSONL records or a JSON array of records)")
  if first_char(path) == b"[":
    return json_array_items(path)
  return json_lines(path, "records")


def read_text_file(path: str | Path, split: str = "paragraph") -> list[dict]:
  """A plain UTF-8 text file as text records: one per blank-line-separated paragraph, per line, or whole."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file (expected plain UTF-8 text)")
  text = read_text(path)
  parts = {"paragraph": text.split("\n\n"), "line": text.split("\n"), "file": [text]}.get(split)
  if parts is None:
    raise ValueError(f"split={split!r}: expected 'paragraph', 'line' or 'file'")
  out = [{"text": p.strip("\n")} for p in parts if p.strip()]
  if not out:
    raise RecordError(f"{path}:1: the file has no text")
  return out


def read(path: str | Path, schema: str = "auto", *, kind: str | None = None, on_invalid: str = "raise",
         text_split: str = "paragraph", tfds_split: str = "train") -> list[dict]:
  """Records of one file (or prepared TFDS directory) converted to the project's kinds; `kind`
  checks what the caller expects."""
  path = Path(path)
  if on_invalid not in ("raise", "skip"):
    raise ValueError(f"on_invalid={on_invalid!r}: expected 'raise' or 'skip'")
  if schema not in ("auto", "txt", *SCHEMAS):
    raise ValueError(f"unknown schema {schema!r}; known: {['auto', 'txt', *SCHEMAS]}")
  if kind is not None and schema in SCHEMAS and SCHEMAS[schema].kind != kind and (schema, kind) not in VIEWS:
    raise ValueError(f"schema {schema!r} gives {SCHEMAS[schema].kind} records, not {kind}")
  if path.is_dir():   # a prepared TFDS dataset (tfds_io.write): records of one kind already
    from instructrl.data import tfds_io
    recs = tfds_io.Records(path, tfds_split)
    if kind not in (None, recs.kind):
      raise ValueError(f"{path}: a TFDS dataset of {recs.kind} records, expected {kind} records")
    return [recs[i] for i in range(len(recs))]
  if schema == "txt" or (schema == "auto" and text_suffix(path) == ".txt"):
    if kind not in (None, "text"):
      raise ValueError(f"{path}: a plain text file holds text records, not {kind!r}")
    return read_text_file(path, text_split)
  out, skipped = [], []
  for record, where in raw_records(path):
    try:
      if schema == "auto":
        schema = detect_schema(record, where)
        if kind is not None and SCHEMAS[schema].kind != kind and (schema, kind) not in VIEWS:
          raise RecordError(f"{where}: this file holds {schema!r} records ({SCHEMAS[schema].kind}), "
                            f"expected {kind} records")
      out.extend((VIEWS.get((schema, kind)) or SCHEMAS[schema].convert)(record, where))
    except RecordError as e:
      if on_invalid == "raise" or schema == "auto":
        raise
      skipped.append(str(e))
  if skipped:
    logging.warning("%s: skipped %d invalid record(s): %s", path, len(skipped), "; ".join(skipped[:5]))
  if not out:
    raise RecordError(f"{path}: no records")
  return out


def read_demos(path, schema: str = "auto", **kw) -> list[dict]:
  return read(path, schema, kind="demo", **kw)


def read_rankings(path, schema: str = "auto", **kw) -> list[dict]:
  return read(path, schema, kind="ranked", **kw)


def read_prompts(path, schema: str = "auto", **kw) -> list[dict]:
  return read(path, schema, kind="prompt", **kw)


def read_texts(path, schema: str = "auto", **kw) -> list[dict]:
  return read(path, schema, kind="text", **kw)


def read_eval(path, schema: str = "auto", **kw) -> list[dict]:
  return read(path, schema, kind="eval", **kw)
