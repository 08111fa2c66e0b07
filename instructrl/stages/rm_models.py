"""The models the RM stages read: a finished LM stage's params (the policies sampled for comparisons, the
RM's trunk), the model fields an RM is trained or was trained with, and the RM's score of a sequence.

The RM is an LM stage's model with the unembedding replaced by a scalar head (paper, section 3.5), read at
each sequence's last real token, its EOS.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from instructrl import checkpoints, distributed, parallel
from instructrl.data.batching import prompt_response_examples
from instructrl.models.transformer import Decoder
from instructrl.errors import ConfigError
from instructrl.models.config import ModelConfig
from instructrl.stages.train_state import (abstract_state, device_batch, init_params, make_optimizer,
                                           state_shardings)
from instructrl.stages.world import world_fingerprint


def rm_shape(config) -> dict:
  """rm.model_shape as a dict: the model fields where the RM (and PPO's value function, initialised from
  it) differs from the policy, e.g. the paper's 6B RM for a 1.3B policy; {}: the policy's model."""
  return dict(config.rm.get("model_shape", None) or {})


def load_policy(config, workdir: Path, mesh, rules, stage: str = "sft", directory: Path | None = None,
                entry: str = "params", model: dict | None = None):
  """A finished LM stage's params (directory: another run's stage, checked against this run's world;
  model: its model fields when they are not config.model's)."""
  model_cfg = ModelConfig.from_dict(model or config.model)
  tx, _ = make_optimizer(config.sft, 1)
  abstract = abstract_state(model_cfg, tx, state_shardings(model_cfg, tx, mesh, rules))
  params, _ = checkpoints.load_params(directory or Path(workdir) / stage, abstract["params"], model_cfg.to_dict(),
                                      world_fingerprint(workdir), entry=entry)
  return params


def finished_model(where: Path) -> dict | None:
  """The model fields a finished stage was trained with, or None if it has not finished."""
  ckpt = checkpoints.StageCheckpoints(where)
  try:
    meta = ckpt.meta() if ckpt.latest_step() is not None else None
  finally:
    ckpt.close()
  if not meta or not meta.get("complete"):
    return None
  return ModelConfig.from_dict(meta["model"]).to_dict()


def declared_rm_model(config) -> dict:
  """The RM's model fields as the config declares them: config.model with rm.model_shape's size (the
  paper's 6B RM for every policy size: configs/instructgpt.py's `,rm6b`); without it, the policy's."""
  return ModelConfig.from_dict({**config.model, **rm_shape(config)}).to_dict()


def rm_model(config) -> dict:
  """The model fields the RM stage trains: declared_rm_model, or with rm.base_workdir set, those of the
  model the RM starts from there (an RM larger than the policy), which must then have rm.model_shape's size."""
  base = config.rm.get("base_workdir", "")
  if not base:
    return declared_rm_model(config)
  where = Path(base) / config.rm.policy
  model = finished_model(where)
  if model is None:
    raise FileNotFoundError(
        f"rm.base_workdir={base}: no finished {config.rm.policy!r} stage at {where}. Train the RM's base model there "
        f"on this run's world first: copy W/world to {base}/world, then `python -m instructrl.main "
        f"--config=... --config.model.d_model=... --workdir={base} --stages=pretrain,{config.rm.policy}`")
  shape = rm_shape(config)
  bad = {k: model.get(k) for k, v in shape.items() if model.get(k) != v}
  if bad:
    raise ConfigError(f"rm.model_shape={shape}, but rm.base_workdir's {config.rm.policy!r} stage at {where} has "
                      f"{bad}; expected a base model of the declared size (the RM's trunk is that model)")
  return model


def trained_rm_model(config, workdir: Path) -> dict:
  """The model fields of the RM in workdir/rm (PPO's value function has them too): read from its
  checkpoint, so the stages after the RM need neither rm.base_workdir nor the base run any more.
  Before the RM has finished, what the RM stage would train."""
  return finished_model(Path(workdir) / "rm") or rm_model(config)


