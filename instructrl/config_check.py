"""Every user-settable config field checked before any work: type, sign, range, and the relations
between fields (divisibility, lengths within the model's context, the mesh's device count).

`check_config` is the check of the pipeline (`instructrl.main`): configs/instructgpt.py, and
configs/public.py with its `data` block (`_check_source`). It raises ConfigError naming the field,
its value and what was expected. Per-field rules live in tables (field -> rule); what relates two fields follows.
"""

from __future__ import annotations

import math
import string
from typing import Any, Callable, NamedTuple

from instructrl.errors import ConfigError

# rm_round1, ppo_round1: round one of two rounds of comparisons (rm.rounds=2, stages/rounds.py).
STAGES = ("world", "import", "pretrain", "sft", "rm_round1", "ppo_round1", "rm", "ppo", "ppo_noptx", "eval")


class Rule(NamedTuple):
  ok: Callable[[Any], bool]
  expected: str


def _real(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(lo=None, hi=None, *, lo_open=False, hi_open=False, what="a number") -> Rule:
  """A finite number within [lo, hi] (either end open, or absent)."""
  def ok(v):
    return (_real(v) and (lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))
  if lo is not None and hi is not None:
    text = f"{what} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  elif lo is not None:
    text = f"{what} {'>' if lo_open else '>='} {lo}"
  else:
    text = what
  return Rule(ok, text)


def integer(lo: int = 0) -> Rule:
  return Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo,
              "a positive integer" if lo == 1 else f"an integer >= {lo}")


def choice(*options) -> Rule:
  return Rule(lambda v: v in options, " or ".join(map(repr, options)) if len(options) == 2 else f"one of {options}")


BOOL = Rule(lambda v: isinstance(v, bool), "True or False")
TEXT = Rule(lambda v: isinstance(v, str), "a string")
POSITIVE = number(0, lo_open=True)              # learning rates, temperatures, clip norms
NONNEG = number(0)                              # penalty coefficients
PROB = number(0, 1, hi_open=True, what="a probability")   # dropout, EMA decay, Adam betas
FRACTION = number(0, 1)                         # inclusive: GAE lambda, discount, final lr fraction
OPEN_UNIT = number(0, 1, lo_open=True, hi_open=True)      # PPO's ratio clip, a validation split
COUNT = integer(1)
NONNEG_INT = integer(0)

# Fields of the pretrain and sft blocks (configs/instructgpt.py:_lm_stage); the RM block has them too.
LM_STAGE = {
    "steps": COUNT, "batch_size": COUNT, "seq_len": COUNT, "learning_rate": POSITIVE, "warmup_steps": NONNEG_INT,
    "final_lr_fraction": FRACTION, "b1": PROB, "b2": PROB, "weight_decay": NONNEG, "grad_clip": POSITIVE,
    "log_every": COUNT, "eval_every": COUNT, "eval_batch_size": COUNT, "checkpoint_every": COUNT,
    "keep_checkpoints": COUNT, "keep_period": NONNEG_INT, "on_nonfinite": choice("stop", "skip"),
    "max_nonfinite_skips": NONNEG_INT, "microbatches": COUNT,
}

RM_STAGE = {
    **{k: v for k, v in LM_STAGE.items() if k != "steps"},   # steps: derived from rm.epochs
    "epochs": POSITIVE, "formulation": choice("per_prompt", "shuffled_pairs"), "pair_batch_size": COUNT,
    "policy": choice("pretrain", "sft"), "base_workdir": TEXT, "init_stage": choice("", "pretrain", "sft"),
    "ppo_source": TEXT, "keep_empty": BOOL, "extra_comparisons": TEXT, "n_prompts": COUNT,
    "valid_fraction": OPEN_UNIT, "sample_temperature": POSITIVE, "prompt_len": COUNT, "max_new_tokens": COUNT,
    "collect_batch_prompts": COUNT, "rankings_per_prompt": COUNT, "policy_pair_weight": POSITIVE,
    "gold_probe_prompts": NONNEG_INT, "ensemble_size": COUNT,
    "ensemble_bootstrap": BOOL,
    "rounds": Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v in (1, 2), "1 or 2"),
    "round1_ppo_episodes": integer(0), "packing": BOOL,
}

