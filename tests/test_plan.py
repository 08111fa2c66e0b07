"""`python -m instructrl.tools.plan` on the small preset and 8 simulated devices: it reports per-device memory
from the compiled executables, the argument bytes are the sharded train state's (checked against the
closed-form parameter count), and the fsdp mesh needs less memory per device than pure data parallel.
`--recommend` compiles all four programs (SFT, RM, PPO rollout, PPO update) and each lands within 2x of
the closed form; the scanned sampler's temporaries stay flat in depth. The table and search logic (mesh
parsing, fewest chips that fit, candidate order, pruning) is checked without compiling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instructrl.tools import plan

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024 ** 3


def run_plan(args: list[str], out: Path, timeout: int = 400) -> str:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "instructrl.tools.plan", *args, f"--json={out}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


@pytest.fixture(scope="module")
def small_plan(tmp_path_factory):
  out = tmp_path_factory.mktemp("plan") / "rows.json"
  table = run_plan(["--config=configs/instructgpt.py:small", "--mesh=8,1,1;1,8,1", "--stages=sft", "--target=v5e"], out)
  return {tuple(r["mesh"]): r for r in json.loads(out.read_text())}, table


@pytest.fixture(scope="module")
def small_recommend(tmp_path_factory):
  """Every program of the small preset (layers scanned, as the pod presets), recommended over 8 chips."""
  out = tmp_path_factory.mktemp("plan") / "recommend.json"
  table = run_plan(["--config=configs/instructgpt.py:small", "--config.model.scan_layers=True", "--recommend",
                    "--chips=8", "--tensor=1,2", "--stages=sft,rm,ppo_rollout,ppo_update", "--target=v5e"], out)
  return json.loads(out.read_text()), table


@pytest.mark.slow
def test_plan_reports_compiled_memory_and_fsdp_beats_data_parallel(small_plan):
  from configs import instructgpt
  from instructrl.models.config import ModelConfig
  rows, table = small_plan
  dp, fsdp = rows[(8, 1, 1)], rows[(1, 8, 1)]
  n = ModelConfig.from_dict(instructgpt.get_config("small").model).num_params()
  state = 12 * n   # fp32 params + Adam mu and nu
  for r in (dp, fsdp):
    assert "error" not in r and r["fits"] and r["temp_gib"] > 0 and r["compile_s"] > 0
    assert r["peak_gib"] == pytest.approx(r["argument_gib"] + r["output_gib"] - r["alias_gib"] + r["temp_gib"])
    assert r["alias_gib"] == pytest.approx(r["output_gib"], rel=1e-3)   # the donated state is updated in place
  # Data parallel: every device holds the whole state (+ step, batch rows, rng: a few KiB).
  assert state <= dp["argument_gib"] * GiB <= state * 1.01
  # fsdp=8: every weight with an embed dim is split 8 ways; only small per-head biases stay whole.
  assert state / 8 <= fsdp["argument_gib"] * GiB <= state / 8 * 1.05
  assert fsdp["peak_gib"] < dp["peak_gib"]
  assert "sft" in table and "(1, 8, 1)" in table and "Fewest chips tried on which every stage fits: 8" in table


def test_parse_layouts_and_errors():
  assert plan.parse_layouts("1,-1,1", "16,8") == [(1, 8, 1), (1, 16, 1)]
  assert plan.parse_layouts("8,1,1; (2,2,2)", None) == [(8, 1, 1), (2, 2, 2)]
  with pytest.raises(ValueError, match="give --chips"):
    plan.parse_layouts("1,-1,1", None)
  with pytest.raises(ValueError, match="3 entries"):
    plan.parse_layouts("8,1", None)
  with pytest.raises(ValueError, match="not divisible"):
    plan.parse_layouts("2,-1,1", "9")


def test_smallest_fitting_needs_every_stage_to_fit():
  rows = [{"mesh": [1, 8, 1], "stage": "sft", "fits": True}, {"mesh": [1, 8, 1], "stage": "rm", "fits": False},
          {"mesh": [1, 16, 1], "stage": "sft", "fits": True}, {"mesh": [1, 16, 1], "stage": "rm", "fits": True},
          {"mesh": [1, 32, 1], "stage": "sft", "fits": True}, {"mesh": [1, 32, 1], "stage": "rm", "fits": True}]
  assert plan.smallest_fitting(rows) == (1, 16, 1)
  assert plan.smallest_fitting(rows[:2]) is None


def test_analytic_state_bytes_scale_with_shards():
  """The closed form of docs/scaling.md: 16 bytes a trained parameter, split over fsdp x tensor."""
  from configs import instructgpt
  from instructrl.models.config import ModelConfig
  cfg = ModelConfig.from_dict(instructgpt.get_config("6b").model)
  prog = plan.StageProgram(None, (), "", 32, cfg, 2048, True)
  a8 = plan.analytic_memory("sft", prog, (1, 8, 1), None)
  a32 = plan.analytic_memory("sft", prog, (1, 32, 1), None)
  assert a8["state"] == pytest.approx(16 * cfg.num_params() / 8)
  assert a32["state"] == pytest.approx(a8["state"] / 4)
  assert a32["activations"] < a8["activations"]   # fewer rows per device


def finished_stage(directory: Path, model: dict) -> None:
  """A stage directory whose newest checkpoint says: complete, trained with `model` (all rm.base_workdir reads)."""
  import numpy as np
  from instructrl import checkpoints
  ckpt = checkpoints.StageCheckpoints(directory)
  try:
    ckpt.save(1, {"x": np.zeros(1, np.float32)}, {"complete": True, "model": model})
  finally:
    ckpt.close()


def test_ppo_programs_are_the_stages_own_with_an_rm_wider_than_the_policy(tmp_path):
  """plan compiles what ppo.build makes: the same state tree (score_gain included), and the value function
  and the RM members with the RM's model (rm.base_workdir's, wider here), not the policy's."""
  import jax
  from configs import instructgpt
  from instructrl import parallel
  from instructrl.models.config import ModelConfig
  from instructrl.stages import ppo
  config = instructgpt.get_config("smoke")
  config.rm.ensemble_size = 2
  wider = ModelConfig.from_dict({**config.model, "d_model": 96, "d_ff": 384}).to_dict()
  finished_stage(tmp_path / "base" / "sft", wider)
  config.rm.base_workdir = str(tmp_path / "base")
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = parallel.rules_from_config(config.mesh.rules)
  programs = ppo.build(config, mesh, rules, eos_id=3, pad_id=0)
  spec = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), tree)
  update = plan.build("ppo_update", config, mesh, rules)
  assert jax.tree.structure(update.args[0]) == jax.tree.structure(programs.abstract)
  assert spec(update.args[0]) == spec(programs.abstract)
  assert {"kl_coef", "score_gain"} <= set(update.args[0])
  rollout = plan.build("ppo_rollout", config, mesh, rules)
  policy, value, ref, members = rollout.args[:4]
  assert policy["embed"].shape[-1] == ref["embed"].shape[-1] == 64                 # the smoke policy
  assert value["embed"].shape[-1] == 96 and len(members) == 2                      # the RM's model, both members
  assert all(spec(m) == spec(programs.abstract["value"]) for m in members)
  with parallel.activate(mesh, rules):   # the abstract arguments fit the jitted programs
    rollout.jitted.lower(*rollout.args)
    update.jitted.lower(*update.args)


