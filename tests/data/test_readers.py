"""Readers on the public-data excerpts and hand-written fixtures (always run), and bad inputs:
every error names file, line and field."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pytest

from instructrl.data import readers
from instructrl.data.records import RecordError

FIX = Path(__file__).resolve().parents[1] / "fixtures"
PUB, HAND = FIX / "public", FIX / "handwritten"


def test_public_excerpts_read_with_expected_counts():
  # HH: 8 pairs, each split into the shared transcript prompt and two answers.
  hh = readers.read_rankings(PUB / "hh_harmless_base_test_first8.jsonl.gz")
  raw = [json.loads(l) for l in gzip.open(PUB / "hh_harmless_base_test_first8.jsonl.gz", "rt")]
  assert len(hh) == len(raw) == 8
  for r, x in zip(hh, raw):
    assert r["prompt"].endswith("\n\nAssistant:") and r["prompt"].startswith("\n\nHuman:")
    assert r["prompt"] + r["responses"][0] == x["chosen"] and r["prompt"] + r["responses"][1] == x["rejected"]
    assert r["ranking"] == [0, 1]
  # OpenAssistant: these 5 trees hold 6 prompter messages with >= 2 ranked replies.
  oa = readers.read_rankings(PUB / "oasst_en_5_trees.jsonl")
  assert len(oa) == 6 and all(len(r["responses"]) >= 2 for r in oa)
  first = json.loads((PUB / "oasst_en_5_trees.jsonl").read_text().splitlines()[0])["prompt"]
  by_rank = sorted((m for m in first["replies"] if isinstance(m.get("rank"), int)), key=lambda m: m["rank"])
  assert oa[0]["prompt"] == "\n\nHuman: " + first["text"] + "\n\nAssistant:"
  assert oa[0]["responses"] == [" " + m["text"] for m in by_rank] and oa[0]["ranking"] == list(range(len(by_rank)))
  assert len(readers.read_prompts(PUB / "oasst_prompt_lottery_first10.jsonl")) == 10
  seed = readers.read_demos(PUB / "self_instruct_seed_tasks_first10.jsonl")
  assert len(seed) == 10 and seed[0]["prompt"].startswith("Is there anything I can eat")
  assert len(readers.read_demos(PUB / "self_instruct_user_oriented_first5.jsonl")) == 5
  tqa = readers.read_eval(PUB / "truthfulqa_first10.jsonl")
  assert len(tqa) == 10 and tqa[0]["family"] == "Misconceptions" and len(tqa[0]["correct_answers"]) == 5
  text = readers.read_texts(PUB / "tinyshakespeare_head.txt")
  assert len(text) == 27 and text[0]["text"].startswith("First Citizen:")
  # 26 blank lines separate 27 speeches; 93 non-blank lines (`grep -c .`).
  assert len(readers.read_texts(PUB / "tinyshakespeare_head.txt", text_split="line")) == 93


def test_handwritten_formats():
  alpaca = readers.read_demos(HAND / "alpaca_format.json")   # a JSON array, as alpaca_data.json is
  assert [r["prompt"] for r in alpaca] == [
      "Give three tips for keeping a sourdough starter healthy.",
      "Translate the sentence into French.\n\nThe library opens at nine.",
      "Sort these numbers from smallest to largest.\n\n7, 2, 9, 4",
      "Name the largest planet in the solar system."]   # input "" or absent: the instruction alone
  assert alpaca[1]["response"] == "La bibliothèque ouvre à neuf heures."
  dolly = readers.read_demos(HAND / "dolly_format.jsonl")
  assert len(dolly) == 3 and dolly[0]["prompt"].endswith("Herman Melville.") and dolly[0]["category"] == "closed_qa"
  assert len(readers.read_demos(HAND / "prompt_response.jsonl")) == 2
  ranked = readers.read_rankings(HAND / "ranked_k3.jsonl")
  assert [r["ranking"] for r in ranked] == [[0, 1, 2], [1, 2, 0]]
  pairs = readers.read_rankings(HAND / "pairs.jsonl")
  assert pairs[0]["responses"] == ["Hello, nice to meet you.", "What do you want?"]


@pytest.mark.parametrize("opener,suffix", [(gzip.open, ".gz"), (bz2.open, ".bz2"), (lzma.open, ".xz")])
def test_compressed_jsonl(tmp_path, opener, suffix):
  src = (HAND / "dolly_format.jsonl").read_text()
  path = tmp_path / f"dolly.jsonl{suffix}"
  with opener(path, "wt", encoding="utf-8") as f:
    f.write(src)
  assert readers.read_demos(path) == readers.read_demos(HAND / "dolly_format.jsonl")


# ----------------------------------------------------------------------------- bad input

def write(tmp_path, lines, name="bad.jsonl"):
  p = tmp_path / name
  p.write_text("".join(l if isinstance(l, str) else json.dumps(l) for l in lines), encoding="utf-8")
  return p


GOOD_ALPACA = {"instruction": "Add.", "input": "1 2", "output": "3"}


@pytest.mark.parametrize("line3,message", [
    ('{"instruction": "Add.", "output": "3"\n', r"bad\.jsonl:3: invalid JSON"),
    ({"instruction": "Add.", "input": "1 2"}, r"bad\.jsonl:3: missing field 'output'"),
    ({"instruction": "Add.", "input": 12, "output": "3"}, r"bad\.jsonl:3: field 'input' should be str, got int"),
    ({"instruction": "   ", "output": "3"}, r"bad\.jsonl:3: field 'instruction' is empty"),
    ({"instruction": "Add.", "output": ""}, r"bad\.jsonl:3: field 'output' is empty"),
    ([1, 2], r"bad\.jsonl:3: expected a JSON object for a 'alpaca' record, got list"),
])
def test_bad_record_names_file_line_field(tmp_path, line3, message):
  lines = [json.dumps(GOOD_ALPACA) + "\n", "\n", line3 if isinstance(line3, str) else json.dumps(line3) + "\n",
           json.dumps(GOOD_ALPACA) + "\n"]
  p = write(tmp_path, lines)
  with pytest.raises(RecordError, match=message):
    readers.read_demos(p)
  if "invalid JSON" not in message:   # a bad record can be skipped; bad JSON never is
    assert len(readers.read_demos(p, on_invalid="skip")) == 2


def test_unknown_schema_and_wrong_kind(tmp_path):
  p = write(tmp_path, [json.dumps({"question": "q", "answer": "a"}) + "\n"])
  with pytest.raises(RecordError, match=r"bad\.jsonl:1: unknown schema: got fields \['answer', 'question'\]; "
                                         r"known: oasst"):
    readers.read(p)
  with pytest.raises(RecordError, match=r"dolly_format\.jsonl:1: this file holds 'dolly' records \(demo\), "
                                         r"expected ranked records"):
    readers.read_rankings(HAND / "dolly_format.jsonl")
  with pytest.raises(ValueError, match="unknown schema 'alpacca'"):
    readers.read(p, "alpacca")
  with pytest.raises(ValueError, match="schema 'hh' gives ranked records, not demo"):
    readers.read_demos(p, "hh")
  # A later record of another shape is an error against the file's schema, not converted silently.
  p = write(tmp_path, [json.dumps(GOOD_ALPACA) + "\n", json.dumps({"prompt": "p", "response": "r"}) + "\n"])
  with pytest.raises(RecordError, match=r"bad\.jsonl:2: missing field 'instruction'"):
    readers.read_demos(p)


def test_bad_hh_oasst_and_json_array(tmp_path):
  p = write(tmp_path, [json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: yo\n\nAssistant: b"})
                       + "\n"])
  with pytest.raises(RecordError, match=r"bad\.jsonl:1: 'chosen' and 'rejected' differ before their last"):
    readers.read_rankings(p)
  tree = {"message_tree_id": "t", "prompt": {"text": "hi", "role": "prompter", "replies": [
      {"text": "a", "role": "assistant", "rank": 0}, {"text": 5, "role": "assistant", "rank": 1}]}}
  p = write(tmp_path, [json.dumps(tree) + "\n"])
  with pytest.raises(RecordError, match=r"bad\.jsonl:1: prompt\.replies\[1\]: field 'text' should be str, got int"):
    readers.read_rankings(p)
  p = tmp_path / "bad.json"
  p.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a"}\n]\n')
  with pytest.raises(RecordError, match=r"bad\.json:3: missing field 'output'"):
    readers.read_demos(p)
  p.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a", \n]\n')
  with pytest.raises(RecordError, match=r"bad\.json:4: invalid JSON"):
    readers.read_demos(p)
  p.write_text('[{"instruction": "a", "output": "b"}]\n{"instruction": "c", "output": "d"}\n')
  with pytest.raises(RecordError, match=r"bad\.json:2: text after the JSON array's closing"):
    readers.read_demos(p)
  # A .json file of one object a line is JSONL (the form `datasets`' to_json writes), told by its first byte.
  p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
  assert [r["response"] for r in readers.read_demos(p)] == ["b", "d"]
  t = tmp_path / "bad.txt"
  t.write_bytes(b"fine\nline two \xff\xfe\n")
  with pytest.raises(RecordError, match=r"bad\.txt:2: not UTF-8 text"):
    readers.read_texts(t)
  t.write_text("\n\n  \n")
  with pytest.raises(RecordError, match=r"bad\.txt:1: the file has no text"):
    readers.read_texts(t)
  with pytest.raises(FileNotFoundError, match="nowhere.jsonl: no such file"):
    readers.read_demos(tmp_path / "nowhere.jsonl")


# ----------------------------------------------------------------------------- compressed files, by content

def dolly_lines(n=400):
  rec = json.loads((HAND / "dolly_format.jsonl").read_text().splitlines()[0])
  return "".join(json.dumps({**rec, "response": f"answer {i} " + "words " * 20}) + "\n" for i in range(n))


@pytest.mark.parametrize("compress,name", [(gzip.compress, "gzip"), (bz2.compress, "bzip2"), (lzma.compress, "xz")])
def test_truncated_compressed_file_names_file_and_line(tmp_path, compress, name):
  text = dolly_lines()
  data = compress(text.encode())
  path = tmp_path / "dolly.jsonl.gz"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(RecordError) as e:
    readers.read_demos(path)
  msg = str(e.value)
  # The error is at the first line not read whole; every line before it came out of the stream intact.
  line = int(msg.split(":")[1])
  assert msg.startswith(f"{path}:{line}: the {name} stream ends early (truncated file); {line - 1} whole line(s)")
  assert (1 < line if name != "bzip2" else 1 <= line) < 400   # bzip2 gives nothing of an unfinished 900 kB block
  if line > 1:
    intact = tmp_path / "head.jsonl"
    intact.write_text("".join(text.splitlines(keepends=True)[:line - 1]))
    assert len(readers.read_demos(intact)) == line - 1


def test_damaged_gzip_names_the_file(tmp_path):
  data = bytearray(gzip.compress(dolly_lines().encode()))
  data[-8] ^= 0xFF   # the trailer's CRC-32: every line decodes, the check at the end fails
  path = tmp_path / "dolly.jsonl.gz"
  path.write_bytes(bytes(data))
  with pytest.raises(RecordError, match=rf"^{path}:401: the gzip stream is damaged \(BadGzipFile: CRC check failed"):
    readers.read_demos(path)


def test_plain_file_named_gz_is_read_as_plain_text(tmp_path, caplog):
  path = tmp_path / "dolly.jsonl.gz"   # a download decompressed on the way that kept its name
  path.write_text((HAND / "dolly_format.jsonl").read_text())
  assert readers.read_demos(path) == readers.read_demos(HAND / "dolly_format.jsonl")
  assert "named .gz but not gzip-compressed" in caplog.text and str(path) in caplog.text


@pytest.mark.parametrize("name", ["dolly.jsonl", "dolly", "dolly.json"])
def test_gzip_without_gz_suffix_is_decompressed(tmp_path, name):
  path = tmp_path / name
  path.write_bytes(gzip.compress((HAND / "dolly_format.jsonl").read_bytes()))
  assert readers.read_demos(path) == readers.read_demos(HAND / "dolly_format.jsonl")


@pytest.mark.parametrize("name", ["alpaca.json.gz", "alpaca.jsonl.gz", "alpaca_data"])
def test_json_array_detected_by_content_after_decompression(tmp_path, name):
  path = tmp_path / name
  path.write_bytes(gzip.compress((HAND / "alpaca_format.json").read_bytes()))
  assert readers.read_demos(path) == readers.read_demos(HAND / "alpaca_format.json")
  # Its errors keep the array's line numbers.
  path.write_bytes(gzip.compress(b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a"}\n]\n'))
  with pytest.raises(RecordError, match=rf"^{path}:3: missing field 'output'"):
    readers.read_demos(path)


def test_compressed_text_and_unsupported_zstd(tmp_path):
  path = tmp_path / "shakespeare.txt.gz"
  path.write_bytes(gzip.compress((PUB / "tinyshakespeare_head.txt").read_bytes()))
  assert readers.read_texts(path) == readers.read_texts(PUB / "tinyshakespeare_head.txt")
  path = tmp_path / "data.jsonl.zst"
  path.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(16))
  with pytest.raises(RecordError, match=rf"^{path}:1: zstd-compressed data, which the readers do not decompress"):
    readers.read_demos(path)
