"""Ranked / pair / HH-RLHF records: validation errors with file:line, conversions, and the
static-shape RM batches (tokens, last_index, ranks, mask) and their pairs view."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from instructrl.data.rankings import (RankedExamples, hh_to_ranked, load_ranked, pair_examples, pair_to_ranked,
                                      ranked_examples, validate_ranked)
from instructrl.data.records import RecordError
from instructrl.objectives import ranked_to_pairs

# ../shared/data beside the checkout (as on the project machines and in CI).
HH_FILE = Path(__file__).resolve().parents[3] / "shared/data/hh-rlhf/harmless-base-test-first1000.jsonl.gz"


class FakeTokenizer:
  """One id per character (4..33), with the project's special ids."""
  bos_id, eos_id, pad_id = 2, 3, 0

  def encode(self, text):
    return [4 + ord(c) % 30 for c in text]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]


TOK = FakeTokenizer()
GOOD = {"prompt": "Sort: 3 1 2", "responses": ["1 2 3", "3 2 1", "1 3 2"], "ranking": [0, 2, 1],
        "labeler": "L01", "group": 2}


def write_lines(path, objs):
  path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
  return path


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "responses": ["only one"], "ranking": [0]}, r"K >= 2 .*got K=1"),
    ({**GOOD, "responses": [], "ranking": []}, r"K >= 2 .*got K=0"),
    ({**GOOD, "ranking": [0, 0, 1]}, r"permutation of range\(3\).*got \[0, 0, 1\].*missing \[2\], repeated \[0\]"),
    ({**GOOD, "ranking": [0, 1]}, r"permutation of range\(3\).*got \[0, 1\].*missing \[2\]"),
    ({**GOOD, "ranking": [1, 2, 3]}, r"permutation of range\(3\).*out of range \[3\]"),
    ({**GOOD, "ranking": ["0", 1, 2]}, r"permutation of range\(3\).*non-integer entries \['0'\]"),
    ({**GOOD, "ranking": [0, 1, True]}, r"non-integer entries \[True\]"),
    ({**GOOD, "responses": ["a", "b", "a"]}, r"duplicate responses at indices \[0, 2\]"),
    ({**GOOD, "responses": ["a", " \n", "c"]}, r"responses\[1\] is empty"),
    ({**GOOD, "responses": ["a", 7, "c"]}, r"responses\[1\] should be str, got int"),
    ({k: v for k, v in GOOD.items() if k != "ranking"}, r"missing field 'ranking'"),
    ({**GOOD, "responses": "a b c"}, r"field 'responses' should be list, got str"),
    ({**GOOD, "prompt": "  "}, r"field 'prompt' is empty"),
    ({**GOOD, "prompt": 3}, r"field 'prompt' should be str"),
    ({"prompt": "p", "chosen": "a"}, r"missing field 'rejected'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, r"duplicate responses at indices \[0, 1\]"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, r"field 'chosen' is empty"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yo"}, r"missing field 'rejected'"),
    ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, r"'chosen' has no .*Assistant"),
    ({"text": "just text"}, r"not a ranked record.*got \['text'\]"),
    ([1, 2], r"expected a JSON object"),
])
def test_bad_records_name_file_line_and_the_problem(tmp_path, bad, message):
  path = write_lines(tmp_path / "r.jsonl", [GOOD, bad])
  with pytest.raises(RecordError, match=rf"^{tmp_path / 'r.jsonl'}:2: .*{message}"):
    load_ranked(path)


def test_bad_json_and_missing_file(tmp_path):
  path = write_lines(tmp_path / "r.jsonl", [GOOD, "", GOOD, '{"prompt": "p", "responses": ["a", '])
  with pytest.raises(RecordError, match=r"r\.jsonl:4: invalid JSON"):
    load_ranked(path)
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    load_ranked(tmp_path / "nope.jsonl")