@pytest.mark.slow
def test_recommend_compiles_every_program_near_the_closed_form(small_recommend):
  result, table = small_recommend
  assert set(result["recommended"]) == {"sft", "rm", "ppo_rollout", "ppo_update"}
  for stage, r in result["recommended"].items():
    # 14.4 GiB usable: everything fits on the first candidate, fsdp over the 8 chips.
    assert r is not None and r["mesh"] == [1, 8, 1] and r["fits"], stage
    assert r["peak_gib"] == pytest.approx(r["argument_gib"] + r["output_gib"] - r["alias_gib"] + r["temp_gib"])
    assert 0.5 < r["peak_gib"] / r["analytic_gib"] < 2.0, (stage, r["peak_gib"], r["analytic_gib"])
  assert result["rows"] == list(result["recommended"].values())   # nothing after the first fit is compiled
  assert "Recommended per stage on v5e" in table and "ppo_update" in table.splitlines()[-1]


def test_candidate_meshes_try_fewest_chips_then_narrowest_tensor():
  assert plan.candidate_meshes([16, 8], [1, 8, 2]) == [(1, 8, 1), (1, 4, 2), (1, 1, 8), (1, 16, 1), (1, 8, 2),
                                                       (1, 2, 8)]
  assert plan.candidate_meshes([4], [8]) == []


def test_recommend_takes_the_first_candidate_that_fits_and_prunes_by_the_closed_form(monkeypatch):
  """The search logic alone: _measure replaced by a table of (closed form, compiled) peaks by mesh."""
  from configs import instructgpt
  budget = plan.TARGETS["v4"] * 0.9 / GiB
  peaks = {(1, 8, 1): (3.0 * budget, 4.0 * budget),   # closed form > 2x budget: not compiled (prune=2)
           (1, 4, 2): (1.5 * budget, 1.2 * budget),   # compiled, over
           (1, 16, 1): (0.5 * budget, 0.9 * budget),  # fits: the answer
           (1, 8, 2): (0.1 * budget, 0.1 * budget)}   # more chips: never tried
  compiled = []

  def fake_measure(stage, config, mesh, rules, shape, analytic_only, fit_layers):
    closed, peak = peaks[shape]
    if not analytic_only:
      compiled.append(shape)
      return {"shape": "s", "analytic_gib": closed, "peak_gib": peak}
    return {"shape": "s", "analytic_gib": closed}

  monkeypatch.setattr(plan, "_measure", fake_measure)
  from instructrl import parallel
  monkeypatch.setattr(parallel, "make_mesh", lambda shape, devices=None: None)   # no mesh is compiled for
  result = plan.recommend(instructgpt.get_config("small"), ["sft"], "v4", [8, 16], [1, 2], devices=list(range(16)))
  assert compiled == [(1, 4, 2), (1, 16, 1)]
  assert result["recommended"]["sft"]["mesh"] == [1, 16, 1]
  assert [r["mesh"] for r in result["rows"]] == [[1, 8, 1], [1, 4, 2], [1, 16, 1]]
  assert "skipped" in result["rows"][0] and not result["rows"][1]["fits"]
  compiled.clear()
  none = plan.recommend(instructgpt.get_config("small"), ["sft"], "v4", [8], [1, 2], prune=0, devices=list(range(8)))
  assert compiled == [(1, 8, 1), (1, 4, 2)] and none["recommended"]["sft"] is None
  assert "none fits on up to 8 chips" in plan.format_recommendation(none, "v4", 0.1)


