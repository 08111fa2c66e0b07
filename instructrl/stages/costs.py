"""The unit each stage's `cost(config)` is counted in, for the pipeline's ETA (progress.py).

A cost comes from the config alone, in "token passes": one token through the model forward once.
The stages share one model shape, so the unit is the same for all of them:
- a training token costs TRAIN_COST = 3 (forward + backward);
- a sampled token costs SAMPLE_COST: decoding is one small forward per new token, latency-bound at
  these batch sizes, but the sampler stops once every row has ended and tiny's answers are short.
  6 is calibrated on a whole tiny run (seed 0: pretrain 1,670 s, sft 366, rm 876, ppo 491,
  ppo_noptx 325, eval 96; shares 44/10/23/13/9/3%, estimated 39/9/19/18/12/4% with this value and
  22/6/28/19/16/11% with 40). PPO is still overestimated by ~1.4x. On an accelerator decoding is
  relatively dearer or cheaper; the ETA's *rate* adapts to the machine, the stages' relative weights
  do not;
- compilation is not modelled: on the smoke preset it is most of the time, so early ETAs there are
  far off (README, "One command");
- the world stage (seconds) and small evaluation passes inside training are not counted.

A stage's cost is a triple (before its training loop, the loop, after the loop), so that a resumed
stage counts only the part after its checkpoint.
"""

from __future__ import annotations

TRAIN_COST = 3.0     # token passes per trained token
SAMPLE_COST = 6.0    # token passes per sampled token (see above)


def gold_eval(config, runs: int) -> float:
  """The end-of-stage judged samples of pretrain/sft/ppo (eval.n_prompts prompts, `runs` decodings)."""
  e = config.eval
  return runs * e.n_prompts * e.max_new_tokens * SAMPLE_COST if e.n_prompts else 0.0
