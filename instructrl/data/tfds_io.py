"""TFDS-prepared datasets of the project's record kinds, written and read without TensorFlow.

`write` prepares a TFDS dataset (array_record files + dataset_info.json) from validated records;
`read` opens one with `tfds.builder_from_directory(...).as_data_source(split)`, which reads the
array_record files through `array_record`'s random access: TensorFlow is never imported (tested).
Random access is what the training loop needs: its batches are `batch_indices(n, batch, step,
seed)`, a pure function of the step, so a resumed run reads exactly the records it would have
read (the role Grain's index sampler plays elsewhere; no iterator state to checkpoint).

  python -m instructrl.tools.prepare_tfds --kind=demo --name=alpaca --data_dir=tfds \
      --split=train=alpaca_data.json
  python -m instructrl.main --config=configs/public.py --workdir=runs/a \
      --config.data.demos=tfds/alpaca/1.0.0 ...

Features by kind (fields outside these are not stored):
  text {text}; demo {prompt, response}; prompt {prompt}; ranked {prompt, responses[], ranking[]};
  eval {prompt, family}.
Needs the `tfds` extra (tensorflow-datasets, array-record); imported here only. This module reads
records, not public-format files: `data/readers.py` reads a prepared directory through it, and the
command that prepares one from public files is `instructrl.tools.prepare_tfds`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from instructrl.data.rankings import validate_ranked
from instructrl.data.records import RecordError, validate

VERSION = "1.0.0"


def _features(kind: str):
  import tensorflow_datasets as tfds
  F = tfds.features
  text = F.Text()
  return F.FeaturesDict({
      "text": {"text": text},
      "demo": {"prompt": text, "response": text},
      "prompt": {"prompt": text},
      "ranked": {"prompt": text, "responses": F.Sequence(F.Text()), "ranking": F.Sequence(F.Scalar(dtype=np.int32))},
      "eval": {"prompt": text, "family": text},
  }[kind])


FIELDS = {"text": ("text",), "demo": ("prompt", "response"), "prompt": ("prompt",),
          "ranked": ("prompt", "responses", "ranking"), "eval": ("prompt", "family")}


def _check(record: Mapping[str, Any], kind: str, where: str) -> dict:
  if kind == "ranked":
    return validate_ranked(dict(record), where, allow_empty_response=True)
  if kind == "prompt":
    if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
      raise RecordError(f"{where}: field 'prompt' should be a non-empty str")
    return dict(record)
  return validate(dict(record), kind, where)


def write(splits: Mapping[str, Sequence[Mapping[str, Any]]], kind: str, name: str, data_dir: str | Path) -> Path:
  """Prepare `data_dir/name/1.0.0` (array_record) from {split: records}; returns that directory."""
  import tensorflow_datasets as tfds
  if kind not in FIELDS:
    raise ValueError(f"kind={kind!r}: expected one of {sorted(FIELDS)}")
  checked = {s: [_check(r, kind, f"{s}[{i}]") for i, r in enumerate(recs)] for s, recs in splits.items()}
  fields = FIELDS[kind]

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):   # one class per call
    VERSION = tfds.core.Version(VERSION)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=_features(kind),
                                   description=f"instructrl {kind} records ({name})")

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(recs) for s, recs in checked.items()}

    def _generate_examples(self, recs):
      for i, r in enumerate(recs):
        yield i, {f: r[f] for f in fields}

  Builder.name = name   # the dataset's directory name
  builder = Builder(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()   # nothing is downloaded: the generator yields the records
  return Path(builder.data_dir)


def _decode(x):
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray):
    return [_decode(v) for v in x.tolist()]
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, list):
    return [_decode(v) for v in x]
  return x


class Records:
  """Random access to a prepared split: `len`, `[i]` -> a validated record dict (str, not bytes)."""

  def __init__(self, directory: str | Path, split: str = "train"):
    import tensorflow_datasets as tfds
    d = Path(directory)
    if not (d / "dataset_info.json").is_file():
      raise FileNotFoundError(f"{d}: no dataset_info.json (expected a prepared TFDS dataset directory, "
                              f"e.g. data_dir/name/{VERSION})")
    builder = tfds.builder_from_directory(str(d))
    if split not in builder.info.splits:
      raise ValueError(f"{d}: no split {split!r}; it has {sorted(builder.info.splits)}")
    names = set(builder.info.features.keys())
    self.kind = next((k for k, f in FIELDS.items() if set(f) == names), None)
    if self.kind is None:
      raise ValueError(f"{d}: features {sorted(names)} match no record kind ({FIELDS})")
    self.source, self.where = builder.as_data_source(split=split), f"{d}[{split}]"

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    raw = self.source[int(i)]
    return _check({k: _decode(v) for k, v in raw.items()}, self.kind, f"{self.where}:{i}")


def read(directory: str | Path, split: str = "train") -> list[dict]:
  r = Records(directory, split)
  return [r[i] for i in range(len(r))]
