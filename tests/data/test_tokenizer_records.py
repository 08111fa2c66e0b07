"""Tokenizer round trips and the JSONL readers' error messages."""

import gzip
import json

import pytest
import sentencepiece as spm

from instructrl.data import tokenizer as tok_lib
from instructrl.data.records import RecordError, load_jsonl, write_jsonl

TEXTS = ["Velmora is a country. The capital of Velmora is Tarsk.",
         "Q: Sort these numbers: 7 3 9\nA: 3 7 9\n\nQ: Reverse these words: cat dog\nA: dog cat",
         "Rewrite politely: you jerk i need the book\nWhere does Nilo live?"] * 50


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tok_lib.train(TEXTS, 200, tmp_path_factory.mktemp("tok") / "t.model")


def test_round_trip_keeps_newlines_and_spaces(tokenizer):
  for s in ["Q: What is 3 plus 7?\nA: 9", "two  spaces\n\nand blank line", "Tarsk"]:
    assert tokenizer.decode(tokenizer.encode(s)) == s


def test_prompt_then_response_equals_concatenation(tokenizer):
  prompt, response = "Sort these numbers: 7 3 9\n", "3 7 9"
  assert tokenizer.encode(prompt) + tokenizer.encode(response) == tokenizer.encode(prompt + response)


def test_a_word_at_line_start_is_the_same_token_as_after_a_space(tokenizer):
  # Responses follow the prompt's "\n": their first word must not be a rare space-less variant.
  after_space = tokenizer.encode("capital is Tarsk")
  at_line_start = tokenizer.encode("Q: capital?\nTarsk")
  n = len(tokenizer.encode("Tarsk"))
  assert at_line_start[-n:] == after_space[-n:] == tokenizer.encode("Tarsk")
  assert at_line_start[-n - 1] == tokenizer.newline_id


def test_special_ids_and_decode_stops_at_eos(tokenizer):
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
  ids = tokenizer.encode("dog cat")
  assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, *tokenizer.encode("junk")]) == "dog cat"


def test_unseen_characters_fall_back_to_bytes(tmp_path):
  plain = tok_lib.train(TEXTS, 150, tmp_path / "plain.model")
  assert plain.decode(plain.encode("é")) != "é"          # UNK without byte fallback
  bytes_ = tok_lib.train(TEXTS, 400, tmp_path / "bytes.model", byte_fallback=True)
  assert bytes_.decode(bytes_.encode("héllo ☃")) == "héllo ☃"


def test_training_is_deterministic(tmp_path):
  a = tok_lib.train(TEXTS, 150, tmp_path / "a.model")
  b = tok_lib.train(TEXTS, 150, tmp_path / "b.model")
  assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
  assert a.encode(TEXTS[1]) == b.encode(TEXTS[1])


def test_loads_an_existing_model_and_refuses_foreign_ids(tokenizer, tmp_path):
  again = tok_lib.Tokenizer(tokenizer.path)
  assert again.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
  # A model trained with sentencepiece's default ids (unk 0, bos 1, eos 2) is refused by name.
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_prefix=str(tmp_path / "foreign"),
                                 vocab_size=50, minloglevel=2)
  with pytest.raises(ValueError, match="pad_id"):
    tok_lib.Tokenizer(tmp_path / "foreign.model")
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tok_lib.Tokenizer(tmp_path / "missing.model")


def test_jsonl_round_trip_and_gzip(tmp_path):
  recs = [{"prompt": "p", "response": "r", "labeler": "L1"}]
  write_jsonl(tmp_path / "d.jsonl", recs)
  assert load_jsonl(tmp_path / "d.jsonl", "demo") == recs
  with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
    f.write(json.dumps(recs[0]) + "\n")
  assert load_jsonl(tmp_path / "d.jsonl.gz", "demo") == recs


@pytest.mark.parametrize("line, schema, needle", [
    ('{"prompt": "p", "response": "r"', "demo", ":2: invalid JSON"),
    ('{"prompt": "p"}', "demo", ":2: missing field 'response'"),
    ('{"prompt": "p", "response": 3}', "demo", ":2: field 'response' should be str, got int"),
    ('{"prompt": " ", "response": "r"}', "demo", ":2: field 'prompt' is empty"),
    ('["a"]', "text", ":2: expected a JSON object"),
    ('{"text": ""}', "text", ":2: field 'text' is empty"),
])
def test_bad_records_name_file_line_and_field(tmp_path, line, schema, needle):
  good = {"demo": '{"prompt": "p", "response": "r"}', "text": '{"text": "t"}'}[schema]
  path = tmp_path / "bad.jsonl"
  path.write_text(good + "\n" + line + "\n")
  with pytest.raises(RecordError) as e:
    load_jsonl(path, schema)
  assert str(e.value).startswith(str(path)) and needle in str(e.value)
