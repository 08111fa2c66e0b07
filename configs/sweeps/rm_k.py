"""K, the number of responses a labeler ranks per prompt (paper 3.5: K = 4..9). K = 2 is plain
pairwise data; more K gives C(K,2) comparisons for K forward passes."""

from configs.sweeps import common


def get_sweep(arg=None):
  members = [("K2", {"rm.k_choices": (2,)}), ("K4", {"rm.k_choices": (4,)}), ("K9", {"rm.k_choices": (9,)}),
             ("K4-9", {"rm.k_choices": (4, 5, 6, 7, 8, 9)})]
  return common.sweep(arg, common.RM_ONLY, members, common.RM_METRICS, round1="member")
