"""Model size (the paper: 1.3B, 6B, 175B policies). Widths and depths around the preset's model;
every stage is recomputed per member (nothing upstream is shared but the world)."""

from configs.sweeps import common


def get_sweep(arg=None):
  preset = arg or "tiny"
  base = {"smoke": (2, 64), "tiny": (3, 128)}.get(preset, (3, 128))
  sizes = [(base[0] - 1, base[1] // 2), base, (base[0] + 1, base[1] * 3 // 2)]
  members = [(f"L{l}-D{d}", {"model.n_layers": l, "model.d_model": d, "model.d_ff": 4 * d,
                             "model.head_dim": d // 4}) for l, d in sizes]
  return common.sweep(arg, common.FULL, members, {**common.PPO_METRICS, **common.RM_METRICS},
                      round1="member")
