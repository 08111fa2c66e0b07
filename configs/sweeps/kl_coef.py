"""KL reward coefficient beta (paper C.4: 0.02). `python -m instructrl.tools.sweep --sweep=configs/sweeps/kl_coef.py`."""

from configs.sweeps import common


def get_sweep(arg=None):
  # 0.02 is the paper's; tiny's RM is easier to exploit and its best beta is higher (tiny default 0.2: docs/results.md)
  members = [(f"beta{b:g}", {"ppo.kl_coef": b}) for b in (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)]
  return common.sweep(arg, common.FULL, members, common.PPO_METRICS)
