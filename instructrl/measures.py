"""The eval measures: answers to held-out prompts, the gold judge's score, win rate with its interval,
Likert, cloze accuracy and held-out LM loss.

Used at the end of pretrain (does GPT follow a bare instruction? with a few-shot prefix?) and
SFT (does it now?), and later by the eval stage (win rates, alignment tax).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from instructrl import distributed
from instructrl.data.batching import TokenExamples, left_pad_prompts
from instructrl.data.world import tasks as world_tasks
from instructrl.models.config import ModelConfig
from instructrl.models.sampling import sample
from instructrl.models.transformer import Decoder


def generate(params, model_cfg: ModelConfig, tokenizer, prompts: list[str], *, rng, batch_size: int,
             prompt_len: int, max_new_tokens: int, temperature: float, top_k: int = 0,
             top_p: float = 1.0) -> list[str | None]:
  """Decoded responses (None for a prompt longer than prompt_len). Batches are padded to a fixed size."""
  toks, mask, keep = left_pad_prompts(tokenizer, prompts, prompt_len)
  out: list[str | None] = [None] * len(prompts)
  for start in range(0, len(keep), batch_size):
    t, m = toks[start:start + batch_size], mask[start:start + batch_size]
    n = len(t)
    if n < batch_size:   # static shapes: pad the last batch with copies of its first row
      t = np.concatenate([t, np.repeat(t[:1], batch_size - n, 0)])
      m = np.concatenate([m, np.repeat(m[:1], batch_size - n, 0)])
    s = sample(params, t, m, jax.random.fold_in(rng, start), cfg=model_cfg, max_new_tokens=max_new_tokens,
               temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id,
               pad_id=tokenizer.pad_id)
    tokens = distributed.to_host(s.tokens)   # sharded over 'batch', possibly across hosts
    for row in range(n):
      out[int(keep[start + row])] = tokenizer.decode(tokens[row])
  return out


def answer(params, model_cfg: ModelConfig, tokenizer, world, records: list[dict], *, rng, eval_cfg,
           prefix: str = "", stop_at_newline: bool = False, temperature: float | None = None) -> list[str | None]:
  """The policy's answers to `records` (None where the prompt is longer than eval_cfg.prompt_len).

  prefix: text put before each prompt (a few-shot prefix for prompted GPT, which then sees the
  corpus Q/A format); stop_at_newline: cut each answer at its first newline (that format ends
  answers so).
  """
  prompts = [prefix + (f"Q: {r['prompt']}\nA:" if prefix else world.format_prompt(r["prompt"])) for r in records]
  answers = generate(params, model_cfg, tokenizer, prompts, rng=rng, batch_size=eval_cfg.batch_size,
                     prompt_len=eval_cfg.prompt_len + (eval_cfg.prefix_len if prefix else 0),
                     max_new_tokens=eval_cfg.max_new_tokens,
                     temperature=eval_cfg.temperature if temperature is None else temperature)
  if stop_at_newline:
    answers = [None if a is None else a.strip().split("\n")[0].strip() for a in answers]
  return answers


def gold_summary(world, records: list[dict], answers: list) -> dict:
  """Mean gold score, acceptable and correct rates over the answered prompts, and the gold score per task family."""
  judged = [(r.get("family", "?"), world.judge(r, a)) for r, a in zip(records, answers) if a is not None]
  verdicts = [v for _, v in judged]
  if not verdicts:
    raise ValueError("gold_eval: every prompt was longer than eval.prompt_len")
  by_family, by_behaviour = {}, {}
  for fam, v in judged:
    by_family.setdefault(fam, []).append(v.score)
  for r, a in zip(records, answers):
    if a is not None and "family" in r:
      by_behaviour.setdefault(world_tasks.behaviour(r), []).append(world.judge(r, a))
  return {"gold_score": float(np.mean([v.score for v in verdicts])),
          # Where a model wins or loses: the mean gold score of each task family's answers, and their count.
          "by_family": {f: {"gold_score": float(np.mean(xs)), "n": len(xs)} for f, xs in sorted(by_family.items())},
          # The behaviours RLHF should fix (a constraint obeyed, a false premise rejected, a hedge where the
          # world has no answer, no insult): how often the behaviour part of the judge is whole, and content.
          "by_behaviour": {b: {"compliant": float(np.mean([v.compliant for v in vs])),
                               "correct": float(np.mean([v.correct for v in vs])), "n": len(vs)}
                           for b, vs in sorted(by_behaviour.items())},
          "acceptable_rate": float(np.mean([v.acceptable for v in verdicts])),
          "correct_rate": float(np.mean([v.correct for v in verdicts])), "n": len(verdicts),
          "skipped_too_long": len(records) - len(verdicts),
          "examples": [{"prompt": r["prompt"], "answer": a} for r, a in list(zip(records, answers))[:3]]}


def gold_eval(params, model_cfg: ModelConfig, tokenizer, world, records: list[dict], *, rng, eval_cfg,
              prefix: str = "", stop_at_newline: bool = False, temperature: float | None = None) -> dict:
  """gold_summary of the policy's answers (see `answer` for the arguments)."""
  answers = answer(params, model_cfg, tokenizer, world, records, rng=rng, eval_cfg=eval_cfg, prefix=prefix,
                   stop_at_newline=stop_at_newline, temperature=temperature)
  return gold_summary(world, records, answers)


