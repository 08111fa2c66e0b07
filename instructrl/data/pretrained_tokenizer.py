"""Tokenizers that come with released checkpoints: HF `tokenizer.json` and sentencepiece `.model`.

Both expose what the batching code uses (vocab_size, pad_id, bos_id, eos_id, encode,
encode_batch, decode) and, unlike the project's own `tokenizer.Tokenizer`, take the special
ids the file defines instead of requiring PAD=0/BOS=1/EOS=2. Text is encoded without special
tokens: the batching code adds BOS and EOS itself. A model with no pad token (GPT-2, LLaMA)
pads with its EOS id: padded slots are masked out of the loss and of attention, so the id
there only has to be a valid row of the embedding.

`tokenizer.json` needs the `tokenizers` package (the `hf` extra); it is imported here only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence


def _special_from_config(directory: Path) -> dict[str, str]:
  """bos/eos/pad token strings from tokenizer_config.json / special_tokens_map.json, if present."""
  out = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    p = directory / name
    if p.is_file():
      cfg = json.loads(p.read_text())
      for key in ("bos_token", "eos_token", "pad_token"):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
          out[key] = v
  return out


class _Common:
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def decode(self, ids: Iterable[int]) -> str:
    """Decode, stopping at EOS and skipping PAD/BOS."""
    out = []
    for i in map(int, ids):
      if i == self.eos_id:
        break
      if i not in (self.pad_id, self.bos_id):
        out.append(i)
    return self._decode(out)

  def _check_ids(self, where):
    for name in ("bos_id", "eos_id", "pad_id"):
      v = getattr(self, name)
      if v is None or not 0 <= v < self.vocab_size:
        raise ValueError(f"{where}: {name} is {v!r}; pass {name}= explicitly (a token id below {self.vocab_size})")


class HFTokenizer(_Common):
  """A `tokenizer.json` (what transformers' fast tokenizers save) through the `tokenizers` package."""

  def __init__(self, path: str | Path, *, bos_id: int | None = None, eos_id: int | None = None,
               pad_id: int | None = None):
    try:
      from tokenizers import Tokenizer as _Tok
    except ImportError as e:
      raise ImportError("reading tokenizer.json needs the `tokenizers` package: pip install 'instructrl[hf]'") from e
    path = Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no such file (expected a Hugging Face tokenizer.json)")
    try:
      self.tok = _Tok.from_file(str(path))
    except Exception as e:   # the Rust side raises a bare Exception on a bad file
      raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
    self.path = path
    special = _special_from_config(path.parent)
    lookup = lambda key: None if key not in special else self.tok.token_to_id(special[key])
    self.bos_id = bos_id if bos_id is not None else lookup("bos_token")
    self.eos_id = eos_id if eos_id is not None else lookup("eos_token")
    if self.eos_id is None:   # GPT-2 style files name no specials outside tokenizer.json
      self.eos_id = self.tok.token_to_id("<|endoftext|>") if self.tok.token_to_id("<|endoftext|>") is not None \
          else self.tok.token_to_id("</s>")
    if self.bos_id is None:
      self.bos_id = self.tok.token_to_id("<s>") if self.tok.token_to_id("<s>") is not None else self.eos_id
    self.pad_id = pad_id if pad_id is not None else (lookup("pad_token") if lookup("pad_token") is not None
                                                     else self.eos_id)
    self._check_ids(path)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

  def _decode(self, ids: list[int]) -> str:
    return self.tok.decode(ids, skip_special_tokens=True)


class SentencePieceTokenizer(_Common):
  """A released sentencepiece `.model` (LLaMA-1/2 style) with the special ids it defines."""

  def __init__(self, path: str | Path, *, pad_id: int | None = None, bos_id: int | None = None,
               eos_id: int | None = None):
    import sentencepiece as spm
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no such file (expected a sentencepiece .model)")
    try:
      self.sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
      raise ValueError(f"{path}: not a valid sentencepiece model ({e})") from None
    self.path = path
    self.bos_id = bos_id if bos_id is not None else self.sp.bos_id()
    self.eos_id = eos_id if eos_id is not None else self.sp.eos_id()
    self.pad_id = pad_id if pad_id is not None else (self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id)
    self._check_ids(path)

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.sp.encode(list(texts))

  def _decode(self, ids: list[int]) -> str:
    return self.sp.decode(ids)


def load(path: str | Path, **special):
  """tokenizer.json (or a directory holding one) -> HFTokenizer; *.model (or a directory holding a
  tokenizer.model and no tokenizer.json) -> SentencePieceTokenizer."""
  path = Path(path)
  if path.is_dir() and not (path / "tokenizer.json").is_file() and (path / "tokenizer.model").is_file():
    path = path / "tokenizer.model"   # a save_pretrained directory of a sentencepiece model (LLaMA-1/2)
  if path.suffix == ".model":
    return SentencePieceTokenizer(path, **special)
  if path.suffix == ".json" or (path / "tokenizer.json").is_file():
    return HFTokenizer(path, **special)
  raise ValueError(f"{path}: expected a sentencepiece .model file or a tokenizer.json (or a directory with one)")
