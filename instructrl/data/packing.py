"""Packing the RM's ranked responses: several sequences per row, each attending only to itself.

A per-prompt RM batch is [B, K_max, T]: every prompt has K_max slots of T tokens, but a prompt ranks
K = 4..9 responses and each is BOS + prompt + response + EOS, well under T. On tiny's round-two data
about a quarter of the slots' tokens are real. Packing puts the real sequences end to end in fewer rows
of T (first-fit decreasing, so the same batch always packs the same way), with

  segment_ids [R, T]  1, 2, ... per sequence in the row, 0 on the padding after the last one;
  positions   [R, T]  restarting at 0 at each sequence's BOS, so the model sees what it sees unpacked;
  gather      [B, K]  where each response's EOS lands in the flattened [R * T] scores.

With attention masked to the segment (models/transformer.py, `segment_ids`), every sequence's scores are
the unpacked ones up to float rounding (tests/models/test_packing.py).

Sharding: the batch's B prompts split into the data-parallel shards of the mesh; each shard's prompts
pack into its own `rows_per_shard` rows, so a device's packed rows hold exactly the prompts of its
[B, K] rows, and each host packs only the shards it holds. The row count is static for a run: the most
any batch of the run needs (`rows_needed` over all its batches), so a run compiles one step.
"""

from __future__ import annotations

import numpy as np


def first_fit_decreasing(lengths, row_len: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Place sequences of `lengths` in rows of `row_len`: (row, offset) of each, and the rows used.

  Longest first, each into the first row with room (ties: the earlier sequence first), so the placement
  is a pure function of the lengths."""
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and (lengths.max() > row_len or lengths.min() < 1):
    bad = int(np.argmax((lengths > row_len) | (lengths < 1)))
    raise ValueError(f"packing: sequence {bad} has {lengths[bad]} tokens; expected 1..{row_len} (the row length)")
  row, offset = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
  free: list[int] = []   # room left in each open row
  for i in np.argsort(-lengths, kind="stable"):
    n = int(lengths[i])
    r = next((j for j, f in enumerate(free) if f >= n), len(free))
    if r == len(free):
      free.append(row_len)
    row[i], offset[i] = r, row_len - free[r]
    free[r] -= n
  return row, offset, len(free)


def shard_slices(batch_size: int, n_shards: int) -> list[slice]:
  if batch_size % n_shards:
    raise ValueError(f"packing: a batch of {batch_size} prompts does not split into {n_shards} data shards")
  per = batch_size // n_shards
  return [slice(s * per, (s + 1) * per) for s in range(n_shards)]


def rows_needed(last_index: np.ndarray, mask: np.ndarray, row_len: int, n_shards: int = 1) -> int:
  """The rows per shard a batch ([B, K] EOS positions and real-response mask) packs into."""
  lengths = last_index + 1
  return max(first_fit_decreasing(lengths[sl][mask[sl]], row_len)[2]
             for sl in shard_slices(len(mask), n_shards))


def pack_shard(tokens: np.ndarray, last_index: np.ndarray, mask: np.ndarray, rows: int,
               pad_id: int) -> dict[str, np.ndarray]:
  """One shard's prompts ([b, K, T] right-padded sequences) packed into `rows` rows of T.

  gather: the shard-local flat index of each response's EOS in [rows * T]; 0 for masked slots (the loss
  ignores their scores)."""
  b, k, t = tokens.shape
  lengths = (last_index + 1)[mask]
  row, offset, used = first_fit_decreasing(lengths, t)
  if used > rows:
    raise ValueError(f"packing: this shard's {len(lengths)} sequences need {used} rows of {t}, more than the "
                     f"{rows} the run was sized for (rows_needed over every batch of the run)")
  out_tokens = np.full((rows, t), pad_id, np.int32)
  segments = np.zeros((rows, t), np.int32)
  positions = np.zeros((rows, t), np.int32)
  gather = np.zeros((b, k), np.int32)
  seg_in_row = np.zeros(rows, np.int32)
  for (n, j), r, o in zip(np.argwhere(mask), row, offset):   # row-major: the same order as `lengths`
    length = int(last_index[n, j]) + 1
    seg_in_row[r] += 1
    out_tokens[r, o:o + length] = tokens[n, j, :length]
    segments[r, o:o + length] = seg_in_row[r]
    positions[r, o:o + length] = np.arange(length)
    gather[n, j] = r * t + o + length - 1
  return {"tokens": out_tokens, "segment_ids": segments, "positions": positions, "gather": gather}


# The packed batch's fields with one row per packed row (the others have one per prompt).
PACKED_ROW_KEYS = ("packed_tokens", "segment_ids", "positions")


def pack_batch(batch: dict[str, np.ndarray], rows_per_shard: int, n_shards: int, pad_id: int,
               first_shard: int = 0) -> dict[str, np.ndarray]:
  """A per-prompt RM batch (tokens [B, K, T], last_index, ranks, mask [B, K], ...) with its tokens packed.

  Returns the [B, K] fields unchanged (ranks, mask, own, ...), the packed rows [n_shards * rows_per_shard, T]
  (PACKED_ROW_KEYS), and gather [B, K]: each response's EOS in the flattened packed scores, global over the
  shards (shard s's rows start at s * rows_per_shard). first_shard: the batch is the shards from this one on
  of a larger batch (a host packing the shards it holds), whose flat indices `gather` gives."""
  tokens, last, mask = batch["tokens"], batch["last_index"], batch["mask"]
  t = tokens.shape[-1]
  parts = []
  for s, sl in enumerate(shard_slices(len(mask), n_shards), start=first_shard):
    p = pack_shard(tokens[sl], last[sl], mask[sl], rows_per_shard, pad_id)
    p["gather"] = p["gather"] + s * rows_per_shard * t
    parts.append(p)
  packed = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  rest = {k: v for k, v in batch.items() if k not in ("tokens", "last_index")}
  return {**rest, "packed_tokens": packed["tokens"], "segment_ids": packed["segment_ids"],
          "positions": packed["positions"], "gather": packed["gather"]}
