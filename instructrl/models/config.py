"""The model config: one frozen dataclass for GPT-2/GPT-3 style and LLaMA style decoders.

Built from the `config.model` ConfigDict (see configs/instructgpt.py) so a checkpoint can
store it as JSON and a later stage can compare field by field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

STYLES = ("gpt", "llama")
ATTENTION = ("einsum", "dot_product")
# What each block keeps for the backward pass ("" follows `remat`: "block_inputs" if set, else "none").
REMAT_POLICIES = ("none", "block_inputs", "nothing_saveable", "dots_saveable")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  style: str = "gpt"            # "gpt": learned positions, LayerNorm, GELU, tied; "llama": RoPE, RMSNorm, SwiGLU
  vocab_size: int = 1024
  max_len: int = 128            # context length (learned position table size for "gpt")
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4           # < n_heads: grouped-query attention
  head_dim: int = 32
  d_ff: int = 512
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  embed_dropout: float = 0.0
  attn_dropout: float = 0.0
  resid_dropout: float = 0.0    # the paper's SFT uses 0.2 (appendix C.1)
  dtype: str = "float32"        # compute dtype: float32 on CPU, bfloat16 on accelerators
  param_dtype: str = "float32"  # master weights stay float32 (paper: fp32 master weights)
  remat: bool = False           # recompute each block in the backward pass (large presets)
  remat_policy: str = ""        # one of REMAT_POLICIES, or "" to follow `remat` (see `block_remat`)
  # The layers as one nn.scan over a Block with stacked [n_layers, ...] weights: compile time independent of
  # depth. Changes the params' tree layout (models/layout.py converts), not their meaning.
  scan_layers: bool = False
  # "einsum": attention written out (default); "dot_product": jax.nn.dot_product_attention, which runs
  # cuDNN's fused (flash) kernel on GPU where it applies and the same XLA math elsewhere. No param change.
  attention: str = "einsum"

  def __post_init__(self):
    def bad(field, expected):
      raise ValueError(f"model.{field}={getattr(self, field)!r}: expected {expected}")
    if self.style not in STYLES:
      bad("style", f"one of {STYLES}")
    for f in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
        bad(f, "a positive integer")
    if self.n_heads % self.n_kv_heads:
      bad("n_kv_heads", f"a divisor of n_heads={self.n_heads}")
    if self.style == "llama" and self.head_dim % 2:
      bad("head_dim", "an even number (RoPE rotates pairs)")
    for f in ("embed_dropout", "attn_dropout", "resid_dropout"):
      if not 0.0 <= getattr(self, f) < 1.0:
        bad(f, "a probability in [0, 1)")
    if self.remat_policy not in ("",) + REMAT_POLICIES:
      bad("remat_policy", f"'' (follow model.remat) or one of {REMAT_POLICIES}")
    if not isinstance(self.scan_layers, bool):
      bad("scan_layers", "a bool")
    if self.attention not in ATTENTION:
      bad("attention", f"one of {ATTENTION}")
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in _DTYPES:
        bad(f, f"one of {tuple(_DTYPES)}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"model config: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def block_remat(self) -> str:
    """The remat policy in force: `remat_policy`, or what the older `remat` flag meant."""
    return self.remat_policy or ("block_inputs" if self.remat else "none")

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  def num_params(self, include_embeddings: bool = True) -> int:
    """Closed-form parameter count (used for 6*N*T FLOPs and checked against the real tree)."""
    d, h = self.d_model, self.head_dim
    attn = d * h * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * h * d
    if self.style == "gpt":
      attn += h * (self.n_heads + 2 * self.n_kv_heads) + d   # q/k/v/o biases
      mlp = 2 * d * self.d_ff + self.d_ff + d
      norms = 2 * 2 * d
    else:
      mlp = 3 * d * self.d_ff
      norms = 2 * d
    n = self.n_layers * (attn + mlp + norms)
    n += 2 * d if self.style == "gpt" else d                 # final norm
    emb = self.vocab_size * d
    if self.style == "gpt":
      emb += self.max_len * d
    if not self.tie_embeddings:
      emb += d * self.vocab_size
    return n + (emb if include_embeddings else 0)


def mismatched_fields(a: Mapping[str, Any], b: Mapping[str, Any],
                      ignore: tuple[str, ...] = ("embed_dropout", "attn_dropout", "resid_dropout",
                                                 "dtype", "remat", "remat_policy", "attention",
                                                 "scan_layers")) -> list[str]:
  """Fields that change the parameters' meaning (dropout/dtype/remat/attention may differ by stage; a checkpoint
  of the other `scan_layers` layout is converted when it is restored)."""
  keys = sorted((set(a) | set(b)) - set(ignore))
  return [k for k in keys if a.get(k) != b.get(k)]
