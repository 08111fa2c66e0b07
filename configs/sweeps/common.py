"""Shared pieces of the ablation sweeps: the base preset by argument, and the headline metrics."""

import ml_collections

FULL = "world,pretrain,sft,rm,ppo,ppo_noptx,eval"
RM_ONLY = "world,pretrain,sft,rm,eval"

# label -> path into the eval report (workdir/eval_dev/report.json: sweeps choose settings, so they read the
# dev split judged by the dev group; the test split is for the final configuration only)
PPO_METRICS = {
    "PPO-ptx win rate vs SFT": "results/PPO-ptx/win_rate_vs_sft/mean",
    "PPO win rate vs SFT": "results/PPO/win_rate_vs_sft/mean",
    "PPO-ptx gold score": "results/PPO-ptx/gold/gold_score",
    "PPO-ptx held-out LM loss": "results/PPO-ptx/heldout_lm_loss",
    "PPO held-out LM loss": "results/PPO/heldout_lm_loss",
}
RM_METRICS = {
    "RM accuracy (training groups)": "rm/accuracy_train_groups",
    "RM accuracy (held-out group)": "rm/accuracy_heldout_group",
}


def sweep(arg, stages: str, members: list, metrics: dict, seeds=(0, 1, 2)) -> ml_collections.ConfigDict:
  preset = arg or "tiny"
  s = ml_collections.ConfigDict()
  s.base = f"configs/instructgpt.py:{preset}"
  s.stages = stages
  s.seeds = tuple(seeds) if preset != "smoke" else (0,)   # the paper's headline comparisons use >= 3 seeds
  s.members = [dict(name=n, overrides=o) for n, o in members]
  s.eval_split = "dev"           # members are judged on the dev split by the dev group (tools/sweep.py)
  s.metrics = metrics
  return s
