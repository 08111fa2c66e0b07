"""Every file in ../shared/data read by its reader, with the exact counts its README gives (or that
follow from it). CI clones the repo alone, so these skip there when the directory is absent;
test_readers.py runs the same readers on excerpts of the same files (tests/fixtures/public)."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from instructrl.data import readers
from instructrl.data.records import RecordError

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "README.md").is_file(),
                                reason=f"{DATA} not present (CI clones the repo alone); the same readers run on "
                                       f"tests/fixtures/public in test_readers.py")


def test_hh_rlhf_pairs():
  recs = readers.read_rankings(DATA / "hh-rlhf/harmless-base-test-first1000.jsonl.gz")
  assert len(recs) == 1000   # README: 1,000 records
  assert all(r["ranking"] == [0, 1] and r["prompt"].endswith("\n\nAssistant:") for r in recs)
  # The 3 empty final answers (all chosen) are kept: an empty answer is a real labelled one.
  assert sum(not r["responses"][0].strip() for r in recs) == 3 and sum(not r["responses"][1].strip() for r in recs) == 0


def test_oasst_trees_k_way():
  recs = readers.read_rankings(DATA / "oasst/en_100_tree.jsonl")
  # README: prompter nodes have 2 (58), 3 (117), 4 (28), 5 (3), 6 (6), 8 (1), 9 (1) replies; replies with no
  # rank are dropped, which moves one 2-reply node to K=1 (not a ranking) and one 4-reply node to K=3.
  assert Counter(len(r["responses"]) for r in recs) == {2: 57, 3: 117, 4: 27, 5: 3, 6: 6, 8: 1, 9: 1}
  assert len(recs) == 212 and sum(len(r["responses"]) >= 3 for r in recs) == 155
  trees = [json.loads(l) for l in (DATA / "oasst/en_100_tree.jsonl").read_text().splitlines()]
  assert len(trees) == 100


def test_oasst_prompts():
  assert len(readers.read_prompts(DATA / "oasst/prompt_lottery_en_250_text.jsonl")) == 250


def test_oasst_trees_read_as_prompts_give_every_prompter_turn():
  """PPO's prompts from the trees: each prompter message, answered or not (README: 1,167 messages)."""
  path = DATA / "oasst/en_100_tree.jsonl"
  prompts = readers.read_prompts(path)

  def turns(msg):
    own = msg["role"] == "prompter" and not msg.get("deleted") and bool(msg["text"].strip())
    return own + sum(turns(m) for m in msg.get("replies") or [])

  assert len(prompts) == sum(turns(json.loads(l)["prompt"]) for l in path.read_text().splitlines())
  assert {r["prompt"] for r in readers.read_rankings(path)} <= {p["prompt"] for p in prompts}
  assert all(p["prompt"].startswith("\n\nHuman: ") and p["prompt"].endswith("\n\nAssistant:") for p in prompts)


def test_self_instruct_demos():
  assert len(readers.read_demos(DATA / "self-instruct/seed_tasks.jsonl")) == 175
  assert len(readers.read_demos(DATA / "self-instruct/user_oriented_instructions.jsonl")) == 252


def test_alpaca_eval_outputs_two_are_empty():
  path = DATA / "alpaca_eval/text_davinci_003_model_outputs.jsonl"
  with pytest.raises(RecordError, match=r"text_davinci_003_model_outputs\.jsonl:248: field 'output' is empty"):
    readers.read_demos(path)
  recs = readers.read_demos(path, on_invalid="skip")
  assert len(recs) == 805 - 2


def test_tinyshakespeare_text():
  path = DATA / "tinyshakespeare/input.txt"
  whole = readers.read_texts(path, text_split="file")
  assert len(whole) == 1 and len(whole[0]["text"]) == 1_115_394 - 1   # README: 1,115,394 chars (final "\n" cut)
  assert len(readers.read_texts(path, text_split="line")) == 40_000 - 7_223   # 40,000 lines, 7,223 blank (`grep -c "^$"`)
  assert len(readers.read_texts(path)) == 7_222


def test_truthfulqa_eval():
  recs = readers.read_eval(DATA / "truthfulqa/TruthfulQA.jsonl")
  assert len(recs) == 817
  assert Counter(r["type"] for r in recs) == {"Adversarial": 437, "Non-Adversarial": 380}


def test_every_file_is_covered():
  """A new file in ../shared/data must get a reader test here."""
  covered = {"hh-rlhf/harmless-base-test-first1000.jsonl.gz", "oasst/en_100_tree.jsonl",
             "oasst/prompt_lottery_en_250_text.jsonl", "self-instruct/seed_tasks.jsonl",
             "self-instruct/user_oriented_instructions.jsonl", "alpaca_eval/text_davinci_003_model_outputs.jsonl",
             "tinyshakespeare/input.txt", "truthfulqa/TruthfulQA.jsonl"}
  files = {str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.is_file() and p.name != "README.md"}
  assert files == covered
  assert gzip.open(DATA / "hh-rlhf/harmless-base-test-first1000.jsonl.gz").read(1)
