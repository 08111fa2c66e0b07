"""The benchmarks: their JSON has the keys BENCHMARKS.md quotes, and the no-cache baseline samples what the
cache sampler samples (else "cache vs no cache" would compare different work)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.sampler import sample_no_cache  # noqa: E402
from instructrl.models.config import ModelConfig  # noqa: E402
from instructrl.models.sampling import sample  # noqa: E402
from instructrl.models.transformer import Decoder  # noqa: E402


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_no_cache_sampler_draws_the_same_tokens_as_the_cache_sampler(style):
  cfg = ModelConfig(style=style, vocab_size=64, max_len=24, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                    head_dim=16, d_ff=64)
  params = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  mask = np.arange(8)[None, :] >= np.array([[0], [3], [5]])           # left-padded prompts
  prompt = np.where(mask, rng.integers(4, 64, (3, 8)), 0).astype(np.int32)
  kw = dict(cfg=cfg, max_new_tokens=6, temperature=1.0, eos_id=-1, pad_id=0)
  cached = sample(params, prompt, mask, jax.random.key(3), **kw).tokens
  recomputed = sample_no_cache(params, prompt, mask, jax.random.key(3), **kw)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(recomputed))


def test_interleaved_calls_round_robin():
  calls = []
  times = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
  assert calls == ["a", "b"] * 3
  assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_llama_shape_flops_per_token():
  s = common.setup("tiny", model=common.SHAPES["llama8x512"][1], min_len=256)
  cfg = s.cfg
  per_layer = 4 * 512 * 512 + 3 * 512 * 1408
  assert cfg.num_params(include_embeddings=False) == 8 * (per_layer + 2 * 512) + 512
  want = 6 * (8 * (per_layer + 2 * 512) + 512 + 512 * 1024) + 12 * 8 * 8 * 64 * 256
  assert common.lm_flops_per_token(cfg, 256) == want


ENV_KEYS = {"backend", "device", "jax", "loadavg", "xla_flags"}


@pytest.mark.slow
def test_run_all_smoke_writes_one_json_with_every_benchmark(tmp_path):
  """--smoke: each script once after its warm-up, with run_all's own plumbing (the --quick and full tiers pass
  their flags the same way; their timings are what BENCHMARKS.md quotes)."""
  names = ["matmul_peak", "train_step_tiny", "sampler", "rm_step", "rm_packing", "ppo_iteration"]
  if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
    names.append("compare_torch")
  out = tmp_path / "r.json"
  p = subprocess.run([sys.executable, str(ROOT / "benchmarks/run_all.py"), "--smoke", f"--out={out}",
                      f"--only={','.join(names)}"], capture_output=True, text=True, cwd=ROOT, timeout=900)
  doc = json.loads(out.read_text())
  assert p.returncode == 0, (doc["failed"], p.stderr[-3000:])
  assert doc["smoke"] and not doc["quick"]
  r = doc["results"]
  assert set(r) == set(names)
  for name in names:
    assert ENV_KEYS <= set(r[name]), name
  assert r["matmul_peak"]["float32_flops_per_s"] > 0 and r["matmul_peak"]["bfloat16_flops_per_s"] > 0
  t = r["train_step_tiny"]
  assert t["tokens_per_s"] > 0 and 0 < t["mfu"] < 1 and t["compiles_after_warmup"] == 0
  assert all(row["cache"]["new_tokens_per_s"] > 0 and row["no_cache"]["new_tokens_per_s"] > 0
             for row in r["sampler"]["results"]) and r["sampler"]["compiles_after_warmup"] == 0
  assert [row["K"] for row in r["rm_step"]["results"]] == [2, 4, 9] and r["rm_step"]["compiles_after_warmup"] == 0
  pk = r["rm_packing"]
  assert pk["rows_packed"] < pk["rows_unpacked"] and pk["fill_packed"] > pk["fill_unpacked"]
  assert pk["first_step_loss_abs_diff"] < 1e-5 and pk["compiles_after_warmup"] == 0
  ppo = r["ppo_iteration"]
  assert ppo["episodes_per_s"] > 0 and set(ppo["rollout_split_s"]) == {"sampling", "scoring"}
  assert ppo["compiles_after_warmup"] == 0
  if "compare_torch" in r:
    c = r["compare_torch"]
    assert {"matmul", "sft", "generate", "rm", "ppo"} <= set(c)
    assert c["sft"][0]["ratio"] > 0 and c["ppo"]["ratio"] > 0 and c["generate"]["results"][0]["ratio"] > 0
    assert c["rm"]["results"][0]["ratio_jax_per_prompt_vs_torch"] > 0
    assert c["sft"][0]["compiles_after_warmup"] == 0 and c["ppo"]["compiles_after_warmup"] == 0


def test_linear_ab_times_both_backwards_of_the_same_step():
  p = subprocess.run([sys.executable, str(ROOT / "benchmarks/linear_ab.py"), "--shape=tiny", "--steps=1",
                      "--repeats=1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout)
  assert ENV_KEYS <= set(r) and set(r["step_s"]) == {"written", "autodiff"}
  assert r["speedup_median"] > 0 and r["compiles_after_warmup"] == 0
  a, b = r["first_step"]["written"], r["first_step"]["autodiff"]     # same step, same math
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
  np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)


def test_compare_torch_pools_one_sided_children_into_ratios():
  """--isolate runs a JAX-only and a torch-only child per round; the parent pools their raw timings."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from benchmarks import compare_torch as ct
  spec = {"ratio": ("jax", "torch")}
  jax1 = {"sft": [ct.ratio_row({"jax": [1.0, 3.0]}, 100, "tokens", spec) | {"compiles_after_warmup": 0}],
          "matmul": {"float32": {"n": 8, "jax_flops_per_s": 5.0}}}
  jax2 = {"sft": [ct.ratio_row({"jax": [2.0]}, 100, "tokens", spec) | {"compiles_after_warmup": 1}],
          "matmul": {"float32": {"n": 8, "jax_flops_per_s": 6.0}}}
  torch1 = {"sft": [ct.ratio_row({"torch": [4.0]}, 100, "tokens", spec) | {"compiles_after_warmup": 0}],
            "matmul": {"float32": {"n": 8, "torch_flops_per_s": 12.0}}}
  assert "ratio" not in jax1["sft"][0]                          # one side alone has no ratio
  out = ct.merge(ct.merge(jax1, jax2), torch1)
  ct.finish(out)
  ct.matmul_ratios(out["matmul"])
  row = out["sft"][0]
  assert row["jax"]["times_s"] == [1.0, 3.0, 2.0] and row["jax"]["median_s"] == 2.0
  assert row["jax"]["tokens_per_s"] == 50.0 and row["torch"]["tokens_per_s"] == 25.0
  assert row["ratio"] == 2.0 and row["compiles_after_warmup"] == 1   # a recompile in any child shows
  assert out["matmul"]["float32"]["jax_flops_per_s"] == 6.0 and out["matmul"]["float32"]["ratio"] == 0.5


