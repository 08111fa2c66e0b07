"""KL reward coefficient beta (paper C.4: 0.02). `python -m instructrl.sweep --sweep=configs/sweeps/kl_coef.py`."""

from configs.sweeps import common


def get_sweep(arg=None):
  members = [(f"beta{b:g}", {"ppo.kl_coef": b}) for b in (0.0, 0.01, 0.02, 0.05, 0.1)]
  return common.sweep(arg, common.FULL, members, common.PPO_METRICS)
