r"""Will a config fit, and on how many chips? Compile the train steps ahead of time and ask XLA.

  python -m instructrl.tools.plan --config=configs/instructgpt.py:6b --mesh=1,64,1 --target=v5p
  python -m instructrl.tools.plan --config=configs/instructgpt.py:1.3b --mesh=1,-1,1 --chips=8,16,32 --target=v4
  python -m instructrl.tools.plan --config=configs/instructgpt.py:small --mesh="8,1,1;1,8,1" --stages=sft
  python -m instructrl.tools.plan --config=configs/instructgpt.py:1.3b --recommend --target=v4

Every stage's step (pretrain, SFT, RM, PPO rollout, PPO update) is jitted exactly as the stage
jits it, lowered on abstract inputs (`jax.ShapeDtypeStruct` carrying the mesh's shardings: no
parameter is ever allocated) and compiled for a mesh of *simulated* CPU devices. The compiled
executable's `memory_analysis()` gives the per-device bytes of its arguments, outputs, aliases
(donated state) and temporaries; the peak is arguments + outputs - aliases + temporaries.

What this measures and what it does not: the program is the one a TPU/GPU runs (same sharding,
same remat, same collectives), but buffer assignment is XLA:CPU's. TPU pads minor dimensions to
(8, 128) tiles and fuses differently, so treat the figure as an estimate with ~10-20% error and
keep `--headroom` (default 10% of HBM, for the runtime and fragmentation). `analytic` beside it is
the closed-form estimate of docs/scaling.md (state / shards + remat activations), the only figure
for shapes too slow to compile here (`--analytic_only`, e.g. 175b).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from instructrl import cli_flags
from absl import app, flags
from ml_collections import config_flags

GiB = 1024 ** 3

# Per-chip memory (HBM) of common targets, in bytes. Sources: Cloud TPU system architecture pages
# (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB) and NVIDIA datasheets (A100/H100 80 GB, H200 141 GB).
TARGETS = {
    "v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB,
    "a100-80g": 80e9, "h100": 80e9, "h200": 141e9,
}
# Set before JAX creates its CPU backend. LLVM's optimisation passes dominate compile time on CPU and do
# not change buffer assignment (the memory figures): skipped. XLA:CPU's cse_barrier_expander drops the
# optimization barriers that jax.checkpoint places around recomputed blocks, after which CSE merges the
# recomputation back into the forward pass and remat saves nothing (measured: a 2-layer 1.3b-wide SFT
# step's temp bytes 6.2 GiB with remat vs 6.3 without); TPU and GPU keep the barriers, so keep them here.
PLAN_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_disable_hlo_passes=cse_barrier_expander")
STAGES = ("pretrain", "sft", "rm", "ppo_rollout", "ppo_update")

_CONFIG = cli_flags.define(config_flags.DEFINE_config_file, "config", None, "Config, e.g. configs/instructgpt.py:6b.", lock_config=True)
_MESH = cli_flags.define(flags.DEFINE_string, "mesh", None, "Mesh shape data,fsdp,tensor (one entry may be -1 with --chips); several "
                            "separated by ';' are compared in one table. Default: config.mesh.shape.")
_CHIPS = cli_flags.define(flags.DEFINE_string, "chips", None, "Comma-separated chip counts to try (the -1 entry of --mesh takes the rest); "
                             "default: the product of --mesh.")
_TARGET = cli_flags.define(flags.DEFINE_enum, "target", "v5p", list(TARGETS), "Chip whose memory the result is checked against.")
_STAGES = cli_flags.define(flags.DEFINE_string, "stages", "sft,rm,ppo_rollout,ppo_update", f"Comma-separated, from {STAGES}.")
_HEADROOM = cli_flags.define(flags.DEFINE_float, "headroom", 0.1, "Fraction of chip memory kept free (runtime, fragmentation).")
_ANALYTIC_ONLY = cli_flags.define(flags.DEFINE_bool, "analytic_only", False, "Skip compiling; closed-form estimate only (175b).")
_FIT_LAYERS = cli_flags.define(flags.DEFINE_string, "fit_layers", None, "Two depths, e.g. 2,4: compile those and extrapolate the "
                                  "bytes linearly to model.n_layers (minutes instead of an hour for 6b/175b); per-layer models only, "
                                  "a scanned one (model.scan_layers, the paper presets) compiles at full depth as fast.")
_RECOMMEND = cli_flags.define(flags.DEFINE_bool, "recommend", False, "For each stage, search --chips x --tensor meshes "
                                 "(1, chips/t, t) and recommend the fewest chips that fit (--mesh is ignored).")
_TENSOR = cli_flags.define(flags.DEFINE_string, "tensor", "1,2,4,8", "--recommend: tensor-axis widths to try on each chip count.")
_PRUNE = cli_flags.define(flags.DEFINE_float, "prune", 2.0, "--recommend: do not compile a mesh whose closed form exceeds "
                             "this many times the budget (0: compile all).")
RECOMMEND_CHIPS = "8,16,32,64,128,256"
_JSON = cli_flags.define(flags.DEFINE_string, "json", None, "Also write the rows as JSON to this file.")


# ----------------------------------------------------------------------------- one stage, abstractly

@dataclasses.dataclass
class StageProgram:
  jitted: object            # a jax.jit-wrapped function
  args: tuple               # abstract arguments (ShapeDtypeStruct with shardings)
  shape: str                # human-readable batch shape
  batch: int                # global rows (what must split over the batch axes)
  model_cfg: object
  tokens: int               # tokens per row that pass through the model
  train: bool               # backward pass and optimizer state
  per_row: int = 1          # sequences a row holds (the RM's K responses to one prompt), `tokens` split evenly
  microbatches: int = 1     # the step's gradient accumulated over this many micro-batches of `batch` rows


def _abstract(shape, dtype, sharding):
  import jax
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _abstract_key(mesh):
  import jax
  from instructrl import parallel
  k = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=parallel.replicated(mesh))


def _with_steps(stage_cfg, steps: int = 1000):
  import ml_collections
  c = ml_collections.ConfigDict(stage_cfg.to_dict())
  c.steps = steps
  return c


def _stage_model(stage: str, config) -> dict:
  """The model fields a stage trains before its overrides: the RM's may be rm.base_workdir's larger model."""
  if stage == "rm":
    from instructrl.stages import rm_models
    return rm_models.rm_model(config)
  return dict(config.model)


def _micro(n: int) -> str:
  return f" in {n} micro-batches" if n > 1 else ""


def describe(stage: str, config) -> StageProgram:
  """The stage's shapes without tracing anything (enough for the analytic estimate)."""
  from instructrl.models.config import ModelConfig
  if stage not in STAGES:
    raise ValueError(f"--stages: unknown stage {stage!r}; expected some of {STAGES}")
  if stage in ("pretrain", "sft", "rm"):
    cfg = config[stage]
    model_cfg = ModelConfig.from_dict({**_stage_model(stage, config), **cfg.get("model_overrides", {})})
    n = int(cfg.get("microbatches", 1))
    if stage != "rm":
      return StageProgram(None, (), f"{cfg.batch_size} x {cfg.seq_len}{_micro(n)}", cfg.batch_size, model_cfg,
                          cfg.seq_len, True, microbatches=n)
    K = max(cfg.k_choices)
    return StageProgram(None, (), f"{cfg.batch_size} prompts x K={K} x {cfg.seq_len}{_micro(n)}", cfg.batch_size,
                        model_cfg, K * cfg.seq_len, True, per_row=K, microbatches=n)
  cfg = config.ppo
  model_cfg = ModelConfig.from_dict(config.model)
  B, P, N = cfg.batch_size, cfg.prompt_len, cfg.max_new_tokens
  if stage == "ppo_rollout":
    return StageProgram(None, (), f"{B} episodes x ({P} prompt + {N} new)", B, model_cfg, P + N, False)
  from instructrl.stages import ppo
  ptx_bs = cfg.ptx_batch_size if ppo.ptx_enabled(cfg) else 1
  n = int(cfg.get("microbatches", 1))
  return StageProgram(None, (), f"{B} episodes, minibatch {cfg.minibatch_size}, ptx {ptx_bs} x {cfg.ptx_seq_len}"
                      f"{_micro(n)}", cfg.minibatch_size, model_cfg, P + N, True, microbatches=n)


