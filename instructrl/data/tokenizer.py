"""SentencePiece tokenizer: trained from the corpus in seconds, or loaded from a `.model` file.

Ids are fixed: PAD 0, UNK 1, BOS 2, EOS 3. Newlines are a user-defined piece, no dummy prefix
is added (so encode(prompt + "\\n") + encode(response) == encode(prompt + "\\n" + response)) and no
normalisation is applied, because the task world's formats ("prompt\\n", "Q: ...\\nA: ...")
mean something only if newlines and spaces survive a round trip.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:

  def __init__(self, model_path: str | os.PathLike):
    path = Path(model_path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer model not found: {path}")
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_file=str(path))
    for name, want, got in (("pad", PAD_ID, self.sp.pad_id()), ("bos", BOS_ID, self.sp.bos_id()),
                            ("eos", EOS_ID, self.sp.eos_id())):
      if got != want:
        raise ValueError(f"{path}: {name}_id is {got}, instructrl expects {want} (train with tokenizer.train)")

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.sp.encode(list(texts))

  def decode(self, ids: Iterable[int]) -> str:
    """Decode, stopping at EOS and skipping PAD/BOS."""
    out = []
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i not in (PAD_ID, BOS_ID):
        out.append(i)
    return self.sp.decode(out)


def train(texts: Iterable[str], vocab_size: int, model_path: str | os.PathLike,
          byte_fallback: bool = False) -> Tokenizer:
  """Train a BPE model on `texts` and write it to `model_path`. Deterministic for the same input.

  Characters never seen in training map to UNK unless byte_fallback (256 byte pieces, worth it
  for open-domain text, too costly at the task world's vocab of 512-1024).
  """
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, user_defined_symbols=["\n"],
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
      split_digits=True,
      character_coverage=1.0, byte_fallback=byte_fallback, num_threads=1, max_sentence_length=16384,
      minloglevel=2, hard_vocab_limit=False)
  path = Path(model_path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_bytes(buf.getvalue())
  os.replace(tmp, path)   # atomic: a killed run never leaves half a model
  return Tokenizer(path)