# ----------------------------------------------------------------------------- the paper's comparisons

def mean_ci(values, bounds=(-np.inf, np.inf)) -> dict:
  """Mean with a 95% normal-approximation interval over independent per-prompt outcomes, clipped
  to the range the outcomes can take (`bounds`)."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    raise ValueError("mean_ci: no values")
  half = 1.96 * x.std(ddof=1) / np.sqrt(x.size) if x.size > 1 else float("nan")
  lo, hi = np.clip([x.mean() - half, x.mean() + half], *bounds)
  return {"mean": float(x.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(x.size)}


def win_rate(world, records: list[dict], answers: list, baseline: list, labelers: list, rng) -> dict:
  """How often a labeler prefers `answers` to `baseline` on the same prompt (the paper's main metric).

  Prompt i is judged by labelers[i % len(labelers)]; identical answers count 0.5; prompts where
  either side has no answer (prompt too long) are skipped.
  """
  out = [world.prefers(r, a, b, labelers[i % len(labelers)].id, rng)
         for i, (r, a, b) in enumerate(zip(records, answers, baseline)) if a is not None and b is not None]
  return mean_ci(out, bounds=(0.0, 1.0))


def likert(world, records: list[dict], answers: list, labelers: list, rng) -> dict:
  return mean_ci([world.likert(r, a, labelers[i % len(labelers)].id, rng)
                  for i, (r, a) in enumerate(zip(records, answers)) if a is not None], bounds=(1.0, 7.0))


def cloze_examples(tokenizer, items: list[dict], seq_len: int) -> tuple[TokenExamples, np.ndarray]:
  """One row per (item, choice): BOS + context + choice, the loss mask on the choice's tokens only.

  Returns the examples and each row's item index; items longer than seq_len are an error (the
  world's cloze contexts are one short sentence).
  """
  ctx = tokenizer.encode_batch([it["context"] for it in items])
  choices = tokenizer.encode_batch([c for it in items for c in it["choices"]])
  rows, owner, pos = [], [], 0
  for i, it in enumerate(items):
    for _ in it["choices"]:
      rows.append(([tokenizer.bos_id, *ctx[i]], choices[pos]))
      owner.append(i)
      pos += 1
  L = seq_len + 1
  toks = np.full((len(rows), L), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(rows), L), bool)
  for r, (c, a) in enumerate(rows):
    if len(c) + len(a) > L:
      raise ValueError(f"cloze item {items[owner[r]].get('id', owner[r])}: {len(c) + len(a)} tokens, more than "
                       f"seq_len + 1 = {L}")
    toks[r, :len(c) + len(a)] = c + a
    mask[r, len(c):len(c) + len(a)] = True
  return TokenExamples(toks, mask), np.asarray(owner)


def sequence_nll(params, model_cfg: ModelConfig, examples: TokenExamples, batch_size: int) -> tuple:
  """Per-row summed NLL over the masked targets and the count of those targets ([N], [N])."""
  score = _nll_fn(model_cfg)
  n = len(examples)
  idx = np.concatenate([np.arange(n), np.zeros(-n % batch_size, np.int64)])   # static shape: pad with row 0
  nll, count = [], []
  for s in range(0, len(idx), batch_size):
    b = examples.batch(idx[s:s + batch_size])
    a, c = score(params, b["inputs"], b["targets"], b["mask"])
    nll.append(distributed.to_host(a))
    count.append(distributed.to_host(c))
  return np.concatenate(nll)[:n], np.concatenate(count)[:n]


@functools.lru_cache(maxsize=8)
def _nll_fn(model_cfg: ModelConfig):
  model = Decoder(model_cfg)

  @jax.jit
  def score(params, inputs, targets, mask):
    logits, _ = model.apply({"params": params}, inputs)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
    return -(lp * mask).sum(-1), mask.sum(-1)

  return score


def cloze_accuracy(params, model_cfg: ModelConfig, tokenizer, items: list[dict], *, seq_len: int,
                   batch_size: int) -> float:
  """Multiple choice by log-likelihood: the choice whose tokens the model finds most likely (summed)."""
  ex, owner = cloze_examples(tokenizer, items, seq_len)
  nll, _ = sequence_nll(params, model_cfg, ex, batch_size)
  hits = 0
  for i, it in enumerate(items):
    rows = np.where(owner == i)[0]
    hits += int(np.argmin(nll[rows])) == it["answer"]
  return hits / len(items)


def heldout_lm_loss(params, model_cfg: ModelConfig, examples: TokenExamples, batch_size: int) -> float:
  """Mean per-token NLL on held-out pretraining text (the alignment tax's 'public NLP' analog)."""
  nll, count = sequence_nll(params, model_cfg, examples, batch_size)
  return float(nll.sum() / max(count.sum(), 1))
