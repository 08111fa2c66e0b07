"""Pretraining-mix coefficient gamma (paper C.4: 27.8 at 175B; the tiny preset uses 1). The
`ppo_noptx` stage of every member is the gamma = 0 reference, shared between members."""

from configs.sweeps import common


def get_sweep(arg=None):
  members = [(f"gamma{g:g}", {"ppo.ptx_coef": g}) for g in (0.3, 1.0, 3.0, 10.0)]
  return common.sweep(arg, common.FULL, members, common.PPO_METRICS)