PPO_STAGE = {
    "policy_init": choice("pretrain", "sft"), "select_sft_by_rm": BOOL, "select_prompts": COUNT, "n_prompts": COUNT,
    "total_episodes": COUNT, "batch_size": COUNT, "minibatch_size": COUNT, "ppo_epochs": COUNT,
    "learning_rate": POSITIVE, "value_learning_rate": POSITIVE, "warmup_iterations": NONNEG_INT,
    "kl_coef": NONNEG, "adaptive_kl": BOOL, "target_kl": POSITIVE, "kl_horizon": POSITIVE, "ptx_coef": NONNEG,
    "ptx_batch_size": COUNT, "ptx_seq_len": COUNT, "ema_decay": PROB, "ema_every": choice("update", "iteration"),
    "discount": FRACTION,                         # the GAE discount (the paper's gamma is ptx_coef)
    "gae_lambda": FRACTION, "clip": OPEN_UNIT,
    "value_clip": POSITIVE,                       # in return units, not a ratio: any positive width
    "whiten_advantages": BOOL, "normalize_score": BOOL, "normalize_batches": COUNT, "temperature": POSITIVE,
    "prompt_len": COUNT, "max_new_tokens": COUNT, "missing_eos_penalty": number(), "reward": choice("rm", "gold"),
    "rm_uncertainty_coef": NONNEG, "rm_runs": TEXT, "grad_clip": POSITIVE, "b1": PROB, "b2": PROB,
    "log_every": COUNT, "sample_every": NONNEG_INT, "eval_every": COUNT, "checkpoint_every": COUNT,
    "keep_checkpoints": COUNT, "on_nonfinite": choice("stop", "skip"), "max_nonfinite_skips": NONNEG_INT,
    "microbatches": COUNT,
}

EVAL = {
    "n_prompts": NONNEG_INT, "batch_size": COUNT, "prompt_len": COUNT, "prefix_len": NONNEG_INT,
    "max_new_tokens": COUNT, "temperature": POSITIVE, "baseline_temperature": POSITIVE,
    "prompted_at_policy_temperature": BOOL, "sft_at_baseline_temperature": BOOL, "few_shot": NONNEG_INT,
    "report_prompts": NONNEG_INT, "cloze_seq_len": COUNT, "split": choice("test", "dev"),
}

MODEL = {
    "style": choice("gpt", "llama"), "vocab_size": COUNT, "max_len": COUNT, "d_model": COUNT, "n_layers": COUNT,
    "n_heads": COUNT, "n_kv_heads": COUNT, "head_dim": COUNT, "d_ff": COUNT, "norm_eps": POSITIVE,
    "rope_theta": POSITIVE, "tie_embeddings": BOOL, "embed_dropout": PROB, "attn_dropout": PROB,
    "resid_dropout": PROB, "dtype": choice("float32", "bfloat16", "float16"),
    "param_dtype": choice("float32", "bfloat16", "float16"), "remat": BOOL,
    "remat_policy": choice("", "none", "block_inputs", "nothing_saveable", "dots_saveable"), "scan_layers": BOOL,
    "attention": choice("einsum", "dot_product"),
    "qkv_bias": BOOL, "embed_scale": BOOL, "glu_activation": choice("silu", "gelu_tanh"),
    "sliding_window": NONNEG_INT, "rope_scaling": choice("", "llama3"), "rope_factor": number(1),
    "rope_low_freq_factor": POSITIVE, "rope_high_freq_factor": POSITIVE, "rope_original_max_len": NONNEG_INT,
    "attn_softcap": NONNEG, "final_softcap": NONNEG, "query_pre_attn_scalar": NONNEG, "post_norms": BOOL,
}

# configs/instructgpt.py: block -> {field: rule}. Blocks with their own checks (world, mesh, the
# model_overrides and rm.source_mix sub-blocks, rm.k_choices) are handled below the table.
PIPELINE = {
    "": {"preset": TEXT, "seed": NONNEG_INT, "stages": TEXT},
    "tokenizer": {"vocab_size": COUNT, "byte_fallback": BOOL},
    "model": MODEL,
    "pretrain": LM_STAGE,
    "sft": {**LM_STAGE, "pretrain_mix": PROB, "demos_dir": TEXT},
    "rm": RM_STAGE,
    "ppo": PPO_STAGE,
    "eval": EVAL,
}
CHECKED_APART = {"mesh.shape", "mesh.rules", "world", "data", "pretrain.model_overrides", "sft.model_overrides",
                 "rm.model_overrides", "rm.model_shape", "rm.source_mix", "rm.round2_mix", "rm.k_choices"}

