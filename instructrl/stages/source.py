"""Where the stages' data comes from: the generated task world (`W/world`) or public files (`W/data`).

`config.data.source` chooses. Both write the same file names, so SFT, the RM, PPO and eval read
one layout:

  demos_train / demos_valid.jsonl     demo records (SFT; the RM's score bias reads demos_valid)
  corpus_train / corpus_valid.jsonl   text records (SFT's pretraining mix, PPO's ptx, the LM-loss tax)
  prompts_ppo / prompts_dev / prompts_eval.jsonl   prompt records (PPO; tuning; the report)

The world adds its gold judge, labelers and RM comparisons collected by the rm stage; the files
source (`stages/data_import.py`) adds the rankings of two disjoint prompt sets, one for the policy's
RM and one for the judge RM that stands in for the gold judge (`stages/proxy_eval.py`). Prompts
in W/data are already in the model's format (the template applied on import), so `format_prompt`
is the identity there and the world's own format otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

SOURCES = ("world", "files")


def kind(config) -> str:
  """config.data.source; configs without a `data` block are world runs."""
  data = config.get("data", None)
  return str(data.get("source", "world")) if data is not None else "world"


def data_dir(workdir: Path, config=None) -> Path:
  """W/world or W/data: by the config when given, else by what the workdir holds."""
  workdir = Path(workdir)
  if config is not None:
    return workdir / ("data" if kind(config) == "files" else "world")
  return workdir / "data" if (workdir / "data" / "COMPLETE").exists() and not (workdir / "world").exists() \
      else workdir / "world"


@dataclasses.dataclass
class Source:
  dir: Path
  tokenizer: Any
  format_prompt: Callable[[str], str]
  world: Any = None              # the task world (gold judge, labelers); None for public files

  @property
  def has_gold(self) -> bool:
    return self.world is not None


def open_source(config, workdir: Path) -> Source:
  """The data a stage reads, after the world or import stage has written it."""
  d = data_dir(workdir, config)
  if kind(config) == "files":
    from instructrl.stages import data_import
    return Source(d, data_import.load_tokenizer(d), lambda p: p)
  from instructrl.data import world as world_lib
  from instructrl.stages.world import load_tokenizer
  world = world_lib.World.load(d)
  return Source(d, load_tokenizer(workdir), world.format_prompt, world)


def marker(workdir: Path) -> dict | None:
  """W/data/COMPLETE as a dict (None before the import stage finished)."""
  path = Path(workdir) / "data" / "COMPLETE"
  return json.loads(path.read_text()) if path.exists() else None