def initial_rm_params(config, workdir: Path, mesh, rules, model_cfg: ModelConfig, shardings, key):
  """The RM before training: a fresh scalar head on the trunk of a finished LM stage, rm.init_stage
  ("" = rm.policy, the paper's SFT init; "pretrain": the pretrained GPT's), of this run or of
  rm.base_workdir's run. The LM's unembedding is dropped."""
  cfg = config.rm
  base = Path(cfg.base_workdir) if cfg.get("base_workdir", "") else None
  trunk = cfg.get("init_stage", "") or cfg.policy
  if base is None and declared_rm_model(config) != ModelConfig.from_dict(config.model).to_dict():
    raise ConfigError(f"rm.model_shape={rm_shape(config)}: an RM of another size than the policy needs "
                      f"rm.base_workdir, a run whose finished {trunk!r} stage has that size")
  rm = init_params(model_cfg, key, shardings["params"], mesh, rules, head="scalar")
  lm = load_policy(config, workdir, mesh, rules, trunk, model=rm_model(config),
                   directory=base / trunk if base is not None else None)
  return {k: lm[k] if k in lm else v for k, v in rm.items()}


def rm_scores(model, params, tokens_nt, last_n, rng=None):
  """Scalar reward of each sequence, read at its last real token (the EOS)."""
  scores_nt, _ = model.apply({"params": params}, tokens_nt, deterministic=rng is None,
                             rngs=None if rng is None else {"dropout": rng})
  return jnp.take_along_axis(scores_nt, last_n[:, None], axis=1)[:, 0]


def packed_rm_scores(model, params, batch, rng=None):
  """Scalar reward [B, K] of each response of a packed per-prompt batch (data/packing.py): one forward pass
  over the packed rows, each sequence attending only to itself, read at each response's EOS."""
  scores_rt, _ = model.apply({"params": params}, batch["packed_tokens"], batch["positions"],
                             segment_ids_bt=batch["segment_ids"], deterministic=rng is None,
                             rngs=None if rng is None else {"dropout": rng})
  return jnp.take(scores_rt.reshape(-1), batch["gather"], axis=0)


def eos_index(examples) -> np.ndarray:
  """Each prompt + response example's last trained position, its EOS: where the RM reads the score."""
  return (examples.loss_mask.shape[1] - 1 - np.argmax(examples.loss_mask[:, ::-1], axis=1)).astype(np.int32)


# ----------------------------------------------------------------------------- scoring texts

def row_scores(score_step, params, tokens, last, batch_size: int, mesh, rules) -> np.ndarray:
  """The score of EVERY row: the last batch is filled up with copies of row 0 (static shape), dropped after."""
  n, fill = len(tokens), -len(tokens) % batch_size
  tokens = np.concatenate([tokens, np.repeat(tokens[:1], fill, axis=0)])
  last = np.concatenate([last, np.repeat(last[:1], fill, axis=0)])
  out = []
  for b in range(len(tokens) // batch_size):
    sl = slice(b * batch_size, (b + 1) * batch_size)
    batch = device_batch({"tokens": tokens[sl], "last": last[sl]}, mesh, rules)
    out.append(distributed.to_host(score_step(params, batch["tokens"], batch["last"])))
  return np.concatenate(out)[:n].astype(np.float64)


@functools.lru_cache(maxsize=4)
def _score_fn(model_cfg: ModelConfig):
  model = Decoder(model_cfg, head="scalar")
  return jax.jit(lambda params, tokens, last: rm_scores(model, params, tokens, last))


class RMScorer:
  """A finished RM stage (W/rm, W/rm_judge) scoring (prompt, response) texts."""

  def __init__(self, config, workdir: Path, stage: str, tokenizer, mesh, rules):
    where = Path(workdir) / stage
    meta = checkpoints.recorded_meta(where)
    if not meta or not meta.get("complete"):
      raise checkpoints.StageMissing(f"{where}: no finished reward model; run the rm stage first")
    self.model_cfg = ModelConfig.from_dict(meta["model"])
    tx, _ = make_optimizer(config.sft, 1)
    abstract = abstract_state(self.model_cfg, tx, state_shardings(self.model_cfg, tx, mesh, rules, head="scalar"),
                              head="scalar")["params"]
    self.params, _ = checkpoints.load_params(where, abstract, self.model_cfg.to_dict(), world_fingerprint(workdir))
    self.tokenizer, self.seq_len, self.batch_size = tokenizer, int(config.rm.seq_len), int(config.rm.eval_batch_size)
    self.mesh, self.rules = mesh, rules

  def score(self, prompts: list[str], responses: list[str]) -> list[float]:
    # Rows of rm.seq_len tokens; an over-long row is cut, not dropped: every answer gets a score.
    ex = prompt_response_examples(self.tokenizer, prompts, responses, self.seq_len - 1, truncate=True)
    with parallel.activate(self.mesh, self.rules):
      scores = row_scores(_score_fn(self.model_cfg), self.params, ex.tokens, eos_index(ex), self.batch_size,
                          self.mesh, self.rules)
    return scores.tolist()
