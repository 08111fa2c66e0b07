"""Local stand-ins for released artefacts: a byte-level BPE tokenizer.json trained here on the
fixture texts, and a random GPT-2 saved with save_pretrained next to it (no download)."""

from __future__ import annotations

from pathlib import Path

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def fixture_texts() -> list[str]:
  return [p.read_text(encoding="utf-8") for p in sorted((FIX / "public").glob("*.jsonl")) + sorted(
      (FIX / "public").glob("*.txt"))]


def train_bytelevel_bpe(path: Path, vocab_size: int = 800) -> Path:
  """A GPT-2-style tokenizer.json (byte-level BPE, <|endoftext|> special) from the `tokenizers` package."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(fixture_texts(), trainer)
  path.parent.mkdir(parents=True, exist_ok=True)
  tok.save(str(path))
  return path


def gpt2_with_tokenizer(directory: Path, n_positions: int = 512):
  """save_pretrained GPT-2 (random, 2 x 32) whose vocab is the tokenizer's; tokenizer.json beside it."""
  import torch
  import transformers
  from tokenizers import Tokenizer
  tok_path = train_bytelevel_bpe(directory / "tokenizer.json")
  vocab = Tokenizer.from_file(str(tok_path)).get_vocab_size()
  eos = Tokenizer.from_file(str(tok_path)).token_to_id("<|endoftext|>")
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4,
                                bos_token_id=eos, eos_token_id=eos)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(directory)
  return directory
