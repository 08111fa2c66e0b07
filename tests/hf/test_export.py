"""Exports of trained stages: the PPO policy's EMA weights as *ForCausalLM, the reward model as
*ForSequenceClassification, both read back by transformers with our numbers.

Stage checkpoints are written here with `StageCheckpoints.save` holding what the stages save (PPO:
params, ema, value; RM: the scalar-head params), from random transformers models at O(1) scale, so a
wrong entry, a misplaced tensor or a lost bias moves the compared numbers far beyond the tolerance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF parity tests need the `hf` extra (torch, transformers)")
transformers = pytest.importorskip("transformers", reason="HF parity tests need the `hf` extra")

import hf_fixtures as helpers  # noqa: E402

from instructrl import checkpoints  # noqa: E402
from instructrl.models import hf  # noqa: E402
from instructrl.models.transformer import Decoder  # noqa: E402
from instructrl.stages.rm_models import rm_scores  # noqa: E402
from instructrl.tools import convert  # noqa: E402

V, PAD, EOS = 101, 0, 2
COMMON = dict(vocab_size=V, bos_token_id=1, eos_token_id=EOS)
LLAMA = dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, **COMMON)
FAMILIES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_positions=48, n_embd=32, n_layer=2, n_head=4, n_inner=80, **COMMON)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLAMA, tie_word_embeddings=True)),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**{**LLAMA, "num_key_value_heads": 1})),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**LLAMA, query_pre_attn_scalar=8)),
}
TOKENS = np.random.default_rng(1).integers(3, V, (3, 24))
ROOT = Path(__file__).resolve().parents[2]


def lm_params(kind: str, tmp: Path, seed: int = 0):
  d = tmp / f"hf_{kind}_{seed}"
  helpers.randomize_weights(FAMILIES[kind](), seed=seed).save_pretrained(d)
  return hf.load(d)


def save_stage(directory: Path, state: dict, cfg):
  ckpt = checkpoints.StageCheckpoints(directory)
  try:
    ckpt.save(3, state, {"complete": True, "model": cfg.to_dict()})
  finally:
    ckpt.close()


def logits(params, cfg, tokens):
  return np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(tokens))[0])


def hf_logits(model, tokens, mask=None):
  with torch.no_grad():
    out = model(torch.tensor(tokens, dtype=torch.long),
                attention_mask=None if mask is None else torch.tensor(mask, dtype=torch.long))
  return out.logits.numpy()


# ----------------------------------------------------------------------------- PPO policy (EMA)

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_ppo_export_is_the_ema_policy(kind, tmp_path):
  """`export --stage=ppo` writes the EMA entry by default (--entry=params the last iterate); the value
  function and the rest of the state stay behind."""
  params, cfg = lm_params(kind, tmp_path, seed=0)
  ema, _ = lm_params(kind, tmp_path, seed=1)
  rm_like = {k: v for k, v in params.items() if k != "unembed"}
  value = {**rm_like, "score": np.ones(cfg.d_model, np.float32), "score_bias": np.float32(0.5)}
  save_stage(tmp_path / "w" / "ppo", {"step": np.int32(3), "params": params, "ema": ema, "value": value}, cfg)
  assert convert.stage_entry("ppo") == "ema" and convert.stage_entry("ppo_noptx") == "ema"

  convert.export_hf(tmp_path / "w", "ppo", tmp_path / "out_ema")
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out_ema").eval()
  ours = logits(ema, cfg, TOKENS)
  np.testing.assert_allclose(hf_logits(again, TOKENS), ours, atol=1e-4, rtol=0)
  assert np.abs(logits(params, cfg, TOKENS) - ours).max() > 1.0, "params and ema must differ for this to test"

  convert.export_hf(tmp_path / "w", "ppo", tmp_path / "out_params", entry="params")
  last = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out_params").eval()
  np.testing.assert_allclose(hf_logits(last, TOKENS), logits(params, cfg, TOKENS), atol=1e-4, rtol=0)


def test_ema_entry_only_for_ppo_stages(tmp_path):
  params, cfg = lm_params("llama", tmp_path)
  save_stage(tmp_path / "w" / "sft", {"params": params}, cfg)
  with pytest.raises(ValueError, match="only PPO stages keep an EMA policy"):
    convert.export_hf(tmp_path / "w", "sft", tmp_path / "out", entry="ema")


# ----------------------------------------------------------------------------- reward model

def rm_params(kind: str, tmp: Path, bias: float = 0.7):
  """An RM as the RM stage leaves it: an LM trunk, a scalar head, and a bias (reward.py subtracts the
  demonstrations' mean score, so it is not zero)."""
  lm, cfg = lm_params(kind, tmp)
  trunk = {k: v for k, v in lm.items() if k != "unembed"}
  w = np.random.default_rng(2).normal(size=cfg.d_model).astype(np.float32) * 0.5
  return {**trunk, "score": w, "score_bias": np.float32(bias)}, cfg


def right_padded(lengths):
  """Right-padded rows (as the RM scores them), each ending in EOS at its last real token."""
  T = max(lengths)
  tokens, mask = np.full((len(lengths), T), PAD, np.int64), np.zeros((len(lengths), T), np.int64)
  for i, n in enumerate(lengths):
    tokens[i, :n], mask[i, :n] = TOKENS[i % len(TOKENS), :n], 1
    tokens[i, n - 1] = EOS
  return tokens, mask


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "gemma", "gemma2"])
def test_rm_export_scores_as_transformers(kind, tmp_path):
  params, cfg = rm_params(kind, tmp_path)
  save_stage(tmp_path / "w" / "rm", {"params": params}, cfg)
  convert.export_hf(tmp_path / "w", "rm", tmp_path / "out", pad_id=PAD, eos_id=EOS)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
  assert type(model).__name__.endswith("ForSequenceClassification") and model.config.pad_token_id == PAD
  left = json.loads((tmp_path / "out" / hf.CONFIG).read_text())[hf.SCORE_BIAS_KEY]
  # GPT-2's final LayerNorm absorbs the bias; an RMSNorm cannot, so the config records it.
  assert left == (0.0 if kind == "gpt2" else pytest.approx(0.7))

  head = Decoder(cfg, head="scalar")
  for lengths in ([24, 9, 17], [5, 12, 5, 20]):   # batches of different padded lengths
    tokens, mask = right_padded(lengths)
    ours = np.asarray(rm_scores(head, params, jnp.asarray(tokens), jnp.asarray(lengths) - 1))
    theirs = hf_logits(model, tokens, mask)[:, 0]
    assert np.std(ours) > 0.3, "scores too alike for the comparison to mean anything"
    np.testing.assert_allclose(theirs, ours - left, atol=1e-4, rtol=0)


