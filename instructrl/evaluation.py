"""Evaluation with the task world's gold judge: sample answers to held-out prompts and score them.

Used at the end of pretrain (does GPT follow a bare instruction? with a few-shot prefix?) and
SFT (does it now?), and later by the eval stage (win rates, alignment tax).
"""

from __future__ import annotations

import numpy as np
import jax

from instructrl.data.batching import left_pad_prompts
from instructrl.models.config import ModelConfig
from instructrl.models.sampling import sample


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
    tokens = np.asarray(s.tokens)
    for row in range(n):
      out[int(keep[start + row])] = tokenizer.decode(tokens[row])
  return out


def gold_eval(params, model_cfg: ModelConfig, tokenizer, world, records: list[dict], *, rng, eval_cfg,
              prefix: str = "", stop_at_newline: bool = False, temperature: float | None = None) -> dict:
  """Mean gold score, acceptable and correct rates of the policy's answers to `records`.

  prefix: text put before each formatted prompt (a few-shot prefix for prompted GPT);
  stop_at_newline: cut the answer at its first newline (the few-shot Q/A format ends answers so).
  """
  prompts = [prefix + (f"Q: {r['prompt']}\nA:" if prefix else world.format_prompt(r["prompt"])) for r in records]
  answers = generate(params, model_cfg, tokenizer, prompts, rng=rng, batch_size=eval_cfg.batch_size,
                     prompt_len=eval_cfg.prompt_len + (eval_cfg.prefix_len if prefix else 0),
                     max_new_tokens=eval_cfg.max_new_tokens,
                     temperature=eval_cfg.temperature if temperature is None else temperature)
  scores, acceptable, correct, skipped = [], [], [], 0
  for rec, ans in zip(records, answers):
    if ans is None:
      skipped += 1
      continue
    if stop_at_newline:
      ans = ans.strip().split("\n")[0].strip()
    v = world.judge(rec, ans)
    scores.append(v.score)
    acceptable.append(v.acceptable)
    correct.append(v.correct)
  if not scores:
    raise ValueError("gold_eval: every prompt was longer than eval.prompt_len")
  return {"gold_score": float(np.mean(scores)), "acceptable_rate": float(np.mean(acceptable)),
          "correct_rate": float(np.mean(correct)), "n": len(scores), "skipped_too_long": skipped,
          "examples": [{"prompt": r["prompt"], "answer": a} for r, a in list(zip(records, answers))[:3]]}