# The model fields rm.model_shape may set: the trunk's size. The RM reads the policy's token sequences, so
# its vocabulary, context and architecture style stay the policy's.
RM_SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")


def rm_run_names(config) -> list[str]:
  """ppo.rm_runs as a list of run directories (other runs' RMs joining the ensemble)."""
  return [r.strip() for r in str(config.ppo.get("rm_runs", "") or "").split(",") if r.strip()]


def fail(field: str, value, expected: str) -> None:
  raise ConfigError(f"{field}={value!r}: expected {expected}")


def check_table(config, table: dict) -> None:
  """Apply {block: {field: rule}}; a field the config does not have is not checked (older configs)."""
  for block, rules in table.items():
    if block and block not in config:
      continue
    section = config[block] if block else config
    for field, rule in rules.items():
      if field in section and not rule.ok(section[field]):
        fail(f"{block}.{field}" if block else field, _plain(section[field]), rule.expected)


def _plain(v):
  return tuple(v) if isinstance(v, list) else v


def mesh_shape(shape, n_devices: int) -> tuple[int, ...]:
  """config.mesh.shape with its -1 resolved against `n_devices`, checked to use exactly those devices."""
  from instructrl.parallel import MESH_AXES
  shape = tuple(shape)
  where = f"mesh.shape={shape}"
  if len(shape) != len(MESH_AXES) or not all(isinstance(s, int) and (s >= 1 or s == -1) for s in shape):
    raise ConfigError(f"{where}: expected {len(MESH_AXES)} positive integers for axes {MESH_AXES} (one may be -1)")
  if shape.count(-1) > 1:
    raise ConfigError(f"{where}: expected at most one -1 entry")
  rest = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % rest:
      raise ConfigError(f"{where}: the other entries' product {rest} does not divide the {n_devices} devices")
    shape = tuple(n_devices // rest if s == -1 else s for s in shape)
  if math.prod(shape) != n_devices:
    raise ConfigError(f"{where} needs {math.prod(shape)} devices, {n_devices} available; expected a shape whose "
                      f"product is {n_devices} (or -1 on one axis)")
  return shape


def data_parallel_size(config, shape: tuple[int, ...]) -> int:
  """How many ways a batch's rows are split: the product of the mesh axes the 'batch' rule maps to."""
  from instructrl.parallel import MESH_AXES, rules_from_config
  try:
    rules = dict(rules_from_config(config.mesh.rules))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"mesh.rules: expected (logical axis, mesh axes) pairs ({e})") from None
  axes = rules.get("batch")
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  unknown = [a for a in axes if a not in MESH_AXES]
  if unknown:
    raise ConfigError(f"mesh.rules: 'batch' maps to {unknown}; expected mesh axes among {MESH_AXES}")
  return math.prod(shape[MESH_AXES.index(a)] for a in axes)


def _model(config, overrides=None, where="model"):
  from instructrl.models.config import ModelConfig
  try:
    return ModelConfig.from_dict({**config.model, **(overrides or {})})
  except ValueError as e:
    raise ConfigError(str(e).replace("model.", f"{where}.", 1) if where != "model" else str(e)) from None
  except TypeError as e:
    raise ConfigError(f"{where}: {e}") from None


