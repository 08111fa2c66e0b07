"""Packed rows (data/packing.py, Decoder's segment_ids_bt): the placement, and every packed sequence's outputs
equal to its outputs alone in a row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl.data import packing
from instructrl.models.config import ModelConfig
from instructrl.models.transformer import Decoder

GPT = dict(style="gpt", vocab_size=64, max_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
           d_ff=64, tie_embeddings=True)
LLAMA = {**GPT, "style": "llama", "n_kv_heads": 2, "tie_embeddings": False}


def ragged(B=6, K=5, T=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((B, K, T), np.int32)
  last = np.zeros((B, K), np.int32)
  mask = np.zeros((B, K), bool)
  for b in range(B):
    for k in range(int(rng.integers(2, K + 1))):
      n = int(rng.integers(3, T + 1))
      tokens[b, k, :n] = rng.integers(4, 64, n)
      last[b, k], mask[b, k] = n - 1, True
  return {"tokens": tokens, "last_index": last, "mask": mask, "ranks": rng.integers(0, K, (B, K)).astype(np.int32)}


def test_first_fit_decreasing_on_hand_made_lengths():
  row, offset, used = packing.first_fit_decreasing([5, 9, 3, 7, 2], 10)
  # longest first: 9 -> row 0; 7 -> row 1; 5 -> row 2; 3 -> row 1 (7 + 3); 2 -> row 2 (5 + 2)
  assert used == 3
  assert row.tolist() == [2, 0, 1, 1, 2] and offset.tolist() == [0, 0, 7, 0, 5]
  with pytest.raises(ValueError, match=r"sequence 1 has 11 tokens; expected 1..10"):
    packing.first_fit_decreasing([3, 11], 10)


def test_packed_batch_holds_every_response_once_where_gather_points():
  batch = ragged()
  B, K, T = batch["tokens"].shape
  n_shards = 2
  rows = packing.rows_needed(batch["last_index"], batch["mask"], T, n_shards)
  out = packing.pack_batch(batch, rows, n_shards, pad_id=0)
  assert out["packed_tokens"].shape == (n_shards * rows, T) and out["gather"].shape == (B, K)
  assert rows < B // n_shards * K   # fewer rows than unpacked
  np.testing.assert_array_equal(out["ranks"], batch["ranks"])
  flat_tok, flat_seg, flat_pos = (out[k].reshape(-1) for k in ("packed_tokens", "segment_ids", "positions"))
  covered = np.zeros(flat_tok.size, int)
  for b, k in np.argwhere(batch["mask"]):
    n, end = batch["last_index"][b, k] + 1, out["gather"][b, k]
    start = end - n + 1
    # shard s's prompts sit in shard s's rows
    assert start // (rows * T) == b // (B // n_shards)
    np.testing.assert_array_equal(flat_tok[start:end + 1], batch["tokens"][b, k, :n])
    np.testing.assert_array_equal(flat_pos[start:end + 1], np.arange(n))
    assert len(set(flat_seg[start:end + 1])) == 1 and flat_seg[start] > 0
    assert start % T + n <= T   # within one row
    covered[start:end + 1] += 1
  assert covered.max() == 1 and covered.sum() == (batch["last_index"] + 1)[batch["mask"]].sum()
  assert (flat_seg[covered == 0] == 0).all() and (flat_tok[covered == 0] == 0).all()
  with pytest.raises(ValueError, match="more than the"):
    packing.pack_batch(batch, rows - 1, n_shards, pad_id=0)


@pytest.mark.parametrize("style,scan", [("gpt", False), ("llama", False), ("llama", True)])
@pytest.mark.parametrize("attention", ["einsum", "dot_product"])
def test_packed_sequences_score_as_they_do_alone(style, scan, attention):
  cfg = ModelConfig(**{**(GPT if style == "gpt" else LLAMA), "scan_layers": scan, "attention": attention})
  model = Decoder(cfg, head="scalar")
  batch = ragged()
  B, K, T = batch["tokens"].shape
  params = model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
  alone, _ = model.apply({"params": params}, batch["tokens"].reshape(B * K, T))
  alone = np.take_along_axis(np.asarray(alone), batch["last_index"].reshape(-1, 1), 1).reshape(B, K)
  out = packing.pack_batch(batch, packing.rows_needed(batch["last_index"], batch["mask"], T), 1, pad_id=0)
  packed, _ = model.apply({"params": params}, out["packed_tokens"], out["positions"],
                          segment_ids_bt=out["segment_ids"])
  got = np.asarray(packed).reshape(-1)[out["gather"]]
  np.testing.assert_allclose(got[batch["mask"]], alone[batch["mask"]], atol=1e-5, rtol=1e-5)
  # without the segment mask the later sequences of a row would read the earlier ones: the test can fail
  unmasked, _ = model.apply({"params": params}, out["packed_tokens"], out["positions"])
  assert np.abs(np.asarray(unmasked).reshape(-1)[out["gather"]] - alone)[batch["mask"]].max() > 1e-3


def test_segment_ids_refuse_a_cache_or_a_padding_mask():
  cfg = ModelConfig(**GPT)
  model = Decoder(cfg, head="scalar")
  tokens = jnp.ones((1, 8), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  with pytest.raises(ValueError, match="segment_ids_bt"):
    model.apply({"params": params}, tokens, segment_ids_bt=tokens, kv_mask_bs=tokens)