def build(stage: str, config, mesh, rules) -> StageProgram:
  """The stage's jitted step and abstract arguments on `mesh`, as the stage itself builds them."""
  import jax
  import jax.numpy as jnp

  from instructrl import parallel
  from instructrl.models.config import ModelConfig
  from instructrl.stages import lm, ppo, reward, train_state

  bsh = lambda ndim: parallel.batch_sharding(mesh, rules, ndim)
  repl = parallel.replicated(mesh)
  key = _abstract_key(mesh)
  if stage in ("pretrain", "sft", "rm"):
    cfg = _with_steps(config[stage])
    model_cfg = ModelConfig.from_dict({**_stage_model(stage, config), **cfg.get("model_overrides", {})})
    tx, schedule = train_state.make_optimizer(cfg, cfg.steps)
    head = "scalar" if stage == "rm" else "lm"
    sh = train_state.state_shardings(model_cfg, tx, mesh, rules, head=head)
    state = train_state.abstract_state(model_cfg, tx, sh, head=head)
    B, T = cfg.batch_size, cfg.seq_len
    n = int(cfg.get("microbatches", 1))
    if stage != "rm":
      step, _ = lm.make_steps(model_cfg, tx, schedule, sh, mesh, rules, n)
      batch = {"inputs": _abstract((B, T), jnp.int32, bsh(2)), "targets": _abstract((B, T), jnp.int32, bsh(2)),
               "mask": _abstract((B, T), jnp.bool_, bsh(2))}
      return StageProgram(step, (state, batch, key), f"{B} x {T}{_micro(n)}", B, model_cfg, T, True, microbatches=n)
    if cfg.formulation != "per_prompt":
      raise ValueError(f"rm.formulation={cfg.formulation!r}: plan covers the paper's per_prompt step")
    K = max(cfg.k_choices)   # ragged K is padded to K_max: the compiled shape is [B, K_max, T]
    step, _, _ = reward.make_steps(model_cfg, "per_prompt", tx, schedule, sh, mesh, rules, microbatches=n)
    batch = {"tokens": _abstract((B, K, T), jnp.int32, bsh(3)), "last_index": _abstract((B, K), jnp.int32, bsh(2)),
             "ranks": _abstract((B, K), jnp.int32, bsh(2)), "mask": _abstract((B, K), jnp.bool_, bsh(2))}
    return StageProgram(step, (state, batch, key), f"{B} prompts x K={K} x {T}{_micro(n)}", B, model_cfg, K * T,
                        True, per_row=K, microbatches=n)

  # PPO: policy, reference, value and RM on the same mesh in one program each (rollout, update), made by
  # ppo.build as the stage makes them: the value function and the RM have the RM's model (rm.base_workdir's).
  from instructrl.data.tokenizer import EOS_ID, PAD_ID
  cfg = config.ppo
  programs = ppo.build(config, mesh, rules, eos_id=EOS_ID, pad_id=PAD_ID)
  state = programs.abstract
  B, P, N = cfg.batch_size, cfg.prompt_len, cfg.max_new_tokens
  scalar = lambda: _abstract((), jnp.float32, repl)
  ro_args = (state["params"], state["value"], state["params"], (state["value"],) * programs.n_rm,
             _abstract((B, P), jnp.int32, bsh(2)), _abstract((B, P), jnp.bool_, bsh(2)), key, scalar(), scalar())
  if stage == "ppo_rollout":
    return StageProgram(programs.rollout, ro_args, f"{B} episodes x ({P} prompt + {N} new)", B, programs.model_cfg,
                        P + N, False)
  if stage != "ppo_update":
    raise ValueError(f"--stages: unknown stage {stage!r}; expected some of {STAGES}")
  with parallel.activate(mesh, rules):   # the model's logical constraints need the rules while tracing
    ro_out = jax.eval_shape(programs.rollout, *ro_args)
  batch = jax.tree.map(lambda a: _abstract(a.shape, a.dtype, bsh(a.ndim)), ro_out[0])   # episodes over 'batch'
  ptx_on = ppo.ptx_enabled(cfg)
  ptx_bs, L = cfg.ptx_batch_size if ptx_on else 1, cfg.ptx_seq_len
  ptx_sh = programs.ptx_sharding if ptx_on else repl   # as ppo.run's batches
  ptx = {k: _abstract((ppo.ptx_minibatches(cfg), ptx_bs, L), dt, ptx_sh)
         for k, dt in (("inputs", jnp.int32), ("targets", jnp.int32), ("mask", jnp.bool_))}
  n = int(cfg.get("microbatches", 1))
  return StageProgram(programs.update, (state, batch, ptx, key), f"{B} episodes, minibatch {cfg.minibatch_size}, "
                      f"ptx {ptx_bs} x {L}{_micro(n)}", cfg.minibatch_size, programs.model_cfg, P + N, True,
                      microbatches=n)


