"""Further LLaMA-style families against transformers: Qwen2 (q/k/v biases), Gemma v1 ((1 + w) RMSNorm,
sqrt(d_model) embedding scale, GeGLU, free head_dim, MQA), Gemma 2 (soft-capping, post-norms,
query_pre_attn_scalar, context capped at its alternate layers' window), LLaMA 3.1's "llama3" RoPE scaling
and Mistral's sliding window (at sequences longer than the window, in the forward pass and the KV-cache
sampler).

Each: imported logits equal transformers' (f32), the export reloads in transformers with the same logits,
and greedy sampling with our sampler equals `generate(do_sample=False)` token for token on a left-padded
batch. Models are tiny random configs made here (no download), weights at O(1) scale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF parity tests need the `hf` extra (torch, transformers)")
transformers = pytest.importorskip("transformers", reason="HF parity tests need the `hf` extra")

import hf_fixtures as helpers  # noqa: E402

from instructrl.models import hf  # noqa: E402
from instructrl.models.config import ModelConfig  # noqa: E402
from instructrl.models.sampling import sample  # noqa: E402
from instructrl.models.transformer import Decoder, rope_inv_freq  # noqa: E402

V = 101
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
WINDOW = 8
FAMILIES = {
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**BASE, tie_word_embeddings=False)),
    "qwen2_tied": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**BASE, tie_word_embeddings=True)),
    # head_dim 16 with d_model 32 and 4 heads: 4 * 16 != 32, and one kv head (MQA).
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(
        **{**BASE, "num_key_value_heads": 1, "head_dim": 16})),
    "gemma_gqa": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(
        **{**BASE, "num_key_value_heads": 2, "head_dim": 12})),
    # head_dim 16: wavelengths 6.3, 20, 63, 199, ... fall in all three llama3 bands (< 16, 16..64, > 64).
    "llama3": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**BASE, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1},
        rope_parameters=dict(LLAMA3_ROPE))),
    "mistral_window": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **BASE, sliding_window=WINDOW, tie_word_embeddings=False)),
    # Soft caps small enough to bind on O(1) scores and logits; query_pre_attn_scalar != head_dim; the
    # alternate layers' window (64) caps the imported context below max_position_embeddings (128).
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **{**BASE, "head_dim": 16}, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, sliding_window=64)),
}
EXPECT = {"qwen2": dict(qkv_bias=True, tie_embeddings=False), "qwen2_tied": dict(qkv_bias=True, tie_embeddings=True),
          "gemma": dict(embed_scale=True, glu_activation="gelu_tanh", n_kv_heads=1, head_dim=16, tie_embeddings=True),
          "gemma_gqa": dict(embed_scale=True, glu_activation="gelu_tanh", n_kv_heads=2, head_dim=12),
          "llama3": dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=64),
          "mistral_window": dict(sliding_window=WINDOW),
          "gemma2": dict(post_norms=True, embed_scale=True, glu_activation="gelu_tanh", attn_softcap=2.0,
                         final_softcap=3.0, query_pre_attn_scalar=12.0, max_len=64, sliding_window=0)}
TOKENS = np.random.default_rng(1).integers(3, V, (3, 40))   # 40 > the window of 8


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(request.param)
  model = helpers.randomize_weights(FAMILIES[request.param]())
  model.save_pretrained(d)
  return request.param, d, model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@functools.partial(jax.jit, static_argnames="cfg")
def _forward(params, tokens, cfg):
  return Decoder(cfg).apply({"params": params}, tokens)[0]


def our_logits(params, cfg, tokens):
  return np.asarray(_forward(params, jnp.asarray(tokens), cfg))


def test_config_reads_the_family(checkpoint):
  kind, d, _ = checkpoint
  _, cfg = hf.load(d)
  for field, want in EXPECT[kind].items():
    assert getattr(cfg, field) == want, field
  assert hf.hf_family(cfg) == transformers.AutoConfig.from_pretrained(d).model_type


def test_import_logits_match_transformers(checkpoint):
  kind, d, model = checkpoint
  params, cfg = hf.load(d)
  ref = hf_logits(model, TOKENS)
  assert ref.std() > 0.5, "logits too small for the comparison to mean anything"
  # float32 summation order (transformers' sdpa vs our einsum) differs by <= 2.0e-5 on these logits
  # (std 1.1-3.0); a mapping or formula error moves them by O(1).
  np.testing.assert_allclose(our_logits(params, cfg, TOKENS), ref, atol=3e-5, rtol=1e-5)   # logits up to ~5: CPUs reduce in other orders
  # num_params' closed form counts the imported tree (biases, free head_dim) exactly.
  assert cfg.num_params() == sum(a.size for a in jax.tree.leaves(params))


def test_export_reloads_in_transformers(checkpoint, tmp_path):
  kind, d, model = checkpoint
  params, cfg = hf.load(d)
  hf.save(tmp_path / "out", params, cfg, bos_id=1, eos_id=2)
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert type(again) is type(model)
  np.testing.assert_allclose(hf_logits(again, TOKENS), hf_logits(model, TOKENS), atol=1e-5, rtol=0)
  params2, cfg2 = hf.load(tmp_path / "out")
  assert cfg2 == cfg
  # Gemma's (1 + w) scale goes through w = scale - 1 and back: equal to float32 rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=0), params2, params)


def test_greedy_sampler_equals_generate(checkpoint):
  """Left-padded prompts of 7, 4 and 6 tokens, 24 new tokens: past the window of 8 for Mistral, so the
  KV-cache path's window mask is exercised on every late step. One variant per family (a tied Qwen2 or a
  GQA Gemma samples through the same code as its sibling)."""
  kind, d, model = checkpoint
  if kind in ("qwen2_tied", "gemma_gqa"):
    pytest.skip("covered by its family's other variant")
  params, cfg = hf.load(d)
  lengths, n_new = [7, 4, 6], 24
  helpers.assert_greedy_equals_generate(model, params, cfg, TOKENS, lengths, n_new)


# ----------------------------------------------------------------------------- the pieces, on their own

def test_llama3_frequencies_equal_transformers():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf_cfg = transformers.LlamaConfig(**{**BASE, "head_dim": 16}, rope_parameters=dict(LLAMA3_ROPE))
  want, scaling = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
  cfg = hf.config_from_hf(hf_cfg.to_dict())
  got = rope_inv_freq(cfg)
  np.testing.assert_array_equal(got, want.numpy())
  assert scaling == 1.0
  plain = rope_inv_freq(ModelConfig.from_dict({**cfg.to_dict(), "rope_scaling": ""}))
  # All three bands are present: kept, divided by the factor, and interpolated in between.
  assert (got == plain).sum() >= 1 and np.isclose(got, plain / 8).sum() >= 1
  assert ((got < plain) & ~np.isclose(got, plain / 8)).sum() >= 1


def test_sliding_window_is_a_mask_on_slots():
  """A token more than `window` slots back changes nothing; one inside the window does (tiny Decoder)."""
  cfg = ModelConfig(style="llama", vocab_size=V, max_len=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=64, sliding_window=WINDOW)
  params = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  params = jax.tree.map(lambda x: x * 20 if x.ndim > 1 else x, params)
  t = jnp.asarray(TOKENS[:1, :24])
  base = our_logits(params, cfg, t)
  changed = our_logits(params, cfg, t.at[0, 3].set((t[0, 3] + 1) % V))
  # One layer: query q sees slots q-7..q, so slot 3 reaches queries 3..10 and no later one.
  np.testing.assert_array_equal(changed[0, 11:], base[0, 11:])
  assert np.abs(changed[0, 3:11] - base[0, 3:11]).max(-1).min() > 1e-4
  # jax.nn.dot_product_attention (cuDNN's path on GPU) gets the same window through its mask.
  fused = ModelConfig.from_dict({**cfg.to_dict(), "attention": "dot_product"})
  np.testing.assert_allclose(our_logits(params, fused, t), base, atol=1e-5, rtol=0)


def test_gemma2_context_stops_at_its_window():
  """Gemma 2's sliding layers alternate with full ones; the import caps the context at the window (where
  it never binds), and the sampler refuses to go past it rather than drift from transformers."""
  g2 = {**BASE, "model_type": "gemma2", "sliding_window": 16, "max_position_embeddings": 128}
  cfg = hf.config_from_hf(g2)
  assert cfg.max_len == 16 and cfg.sliding_window == 0 and cfg.post_norms
  assert hf.config_from_hf({**g2, "layer_types": ["full_attention"] * 2}).max_len == 128
  params = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  with pytest.raises(ValueError, match="exceeds model.max_len=16"):
    sample(params, jnp.ones((1, 10), jnp.int32), jnp.ones((1, 10), bool), jax.random.key(0), cfg=cfg,
           max_new_tokens=7, temperature=0.0, eos_id=-1, pad_id=0)


def test_unsupported_variants_are_refused():
  qwen_window = {**BASE, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16}
  with pytest.raises(hf.ConvertError, match=r"use_sliding_window=True .*'qwen2'"):
    hf.config_from_hf(qwen_window)
  with pytest.raises(hf.ConvertError, match=r"attention_bias=True"):
    hf.config_from_hf({**BASE, "model_type": "llama", "attention_bias": True})
  with pytest.raises(hf.ConvertError, match=r"hidden_act='relu'"):
    hf.config_from_hf({**BASE, "model_type": "gemma", "hidden_act": "relu"})
  with pytest.raises(hf.ConvertError, match=r"rope_type 'yarn'"):
    hf.config_from_hf({**BASE, "model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
  with pytest.raises(hf.ConvertError, match=r"'llama3' without 'low_freq_factor'"):
    hf.config_from_hf({**BASE, "model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
  # A config no transformers family computes is refused at export, naming the field.
  odd = ModelConfig(style="llama", embed_scale=True, glu_activation="gelu_tanh", qkv_bias=True)
  with pytest.raises(hf.ConvertError, match=r"model\.qkv_bias=True .*'gemma'"):
    hf.config_to_hf(odd)
  with pytest.raises(hf.ConvertError, match=r"model\.sliding_window=8 .*'gemma2'"):
    hf.config_to_hf(ModelConfig(style="llama", embed_scale=True, glu_activation="gelu_tanh", post_norms=True,
                                sliding_window=8))
  with pytest.raises(hf.ConvertError, match=r"use_bidirectional_attention=True"):
    hf.config_from_hf({**BASE, "model_type": "gemma2", "use_bidirectional_attention": True})