def check_config(config, n_devices: int | None = None, stages=None) -> None:
  """The task-world pipeline's config (configs/instructgpt.py), before the lock and before any work.

  n_devices: the devices the mesh spans (default jax.device_count(); no mesh is built).
  stages: the stages this run runs (main.py's --stages; default config.stages).
  """
  check_table(config, PIPELINE)
  unknown = [s for s in str(config.stages).split(",") if s.strip() and s.strip() not in STAGES]
  if unknown or not str(config.stages).strip():
    fail("stages", config.stages, f"comma-separated stage names among {','.join(STAGES)}")
  if stages is None:
    stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]

  files = _check_source(config, stages)
  from instructrl.data import world as world_lib
  try:
    world_lib.validate(config.world)
  except ValueError as e:
    raise ConfigError(f"world.{e}") from None
  model = _model(config)
  for name in ("pretrain", "sft", "rm"):
    _model(config, config[name].get("model_overrides", {}), f"{name}.model_overrides")
  _check_rm_shape(config, model, stages)
  if not files and config.tokenizer.vocab_size > model.vocab_size:
    raise ConfigError(f"tokenizer.vocab_size={config.tokenizer.vocab_size} exceeds model.vocab_size="
                      f"{model.vocab_size}; expected at most the model's vocabulary")

  # Lengths: every sequence a stage builds must fit the model's context (learned positions for "gpt").
  for name in ("pretrain", "sft"):
    stage = config[name]
    if stage.seq_len > model.max_len:
      raise ConfigError(f"{name}.seq_len={stage.seq_len} exceeds model.max_len={model.max_len}")
    if not stage.warmup_steps < stage.steps:
      fail(f"{name}.warmup_steps", stage.warmup_steps, f"0 <= warmup_steps < {name}.steps={stage.steps}")
  rm, ppo = config.rm, config.ppo
  if rm.seq_len > model.max_len or rm.prompt_len + rm.max_new_tokens > model.max_len:
    raise ConfigError(f"rm.seq_len={rm.seq_len} / rm.prompt_len + rm.max_new_tokens = "
                      f"{rm.prompt_len + rm.max_new_tokens} exceed model.max_len={model.max_len}")
  if ppo.prompt_len + ppo.max_new_tokens + 1 > model.max_len:
    # + 1: a response cut at max_new_tokens is scored by the RM with an EOS after it (ppo.eos_terminated).
    raise ConfigError(f"ppo.prompt_len + ppo.max_new_tokens + 1 = {ppo.prompt_len + ppo.max_new_tokens + 1} "
                      f"exceeds model.max_len={model.max_len} (one position for the EOS the RM reads a truncated "
                      f"response at)")
  from instructrl.stages.ppo import ptx_enabled
  if ptx_enabled(ppo) and ppo.ptx_seq_len > model.max_len:
    raise ConfigError(f"ppo.ptx_seq_len={ppo.ptx_seq_len} exceeds model.max_len={model.max_len}")
  ev = config.eval
  need = ev.prompt_len + ev.prefix_len + ev.max_new_tokens
  if model.style == "gpt" and need > model.max_len:
    raise ConfigError(f"eval.prompt_len + eval.prefix_len + eval.max_new_tokens = {need} exceeds "
                      f"model.max_len={model.max_len}")
  if ev.cloze_seq_len > model.max_len:
    raise ConfigError(f"eval.cloze_seq_len={ev.cloze_seq_len} exceeds model.max_len={model.max_len}")

  # The reward model's comparisons.
  k = rm.k_choices
  if (not isinstance(k, (tuple, list)) or not k
      or not all(isinstance(x, int) and not isinstance(x, bool) for x in k) or min(k) < 2):
    raise ConfigError(f"rm.k_choices={_plain(k)}: every K must be >= 2 (responses ranked per prompt; the paper "
                      f"uses 4..9)")
  mix = dict(rm.source_mix)
  for source, weight in mix.items():
    if not (_real(weight) and weight >= 0):
      fail(f"rm.source_mix.{source}", weight, "a non-negative weight (the share of ranked responses from that source)")
  if not any(v > 0 for v in mix.values()):
    raise ConfigError(f"rm.source_mix={mix}: expected non-negative weights, at least one positive "
                      f"(sources: policy, pretrain, pretrain_few_shot, ppo, mismatched)")
  if float(mix.get("ppo", 0.0)) > 0 and not rm.ppo_source:
    raise ConfigError("rm.source_mix.ppo > 0 needs rm.ppo_source: an earlier run's finished ppo stage dir")
  _check_rounds(config, stages, files)
  if "heldout_group" in rm:
    raise ConfigError(f"rm.heldout_group={_plain(rm.heldout_group)!r}: this field was removed; the RM holds out "
                      f"world.heldout_group, the labeler group that judges the evaluation (one field, so the RM "
                      f"never trains on the eval raters' rankings): set world.heldout_group instead")
  if ppo.rm_uncertainty_coef > 0 and rm.ensemble_size + len(rm_run_names(config)) < 2:
    raise ConfigError(f"ppo.rm_uncertainty_coef={ppo.rm_uncertainty_coef} needs rm.ensemble_size >= 2 or "
                      f"ppo.rm_runs: one RM has no disagreement to penalise")

  # PPO's shapes.
  if ppo.batch_size % ppo.minibatch_size:
    raise ConfigError(f"ppo.minibatch_size={ppo.minibatch_size} does not divide ppo.batch_size={ppo.batch_size}; "
                      f"expected a divisor (each iteration's episodes split into whole minibatches)")
  if ppo.adaptive_kl and not ppo.kl_coef > 0:
    fail("ppo.kl_coef", ppo.kl_coef, "> 0 with ppo.adaptive_kl (the controller scales beta; from 0 it stays 0)")

  # The mesh: exactly the devices there are, and batches whose rows split evenly over its data axes.
  if n_devices is None:
    import jax
    n_devices = jax.device_count()
  shape = mesh_shape(config.mesh.shape, n_devices)
  dp = data_parallel_size(config, shape)
  batches = [f"{s}.{f}" for s in ("pretrain", "sft") for f in ("batch_size", "eval_batch_size")]
  batches += ["rm.batch_size" if rm.formulation == "per_prompt" else "rm.pair_batch_size", "rm.eval_batch_size",
              "ppo.batch_size"] + (["ppo.ptx_batch_size"] if ptx_enabled(ppo) else [])
  for path in batches:
    block, field = path.split(".")
    if config[block][field] % dp:
      raise ConfigError(f"{path}={config[block][field]} is not divisible by the {dp} data-parallel shards of "
                        f"mesh.shape={shape}; expected a multiple of {dp}")
  split = {"pretrain": ["pretrain.batch_size"], "sft": ["sft.batch_size"],
           "rm": ["rm.batch_size" if rm.formulation == "per_prompt" else "rm.pair_batch_size"],
           "ppo": ["ppo.minibatch_size"] + (["ppo.ptx_batch_size"] if ptx_enabled(ppo) else [])}
  for block, paths in split.items():
    check_microbatches(config, block, paths, dp, shape)
  # Last: a formulation or micro-batch count that is itself wrong gets its own error first.
  if rm.get("packing", False) and (rm.formulation != "per_prompt" or rm.microbatches != 1):
    fail("rm.packing", True, f"False with rm.formulation={rm.formulation!r} and rm.microbatches={rm.microbatches} "
         f"(packing packs a per-prompt batch's responses, whole: rm.formulation='per_prompt', rm.microbatches=1)")


