"""Hugging Face checkpoints <-> instructrl params: GPT-2 and LLaMA-family (LLaMA incl. 3.1 RoPE scaling,
Mistral incl. sliding window, Qwen2, Gemma, Gemma 2) safetensors, both ways; RMs out as *ForSequenceClassification.

Reads what `transformers`' `save_pretrained` writes (config.json plus model.safetensors, or
model-0000k-of-0000n.safetensors shards listed in model.safetensors.index.json) with the
`safetensors` package alone: no torch, no transformers at run time.

Layouts (HF name -> instructrl path, shapes with D d_model, N/K heads, H head_dim, F d_ff):
  GPT-2 (Conv1D weights are [in, out]):
    wte [V, D] -> embed;  wpe [P, D] -> pos_embed;  ln_1/ln_2/ln_f -> norm_attn/norm_mlp/norm_final
    attn.c_attn [D, 3D] -> wq, wk, wv [D, N, H] (+ biases);  attn.c_proj [D, D] -> wo [N, H, D]
    mlp.c_fc [D, F] -> w_in;  mlp.c_proj [F, D] -> w_out
  LLaMA (nn.Linear weights are [out, in], so every matrix is transposed):
    embed_tokens -> embed;  q/k/v/o_proj -> wq/wk/wv/wo;  gate/up/down_proj -> w_gate/w_in/w_out
    input_layernorm/post_attention_layernorm/norm -> norm_attn/norm_mlp/norm_final;  lm_head -> unembed
    Qwen2: q/k/v_proj.bias -> bq/bk/bv.  Gemma: a norm weight w (its scale is 1 + w) -> scale = 1 + w.
    Gemma 2: input/post_attention/pre_feedforward/post_feedforward_layernorm -> norm_attn, attn.norm_post,
    norm_mlp, mlp.norm_post.
  RM export (head "scalar"): score [D] -> score.weight [1, D]; score_bias: see `fold_score_bias`.
HF's LLaMA stores q/k in the rotate-half RoPE layout, which is the one `transformer.rope` uses,
so no permutation is needed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from instructrl.models.config import LATER_DEFAULTS, ModelConfig

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
GPT2_TYPES = ("gpt2",)
LLAMA_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2")
# Buffers that older transformers versions saved next to GPT-2 weights: not parameters.
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


class ConvertError(ValueError):
  """A checkpoint that cannot be converted: the message names the file and what was expected."""


# ----------------------------------------------------------------------------- config

def _rope(hf: Mapping[str, Any], where: str) -> dict:
  """ModelConfig's RoPE fields from either spelling (transformers < 5: `rope_theta` + `rope_scaling`; >= 5:
  `rope_parameters`): plain RoPE and LLaMA 3.1's "llama3" scaling; any other rope_type is refused."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  out = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
  for p in (params, scaling):
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "llama3":
      try:
        out.update(rope_scaling="llama3", rope_factor=float(p["factor"]),
                   rope_low_freq_factor=float(p["low_freq_factor"]),
                   rope_high_freq_factor=float(p["high_freq_factor"]),
                   rope_original_max_len=int(p["original_max_position_embeddings"]))
      except KeyError as e:
        raise ConvertError(f"{where}: rope_type 'llama3' without {e.args[0]!r}") from None
    elif kind != "default":
      raise ConvertError(f"{where}: rope_type {kind!r} is not supported (plain RoPE 'default', or 'llama3')")
  return out