@pytest.mark.slow
def test_compile_time_reports_both_layouts_at_both_depths():
  env = {**__import__("os").environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
         "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_time.py"), "--preset=smoke",
                        "--layers=1,3", "--mesh=1,1,1", "--batch_size=4", "--seq_len=16"],
                       capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert {(x["layers"], x["scan_layers"]) for x in r["results"]} == {(1, True), (3, True), (1, False), (3, False)}
  assert all(x["lower_s"] > 0 and x["compile_s"] > 0 for x in r["results"])
  by = {(x["layers"], x["scan_layers"]): x for x in r["results"]}
  assert by[(3, True)]["params"] == by[(3, False)]["params"] > by[(1, True)]["params"]
  assert set(r["ratio_3_over_1"]) == {"scan", "loop"} and r["env"]["n_devices"] == 8


def test_eos_hazard_puts_that_probability_on_eos():
  import flax.linen as nn

  from benchmarks.sampler import with_eos_hazard
  from instructrl.data.tokenizer import EOS_ID
  from instructrl.models.sampling import process_logits
  cfg = ModelConfig(style="gpt", vocab_size=512, max_len=24, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2,
                    head_dim=32, d_ff=128)
  params = nn.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  toks = jnp.asarray(np.random.default_rng(0).integers(4, 512, (8, 16)), jnp.int32)
  for hazard in (0.01, 0.2):
    logits, _ = Decoder(cfg).apply({"params": with_eos_hazard(params, cfg, hazard)}, toks)
    p_eos = np.exp(np.asarray(process_logits(logits)[..., EOS_ID]))
    np.testing.assert_allclose(p_eos.mean(), hazard, rtol=0.15)
  with pytest.raises(ValueError, match="eos_hazard"):
    with_eos_hazard(params, cfg, 1.0)
