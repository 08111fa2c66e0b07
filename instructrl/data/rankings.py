"""Ranked responses for the reward model: reading, validation, and static-shape batches.

Three input schemas (one JSON object a line), all turned into the project's `ranked` record:
  ranked: {"prompt": str, "responses": [str, ...], "ranking": [int, ...], ...}  # indices, best first
  pair:   {"prompt": str, "chosen": str, "rejected": str, ...}     -> K = 2, ranking [0, 1]
  HH-RLHF transcripts: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}
          -> the shared prompt is everything up to and including the last "\\n\\nAssistant:"
             (it must be identical in both), the two responses are the remainders.

Bad-data policies (all errors are `RecordError`s starting with `file:line:` when read from a file):
- K < 2, a ranking that is not a permutation of range(K), a response that is not a string,
  a missing field, a field of the wrong type, invalid JSON: error.
- Two identical responses in one record: error naming the indices (a response cannot be ranked
  against itself, and a "comparison" of identical texts teaches the RM nothing but noise).
- An empty (or whitespace-only) response: error naming the index, for `ranked` and `pair`
  records. HH-RLHF transcripts are the exception: there an empty last Assistant turn is a real,
  labelled answer (the model said nothing; 3 of the first 1,000 harmless-base test pairs, all
  of them the chosen one), so it is kept and scores at the EOS right after the prompt.
- At batching time, a record whose prompt + any response does not fit in seq_len is dropped
  whole (its other comparisons would otherwise be ranked among a subset the labeler never saw)
  and the count is logged; never truncated. A record with more responses than k_max: error.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from instructrl.data.records import RecordError, json_lines, validate
from instructrl.objectives import ranked_to_pairs

HH_ASSISTANT = "\n\nAssistant:"


def validate_ranked(record: Any, where: str, *, allow_empty_response: bool = False) -> dict:
  """A `ranked` record, checked beyond its field types: returns it, or raises RecordError."""
  validate(record, "ranked", where)
  responses, ranking = record["responses"], record["ranking"]
  k = len(responses)
  if k < 2:
    raise RecordError(f"{where}: a ranked record needs K >= 2 responses to compare, got K={k}")
  for i, r in enumerate(responses):
    if not isinstance(r, str):
      raise RecordError(f"{where}: responses[{i}] should be str, got {type(r).__name__}")
    if not allow_empty_response and not r.strip():
      raise RecordError(f"{where}: responses[{i}] is empty")
  bad_items = [x for x in ranking if not isinstance(x, int) or isinstance(x, bool)]
  if bad_items or sorted(ranking) != list(range(k)):
    why = (f"non-integer entries {bad_items!r}" if bad_items else
           f"missing {sorted(set(range(k)) - set(ranking))}, "
           f"repeated {sorted({x for x in ranking if ranking.count(x) > 1})}, "
           f"out of range {sorted({x for x in ranking if not 0 <= x < k})}")
    raise RecordError(f"{where}: 'ranking' must be a permutation of range({k}) (response indices, best "
                      f"first, one per response), got {ranking!r} ({why})")
  seen: dict[str, list[int]] = {}
  for i, r in enumerate(responses):
    seen.setdefault(r, []).append(i)
  dups = [idx for idx in seen.values() if len(idx) > 1]
  if dups:
    raise RecordError(f"{where}: duplicate responses at indices {', '.join(map(str, dups))} "
                      f"(identical texts cannot be ranked against each other)")
  return record


def pair_to_ranked(record: Any, where: str = "<pair>") -> dict:
  """{"prompt", "chosen", "rejected", ...} -> a ranked record with K = 2 and ranking [0, 1]."""
  validate(record, "pair", where)
  extra = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}
  out = {**extra, "prompt": record["prompt"], "responses": [record["chosen"], record["rejected"]],
         "ranking": [0, 1]}
  return validate_ranked(out, where)


def hh_to_ranked(record: Any, where: str = "<hh>") -> dict:
  """An HH-RLHF {"chosen", "rejected"} transcript pair -> a ranked record with K = 2.

  The prompt (all turns, up to and including the last "\\n\\nAssistant:") must be the same in
  both transcripts. Error messages give character offsets, never the text (the harmless split
  is red-teaming data).
  """
  if not isinstance(record, dict):
    raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
  prompts, responses = [], []
  for field in ("chosen", "rejected"):
    if field not in record:
      raise RecordError(f"{where}: missing field {field!r} (an HH-RLHF record needs ['chosen', 'rejected'])")
    text = record[field]
    if not isinstance(text, str):
      raise RecordError(f"{where}: field {field!r} should be str, got {type(text).__name__}")
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
      raise RecordError(f"{where}: field {field!r} has no {HH_ASSISTANT!r} turn, so no response to rank")
    cut += len(HH_ASSISTANT)
    prompts.append(text[:cut])
    responses.append(text[cut:])
  if prompts[0] != prompts[1]:
    a, b = prompts
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    raise RecordError(f"{where}: 'chosen' and 'rejected' differ before their last {HH_ASSISTANT!r} turn "
                      f"(prompt lengths {len(a)} and {len(b)}, first difference at character {first}); "
                      f"they must share the whole conversation except the final answer")
  if not prompts[0][:-len(HH_ASSISTANT)].strip():
    raise RecordError(f"{where}: the conversation before the last {HH_ASSISTANT!r} is empty")
  extra = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
  out = {**extra, "prompt": prompts[0], "responses": responses, "ranking": [0, 1]}
  return validate_ranked(out, where, allow_empty_response=True)


def to_ranked(record: Any, where: str, *, allow_empty_response: bool = False) -> dict:
  """Any accepted schema -> a validated ranked record, chosen by the fields present.
  allow_empty_response: accept empty responses in `ranked` records (a policy's own collected samples,
  where saying nothing is a real answer the labelers ranked); they stay errors in other data."""
  if isinstance(record, dict):
    if "responses" in record or "ranking" in record:
      return validate_ranked(record, where, allow_empty_response=allow_empty_response)
    if "prompt" in record and ("chosen" in record or "rejected" in record):
      return pair_to_ranked(record, where)
    if "chosen" in record or "rejected" in record:
      return hh_to_ranked(record, where)
    raise RecordError(f"{where}: not a ranked record: expected fields ['prompt', 'responses', 'ranking'] "
                      f"(ranked), ['prompt', 'chosen', 'rejected'] (pair) or ['chosen', 'rejected'] "
                      f"(HH-RLHF transcripts); got {sorted(record)}")
  raise RecordError(f"{where}: expected a JSON object for a ranked record, got {type(record).__name__}")


def load_ranked(path: str | Path, *, allow_empty_response: bool = False) -> list[dict]:
  """Read a JSONL(.gz) file of ranked, pair or HH-RLHF records; every record validated.

  A truncated last line or bad JSON is an error, never skipped; blank lines are skipped.
  allow_empty_response: see to_ranked (the RM stage's own comparisons).
  """
  return [to_ranked(record, where, allow_empty_response=allow_empty_response)
          for record, where in json_lines(path, "ranked / pair / HH-RLHF records")]


@dataclasses.dataclass
class RankedExamples:
  """One row per prompt with all its responses: the RM forwards [B * K_max, T] once per step.

  Response k of prompt n is tokens[n, k] = BOS + prompt + response + EOS, right-padded with PAD.
  The RM reads its score at last_index[n, k], the EOS: the last real token, never a pad, so a
  causal model's score there has seen the whole response and nothing after it. Padded slots
  (k >= K of that prompt) are all PAD with mask False, last_index 0 and rank k_max.
  """
  tokens: np.ndarray      # [N, K_max, T] int32
  last_index: np.ndarray  # [N, K_max] int32
  ranks: np.ndarray       # [N, K_max] int32: 0 = best
  mask: np.ndarray        # [N, K_max] bool: a real response
  index: np.ndarray       # [N] int64: the record each row came from (over-long records dropped)

  def __len__(self):
    return len(self.tokens)

  def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": self.tokens[idx], "last_index": self.last_index[idx], "ranks": self.ranks[idx],
            "mask": self.mask[idx]}


def ranked_examples(tokenizer, records, seq_len: int, k_max: int,
                    format_prompt: Optional[Callable[[str], str]] = None, *,
                    what: str = "rankings") -> RankedExamples:
  """Tokenise validated ranked records (load_ranked / validate_ranked) to static shapes.

  Policy: a record with any prompt + response longer than seq_len tokens (BOS and EOS
  included) is dropped whole and the count logged; more than k_max responses is an error.
  """
  format_prompt = format_prompt or (lambda p: p)
  bos, eos, pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
  records = list(records)
  for i, r in enumerate(records):
    k = len(r["responses"])
    if k > k_max:
      raise ValueError(f"{what}: record {i} has K={k} responses, more than k_max={k_max}; raise k_max "
                       f"(the paper's K is 4..9) or filter such records out")
    if sorted(r["ranking"]) != list(range(k)):
      raise ValueError(f"{what}: record {i} has ranking {r['ranking']!r}, not a permutation of range({k}); "
                       f"validate records with load_ranked / validate_ranked first")
  p_ids = tokenizer.encode_batch([format_prompt(r["prompt"]) for r in records])
  flat = tokenizer.encode_batch([resp for r in records for resp in r["responses"]])
  n = len(records)
  toks = np.full((n, k_max, seq_len), pad, np.int32)
  last = np.zeros((n, k_max), np.int32)
  ranks = np.full((n, k_max), k_max, np.int32)
  mask = np.zeros((n, k_max), bool)
  keep, pos = [], 0
  for i, r in enumerate(records):
    k = len(r["responses"])
    r_ids, pos = flat[pos:pos + k], pos + k
    seqs = [[bos, *p_ids[i], *ids, eos] for ids in r_ids]
    if max(map(len, seqs)) > seq_len:
      continue
    for j, seq in enumerate(seqs):
      toks[i, j, :len(seq)] = seq
      last[i, j] = len(seq) - 1
    ranks[i, np.asarray(r["ranking"])] = np.arange(k)   # ranking lists indices best first
    mask[i, :k] = True
    keep.append(i)
  dropped = n - len(keep)
  if dropped:
    logging.warning("%s: dropped %d of %d prompts with a prompt + response longer than seq_len=%d",
                    what, dropped, n, seq_len)
  if not keep:
    raise ValueError(f"{what}: every record has a prompt + response longer than seq_len={seq_len}; "
                     f"raise the seq_len")
  return RankedExamples(toks[keep], last[keep], ranks[keep], mask[keep], np.asarray(keep, np.int64))


@dataclasses.dataclass
class PairExamples:
  """The independent-pairs view (ablation): one row per comparison, gathered from RankedExamples.

  pairs[p] = (row, winner slot, loser slot); token rows are gathered on demand, so the C(K,2)
  expansion costs indices, not copies of the tokens.
  """
  ranked: RankedExamples
  pairs: np.ndarray   # [P, 3] int64: (row in `ranked`, winner slot, loser slot)

  def __len__(self):
    return len(self.pairs)

  def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    n, w, l = self.pairs[idx].T
    return {"chosen": self.ranked.tokens[n, w], "rejected": self.ranked.tokens[n, l],
            "chosen_last": self.ranked.last_index[n, w], "rejected_last": self.ranked.last_index[n, l]}

  # Full arrays [P, T] / [P], for small data and tests.
  chosen = property(lambda self: self.batch(np.arange(len(self)))["chosen"])
  rejected = property(lambda self: self.batch(np.arange(len(self)))["rejected"])
  chosen_last = property(lambda self: self.batch(np.arange(len(self)))["chosen_last"])
  rejected_last = property(lambda self: self.batch(np.arange(len(self)))["rejected_last"])


def pairs_from_ranked(ex: RankedExamples) -> PairExamples:
  rows = []
  for n in range(len(ex)):
    k = int(ex.mask[n].sum())
    ranking = np.argsort(ex.ranks[n, :k], kind="stable")   # slots, best first
    rows += [(n, w, l) for w, l in ranked_to_pairs(ranking)]
  return PairExamples(ex, np.asarray(rows, np.int64).reshape(-1, 3))


def pair_examples(tokenizer, records, seq_len: int, format_prompt: Optional[Callable[[str], str]] = None, *,
                  what: str = "pairs") -> PairExamples:
  """All C(K,2) comparisons of every record as independent rows (same tokens, same drop policy)."""
  records = list(records)
  k_max = max((len(r["responses"]) for r in records), default=2)
  return pairs_from_ranked(ranked_examples(tokenizer, records, seq_len, k_max, format_prompt, what=what))
