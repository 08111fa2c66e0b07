"""Tokenised examples at static shapes, and a stateless batch order that makes resume exact.

`batch_indices(n, batch_size, step, seed)` is a pure function of the step: the data position
of a run IS its step, so a restored checkpoint continues on exactly the batches it would have
seen (no iterator state to lose).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from instructrl.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclasses.dataclass
class TokenExamples:
  tokens: np.ndarray   # [N, L + 1] int32: model inputs are tokens[:, :-1], targets tokens[:, 1:]
  loss_mask: np.ndarray  # [N, L + 1] bool: position t+1 is a trained target (the mask of targets)

  def __len__(self):
    return len(self.tokens)

  def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    toks, mask = self.tokens[idx], self.loss_mask[idx]
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": mask[:, 1:]}


def pack_texts(token_lists, seq_len: int, tokenizer=None) -> TokenExamples:
  """Concatenate BOS + text + EOS streams and cut into windows of seq_len + 1 (pretraining). The
  tokenizer's own BOS / EOS ids (a released checkpoint's), else the project's."""
  bos, eos, _ = _specials(tokenizer)
  stream = np.fromiter((t for ids in token_lists for t in (bos, *ids, eos)), dtype=np.int32)
  n = (len(stream) - 1) // seq_len
  if n < 1:
    raise ValueError(f"corpus has {len(stream)} tokens, fewer than one window of seq_len={seq_len} + 1")
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  toks = stream[idx]
  return TokenExamples(toks, np.ones_like(toks, dtype=bool))


def _specials(tokenizer) -> tuple[int, int, int]:
  """(bos, eos, pad): a pretrained tokenizer's own ids (pretrained_tokenizer.py), else the project's."""
  return (getattr(tokenizer, "bos_id", BOS_ID), getattr(tokenizer, "eos_id", EOS_ID),
          getattr(tokenizer, "pad_id", PAD_ID))


def prompt_response_examples(tokenizer, prompts, responses, seq_len: int, *, what: str = "demos",
                             truncate: bool = False) -> TokenExamples:
  """BOS + prompt + response + EOS, right-padded; loss only on response tokens and the EOS.

  Policy: an example longer than seq_len + 1 is dropped (the paper drops over-long prompts)
  and the count is logged, never silently truncated into a response without its end.
  truncate=True (scoring given answers, where every row needs a score) keeps every row instead: one too
  long keeps at most seq_len - 1 response tokens and loses the start of its prompt; it still ends in EOS.
  """
  p_ids = tokenizer.encode_batch(prompts)
  r_ids = tokenizer.encode_batch(responses)
  bos, eos, pad = _specials(tokenizer)
  L = seq_len + 1
  toks = np.full((len(p_ids), L), pad, np.int32)
  mask = np.zeros((len(p_ids), L), bool)
  keep = []
  for i, (p, r) in enumerate(zip(p_ids, r_ids)):
    if truncate:
      r = r[:L - 2]
      p = p[max(0, len(p) - (L - 2 - len(r))):]
    seq = [bos, *p, *r, eos]
    if len(seq) > L:
      continue
    toks[i, :len(seq)] = seq
    mask[i, 1 + len(p):len(seq)] = True
    keep.append(i)
  dropped = len(p_ids) - len(keep)
  if dropped:
    logging.warning("%s: dropped %d of %d examples longer than seq_len=%d", what, dropped, len(p_ids), seq_len)
  if not keep and not truncate:
    raise ValueError(f"{what}: every example is longer than seq_len={seq_len}; raise the seq_len")
  return TokenExamples(toks[keep], mask[keep])


def left_pad_prompts(tokenizer, prompts, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """BOS + prompt, left-padded to `length`. Returns (tokens, mask, kept index) — over-long dropped."""
  ids = tokenizer.encode_batch(prompts)
  bos, _, pad = _specials(tokenizer)
  keep = [i for i, p in enumerate(ids) if len(p) + 1 <= length]
  toks = np.full((len(keep), length), pad, np.int32)
  mask = np.zeros((len(keep), length), bool)
  for row, i in enumerate(keep):
    seq = [bos, *ids[i]]
    toks[row, length - len(seq):] = seq
    mask[row, length - len(seq):] = True
  return toks, mask, np.asarray(keep, np.int64)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of the batch at `step`: epochs are seeded permutations, batches run across epoch ends."""
  if n <= 0:
    raise ValueError("no examples to draw batches from")
  start = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(start + len(out), n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    out.extend(perm[offset:offset + batch_size - len(out)].tolist())
  return np.asarray(out, np.int64)