def _llama_family(hf: Mapping[str, Any], kind: str, where: str) -> ModelConfig:
  """LLaMA, Mistral, Qwen2, Gemma and Gemma 2: one block with per-family switches, refusing what it cannot be."""
  def refuse(field, why):
    raise ConvertError(f"{where}: {field}={hf.get(field)!r} is not supported for model_type {kind!r} ({why})")
  act = hf.get("hidden_act", "silu")
  if kind == "gemma2":
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if kind in ("gemma", "gemma2"):
    # transformers reads Gemma's legacy "gelu" as the tanh approximation, the one its weights were trained with.
    if act not in ("gelu", "gelu_pytorch_tanh"):
      refuse("hidden_activation" if kind == "gemma2" else "hidden_act",
             "Gemma's GeGLU uses the tanh GELU, 'gelu_pytorch_tanh'")
    if kind == "gemma" and hf.get("hidden_activation") not in (None, "gelu_pytorch_tanh"):
      refuse("hidden_activation", "Gemma's GeGLU uses the tanh GELU, 'gelu_pytorch_tanh'")
    glu = "gelu_tanh"
  else:
    if act != "silu":
      refuse("hidden_act", "only 'silu' (SwiGLU)")
    glu = "silu"
  if hf.get("mlp_bias"):
    refuse("mlp_bias", "the gated MLP has no biases")
  if hf.get("use_bidirectional_attention"):
    refuse("use_bidirectional_attention", "the Decoder is causal")
  if hf.get("attention_bias"):
    refuse("attention_bias", "an o_proj bias has no counterpart; q/k/v biases alone are model_type 'qwen2'")
  window = 0
  if kind == "mistral":
    window = int(hf.get("sliding_window") or 0)
  elif kind == "qwen2":
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
      refuse("use_sliding_window", "Qwen2's per-layer sliding window; only full attention in every layer")
  elif kind != "gemma2" and hf.get("sliding_window"):
    refuse("sliding_window", "this family has no sliding window")
  d, n = hf["hidden_size"], hf["num_attention_heads"]
  gemma = kind in ("gemma", "gemma2")
  tied = bool(hf.get("tie_word_embeddings", gemma))
  max_len = hf["max_position_embeddings"]
  extra = {}
  if kind == "gemma2":
    max_len = _gemma2_window(hf, max_len)
    extra = dict(post_norms=True, attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
                 final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
                 query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)))   # transformers' default
  return ModelConfig(style="llama", vocab_size=hf["vocab_size"], max_len=max_len,
                     d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n,
                     n_kv_heads=hf.get("num_key_value_heads") or n, head_dim=hf.get("head_dim") or d // n,
                     d_ff=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                     tie_embeddings=tied, qkv_bias=kind == "qwen2", embed_scale=gemma,
                     glu_activation=glu, sliding_window=window, **extra, **_rope(hf, where))


def _gemma2_window(hf: Mapping[str, Any], max_len: int) -> int:
  """Gemma 2's context as imported: up to its sliding window.

  Its sliding layers (every other one) see the last `sliding_window` slots, its full layers all of them.
  The Decoder's layers share one block, so instead of a per-layer mask the context is capped at the
  window, within which the window never binds and both layer kinds compute full causal attention,
  exactly as transformers does (released Gemma 2: 4096 of 8192 positions).
  """
  types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                    for i in range(hf["num_hidden_layers"])]
  window = hf.get("sliding_window")
  if window and "sliding_attention" in types:
    return min(max_len, int(window))
  return max_len