def test_reads_all_three_schemas_from_one_file_gzipped(tmp_path):
  pair = {"prompt": "Say hi", "chosen": "hi", "rejected": "bye", "group": 1}
  hh = {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.\n\nHuman: Another?\n\nAssistant: Green.",
        "rejected": "\n\nHuman: Name a colour.\n\nAssistant: Blue.\n\nHuman: Another?\n\nAssistant: Seven."}
  path = tmp_path / "mix.jsonl.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for r in (GOOD, pair, hh):
      f.write(json.dumps(r) + "\n")
  got = load_ranked(path)
  assert got[0] == GOOD
  assert got[1] == {"prompt": "Say hi", "responses": ["hi", "bye"], "ranking": [0, 1], "group": 1}
  prompt = "\n\nHuman: Name a colour.\n\nAssistant: Blue.\n\nHuman: Another?\n\nAssistant:"
  assert got[2] == {"prompt": prompt, "responses": [" Green.", " Seven."], "ranking": [0, 1]}
  assert got[2]["prompt"] + got[2]["responses"][0] == hh["chosen"]


def test_hh_transcripts_must_share_the_prompt_and_may_have_an_empty_answer():
  ok = hh_to_ranked({"chosen": "\n\nHuman: Help?\n\nAssistant: ", "rejected": "\n\nHuman: Help?\n\nAssistant: No."})
  assert ok["responses"] == [" ", " No."] and ok["ranking"] == [0, 1]
  with pytest.raises(RecordError, match=r"^x:7: 'chosen' and 'rejected' differ before .*first difference at "
                                        r"character 12"):
    hh_to_ranked({"chosen": "\n\nHuman: Hello\n\nAssistant: a", "rejected": "\n\nHuman: Help\n\nAssistant: b"},
                 "x:7")
  with pytest.raises(RecordError, match="conversation before the last"):
    hh_to_ranked({"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"}, "x:1")
  # The project's own schemas keep refusing empty responses.
  with pytest.raises(RecordError, match=r"responses\[0\] is empty"):
    validate_ranked({"prompt": "p", "responses": ["", "b"], "ranking": [0, 1]}, "w")
  assert pair_to_ranked({"prompt": "p", "chosen": "a", "rejected": "b"})["ranking"] == [0, 1]


@pytest.mark.skipif(not HH_FILE.is_file(), reason="shared HH-RLHF sample not present")
def test_real_hh_rlhf_harmless_sample_reads_1000_pairs():
  # Red-teaming data: assertions below never put its text into a failure message.
  recs = load_ranked(HH_FILE)
  assert len(recs) == 1000
  assert all(len(r["responses"]) == 2 and r["ranking"] == [0, 1] for r in recs)
  assert all(r["prompt"].endswith("\n\nAssistant:") and r["prompt"].startswith("\n\nHuman:") for r in recs)
  with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
    raw = [json.loads(line) for line in f]
  assert all(r["prompt"] + r["responses"][0] == x["chosen"] and r["prompt"] + r["responses"][1] == x["rejected"]
             for r, x in zip(recs, raw))
  assert sum(not r["responses"][0].strip() for r in recs) == 3     # kept: a silent answer, chosen
  ex = ranked_examples(TOK, recs[:50], seq_len=4096, k_max=2)
  assert len(ex) == 50 and ex.mask.all()


