"""HF import/export: logits equal transformers' on the same tokens (fp32, 1e-4), export reloads in
transformers with the same logits, greedy KV-cache sampling equals `generate`, bad files are refused.

Models are small random configs made here with transformers (no download). Weights are drawn at
O(1) scale (not HF's 0.02 init, which gives near-zero logits that any mapping would match), norms
and biases included, so a transposed or misplaced tensor moves the logits by far more than 1e-4.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF parity tests need the `hf` extra (torch, transformers)")
transformers = pytest.importorskip("transformers", reason="HF parity tests need the `hf` extra")

import hf_fixtures as helpers  # noqa: E402
from instructrl import parallel  # noqa: E402
from instructrl.models import hf  # noqa: E402
from instructrl.models.transformer import Decoder  # noqa: E402

V = 101
GPT2 = dict(vocab_size=V, n_positions=48, n_embd=32, n_layer=2, n_head=4, n_inner=80, bos_token_id=1,
            eos_token_id=2)
LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
             rope_theta=50000.0, bos_token_id=1, eos_token_id=2)
KINDS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)),
    "llama_tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=True)),
}


def make_hf(kind: str, directory, shard: bool = False):
  torch.manual_seed(0)
  model = KINDS[kind]().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("weight") and p.ndim == 1:            # norm scales around 1
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif p.ndim == 1:                                        # biases
        p.copy_(0.3 * torch.randn_like(p))
      else:   # matrices: O(1) outputs; embeddings at 0.5, else a tied head repeats the last token forever
        emb = any(e in name for e in ("wte", "wpe", "embed"))
        p.copy_(torch.randn_like(p) * (0.5 if emb else 1.5 / min(p.shape) ** 0.5))
  model.save_pretrained(directory, max_shard_size="40KB" if shard else "5GB")
  return model


@pytest.fixture(scope="module", params=["gpt2", "llama", "llama_tied"])
def checkpoint(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(request.param)
  model = make_hf(request.param, d, shard=request.param == "llama")
  return request.param, d, model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def our_logits(params, cfg, tokens):
  return np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(tokens))[0])


TOKENS = np.random.default_rng(1).integers(3, V, (3, 40))


def test_files_as_transformers_wrote_them(checkpoint):
  kind, d, _ = checkpoint
  names = sorted(os.listdir(d))
  if kind == "llama":   # the sharded case really is sharded
    assert hf.INDEX in names and sum(n.startswith("model-0") for n in names) > 1, names
  else:
    assert hf.SINGLE in names, names


def test_import_logits_match_transformers(checkpoint):
  kind, d, model = checkpoint
  params, cfg = hf.load(d)
  assert cfg.style == ("gpt" if kind == "gpt2" else "llama")
  assert cfg.tie_embeddings == (kind != "llama")
  ref = hf_logits(model, TOKENS)
  ours = our_logits(params, cfg, TOKENS)
  assert ref.std() > 0.5, "logits too small for the comparison to mean anything"
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # Tree and shapes are exactly those of a freshly initialised Decoder.
  init = jax.eval_shape(lambda r: Decoder(cfg).init(r, jnp.zeros((1, 4), jnp.int32))["params"], jax.random.key(0))
  import flax.linen as nn
  assert jax.tree.map(lambda x: x.shape, nn.unbox(init)) == jax.tree.map(lambda x: x.shape, params)


def test_export_reloads_in_transformers(checkpoint, tmp_path):
  kind, d, model = checkpoint
  params, cfg = hf.load(d)
  hf.save(tmp_path / "out", params, cfg, bos_id=1, eos_id=2, max_shard_bytes=30_000)
  assert (tmp_path / "out" / hf.INDEX).is_file()   # our writer shards too, and transformers reads it
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_allclose(hf_logits(again, TOKENS), hf_logits(model, TOKENS), atol=1e-5, rtol=0)
  # Round trip through our own reader is exact.
  params2, cfg2 = hf.load(tmp_path / "out")
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_greedy_sampler_equals_generate(checkpoint):
  """A left-padded batch (prompts of 7, 4 and 6 tokens): positions restart at each row's first real
  token in both implementations, so every row's 20 greedy tokens agree."""
  kind, d, model = checkpoint
  params, cfg = hf.load(d)
  lengths, n_new = [7, 4, 6], 20
  helpers.assert_greedy_equals_generate(model, params, cfg, TOKENS, lengths, n_new)


