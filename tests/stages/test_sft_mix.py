"""sft.pretrain_mix: pretraining windows mixed into the SFT examples (paper C.3's PPO init)."""

import json

import numpy as np
import pytest

from instructrl.data.batching import TokenExamples
from instructrl.stages.sft import mix_pretraining


class CharTokenizer:
  def encode_batch(self, texts):
    return [[4 + ord(c) % 50 for c in t] for t in texts]


def _demos(n, width):
  toks = np.arange(n * width, dtype=np.int32).reshape(n, width) % 97
  mask = np.zeros_like(toks, dtype=bool)
  mask[:, width // 2:] = True           # loss on the "response" half only
  return TokenExamples(toks, mask)


@pytest.fixture
def world_dir(tmp_path):
  lines = [json.dumps({"text": f"document number {i} says something about fish and rocks"}) for i in range(200)]
  (tmp_path / "corpus_train.jsonl").write_text("\n".join(lines) + "\n")
  return tmp_path


def test_mix_keeps_every_demo_and_adds_the_asked_fraction_of_full_loss_windows(world_dir):
  demos = _demos(90, 17)
  mixed = mix_pretraining(demos, CharTokenizer(), world_dir, 0.1, seed=0)
  assert len(mixed) == 100                                   # 90 demos + 10 windows: 10% of the examples
  np.testing.assert_array_equal(mixed.tokens[:90], demos.tokens)
  np.testing.assert_array_equal(mixed.loss_mask[:90], demos.loss_mask)
  assert mixed.tokens.shape[1] == 17 and mixed.loss_mask[90:].all()   # same length; loss on every token
  stream = "".join(chr(t) for t in mixed.tokens[90:].ravel() if t > 3)  # real corpus text, not padding
  assert len(stream) > 0
  again = mix_pretraining(demos, CharTokenizer(), world_dir, 0.1, seed=0)
  np.testing.assert_array_equal(again.tokens, mixed.tokens)          # seeded: a resumed run sees the same data
  other = mix_pretraining(demos, CharTokenizer(), world_dir, 0.1, seed=1)
  assert not np.array_equal(other.tokens[90:], mixed.tokens[90:])


@pytest.mark.parametrize("fraction", [1.0, -0.1])
def test_mix_fraction_out_of_range_is_refused(world_dir, fraction):
  with pytest.raises(ValueError, match="pretrain_mix"):
    mix_pretraining(_demos(10, 9), CharTokenizer(), world_dir, fraction, seed=0)


def test_mix_larger_than_the_corpus_is_refused(world_dir):
  with pytest.raises(ValueError, match="corpus has"):
    mix_pretraining(_demos(10_000, 9), CharTokenizer(), world_dir, 0.9, seed=0)
