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
GLU_ACTIVATIONS = ("silu", "gelu_tanh")   # SwiGLU (LLaMA, Mistral, Qwen2); GeGLU with tanh GELU (Gemma)
ROPE_SCALINGS = ("", "llama3")
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
  # Fields added for further LLaMA-style families (Qwen2, Gemma, LLaMA 3.1, Mistral). Their defaults are the
  # plain LLaMA model, and `to_dict` leaves a field out while it has its default, so configs and recorded
  # checkpoint meta from before these fields read and compare exactly as they did.
  qkv_bias: bool = False        # "llama": biases on the q/k/v projections (Qwen2); "gpt" always has them
  embed_scale: bool = False     # "llama": embeddings times sqrt(d_model), rounded to the compute dtype (Gemma)
  glu_activation: str = "silu"  # "llama": the gated MLP's activation, "silu" or "gelu_tanh" (Gemma's GeGLU)
  sliding_window: int = 0       # > 0: a query sees only the last `sliding_window` slots, itself included (Mistral)
  rope_scaling: str = ""        # "llama3": LLaMA 3.1's frequency-dependent RoPE scaling, with the four below
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 0
  # Gemma 2 (with embed_scale, glu_activation="gelu_tanh"): tanh soft-capping c * tanh(x / c) of the attention
  # scores and of the LM logits (0: none), the attention scale query_pre_attn_scalar ** -0.5 (0: head_dim),
  # and an RMSNorm on the attention and MLP outputs before each residual add.
  attn_softcap: float = 0.0
  final_softcap: float = 0.0
  query_pre_attn_scalar: float = 0.0
  post_norms: bool = False

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
    if self.glu_activation not in GLU_ACTIVATIONS:
      bad("glu_activation", f"one of {GLU_ACTIVATIONS}")
    if self.style == "gpt":   # GPT-2's block is fixed: these would be silently ignored
      for f in ("qkv_bias", "embed_scale", "glu_activation", "rope_scaling", "post_norms"):
        if getattr(self, f) != LATER_DEFAULTS[f]:
          bad(f, f"{LATER_DEFAULTS[f]!r} for style 'gpt' (it applies to style 'llama' only)")
    if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
      bad("sliding_window", "a non-negative integer (0: no window)")
    for f in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
      if not getattr(self, f) >= 0:
        bad(f, "a number >= 0 (0: off)")
    if self.query_pre_attn_scalar != int(self.query_pre_attn_scalar):
      bad("query_pre_attn_scalar", "a whole number (transformers stores an int)")
    if self.rope_scaling not in ROPE_SCALINGS:
      bad("rope_scaling", f"one of {ROPE_SCALINGS}")
    if self.rope_scaling == "llama3":
      if not self.rope_factor >= 1.0:
        bad("rope_factor", "a factor >= 1")
      if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
        bad("rope_high_freq_factor", f"greater than rope_low_freq_factor={self.rope_low_freq_factor} > 0")
      if not isinstance(self.rope_original_max_len, int) or self.rope_original_max_len <= 0:
        bad("rope_original_max_len", "a positive integer (the context length before scaling)")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"model config: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    return {k: v for k, v in d.items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}

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
      attn += h * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0
      mlp = 3 * d * self.d_ff
      norms = (4 if self.post_norms else 2) * d
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
  of the other `scan_layers` layout is converted when it is restored).

  A field added later and absent from one side (an older checkpoint's meta) counts as its default.
  """
  keys = sorted((set(a) | set(b)) - set(ignore))
  get = lambda d, k: d.get(k, LATER_DEFAULTS.get(k))
  return [k for k in keys if get(a, k) != get(b, k)]


LATER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                   if f.name in ("scan_layers", "remat_policy", "qkv_bias", "embed_scale", "glu_activation", "sliding_window", "rope_scaling",
                                 "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                                 "rope_original_max_len", "attn_softcap", "final_softcap",
                                 "query_pre_attn_scalar", "post_norms")}
