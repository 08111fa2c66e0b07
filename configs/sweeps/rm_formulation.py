"""The paper's claim (3.5): shuffling the C(K,2) comparisons into one dataset overfits; one batch
element per prompt does not. Per-prompt vs shuffled pairs, at one and two epochs."""

from configs.sweeps import common


def get_sweep(arg=None):
  # Packed batches (rm.packing, on in smoke and tiny) hold whole prompts: the pairs members train unpacked.
  members = [(f"{form}-{e}ep", {"rm.formulation": form, "rm.epochs": float(e),
                                **({"rm.packing": False} if form == "shuffled_pairs" else {})})
             for form in ("per_prompt", "shuffled_pairs") for e in (1, 2)]
  return common.sweep(arg, common.RM_ONLY, members, common.RM_METRICS, round1="member")