def test_load_places_weights_with_logical_shardings(tmp_path):
  make_hf("llama", tmp_path)
  mesh = parallel.make_mesh((1, -1, 1))
  params, cfg = hf.load(tmp_path, mesh=mesh, rules=parallel.DEFAULT_RULES)
  from instructrl.models.transformer import abstract_params
  want = parallel.logical_shardings(abstract_params(cfg), mesh, parallel.DEFAULT_RULES)
  got = jax.tree.map(lambda x: x.sharding, params)
  assert jax.tree.leaves(got) == jax.tree.leaves(want)
  assert params["layer_0"]["attn"]["wq"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


# ----------------------------------------------------------------------------- refused inputs

def test_truncated_and_corrupt_safetensors_are_refused(tmp_path):
  make_hf("gpt2", tmp_path)
  f = tmp_path / hf.SINGLE
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  with pytest.raises(hf.ConvertError, match=r"model\.safetensors: not a valid safetensors file.*truncated"):
    hf.load(tmp_path)
  f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(hf.ConvertError, match="not a valid safetensors file"):
    hf.load(tmp_path)
  f.write_bytes(b"")
  with pytest.raises(hf.ConvertError, match="not a valid safetensors file"):
    hf.load(tmp_path)


def test_mismatched_or_unsupported_checkpoints_are_refused(tmp_path):
  make_hf("gpt2", tmp_path)
  cfg_path = tmp_path / hf.CONFIG
  good = json.loads(cfg_path.read_text())
  cfg_path.write_text(json.dumps({**good, "n_embd": 64, "n_inner": 80}))
  with pytest.raises(hf.ConvertError, match=r"'wte.weight' has shape \(101, 32\), expected \(101, 64\)"):
    hf.load(tmp_path)
  cfg_path.write_text(json.dumps({**good, "n_layer": 1}))
  with pytest.raises(hf.ConvertError, match=r"unexpected tensor\(s\), e\.g\. \['h\.1\."):
    hf.load(tmp_path)
  cfg_path.write_text(json.dumps({**good, "activation_function": "relu"}))
  with pytest.raises(hf.ConvertError, match="activation_function 'relu'"):
    hf.load(tmp_path)
  cfg_path.write_text(json.dumps({**good, "model_type": "bert"}))
  with pytest.raises(hf.ConvertError, match="model_type 'bert' is not supported"):
    hf.load(tmp_path)
  cfg_path.write_text("{")
  with pytest.raises(hf.ConvertError, match=r"config\.json:1: invalid JSON"):
    hf.load(tmp_path)
  with pytest.raises(hf.ConvertError, match="no config.json"):
    hf.load(tmp_path / "nowhere")


def test_other_rope_scalings_are_refused():
  """LLaMA 3.1's "llama3" is read (tests/hf/test_families.py); other RoPE variants are refused by name."""
  with pytest.raises(hf.ConvertError, match="rope_type 'linear' is not supported"):
    hf.config_from_hf({**LLAMA, "model_type": "llama", "rope_scaling": {"rope_type": "linear", "factor": 8.0}})


@pytest.mark.slow
def test_cli_import_then_export_round_trip(tmp_path):
  """`python -m instructrl.tools.convert import` writes a stage the SFT/RM hand-off reads; `export` gives it back."""
  import subprocess
  import sys
  from instructrl.tools.convert import export_hf, import_hf, load_stage_params
  model = make_hf("gpt2", tmp_path / "hf")
  run = lambda *a: subprocess.run([sys.executable, "-m", "instructrl.tools.convert", *a], capture_output=True, text=True,
                                  cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  r = run("import", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["model"]["style"] == "gpt"
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    import_hf(tmp_path / "hf", tmp_path / "w")
  r = run("export", f"--workdir={tmp_path / 'w'}", "--stage=pretrain", f"--out={tmp_path / 'out'}")
  assert r.returncode == 0, r.stderr
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_allclose(hf_logits(again, TOKENS), hf_logits(model, TOKENS), atol=1e-5, rtol=0)
  # The imported stage is what checkpoints.load_params hands to the next stage.
  params, cfg = load_stage_params(tmp_path / "w", "pretrain")
  np.testing.assert_allclose(our_logits(params, cfg, TOKENS), hf_logits(model, TOKENS), atol=1e-4, rtol=0)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    export_hf(tmp_path / "w", "rm", tmp_path / "x")


def test_bf16_checkpoint_loads_exactly(tmp_path):
  """Released LLaMA weights are bf16: read through ml_dtypes (numpy has no bfloat16), values exact."""
  model = make_hf("llama", tmp_path / "fp32")
  model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  params, cfg = hf.load(tmp_path / "bf16")
  want = model.float().model.layers[1].self_attn.k_proj.weight.detach().numpy()   # bf16 values, as fp32
  got = np.asarray(params["layer_1"]["attn"]["wk"]).reshape(cfg.d_model, -1).T
  np.testing.assert_array_equal(got, want)
  # Against transformers reading the same bf16 file into fp32 (`model.float()` would keep the RoPE
  # frequencies rounded to bf16 by `.to(bfloat16)`, a difference of ~1e-4 that is not ours).
  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
  np.testing.assert_allclose(our_logits(params, cfg, TOKENS), hf_logits(ref, TOKENS), atol=1e-4, rtol=0)