# ----------------------------------------------------------------------------- memory

def compiled_memory(program: StageProgram, mesh, rules) -> dict:
  """Per-device bytes from XLA's buffer assignment of the compiled SPMD program."""
  from instructrl import parallel
  t0 = time.perf_counter()
  with parallel.activate(mesh, rules):
    compiled = program.jitted.lower(*program.args).compile()
  m = compiled.memory_analysis()
  out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
         "temp": m.temp_size_in_bytes, "code": m.generated_code_size_in_bytes}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["compile_s"] = time.perf_counter() - t0
  return out


def analytic_memory(stage: str, program: StageProgram, mesh_shape: tuple, config) -> dict:
  """Closed-form per-device bytes (docs/scaling.md, "Closed form"): sharded state plus the activations
  live at the program's peak, which is one of a few phases that are never live together.

  state: a trained model costs 16 B a parameter (fp32 params, Adam mu and nu, fp32 gradients), a frozen
  one 4 B (PPO's reference and RM, the EMA), all split over fsdp x tensor.
  A training pass, with b = rows per device: with remat every block keeps its input [b, T, D] in the
  compute dtype (the scan's carry); on top, the larger of (block phase) one block's all-gathered weights
  (2 x 12 D^2 / tensor, compute dtype), its working set b T (16 D + 3 F / tensor) and four fp32 copies
  of the attention scores b (H / tensor) T^2 (scores, masked, probabilities, their gradient), and (head
  phase, LM head only) four fp32 copies of the logits b T V / tensor (logits, exp, log-softmax, gradient).
  The PPO rollout: the larger of sampling (the KV cache with the prefill's scores and logits, or three
  copies of the cache) and re-scoring
  (three fp32 copies of the full sequence's scores and the policy's and reference's response logits).
  Micro-batches (`*.microbatches` = n): a training pass holds one micro-batch's activations (rows / n), and
  each trained model adds a 4 B a parameter fp32 gradient accumulator.
  """
  import numpy as np
  cfg = program.model_cfg
  data, fsdp, tensor = mesh_shape
  n = cfg.num_params()
  ab = np.dtype(cfg.compute_dtype).itemsize
  trained = {"pretrain": 1, "sft": 1, "rm": 1, "ppo_rollout": 0, "ppo_update": 2}[stage]   # models with Adam
  frozen = {"ppo_rollout": 4, "ppo_update": 1}.get(stage, 0)   # rollout: policy/ref/value/RM; update: the EMA
  micro = program.microbatches
  # With micro-batches each trained model also keeps an fp32 gradient accumulator (4 B a parameter).
  state = n * (trained * (16 + (4 if micro > 1 else 0)) + frozen * 4) / (fsdp * tensor)
  D, F, L, H, V = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.n_heads / tensor, cfg.vocab_size / tensor
  per_device = lambda rows: max(rows / (data * fsdp), 1.0)
  scores = lambda b, Tq, Tk: b * H * Tq * Tk * 4
  working = lambda b, T: b * T * (16 * D + 3 * F / tensor) * ab
  head_weights = V * D * (4 + ab)   # the (un)embedding gathered in fp32 and cast

  def train(rows, T, lm_head=True):
    """(kept for the backward pass, the larger transient phase) of one forward + backward."""
    b = per_device(rows)
    kept = L * b * T * D * ab if cfg.remat else L * (working(b, T) + 2 * scores(b, T, T))
    block = 2 * 12 * D * D / tensor * ab + working(b, T) + 4 * scores(b, T, T)
    head = head_weights + 4 * b * T * V * 4 if lm_head else 0.0
    return kept, max(block, head)

  if stage == "ppo_rollout":
    b, S, N = per_device(program.batch), program.tokens, config.ppo.max_new_tokens
    P = S - N
    kv = 2 * L * b * S * cfg.n_kv_heads / tensor * cfg.head_dim * ab
    # The loop's cache goes in and comes out of the layer scan, with one more copy in flight (XLA:CPU's
    # buffer assignment at 24 layers also holds fp32 copies of k and v: it runs bf16 dots in fp32).
    # The prefill attends over the prompt's P slots and unembeds its last position only.
    sampling = max(kv + 2 * scores(b, P, P) + b * V * 4, 3 * kv)
    rescoring = 3 * scores(b, S + 1, S + 1) + 2 * b * N * V * 4 + head_weights
    act = max(sampling, rescoring)
  elif stage == "ppo_update":
    # One minibatch at a time (the update's scan): the policy's gradient (episodes and, with ptx, the
    # pretraining minibatch in one loss: both kept, the larger transient), then the value function's.
    from instructrl.stages import ppo
    kept, transient = train(program.batch / micro, program.tokens)
    if ppo.ptx_enabled(config.ppo):
      k2, t2 = train(config.ppo.ptx_batch_size / micro, config.ppo.ptx_seq_len)
      kept, transient = kept + k2, max(transient, t2)
    act = max(kept + transient, sum(train(program.batch / micro, program.tokens, lm_head=False)))
  else:
    rows, T = program.batch * program.per_row / micro, program.tokens // program.per_row
    act = sum(train(rows, T, lm_head=stage != "rm"))
  return {"state": state, "activations": act, "peak": state + act}


