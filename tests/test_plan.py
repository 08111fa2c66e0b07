"""`python -m instructrl.tools.plan` on the small preset and 8 simulated devices: it reports per-device memory
from the compiled executables, the argument bytes are the sharded train state's (checked against the
closed-form parameter count), and the fsdp mesh needs less memory per device than pure data parallel.
The table logic (mesh parsing, fewest chips that fit) is checked without compiling.
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


@pytest.fixture(scope="module")
def small_plan(tmp_path_factory):
  out = tmp_path_factory.mktemp("plan") / "rows.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "instructrl.tools.plan", "--config=configs/instructgpt.py:small",
                         "--mesh=8,1,1;1,8,1", "--stages=sft", "--target=v5e", f"--json={out}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return {tuple(r["mesh"]): r for r in json.loads(out.read_text())}, proc.stdout


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


def test_analytic_micro_batches_hold_one_micro_batchs_activations():
  """The closed form with *.microbatches = n: activations of rows / n (here exactly a quarter, every term
  being linear in the rows), plus a 4 B a parameter gradient accumulator; the RM's rows are B x K
  responses of seq_len tokens (attention within one response)."""
  from configs import instructgpt
  c = instructgpt.get_config("1.3b")
  c.rm.microbatches = 1
  one = plan.analytic_memory("rm", plan.describe("rm", c), (1, 16, 1), c)
  c.rm.microbatches = 4
  four = plan.analytic_memory("rm", plan.describe("rm", c), (1, 16, 1), c)
  n = plan.describe("rm", c).model_cfg.num_params()
  assert four["state"] - one["state"] == pytest.approx(4 * n / 16)
  cfg = plan.describe("rm", c).model_cfg
  K, T, b = 9, 2048, 64 * 9 / 16
  kept = cfg.n_layers * b * T * cfg.d_model * 4
  scores = 3 * b * cfg.n_heads * T * T * 4
  assert one["activations"] > kept + scores       # per response: T^2, not (K T)^2
  assert one["activations"] < 1.5 * (kept + scores)
  weights = 2 * 12 * cfg.d_model ** 2 * 2
  assert four["activations"] - weights == pytest.approx((one["activations"] - weights) / 4)


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
