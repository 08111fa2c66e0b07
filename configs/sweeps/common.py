"""Shared pieces of the ablation sweeps: the base preset by argument, and the headline metrics."""

import ml_collections

FULL = "world,pretrain,sft,rm,ppo,ppo_noptx,eval"
PPO_PTX = "world,pretrain,sft,rm,ppo,eval"     # PPO-ptx only (its eval has no PPO row)
RM_ONLY = "world,pretrain,sft,rm,eval"

# label -> path into the eval report (workdir/eval_dev/report.json: sweeps choose settings, so they read the
# dev split judged by the dev group; the test split is for the final configuration only)
PPO_METRICS = {
    "PPO-ptx win rate vs SFT": "results/PPO-ptx/win_rate_vs_sft/mean",
    "PPO win rate vs SFT": "results/PPO/win_rate_vs_sft/mean",
    "PPO-ptx gold score": "results/PPO-ptx/gold/gold_score",
    "PPO-ptx held-out LM loss": "results/PPO-ptx/heldout_lm_loss",
    "PPO held-out LM loss": "results/PPO/heldout_lm_loss",
    "PPO-ptx cloze accuracy": "results/PPO-ptx/cloze_accuracy",
    "PPO cloze accuracy": "results/PPO/cloze_accuracy",
}
# Over-optimisation (Gao et al. 2022; paper 4.1 on beta): the RM's score of PPO-ptx's own training rollouts
# against the gold judge's score of the same rollouts, each the mean of the last 10 iterations' batches.
PPO_PTX_METRICS = {
    "PPO-ptx win rate vs SFT": "results/PPO-ptx/win_rate_vs_sft/mean",
    "PPO-ptx gold score": "results/PPO-ptx/gold/gold_score",
    "PPO-ptx held-out LM loss": "results/PPO-ptx/heldout_lm_loss",
    "PPO-ptx cloze accuracy": "results/PPO-ptx/cloze_accuracy",
    "PPO-ptx rollout RM score (last 10)": "ppo_curves/PPO-ptx/rm_score/last10",
    "PPO-ptx rollout gold score (last 10)": "ppo_curves/PPO-ptx/gold_score/last10",
    "PPO-ptx KL to SFT (last 10)": "ppo_curves/PPO-ptx/kl/last10",
}
RM_METRICS = {
    "RM accuracy (training groups)": "rm/accuracy_train_groups",
    "RM accuracy (held-out group)": "rm/accuracy_heldout_group",
}


def sweep(arg, stages: str, members: list, metrics: dict, seeds=(0, 1, 2), round1="base") -> ml_collections.ConfigDict:
  """arg: the base preset with its options (default "tiny"; "tiny,round2" for two rounds of comparisons, whose
  round one is then the base preset's for every member unless round1="member", tools/sweep.py)."""
  preset = arg or "tiny"
  s = ml_collections.ConfigDict()
  s.base = f"configs/instructgpt.py:{preset}"
  s.stages = stages
  s.seeds = tuple(seeds) if not preset.startswith("smoke") else (0,)   # the paper's headline comparisons use >= 3 seeds
  s.members = [dict(name=n, overrides=o) for n, o in members]
  s.round1 = round1
  s.eval_split = "dev"           # members are judged on the dev split by the dev group (tools/sweep.py)
  s.metrics = metrics
  return s
