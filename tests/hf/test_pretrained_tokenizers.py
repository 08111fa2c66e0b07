"""tokenizer.json (via `tokenizers`) agrees with transformers' fast tokenizer on the same file;
a released-style sentencepiece .model keeps its own special ids; bad files are refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers", reason="tokenizer.json needs the `hf` extra")
sys.path.insert(0, str(Path(__file__).parent))

import hf_fixtures as helpers  # noqa: E402
from instructrl.data import pretrained_tokenizer  # noqa: E402
from instructrl.data.batching import prompt_response_examples  # noqa: E402

TEXTS = ["First Citizen:\nBefore we proceed any further, hear me speak.", "  two  spaces, tabs\tand ünïcödé ✓",
         "Give three tips for staying healthy.", ""]


def test_tokenizer_json_matches_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  path = helpers.train_bytelevel_bpe(tmp_path / "tokenizer.json", vocab_size=600)
  ours = pretrained_tokenizer.load(path)
  ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
  assert ours.vocab_size == len(ref) == 600
  for t in TEXTS:
    assert ours.encode(t) == ref(t, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode(t)) == t   # byte-level BPE is lossless
  eot = ref.convert_tokens_to_ids("<|endoftext|>")
  assert ours.eos_id == ours.bos_id == ours.pad_id == eot   # GPT-2 convention: one special token
  assert ours.decode(ours.encode("ab") + [eot] + ours.encode("cd")) == "ab"   # decode stops at EOS
  # Batching puts the tokenizer's own BOS/EOS around the text (not the project's 1/2).
  ex = prompt_response_examples(ours, ["Hi"], [" there"], seq_len=16)
  assert ex.tokens[0, 0] == eot and eot in ex.tokens[0, 1:]


def test_tokenizer_json_special_ids_from_config(tmp_path):
  path = helpers.train_bytelevel_bpe(tmp_path / "tokenizer.json", vocab_size=600)
  (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", '
                                                   '"pad_token": {"content": "a"}}')
  tok = pretrained_tokenizer.load(tmp_path)
  assert tok.pad_id == tok.encode("a")[0] and tok.eos_id != tok.pad_id
  with pytest.raises(ValueError, match="bos_id is 9999; pass bos_id= explicitly"):
    pretrained_tokenizer.load(path, bos_id=9999)


def test_sentencepiece_model_with_llama_ids(tmp_path):
  import sentencepiece as spm
  model = tmp_path / "tokenizer.model"
  spm.SentencePieceTrainer.train(sentence_iterator=iter(helpers.fixture_texts()), model_prefix=str(tmp_path / "tokenizer"),
                                 vocab_size=700, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                 minloglevel=2, num_threads=1, byte_fallback=True)
  tok = pretrained_tokenizer.load(model)
  sp = spm.SentencePieceProcessor(model_file=str(model))
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 700)   # no pad: pads with EOS
  assert tok.encode(TEXTS[0]) == sp.encode(TEXTS[0])
  assert tok.decode(tok.encode(TEXTS[2]) + [2, 5, 6]) == TEXTS[2]


def test_bad_tokenizer_files(tmp_path):
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
    pretrained_tokenizer.load(bad)
  (tmp_path / "x.model").write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match=r"x\.model: not a valid sentencepiece model"):
    pretrained_tokenizer.load(tmp_path / "x.model")
  with pytest.raises(ValueError, match="expected a sentencepiece .model file or a tokenizer.json"):
    pretrained_tokenizer.load(tmp_path / "vocab.txt")