def test_ranked_examples_layout():
  recs = [GOOD, {"prompt": "ab", "responses": ["x", "yy"], "ranking": [1, 0]}]
  ex = ranked_examples(TOK, recs, seq_len=24, k_max=4, format_prompt=lambda p: p + "\n")
  assert isinstance(ex, RankedExamples) and len(ex) == 2
  assert ex.tokens.shape == (2, 4, 24) and ex.tokens.dtype == np.int32
  for n, r in enumerate(recs):
    p = TOK.encode(r["prompt"] + "\n")
    for k, resp in enumerate(r["responses"]):
      seq = [2, *p, *TOK.encode(resp), 3]
      assert ex.tokens[n, k, :len(seq)].tolist() == seq
      assert (ex.tokens[n, k, len(seq):] == 0).all()
      assert ex.last_index[n, k] == len(seq) - 1 and ex.tokens[n, k, ex.last_index[n, k]] == 3
  assert ex.ranks.tolist() == [[0, 2, 1, 4], [1, 0, 4, 4]]          # rank of each response, 0 = best
  assert ex.mask.tolist() == [[True, True, True, False], [True, True, False, False]]
  assert (ex.tokens[0, 3] == 0).all() and (ex.tokens[1, 2:] == 0).all()
  b = ex.batch(np.array([1, 1, 0]))
  assert set(b) == {"tokens", "last_index", "ranks", "mask"}
  assert b["tokens"].shape == (3, 4, 24) and b["ranks"][0].tolist() == [1, 0, 4, 4]


def test_over_long_records_are_dropped_whole_and_counted(caplog):
  long_resp = {"prompt": "p", "responses": ["short", "x" * 40], "ranking": [0, 1]}
  long_prompt = {"prompt": "q" * 40, "responses": ["a", "b"], "ranking": [1, 0]}
  short = {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}
  # BOS + 1 + 8 + EOS = 11 tokens: exactly seq_len fits (the EOS at index 10 is read).
  fits = {"prompt": "p", "responses": ["abcdefgh", "b"], "ranking": [0, 1]}
  with caplog.at_level(logging.WARNING):
    ex = ranked_examples(TOK, [long_resp, short, long_prompt, fits], seq_len=11, k_max=3)
  assert ex.index.tolist() == [1, 3] and ex.tokens.shape == (2, 3, 11)
  assert ex.last_index[1].tolist() == [10, 3, 0] and ex.tokens[1, 0, 10] == 3
  assert "dropped 2 of 4 prompts" in caplog.text and "seq_len=11" in caplog.text
  with pytest.raises(ValueError, match="every record .* longer than seq_len=5"):
    ranked_examples(TOK, [GOOD], seq_len=5, k_max=3)
  with pytest.raises(ValueError, match=r"record 0 has K=3 responses, more than k_max=2"):
    ranked_examples(TOK, [GOOD], seq_len=64, k_max=2)
  with pytest.raises(ValueError, match="not a permutation"):
    ranked_examples(TOK, [{**GOOD, "ranking": [0, 0, 1]}], seq_len=64, k_max=3)


def test_pair_examples_expand_every_comparison():
  recs = [GOOD, {"prompt": "ab", "responses": ["x", "yy"], "ranking": [1, 0]},
          {"prompt": "c", "responses": ["1", "2", "3", "4"], "ranking": [3, 1, 0, 2]}]
  ranked = ranked_examples(TOK, recs, seq_len=24, k_max=4)
  pairs = pair_examples(TOK, recs, seq_len=24)
  assert len(pairs) == 3 + 1 + 6
  assert pairs.chosen.shape == pairs.rejected.shape == (10, 24)
  want = [(n, w, l) for n, r in enumerate(recs) for w, l in ranked_to_pairs(r["ranking"])]
  assert [tuple(p) for p in pairs.pairs.tolist()] == want
  for row, (n, w, l) in enumerate(want):
    assert (pairs.chosen[row] == ranked.tokens[n, w]).all() and (pairs.rejected[row] == ranked.tokens[n, l]).all()
    assert pairs.chosen_last[row] == ranked.last_index[n, w]
    assert pairs.rejected_last[row] == ranked.last_index[n, l]
    assert ranked.ranks[n, w] < ranked.ranks[n, l]
  b = pairs.batch(np.array([3, 0]))
  assert set(b) == {"chosen", "rejected", "chosen_last", "rejected_last"}
  assert b["chosen"][0].tolist() == ranked.tokens[1, 1].tolist()      # "yy" beat "x"
