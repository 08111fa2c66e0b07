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


def randomize_weights(model, seed: int = 0):
  """Redraw a transformers model's weights at O(1) scale (HF's 0.02 init gives near-zero logits that any
  mapping would match): norm scales around 1 (Gemma's stored w around 0, its scale being 1 + w), biases
  at 0.3, matrices so that outputs stay O(1), embeddings at 0.5 (a tied head would otherwise repeat the
  last token forever; 0.2 for Gemma, which multiplies them by sqrt(d_model), and 0.05 for Gemma 2, whose
  normalised layer outputs would otherwise be outweighed by the embedding, so that greedy decoding loops;
  its final norm at scale ~4 then keeps the tied head's logits O(1))."""
  import torch
  torch.manual_seed(seed)
  gemma = "gemma" in type(model).__name__.lower()
  emb_scale = 0.05 if "gemma2" in type(model).__name__.lower() else 0.2 if gemma else 0.5
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("weight") and p.ndim == 1:
        big = emb_scale == 0.05 and name == "model.norm.weight"
        p.copy_((3.0 if big else 0.0 if gemma else 1.0) + 0.3 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.3 * torch.randn_like(p))
      else:
        emb = any(e in name for e in ("wte", "wpe", "embed"))
        p.copy_(torch.randn_like(p) * (emb_scale if emb else 1.5 / min(p.shape) ** 0.5))
  return model.eval()


def assert_greedy_equals_generate(model, params, cfg, tokens, lengths, n_new: int) -> None:
  """Our greedy sampler on a left-padded batch (row i: the first lengths[i] of tokens[i]) gives the tokens
  transformers' `generate(do_sample=False)` gives, and those are not degenerate."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from instructrl.models.sampling import sample
  P = max(lengths)
  prompt, mask = np.zeros((len(lengths), P), np.int64), np.zeros((len(lengths), P), np.int64)
  for i, n in enumerate(lengths):
    prompt[i, P - n:], mask[i, P - n:] = tokens[i, :n], 1
  with torch.no_grad():
    ref = model.generate(torch.tensor(prompt), attention_mask=torch.tensor(mask), do_sample=False,
                         max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=None, pad_token_id=0).numpy()[:, P:]
  out = sample(params, jnp.asarray(prompt, jnp.int32), jnp.asarray(mask, bool), jax.random.key(0),
               cfg=cfg, max_new_tokens=n_new, temperature=0.0, eos_id=-1, pad_id=0)
  assert len(set(ref.ravel().tolist())) > 5, f"degenerate greedy output {ref}"
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)