# ----------------------------------------------------------------------------- the table

def resolve_mesh(shape, chips: int) -> tuple:
  shape = list(shape)
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if chips % rest:
      raise ValueError(f"--mesh={tuple(shape)}: {chips} chips are not divisible by {rest}")
    shape[shape.index(-1)] = chips // rest
  if math.prod(shape) != chips:
    raise ValueError(f"--mesh={tuple(shape)} has {math.prod(shape)} devices, not {chips}")
  return tuple(shape)


def _measure(stage, config, mesh, rules, shape, analytic_only, fit_layers):
  """Compiled (or only analytic) per-device bytes of one stage; with fit_layers=(l1, l2), compiled at
  those depths and extrapolated linearly to config.model.n_layers (the blocks are identical, so
  every byte count is affine in the depth while the peak stays in one phase; checked against a full
  compile in docs/scaling.md). A scanned model is compiled at full depth whatever fit_layers says."""
  import copy
  program = describe(stage, config)
  split = shape[0] * shape[1]
  rows = program.batch // program.microbatches
  if program.batch % program.microbatches or rows % split:
    raise ValueError(f"batch of {program.batch} rows{_micro(program.microbatches)} does not split over data x "
                     f"fsdp = {split} devices; use the tensor axis, a larger batch or fewer micro-batches")
  cfg = program.model_cfg
  for field, axis, size in (("n_heads", "tensor", shape[2]), ("n_kv_heads", "tensor", shape[2]),
                            ("d_ff", "tensor", shape[2]), ("vocab_size", "tensor", shape[2]),
                            ("d_model", "fsdp", shape[1])):
    if getattr(cfg, field) % size:   # the default rules' axes (parallel.DEFAULT_RULES)
      raise ValueError(f"model.{field}={getattr(cfg, field)} does not split over {axis}={size}")
  row = {"shape": program.shape, "analytic_gib": analytic_memory(stage, program, shape, config)["peak"] / GiB}
  if analytic_only:
    return row
  if fit_layers and cfg.scan_layers:
    # Scanned, the compile is as short at full depth as at 4 layers, and the peak can change phase with
    # depth (the rollout's KV cache overtakes the re-scoring), which a linear fit misses.
    fit_layers = None
    row["full_depth"] = "scanned: --fit_layers not needed"
  if not fit_layers:
    m = compiled_memory(build(stage, config, mesh, rules), mesh, rules)
  else:
    L = config.model.n_layers
    ms = []
    for depth in fit_layers:
      c = copy.deepcopy(config)
      c.model.n_layers = depth
      ms.append(compiled_memory(build(stage, c, mesh, rules), mesh, rules))
    (l1, m1), (l2, m2) = zip(fit_layers, ms)
    m = {k: m1[k] + (m2[k] - m1[k]) * (L - l1) / (l2 - l1) for k in m1}
    m["compile_s"] = m1["compile_s"] + m2["compile_s"]
    row["extrapolated_from_layers"] = list(fit_layers)
  row.update({f"{k}_gib": v / GiB for k, v in m.items() if k != "compile_s"}, compile_s=round(m["compile_s"], 1))
  return row