def _check_rounds(config, stages, files: bool) -> None:
  """rm.rounds and round two's source mix (stages/rounds.py); round one's stages only with two rounds."""
  rm = config.rm
  mix = dict(rm.get("round2_mix", {}))
  unknown = sorted(set(mix) - {"policy", "pretrain", "pretrain_few_shot", "ppo", "mismatched"})
  if unknown:
    fail("rm.round2_mix", mix, f"weights of the sources policy, pretrain, pretrain_few_shot, ppo, mismatched "
         f"(not {unknown})")
  for source, weight in mix.items():
    if not (_real(weight) and weight >= 0):
      fail(f"rm.round2_mix.{source}", weight, "a non-negative weight (the share of round two's ranked responses)")
  episodes = rm.get("round1_ppo_episodes", 0)
  if episodes and episodes < config.ppo.batch_size:
    fail("rm.round1_ppo_episodes", episodes, f">= ppo.batch_size={config.ppo.batch_size} (one iteration) or 0")
  rounds = rm.get("rounds", 1)
  round_one = [s for s in stages if s in ("rm_round1", "ppo_round1")]
  if rounds != 2:
    if round_one:
      fail("rm.rounds", rounds, f"2 to run the stages {round_one} (round one of two rounds of comparisons)")
    return
  if files:
    fail("rm.rounds", rounds, "1 with data.source='files' (round two ranks new samples: the task world's labelers)")
  if not float(mix.get("ppo", 0.0)) > 0:
    fail("rm.round2_mix.ppo", mix.get("ppo", 0.0), "> 0 with rm.rounds=2 (round two ranks round one's PPO-ptx "
         "samples)")


