"""The eval stage's measurements: intervals, win rates, Likert, cloze and held-out loss by references."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl import measures
from instructrl.data import world
from instructrl.data import tokenizer as tok_lib
from instructrl.models.config import ModelConfig
from instructrl.models.transformer import Decoder


@pytest.fixture(scope="module")
def w(tmp_path_factory):
  d = tmp_path_factory.mktemp("smoke_world")
  world.generate(world.get_config("smoke"), d)
  return world.World.load(d), d


def records(d, name, n):
  return [json.loads(l) for l in open(d / name)][:n]


def test_mean_ci_matches_the_normal_formula():
  x = [0.0, 1.0, 1.0, 0.5, 1.0]
  out = measures.mean_ci(x)
  half = 1.96 * np.std(x, ddof=1) / np.sqrt(5)
  assert out["mean"] == pytest.approx(0.7)
  assert out["ci_low"] == pytest.approx(0.7 - half) and out["ci_high"] == pytest.approx(0.7 + half)
  assert out["n"] == 5
  clipped = measures.mean_ci([1.0] * 9 + [0.0], bounds=(0.0, 1.0))
  assert clipped["ci_high"] == 1.0 and clipped["ci_low"] < 0.9
  with pytest.raises(ValueError, match="no values"):
    measures.mean_ci([])


def test_win_rate_ties_are_half_and_better_answers_win(w):
  wd, d = w
  recs = records(d, "prompts_eval.jsonl", 40)
  gold = [wd.gold(r) for r in recs]
  raters = wd.heldout_labelers
  rng = np.random.default_rng(0)
  same = measures.win_rate(wd, recs, gold, gold, raters, rng)
  assert same["mean"] == 0.5 and same["ci_low"] == same["ci_high"] == 0.5
  better = measures.win_rate(wd, recs, gold, [""] * len(recs), raters, rng)
  worse = measures.win_rate(wd, recs, [""] * len(recs), gold, raters, rng)
  assert better["mean"] > 0.8 and worse["mean"] < 0.2
  # prompts without an answer (too long) are skipped, not counted as losses
  skipped = measures.win_rate(wd, recs, [None] * 10 + gold[10:], gold, raters, rng)
  assert skipped["n"] == len(recs) - 10


def test_likert_is_on_the_seven_point_scale_and_tracks_quality(w):
  wd, d = w
  recs = records(d, "prompts_eval.jsonl", 40)
  raters = wd.heldout_labelers
  rng = np.random.default_rng(1)
  good = measures.likert(wd, recs, [wd.gold(r) for r in recs], raters, rng)
  bad = measures.likert(wd, recs, ["Shut up, jerk."] * len(recs), raters, rng)
  scores = [wd.likert(r, wd.gold(r), raters[0].id, rng) for r in recs]
  assert set(scores) <= set(range(1, 8))
  assert good["mean"] > 5.0 and bad["mean"] < 2.5


def _tiny_lm(tokenizer):
  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, max_len=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                    head_dim=16, d_ff=64)
  params = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return cfg, params


def test_cloze_and_heldout_loss_equal_a_direct_forward(w, tmp_path):
  _, d = w
  tok_lib.train([r["text"] for r in records(d, "corpus_train.jsonl", None)], 256, tmp_path / "tok.model")
  tokenizer = tok_lib.Tokenizer(tmp_path / "tok.model")
  cfg, params = _tiny_lm(tokenizer)
  items = records(d, "cloze_eval.jsonl", 10)
  ex, owner = measures.cloze_examples(tokenizer, items, seq_len=40)
  assert len(ex) == sum(len(it["choices"]) for it in items) and owner.max() == 9
  # the mask covers exactly the choice's tokens
  for row, (i, c) in enumerate([(i, c) for i, it in enumerate(items) for c in it["choices"]]):
    assert ex.loss_mask[row].sum() == len(tokenizer.encode(c))
  nll, count = measures.sequence_nll(params, cfg, ex, batch_size=8)   # 40 rows: the last batch is padded
  logits, _ = Decoder(cfg).apply({"params": params}, jnp.asarray(ex.tokens[:, :-1]))
  lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), ex.tokens[:, 1:, None], -1)[..., 0]
  want = -(lp * ex.loss_mask[:, 1:]).sum(-1)
  np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(count, ex.loss_mask[:, 1:].sum(-1))
  acc = measures.cloze_accuracy(params, cfg, tokenizer, items, seq_len=40, batch_size=8)
  picks = [int(np.argmin(want[owner == i])) for i in range(len(items))]
  assert acc == pytest.approx(np.mean([p == it["answer"] for p, it in zip(picks, items)]))
  loss = measures.heldout_lm_loss(params, cfg, ex, batch_size=16)
  assert loss == pytest.approx(want.sum() / ex.loss_mask[:, 1:].sum(), rel=1e-5)
  with pytest.raises(ValueError, match="cloze item"):
    measures.cloze_examples(tokenizer, items, seq_len=3)