def plan(config, layouts, stages, target: str, headroom: float = 0.1, analytic_only: bool = False,
         devices=None, fit_layers: tuple | None = None, on_row=None) -> list[dict]:
  """One row per (mesh shape, stage): measured and analytic per-device bytes, and whether it fits."""
  import jax
  from instructrl import parallel
  rules = parallel.rules_from_config(config.mesh.rules)
  budget = TARGETS[target] * (1 - headroom)
  rows = []
  for shape in layouts:
    chips = math.prod(shape)
    if analytic_only:
      mesh = None      # nothing is traced or compiled
    else:
      available = jax.devices() if devices is None else devices
      if chips > len(available):
        raise ValueError(f"mesh {tuple(shape)} needs {chips} devices, {len(available)} simulated devices available")
      mesh = parallel.make_mesh(shape, devices=available[:chips])
    for stage in stages:
      row = {"stage": stage, "chips": chips, "mesh": list(shape), "target": target}
      try:
        row.update(_measure(stage, config, mesh, rules, shape, analytic_only, fit_layers))
        row["fits"] = bool(row.get("peak_gib", row["analytic_gib"]) * GiB <= budget)
      except ValueError as e:
        row.update(error=str(e), fits=False)
      rows.append(row)
      if on_row:   # compiles take minutes: show each row as it is done
        on_row(row)
  return rows