def check_microbatches(config, block: str, paths: list[str], dp: int, shape) -> None:
  """`block`.microbatches splits each of the batches `paths` into whole micro-batches whose rows still
  split over the dp data-parallel shards (stages/microbatch.py keeps each device's rows on it)."""
  if "microbatches" not in config[block]:
    return
  n = config[block].microbatches
  for path in paths:
    b, f = path.split(".")
    rows = config[b][f]
    if rows % n:
      raise ConfigError(f"{block}.microbatches={n} does not divide {path}={rows}; expected a divisor of {rows} "
                        f"(each micro-batch takes {path} / {block}.microbatches rows)")
    if n > 1 and (rows // n) % dp:
      raise ConfigError(f"{block}.microbatches={n}: micro-batches of {rows // n} rows ({path} / {n}) do not split "
                        f"over the {dp} data-parallel shards of mesh.shape={shape}; expected {path} / "
                        f"{block}.microbatches to be a multiple of {dp}")


def _check_rm_shape(config, model, stages) -> None:
  from instructrl.stages.rm_models import rm_shape
  shape = rm_shape(config)
  other = sorted(set(shape) - set(RM_SHAPE_FIELDS))
  if other:
    raise ConfigError(f"rm.model_shape sets {other}; expected only the trunk's size fields {RM_SHAPE_FIELDS} (the "
                      f"RM reads the policy's sequences: vocabulary, context and style stay model.*)")
  _model(config, shape, "rm.model_shape")
  _model(config, {**shape, **config.rm.get("model_overrides", {})}, "rm.model_overrides")
  differs = {k: v for k, v in shape.items() if getattr(model, k) != v}
  if differs and "rm" in stages and not config.rm.get("base_workdir", ""):
    raise ConfigError(f"rm.model_shape={differs} makes the RM another size than the policy, so its trunk cannot "
                      f"come from this run's {config.rm.policy!r} stage; expected rm.base_workdir: a run on this "
                      f"run's world whose finished {config.rm.policy!r} stage has that shape (docs/pipeline.md, "
                      f"'A reward model larger than the policy')")


# ----------------------------------------------------------------------------- public-data runs

DATA = {"source": choice("world", "files"), "hf_dir": TEXT, "tokenizer": TEXT, "bos_id": integer(-1),
        "eos_id": integer(-1), "pad_id": integer(-1), "demos": TEXT, "rankings": TEXT, "prompts": TEXT,
        "eval_prompts": TEXT, "ptx": TEXT, "prompt_template": TEXT, "on_invalid": choice("raise", "skip"),
        "valid_fraction": OPEN_UNIT, "judge_fraction": OPEN_UNIT, "eval_fraction": OPEN_UNIT,
        "dev_fraction": OPEN_UNIT}


def _check_template(template: str) -> None:
  """str.format's own parse: "{{prompt}}" is a literal (every prompt would become the same text), and
  "{prompt.x}" or "{prompt[0]}" read attributes or items of the prompt, so only plain {prompt} fields pass."""
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:
    fail("data.prompt_template", template, f"a str.format template with {{prompt}} ({e})")
  if not fields or any(f != "prompt" for f in fields):
    other = sorted({f"{{{f}}}" for f in fields if f != "prompt"})
    fail("data.prompt_template", template, "a template containing {prompt} and no other field"
         + (f" (it has {', '.join(other)})" if other else ""))
  try:   # a nested field or a bad conversion in the format spec: "{prompt:{width}}", "{prompt!z}"
    template.format(prompt="")
  except (KeyError, IndexError, ValueError) as e:
    fail("data.prompt_template", template, f"a template whose only field is {{prompt}} ({e!r})")


def _check_source(config, stages) -> bool:
  """config.data (absent: the world). Returns whether the run reads public files."""
  if "data" not in config:
    if "import" in stages:
      fail("stages", ",".join(stages), "no 'import' stage without a data block (configs/public.py has one)")
    return False
  check_table(config, {"data": DATA})
  d = config.data
  if d.source == "world":
    if "import" in stages:
      fail("stages", ",".join(stages), "no 'import' stage with data.source='world' (its data is the world stage's)")
    return False
  wrong = [s for s in stages if s in ("world", "pretrain")]
  if wrong:
    fail("stages", ",".join(stages), f"no {wrong} with data.source='files': the import stage brings the released "
         f"checkpoint as W/pretrain and the files as W/data")
  _check_template(d.prompt_template)
  if not d.hf_dir:
    fail("data.hf_dir", d.hf_dir, "a transformers save_pretrained directory (config.json, *.safetensors)")
  needed = [f for f in ("demos", "rankings", "ptx") if not d[f]]
  if needed:
    fail(f"data.{needed[0]}", d[needed[0]], "a file (or several, comma-separated): demos for SFT, rankings for "
         "the two RMs, text for PPO-ptx and the alignment-tax loss")
  if config.rm.formulation != "per_prompt":
    fail("rm.formulation", config.rm.formulation, "'per_prompt' with data.source='files'")
  if config.ppo.get("reward", "rm") != "rm":
    fail("ppo.reward", config.ppo.reward, "'rm' with data.source='files' (public data has no gold judge)")
  return True