def config_from_hf(hf: Mapping[str, Any], where: str = CONFIG) -> ModelConfig:
  """A transformers config.json (as a dict) -> ModelConfig, refusing what the Decoder cannot represent."""
  kind = hf.get("model_type")
  if kind in GPT2_TYPES:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise ConvertError(f"{where}: activation_function {act!r}: only the tanh GELU ('gelu_new') is supported")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
      if hf.get(flag):
        raise ConvertError(f"{where}: {flag}=true is not supported")
    if hf.get("scale_attn_weights") is False:
      raise ConvertError(f"{where}: scale_attn_weights=false is not supported")
    d, n = hf["n_embd"], hf["n_head"]
    if d % n:
      raise ConvertError(f"{where}: n_embd={d} is not divisible by n_head={n}")
    return ModelConfig(style="gpt", vocab_size=hf["vocab_size"], max_len=hf["n_positions"], d_model=d,
                       n_layers=hf["n_layer"], n_heads=n, n_kv_heads=n, head_dim=d // n,
                       d_ff=hf.get("n_inner") or 4 * d, norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
  if kind in LLAMA_TYPES:
    return _llama_family(hf, kind, where)
  raise ConvertError(f"{where}: model_type {kind!r} is not supported; expected one of "
                     f"{GPT2_TYPES + LLAMA_TYPES}")


_ARCH = {"gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma",
         "gemma2": "Gemma2"}
HEADS = {"lm": "ForCausalLM", "scalar": "ForSequenceClassification"}


_GEMMA = {"embed_scale": True, "glu_activation": "gelu_tanh", "tie_embeddings": True}
# Per transformers family: the ModelConfig fields it fixes to a value, and those it reads freely from its
# config.json; every other later-added field must keep its default there.
_FAMILY_FIXED = {"qwen2": {"qkv_bias": True}, "gemma": _GEMMA, "gemma2": {**_GEMMA, "post_norms": True}}
_FAMILY_FREE = {
    "llama": ("rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"),
    "mistral": ("sliding_window",),
    "gemma2": ("attn_softcap", "final_softcap", "query_pre_attn_scalar"),
}


def hf_family(cfg: ModelConfig) -> str:
  """The transformers model_type that computes exactly what `cfg` does, or a ConvertError naming the field."""
  if cfg.style == "gpt":
    family = "gpt2"
  elif cfg.post_norms or cfg.attn_softcap or cfg.final_softcap or cfg.query_pre_attn_scalar:
    family = "gemma2"
  elif cfg.embed_scale or cfg.glu_activation == "gelu_tanh":
    family = "gemma"
  elif cfg.qkv_bias:
    family = "qwen2"
  elif cfg.sliding_window:
    family = "mistral"
  else:
    family = "llama"
  fixed, free = _FAMILY_FIXED.get(family, {}), _FAMILY_FREE.get(family, ())
  for field in sorted(set(LATER_DEFAULTS) | set(fixed)):
    want = fixed.get(field, LATER_DEFAULTS.get(field))
    if field not in free and getattr(cfg, field) != want:
      raise ConvertError(f"model.{field}={getattr(cfg, field)!r} has no counterpart in transformers' {family!r} "
                         f"models ({want!r} there), the only family with the rest of this config")
  return family


def config_to_hf(cfg: ModelConfig, bos_id: int | None = None, eos_id: int | None = None, *, head: str = "lm",
                 pad_id: int | None = None) -> dict:
  """ModelConfig -> a config.json that transformers' AutoModelForCausalLM (head "lm") or
  AutoModelForSequenceClassification (head "scalar", one label read at the last token that is not pad_id)
  loads."""
  family = hf_family(cfg)
  common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_id,
            "eos_token_id": eos_id, "pad_token_id": pad_id, "dtype": "float32", "model_type": family,
            "architectures": [_ARCH[family] + HEADS[head]]}
  if head == "scalar":
    common.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, num_labels=1)
  if family == "gpt2":
    if cfg.n_kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.d_model:
      raise ConvertError(f"GPT-2 export needs n_kv_heads == n_heads and head_dim * n_heads == d_model; got "
                         f"n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}, "
                         f"d_model={cfg.d_model}")
    return {**common, "n_positions": cfg.max_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling == "llama3":
    rope = {**rope, "rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len}
  out = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
         "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
         "hidden_act": "gelu_pytorch_tanh" if family.startswith("gemma") else "silu",
         "max_position_embeddings": cfg.max_len,
         "rms_norm_eps": cfg.norm_eps,
         # Both spellings, so transformers 4.x and 5.x read the same RoPE.
         "rope_theta": cfg.rope_theta, "rope_parameters": rope,
         "rope_scaling": None if rope["rope_type"] == "default" else rope}
  if family in ("llama", "gemma"):
    out.update(attention_bias=False, **({"mlp_bias": False} if family == "llama" else {}))
  if family == "mistral":
    out["sliding_window"] = cfg.sliding_window
  if family == "qwen2":
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
  if family == "gemma2":
    # The alternate layers' window is max_len: it never binds within the context (see _gemma2_window).
    out.update(hidden_activation="gelu_pytorch_tanh", attention_bias=False, sliding_window=cfg.max_len,
               query_pre_attn_scalar=int(cfg.query_pre_attn_scalar or cfg.head_dim),   # an int in transformers
               attn_logit_softcapping=cfg.attn_softcap or None, final_logit_softcapping=cfg.final_softcap or None)
  return out


# ----------------------------------------------------------------------------- safetensors files

def _read_bf16(path: Path, names: list[str]) -> dict[str, np.ndarray]:
  """BF16 tensors by their header offsets (numpy has no bfloat16 dtype name; ml_dtypes does)."""
  import ml_dtypes  # a jax dependency
  with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
  raw = np.memmap(path, np.uint8, mode="r", offset=8 + n)
  out = {}
  for name in names:
    start, end = header[name]["data_offsets"]
    out[name] = np.frombuffer(raw[start:end].tobytes(), ml_dtypes.bfloat16).reshape(header[name]["shape"])
  return out


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays; a corrupt or truncated file is a ConvertError."""
  from safetensors import SafetensorError, safe_open
  path = Path(path)
  if not path.is_file():
    raise ConvertError(f"{path}: no such file")
  try:
    with safe_open(str(path), framework="numpy") as f:
      meta = f.metadata() or {}
      if meta.get("format") not in (None, "pt", "np", "flax", "numpy", "tf", "mlx"):
        raise ConvertError(f"{path}: unknown tensor format {meta.get('format')!r} in the metadata")
      names = list(f.keys())
      bf16 = [k for k in names if f.get_slice(k).get_dtype() == "BF16"]
      out = {k: f.get_tensor(k) for k in names if k not in bf16}
    out.update(_read_bf16(path, bf16) if bf16 else {})
    return out
  except SafetensorError as e:
    raise ConvertError(f"{path}: not a valid safetensors file ({e}); the file is corrupt or truncated, "
                       f"re-download or re-export it") from None


def read_checkpoint(directory: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, {tensor name: array}) from a save_pretrained directory, sharded or not."""
  d = Path(directory)
  if not (d / CONFIG).is_file():
    raise ConvertError(f"{d}: no {CONFIG}; expected a directory written by transformers' save_pretrained")
  try:
    hf = json.loads((d / CONFIG).read_text())
  except json.JSONDecodeError as e:
    raise ConvertError(f"{d / CONFIG}:{e.lineno}: invalid JSON ({e.msg})") from None
  if (d / INDEX).is_file():
    try:
      weight_map = json.loads((d / INDEX).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ConvertError(f"{d / INDEX}: not a safetensors index (expected {{'weight_map': {{name: file}}}}): "
                         f"{e}") from None
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      got = read_safetensors(d / shard)
      tensors.update({k: v for k, v in got.items() if weight_map.get(k) == shard})
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise ConvertError(f"{d / INDEX}: {len(missing)} tensor(s) listed but not in their shard, e.g. {missing[:3]}")
  elif (d / SINGLE).is_file():
    tensors = read_safetensors(d / SINGLE)
  else:
    raise ConvertError(f"{d}: neither {SINGLE} nor {INDEX} (only safetensors checkpoints are read; "
                       f"convert .bin files with transformers first)")
  return hf, tensors


def write_checkpoint(directory: str | Path, hf_config: dict, tensors: Mapping[str, np.ndarray],
                     max_shard_bytes: int = 5 << 30) -> None:
  """config.json + model.safetensors, or shards + index when larger than max_shard_bytes (as HF does)."""
  from safetensors.numpy import save_file
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  (d / CONFIG).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  shards, cur, size = [], {}, 0
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if cur and size + a.nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[name], size = a, size + a.nbytes
  shards.append(cur)
  for stale in (d / SINGLE, d / INDEX, *d.glob("model-*-of-*.safetensors")):
    stale.unlink(missing_ok=True)
  if len(shards) == 1:
    save_file(shards[0], str(d / SINGLE), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards, 1):
    name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(d / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
  total = sum(a.nbytes for a in tensors.values())
  (d / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


# ----------------------------------------------------------------------------- name/layout mapping

def _strip(tensors: Mapping[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Drop the model-class prefix ("transformer." / "model.") so bare and LM-head checkpoints read alike."""
  out = {}
  for k, v in tensors.items():
    for p in prefixes:
      if k.startswith(p):
        k = k[len(p):]
        break
    out[k] = v
  return out


class _Taker:
  """Pops tensors by name, checking shapes; what is left over at the end is an error, not ignored."""

  def __init__(self, tensors: dict[str, np.ndarray], where: str):
    self.t, self.where = dict(tensors), where

  def __call__(self, name: str, shape: tuple) -> np.ndarray:
    if name not in self.t:
      raise ConvertError(f"{self.where}: missing tensor {name!r} (shape {shape} expected)")
    a = self.t.pop(name)
    if tuple(a.shape) != tuple(shape):
      raise ConvertError(f"{self.where}: tensor {name!r} has shape {tuple(a.shape)}, expected {tuple(shape)} "
                         f"from config.json")
    return np.asarray(a, np.float32)

  def finish(self, ignore: tuple[str, ...] = ()):
    left = sorted(k for k in self.t if not k.endswith(ignore))
    if left:
      raise ConvertError(f"{self.where}: {len(left)} unexpected tensor(s), e.g. {left[:4]}; the checkpoint does "
                         f"not match its config.json")


def _gpt2_to_params(cfg: ModelConfig, t: _Taker) -> dict:
  D, N, H, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
  norm = lambda name: {"scale": t(f"{name}.weight", (D,)), "bias": t(f"{name}.bias", (D,))}
  p = {"embed": t("wte.weight", (cfg.vocab_size, D)), "pos_embed": t("wpe.weight", (cfg.max_len, D)),
       "norm_final": norm("ln_f")}
  for i in range(cfg.n_layers):
    h = f"h.{i}"
    qkv_w = t(f"{h}.attn.c_attn.weight", (D, 3 * D))
    qkv_b = t(f"{h}.attn.c_attn.bias", (3 * D,))
    wq, wk, wv = (w.reshape(D, N, H) for w in np.split(qkv_w, 3, axis=1))
    bq, bk, bv = (b.reshape(N, H) for b in np.split(qkv_b, 3))
    p[f"layer_{i}"] = {
        "norm_attn": norm(f"{h}.ln_1"), "norm_mlp": norm(f"{h}.ln_2"),
        "attn": {"wq": wq, "wk": wk, "wv": wv, "bq": bq, "bk": bk, "bv": bv,
                 "wo": t(f"{h}.attn.c_proj.weight", (D, D)).reshape(N, H, D), "bo": t(f"{h}.attn.c_proj.bias", (D,))},
        "mlp": {"w_in": t(f"{h}.mlp.c_fc.weight", (D, F)), "b_in": t(f"{h}.mlp.c_fc.bias", (F,)),
                "w_out": t(f"{h}.mlp.c_proj.weight", (F, D)), "b_out": t(f"{h}.mlp.c_proj.bias", (D,))}}
  if not cfg.tie_embeddings:
    p["unembed"] = t("lm_head.weight", (cfg.vocab_size, D)).T
  elif "lm_head.weight" in t.t:   # a tied checkpoint that stored the head anyway must agree with wte
    head = t("lm_head.weight", (cfg.vocab_size, D))
    if not np.array_equal(head, p["embed"]):
      raise ConvertError(f"{t.where}: tie_word_embeddings is true but lm_head.weight differs from wte.weight")
  t.finish(_GPT2_BUFFERS)
  return p


def _norm_names(cfg: ModelConfig, h: str) -> dict[str, str]:
  """HF names of a layer's norms. Gemma 2's post_attention_layernorm normalises the attention output; in
  the others it is the norm before the MLP."""
  if cfg.post_norms:
    return {"attn": f"{h}.input_layernorm", "attn_post": f"{h}.post_attention_layernorm",
            "mlp": f"{h}.pre_feedforward_layernorm", "mlp_post": f"{h}.post_feedforward_layernorm"}
  return {"attn": f"{h}.input_layernorm", "mlp": f"{h}.post_attention_layernorm"}


def _llama_to_params(cfg: ModelConfig, t: _Taker) -> dict:
  D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  lin = lambda name, out, inp: t(f"{name}.weight", (out, inp)).T   # [out, in] -> [in, out]
  # Gemma's RMSNorm multiplies by (1 + w): stored here as the scale itself, the same float32 number
  # transformers forms, so the Decoder's Norm needs no Gemma variant.
  offset = np.float32(1.0 if cfg.embed_scale else 0.0)
  norm = lambda name: {"scale": t(f"{name}.weight", (D,)) + offset}
  p = {"embed": t("embed_tokens.weight", (cfg.vocab_size, D)), "norm_final": norm("norm")}
  for i in range(cfg.n_layers):
    h = f"layers.{i}"
    names = _norm_names(cfg, h)
    attn = {"wq": lin(f"{h}.self_attn.q_proj", N * H, D).reshape(D, N, H),
            "wk": lin(f"{h}.self_attn.k_proj", K * H, D).reshape(D, K, H),
            "wv": lin(f"{h}.self_attn.v_proj", K * H, D).reshape(D, K, H),
            "wo": lin(f"{h}.self_attn.o_proj", D, N * H).reshape(N, H, D)}
    if cfg.qkv_bias:
      attn.update(bq=t(f"{h}.self_attn.q_proj.bias", (N * H,)).reshape(N, H),
                  bk=t(f"{h}.self_attn.k_proj.bias", (K * H,)).reshape(K, H),
                  bv=t(f"{h}.self_attn.v_proj.bias", (K * H,)).reshape(K, H))
    mlp = {"w_gate": lin(f"{h}.mlp.gate_proj", F, D), "w_in": lin(f"{h}.mlp.up_proj", F, D),
           "w_out": lin(f"{h}.mlp.down_proj", D, F)}
    if cfg.post_norms:
      attn["norm_post"], mlp["norm_post"] = norm(names["attn_post"]), norm(names["mlp_post"])
    p[f"layer_{i}"] = {"norm_attn": norm(names["attn"]), "norm_mlp": norm(names["mlp"]), "attn": attn, "mlp": mlp}
  if not cfg.tie_embeddings:
    p["unembed"] = lin("lm_head", cfg.vocab_size, D)
  elif "lm_head.weight" in t.t:
    t("lm_head.weight", (cfg.vocab_size, D))
  t.finish(("rotary_emb.inv_freq",))
  return p


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], where: str = "<checkpoint>") -> dict:
  """HF tensors -> an instructrl params tree of float32 numpy arrays (unsharded), in cfg's layer layout."""
  from instructrl.models import layout
  if cfg.style == "gpt":
    params = _gpt2_to_params(cfg, _Taker(_strip(tensors, ("transformer.",)), where))
  else:
    params = _llama_to_params(cfg, _Taker(_strip(tensors, ("model.",)), where))
  return layout.stack_layers(params) if cfg.scan_layers else params


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any], head: str = "lm") -> dict[str, np.ndarray]:
  """instructrl params (either layer layout) -> HF tensors named as the *ForCausalLM (head "lm") or
  *ForSequenceClassification (head "scalar": `score.weight` [1, D]; the scalar `score_bias` is not a tensor
  there, see `save_rm`) classes save them."""
  from instructrl.models import layout
  params = layout.unstack_layers(params)
  g = lambda x: np.asarray(x, np.float32)
  D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  out = {}
  if cfg.style == "gpt":
    pre = "transformer."
    out[pre + "wte.weight"], out[pre + "wpe.weight"] = g(params["embed"]), g(params["pos_embed"])
    norm = lambda name, n: out.update({pre + name + ".weight": g(n["scale"]), pre + name + ".bias": g(n["bias"])})
    norm("ln_f", params["norm_final"])
    for i in range(cfg.n_layers):
      l, h = params[f"layer_{i}"], f"{pre}h.{i}"
      a, m = l["attn"], l["mlp"]
      norm(f"h.{i}.ln_1", l["norm_attn"])
      norm(f"h.{i}.ln_2", l["norm_mlp"])
      out[h + ".attn.c_attn.weight"] = np.concatenate([g(a[w]).reshape(D, N * H) for w in ("wq", "wk", "wv")], 1)
      out[h + ".attn.c_attn.bias"] = np.concatenate([g(a[b]).reshape(-1) for b in ("bq", "bk", "bv")])
      out[h + ".attn.c_proj.weight"], out[h + ".attn.c_proj.bias"] = g(a["wo"]).reshape(N * H, D), g(a["bo"])
      out[h + ".mlp.c_fc.weight"], out[h + ".mlp.c_fc.bias"] = g(m["w_in"]), g(m["b_in"])
      out[h + ".mlp.c_proj.weight"], out[h + ".mlp.c_proj.bias"] = g(m["w_out"]), g(m["b_out"])
  else:
    offset = np.float32(1.0 if cfg.embed_scale else 0.0)   # Gemma stores w of its (1 + w) scale
    norm = lambda n: g(n["scale"]) - offset
    out["model.embed_tokens.weight"], out["model.norm.weight"] = g(params["embed"]), norm(params["norm_final"])
    for i in range(cfg.n_layers):
      l, h = params[f"layer_{i}"], f"model.layers.{i}"
      a, m = l["attn"], l["mlp"]
      names = _norm_names(cfg, h)
      out[names["attn"] + ".weight"], out[names["mlp"] + ".weight"] = norm(l["norm_attn"]), norm(l["norm_mlp"])
      if cfg.post_norms:
        out[names["attn_post"] + ".weight"] = norm(a["norm_post"])
        out[names["mlp_post"] + ".weight"] = norm(m["norm_post"])
      out[h + ".self_attn.q_proj.weight"] = g(a["wq"]).reshape(D, N * H).T
      out[h + ".self_attn.k_proj.weight"] = g(a["wk"]).reshape(D, K * H).T
      out[h + ".self_attn.v_proj.weight"] = g(a["wv"]).reshape(D, K * H).T
      out[h + ".self_attn.o_proj.weight"] = g(a["wo"]).reshape(N * H, D).T
      if cfg.qkv_bias:
        for b, proj in (("bq", "q_proj"), ("bk", "k_proj"), ("bv", "v_proj")):
          out[f"{h}.self_attn.{proj}.bias"] = g(a[b]).reshape(-1)
      out[h + ".mlp.gate_proj.weight"] = g(m["w_gate"]).T
      out[h + ".mlp.up_proj.weight"] = g(m["w_in"]).T
      out[h + ".mlp.down_proj.weight"] = g(m["w_out"]).T
  if head == "scalar":
    out["score.weight"] = g(params["score"])[None, :]
  elif not cfg.tie_embeddings:
    out["lm_head.weight"] = g(params["unembed"]).T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- the public API

def load(directory: str | Path, mesh=None, rules=None, param_dtype: str = "float32", scan_layers: bool = False):
  """Import a save_pretrained directory: returns (params, ModelConfig).

  scan_layers: return the params stacked for a model with `scan_layers` (the config says so too).

  With a mesh, every weight is placed with the NamedSharding its logical axes map to under
  `rules` (parallel.DEFAULT_RULES if None), the same shardings the train steps use; without
  one, params are host numpy arrays.
  """
  import jax
  from instructrl import parallel
  from instructrl.models.transformer import abstract_params
  d = Path(directory)
  hf, tensors = read_checkpoint(d)
  cfg = config_from_hf(hf, str(d / CONFIG))
  if param_dtype != cfg.param_dtype or scan_layers:
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "param_dtype": param_dtype, "dtype": param_dtype,
                                 "scan_layers": scan_layers})
  params = params_from_hf(cfg, tensors, str(d))
  boxed = abstract_params(cfg)
  import flax.linen as nn
  want = nn.unbox(boxed)
  got_s, want_s = jax.tree.structure(params), jax.tree.structure(want)
  if got_s != want_s:   # a mapping bug, never a user error: say exactly what differs
    raise AssertionError(f"converted tree {got_s} != model tree {want_s}")
  params = jax.tree.map(lambda a, w: a.astype(w.dtype), params, want)
  if mesh is not None:
    shardings = parallel.logical_shardings(boxed, mesh, rules or parallel.DEFAULT_RULES)

    def check(path, a, s):
      # A released vocab (GPT-2: 50257) rarely divides a tensor axis; say so instead of XLA's error.
      try:
        s.shard_shape(a.shape)
      except ValueError:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ConvertError(f"{d}: weight {name} of shape {a.shape} cannot be split as {s.spec} on mesh "
                           f"{dict(mesh.shape)}: a dimension is not divisible by its mesh axes (a vocab of "
                           f"{cfg.vocab_size}?); map that logical axis to None in mesh.rules, e.g. "
                           f"('vocab', None), or use a mesh axis size that divides it") from None
    jax.tree_util.tree_map_with_path(check, params, shardings)
    params = jax.tree.map(jax.device_put, params, shardings)
  return params, cfg


def save(directory: str | Path, params, cfg: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None,
         max_shard_bytes: int = 5 << 30) -> None:
  """Export params as a save_pretrained-style directory that transformers loads (float32)."""
  import jax
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  write_checkpoint(directory, config_to_hf(cfg, bos_id, eos_id), params_to_hf(cfg, params), max_shard_bytes)


SCORE_BIAS_KEY = "instructrl_score_bias"


def fold_score_bias(cfg: ModelConfig, params: Mapping[str, Any]) -> tuple[dict, float]:
  """(params, bias left over): the RM head's scalar `score_bias` moved where a *ForSequenceClassification
  model can hold it, or handed back.

  transformers' `score` layer has no bias. GPT-2's final LayerNorm does, and feeds only the score, so
  adding c * w / |w|^2 to it adds exactly c to h . w (up to float32 rounding): folded, nothing left over.
  An RMSNorm has no bias, so for the LLaMA family the bias is handed back, for the caller to record.
  """
  c = float(np.asarray(params["score_bias"]))
  w = np.asarray(params["score"], np.float64)
  if cfg.style != "gpt" or not (w @ w) > 0:
    return dict(params), c
  shift = (c * w / (w @ w)).astype(np.float32)
  norm = {**params["norm_final"], "bias": (np.asarray(params["norm_final"]["bias"], np.float32) + shift)}
  return {**params, "norm_final": norm, "score_bias": np.float32(0.0)}, 0.0


def save_rm(directory: str | Path, params, cfg: ModelConfig, *, pad_id: int, bos_id: int | None = None,
            eos_id: int | None = None, max_shard_bytes: int = 5 << 30) -> float:
  """Export a reward model (head "scalar") as a *ForSequenceClassification directory with one label.

  transformers scores each row at its last token that is not `pad_id`, where the RM reads its score
  (the EOS), so `pad_id` must be set and differ from `eos_id`; batches are right-padded, as the RM's are.
  Returns the bias that could not be folded (see `fold_score_bias`): it is written to config.json as
  `instructrl_score_bias`, and transformers' logit equals the instructrl score minus it (0.0 for GPT-2).
  """
  import jax
  if pad_id is None or pad_id < 0:
    raise ConvertError(f"pad_id={pad_id!r}: a reward-model export needs the tokenizer's pad id (transformers "
                       f"reads each row's score at its last token that is not pad_token_id)")
  if eos_id is not None and pad_id == eos_id:
    raise ConvertError(f"pad_id={pad_id} equals eos_id: transformers would read the score before the EOS, where "
                       f"the RM does not; give a pad id other than the EOS")
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  params, left = fold_score_bias(cfg, params)
  hf_cfg = {**config_to_hf(cfg, bos_id, eos_id, head="scalar", pad_id=pad_id), SCORE_BIAS_KEY: left}
  write_checkpoint(directory, hf_cfg, params_to_hf(cfg, params, head="scalar"), max_shard_bytes)
  return left