ROLLOUT_DEPTH = """
import json, os, sys
from instructrl.tools import plan
os.environ["XLA_FLAGS"] = plan.PLAN_XLA_FLAGS
import jax
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
from configs import instructgpt
from instructrl import parallel
out = {}
for scan in (True, False):
  for depth in (2, 6):
    c = instructgpt.get_config("small")
    c.model.update(n_layers=depth, scan_layers=scan, dtype="bfloat16", remat=True)
    c.ppo.update(batch_size=64, minibatch_size=8)
    mesh = parallel.make_mesh((1, 8, 1), devices=jax.devices())
    rules = parallel.rules_from_config(c.mesh.rules)
    out[f"{scan},{depth}"] = plan.compiled_memory(plan.build("ppo_rollout", c, mesh, rules), mesh, rules)["temp"]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_scanned_rollout_gathers_one_layer_at_a_time():
  """Under FSDP the per-layer sampler keeps every layer's gathered weights of the four models (policy, reference,
  value, RM) live through its while_loop; the scanned one gathers a layer inside the loop body, so its
  temporaries do not grow with depth beyond the KV cache."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", ROLLOUT_DEPTH], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  temp = json.loads(proc.stdout.strip().splitlines()[-1])
  from configs import instructgpt
  m = instructgpt.get_config("small").model
  per_layer_weights = 4 * 12 * m.d_model ** 2 * 2            # four models' gathered bf16 weights of one layer
  kv_per_layer = 2 * (64 // 8) * 64 * m.n_kv_heads * m.head_dim * 2   # 8 episodes a device, 32 + 32 slots
  scanned = (temp["True,6"] - temp["True,2"]) / 4
  looped = (temp["False,6"] - temp["False,2"]) / 4
  assert looped >= per_layer_weights, temp
  assert scanned <= kv_per_layer + per_layer_weights / 4, temp


def test_analytic_micro_batches_hold_one_micro_batchs_activations():
  """The closed form with *.microbatches = n: the activations of a batch of rows / n (each micro-batch
  runs alone), plus a 4 B a parameter fp32 gradient accumulator per trained model."""
  from configs import instructgpt
  c = instructgpt.get_config("1.3b")
  for stage, block in (("rm", c.rm), ("sft", c.sft)):
    block.microbatches = 1
    one = plan.analytic_memory(stage, plan.describe(stage, c), (1, 16, 1), c)
    block.microbatches = 4
    four = plan.analytic_memory(stage, plan.describe(stage, c), (1, 16, 1), c)
    n = plan.describe(stage, c).model_cfg.num_params()
    assert four["state"] - one["state"] == pytest.approx(4 * n / 16)
    block.microbatches, block.batch_size = 1, block.batch_size // 4
    quarter = plan.analytic_memory(stage, plan.describe(stage, c), (1, 16, 1), c)
    block.batch_size *= 4
    assert four["activations"] == pytest.approx(quarter["activations"]), stage
    assert four["activations"] < one["activations"], stage


def test_plan_compiles_the_configured_micro_batches():
  """plan.build makes the step the stage runs: with sft.microbatches = 4 a lax.scan over micro-batches of 4
  rows, whose compiled temporaries are well under the one-pass step's."""
  import jax
  from configs import instructgpt
  from instructrl import parallel
  c = instructgpt.get_config("smoke")
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = parallel.rules_from_config(c.mesh.rules)
  temps = {}
  for n in (1, 4):
    c.sft.microbatches = n
    prog = plan.build("sft", c, mesh, rules)
    assert prog.microbatches == n and ("in 4 micro-batches" in prog.shape) == (n == 4)
    with parallel.activate(mesh, rules):
      assert ("scan" in str(jax.make_jaxpr(prog.jitted)(*prog.args))) == (n == 4)
    temps[n] = plan.compiled_memory(prog, mesh, rules)["temp"]
  assert temps[4] < 0.5 * temps[1], temps
