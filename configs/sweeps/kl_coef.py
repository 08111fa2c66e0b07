"""KL reward coefficient beta (paper C.4: 0.02). `python -m instructrl.tools.sweep --sweep=configs/sweeps/kl_coef.py`.

PPO-ptx only (beta is the same penalty with or without the pretraining term; the gamma sweep has the PPO
row). Its metrics include the RM's and the gold judge's scores of the policy's own rollouts: a beta too
small lets the policy climb the RM while gold falls (over-optimisation)."""

from configs.sweeps import common


def get_sweep(arg=None):
  # 0.02 is the paper's; tiny's RM is easier to exploit and its best beta is higher (tiny default 0.2: docs/results.md)
  members = [(f"beta{b:g}", {"ppo.kl_coef": b}) for b in (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)]
  return common.sweep(arg, common.PPO_PTX, members, common.PPO_PTX_METRICS)