def smallest_fitting(rows: list[dict]) -> tuple | None:
  """The mesh with the fewest chips on which every planned stage fits."""
  by_mesh = {}
  for r in rows:
    by_mesh.setdefault(tuple(r["mesh"]), []).append(r["fits"])
  ok = sorted((math.prod(m), m) for m, fits in by_mesh.items() if all(fits))
  return ok[0][1] if ok else None


# ----------------------------------------------------------------------------- recommend

def candidate_meshes(chips: list[int], tensors: list[int]) -> list[tuple]:
  """(1, chips / t, t) for every chip count and tensor width that divides it: fewest chips first, then the
  narrowest tensor axis (fsdp alone is tried before fsdp x tensor on the same chips)."""
  return [(1, c // t, t) for c in sorted(chips) for t in sorted(tensors) if c % t == 0]


def recommend(config, stages, target: str, chips: list[int], tensors: list[int], headroom: float = 0.1,
              fit_layers: tuple | None = None, prune: float = 2.0, devices=None, on_row=None) -> dict:
  """For each stage, the first candidate mesh (`candidate_meshes` order) whose compiled peak fits the target's
  memory less headroom. A candidate whose closed form exceeds `prune` x that budget is not compiled (the
  compiled peak is within 1.5x of the closed form, docs/scaling.md); prune=0 compiles every candidate.
  Returns {"recommended": {stage: row or None}, "rows": every candidate tried, in order}."""
  import jax
  from instructrl import parallel
  rules = parallel.rules_from_config(config.mesh.rules)
  budget = TARGETS[target] * (1 - headroom)
  available = jax.devices() if devices is None else devices
  out = {"recommended": {}, "rows": []}
  for stage in stages:
    out["recommended"][stage] = None
    for shape in candidate_meshes(chips, tensors):
      n = math.prod(shape)
      row = {"stage": stage, "chips": n, "mesh": list(shape), "target": target}
      try:
        row.update(_measure(stage, config, None, rules, shape, True, None))
        if prune and row["analytic_gib"] * GiB > prune * budget:
          row.update(skipped=f"closed form {row['analytic_gib']:.1f} GiB > {prune:g} x budget", fits=False)
        else:
          if n > len(available):
            raise ValueError(f"mesh {shape} needs {n} devices, {len(available)} simulated devices available")
          mesh = parallel.make_mesh(shape, devices=available[:n])
          row.update(_measure(stage, config, mesh, rules, shape, False, fit_layers))
          row["fits"] = bool(row["peak_gib"] * GiB <= budget)
      except ValueError as e:
        row.update(error=str(e), fits=False)
      out["rows"].append(row)
      if on_row:
        on_row(row)
      if row["fits"]:
        out["recommended"][stage] = row
        break
  return out


def format_recommendation(result: dict, target: str, headroom: float) -> str:
  lines = [f"Recommended per stage on {target} ({TARGETS[target] * (1 - headroom) / GiB:.1f} GiB usable a chip): "
           "the fewest chips, then the narrowest tensor axis, that fit",
           f"{'stage':<12}{'chips':>6}  {'mesh':<12}{'peak':>8}{'analytic':>10}  shape"]
  for stage, r in result["recommended"].items():
    if r is None:
      tried = max((x["chips"] for x in result["rows"] if x["stage"] == stage), default=0)
      lines.append(f"{stage:<12}{'-':>6}  none fits on up to {tried} chips (micro-batches or more chips)")
    else:
      lines.append(f"{stage:<12}{r['chips']:>6}  {str(tuple(r['mesh'])):<12}{r['peak_gib']:8.2f}"
                   f"{r['analytic_gib']:10.2f}  {r['shape']}")
  return "\n".join(lines)


def table_header(target: str, headroom: float) -> str:
  return "\n".join([
      f"target {target}: {TARGETS[target] / GiB:.1f} GiB per chip, {headroom:.0%} headroom kept "
      f"(budget {TARGETS[target] * (1 - headroom) / GiB:.1f} GiB)",
      f"{'stage':<12}{'chips':>6}  {'mesh':<12}{'args':>8}{'out':>8}{'alias':>8}{'temp':>8}{'peak':>8}"
      f"{'analytic':>10}  {'fits':<5} shape"])


def table_row(r: dict) -> str:
  g = lambda k: f"{r[k]:8.2f}" if k in r else f"{'-':>8}"
  if "error" in r:
    return f"{r['stage']:<12}{r['chips']:>6}  {str(tuple(r['mesh'])):<12} error: {r['error']}"
  if "skipped" in r:
    return f"{r['stage']:<12}{r['chips']:>6}  {str(tuple(r['mesh'])):<12} not compiled: {r['skipped']}"
  return (f"{r['stage']:<12}{r['chips']:>6}  {str(tuple(r['mesh'])):<12}{g('argument_gib')}{g('output_gib')}"
          f"{g('alias_gib')}{g('temp_gib')}{g('peak_gib')}{r['analytic_gib']:10.2f}  "
          f"{'yes' if r['fits'] else 'NO':<5} {r['shape']}")


def table_footer(rows: list[dict]) -> str:
  lines = []
  fitted = sorted({tuple(r["extrapolated_from_layers"]) for r in rows if "extrapolated_from_layers" in r})
  if fitted:
    lines.append(f"args/out/alias/temp/peak: compiled at depths {fitted[0]} and extrapolated linearly to n_layers.")
  best = smallest_fitting(rows)
  lines.append("GiB per device. " + (f"Fewest chips tried on which every stage fits: {math.prod(best)}, mesh {best}"
                                     if best else "No mesh tried fits every stage: try more chips or a tensor axis."))
  return "\n".join(lines)


def format_table(rows: list[dict], target: str, headroom: float) -> str:
  return "\n".join([table_header(target, headroom), *map(table_row, rows), table_footer(rows)])


def parse_layouts(mesh_text: str, chips_text: str | None) -> list[tuple]:
  """--mesh "1,-1,1" --chips 8,16 -> [(1, 8, 1), (1, 16, 1)]; several meshes separated by ';'."""
  layouts = []
  chips = sorted(int(c) for c in chips_text.split(",")) if chips_text else None
  for text in mesh_text.split(";"):
    try:
      shape = tuple(int(v) for v in text.strip().strip("()").split(","))
    except ValueError:
      raise ValueError(f"--mesh={text!r}: expected data,fsdp,tensor integers, e.g. 1,8,1") from None
    if len(shape) != 3:
      raise ValueError(f"--mesh={text!r}: expected 3 entries (data, fsdp, tensor)")
    if -1 in shape and not chips:
      raise ValueError(f"--mesh={text!r} has a -1 entry: give --chips, e.g. --chips=8,16,32")
    layouts += [resolve_mesh(shape, c) for c in chips] if chips and -1 in shape else [shape]
  return layouts


def _ints(flag: str, text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise app.UsageError(f"--{flag}={text!r}: expected comma-separated positive integers, e.g. 8,16,32")
  return values


def _setup_jax(n_devices: int):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + PLAN_XLA_FLAGS
  import jax
  jax.config.update("jax_platforms", "cpu")
  if n_devices:
    jax.config.update("jax_num_cpu_devices", n_devices)


def main_recommend(config, stages, fit):
  chips, tensors = _ints("chips", _CHIPS.value or RECOMMEND_CHIPS), _ints("tensor", _TENSOR.value)
  _setup_jax(max(chips))
  print(table_header(_TARGET.value, _HEADROOM.value), flush=True)
  result = recommend(config, stages, _TARGET.value, chips, tensors, _HEADROOM.value, fit_layers=fit,
                     prune=_PRUNE.value, on_row=lambda r: print(table_row(r), flush=True))
  print(format_recommendation(result, _TARGET.value, _HEADROOM.value))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=1)


def main(argv):
  del argv
  config = _CONFIG.value
  stages = [s.strip() for s in (_STAGES.value or "sft,rm,ppo_rollout,ppo_update").split(",") if s.strip()]
  bad = [s for s in stages if s not in STAGES]
  if bad:
    raise app.UsageError(f"--stages: unknown {bad}; choose from {STAGES}")
  fit = tuple(int(l) for l in _FIT_LAYERS.value.split(",")) if _FIT_LAYERS.value else None
  if fit is not None and (len(fit) != 2 or fit[0] == fit[1] or min(fit) < 1):
    raise app.UsageError(f"--fit_layers={_FIT_LAYERS.value}: expected two different depths >= 1, e.g. 2,4")
  if _RECOMMEND.value:
    return main_recommend(config, stages, fit)
  try:
    layouts = parse_layouts(_MESH.value or ",".join(map(str, config.mesh.shape)), _CHIPS.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  _setup_jax(0 if _ANALYTIC_ONLY.value else max(math.prod(m) for m in layouts))
  print(table_header(_TARGET.value, _HEADROOM.value), flush=True)
  rows = plan(config, layouts, stages, _TARGET.value, _HEADROOM.value, _ANALYTIC_ONLY.value, fit_layers=fit,
              on_row=lambda r: print(table_row(r), flush=True))
  print(table_footer(rows))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  from instructrl import errors
  errors.run_app(main)   # a bad config, file or checkpoint: one `error:` line, exit 2
