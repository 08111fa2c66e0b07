"""The world's cloze benchmark (alignment tax): every item has one right answer among plausible
distractors of the same kind, and every kind of CLOZE_KINDS (generate.py) is present."""

import collections
import json

import pytest

from instructrl.data import world
from instructrl.data.world.generate import CLOZE_KINDS


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  d = tmp_path_factory.mktemp("world")
  cfg = world.get_config("smoke")   # small facts, quick to make; enough items to check the shares
  cfg.n_cloze = 400
  world.generate(cfg, d)
  items = [json.loads(l) for l in (d / "cloze_eval.jsonl").read_text().splitlines()]
  return world.World.load(d), items


def test_every_item_has_one_right_answer_among_plausible_distractors(made):
  w, items = made
  f = w.facts
  assert len(items) == 400
  for it in items:
    ctx, ch, right = it["context"], it["choices"], it["choices"][it["answer"]]
    wrong = [c for i, c in enumerate(ch) if i != it["answer"]]
    assert len(set(ch)) == 4, it
    kind = it["kind"]
    if kind == "larger":       # the one smaller animal; the distractors are all larger
      a = f.animal[ctx.split()[1]]
      assert f.animal[right]["size"] < a["size"] and all(f.animal[x]["size"] > a["size"] for x in wrong), it
    elif kind == "capital":    # the distractors are the same country's other cities
      c = f.country[ctx[len("The capital of "):-len(" is")]]
      assert right == c["capital"] and all(x in c["cities"] for x in wrong), it
    elif kind == "lives":
      city = f.person_city[ctx[:-len(" lives in")]]
      assert right == city and all(f.city_country[x] == f.city_country[city] for x in wrong), it
    else:                      # count: near numbers
      assert kind == "count"
      n = len(ctx[len("Q: Count the words: "):-len("\nA:")].split())
      assert right == str(n) and all(0 < abs(int(x) - n) <= 2 for x in wrong), it


def test_kinds_follow_their_shares_and_answers_are_balanced(made):
  _, items = made
  count = collections.Counter(it["kind"] for it in items)
  shares = dict(CLOZE_KINDS)
  assert set(count) == set(shares)
  for kind, share in shares.items():
    assert abs(count[kind] / len(items) - share) < 0.08, (kind, count)
  # the right answer's position is uniform: no position bias to exploit
  pos = collections.Counter(it["answer"] for it in items)
  assert all(60 < pos[i] < 140 for i in range(4)), pos