def test_rm_export_needs_a_pad_id_apart_from_eos(tmp_path):
  params, cfg = rm_params("llama", tmp_path)
  save_stage(tmp_path / "w" / "rm", {"params": params}, cfg)
  with pytest.raises(hf.ConvertError, match="needs the tokenizer's pad id"):
    convert.export_hf(tmp_path / "w", "rm", tmp_path / "out")
  with pytest.raises(hf.ConvertError, match="equals eos_id"):
    convert.export_hf(tmp_path / "w", "rm", tmp_path / "out", pad_id=EOS, eos_id=EOS)


@pytest.mark.slow
def test_cli_exports_rm_and_ppo(tmp_path):
  """The commands docs/real_data.md shows, end to end in a subprocess."""
  params, cfg = rm_params("llama", tmp_path)
  save_stage(tmp_path / "w" / "rm", {"params": params}, cfg)
  lm, _ = lm_params("llama", tmp_path)
  save_stage(tmp_path / "w" / "ppo", {"params": lm, "ema": lm, "value": params}, cfg)
  run = lambda *a: subprocess.run([sys.executable, "-m", "instructrl.tools.convert", "export", *a],
                                  capture_output=True, text=True, cwd=ROOT)
  r = run(f"--workdir={tmp_path / 'w'}", "--stage=rm", f"--out={tmp_path / 'rm'}", "--pad_id=0", "--eos_id=2")
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)[hf.SCORE_BIAS_KEY] == pytest.approx(0.7)
  r = run(f"--workdir={tmp_path / 'w'}", "--stage=rm", f"--out={tmp_path / 'rm2'}")
  assert r.returncode == 2 and "pad id" in r.stderr
  r = run(f"--workdir={tmp_path / 'w'}", "--stage=ppo", f"--out={tmp_path / 'ppo'}")
  assert r.returncode == 0, r.stderr
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ppo").eval()
  np.testing.assert_allclose(hf_logits(model, TOKENS), logits(lm, cfg, TOKENS), atol=1e-4, rtol=0)


def test_export_of_a_world_run_carries_its_tokenizer(tmp_path):
  """A world run's export is a checkpoint a public-data run starts from: tokenizer.model beside the
  weights, the world's BOS/EOS in config.json, and the same token ids read back through
  pretrained_tokenizer (what the import stage loads)."""
  from instructrl.data import pretrained_tokenizer
  from instructrl.data import tokenizer as tokenizer_lib
  texts = [f"the capital of land {i} is city {i * 7 % 13}, and its colour is blue." for i in range(300)]
  world_tok = tokenizer_lib.train(texts, 128, tmp_path / "w" / "world" / "tokenizer.model")
  params, cfg = lm_params("llama", tmp_path)
  save_stage(tmp_path / "w" / "pretrain", {"params": params}, cfg)
  convert.export_hf(tmp_path / "w", "pretrain", tmp_path / "out")
  hf_cfg = json.loads((tmp_path / "out" / hf.CONFIG).read_text())
  assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"]) == (tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID)
  loaded = pretrained_tokenizer.load(tmp_path / "out")
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (world_tok.bos_id, world_tok.eos_id, world_tok.pad_id)
  assert loaded.encode_batch(texts[:5]) == world_tok.encode_batch(texts[:5])
