"""TFDS round trip: records -> prepared array_record dataset -> the same records, with no
TensorFlow imported; random access makes step-indexed batches identical after a reopen."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets", reason="needs the `tfds` extra (tensorflow-datasets, array-record)")
pytest.importorskip("array_record", reason="needs the `tfds` extra")

from instructrl.data import readers, tfds_io  # noqa: E402
from instructrl.data.batching import batch_indices  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def _sorted(recs):
  return sorted(recs, key=lambda r: repr(sorted(r.items())))


def test_round_trip_demo_and_ranked(tmp_path):
  demos = readers.read_demos(FIX / "public/self_instruct_seed_tasks_first10.jsonl")
  ranked = readers.read_rankings(FIX / "public/oasst_en_5_trees.jsonl") + readers.read_rankings(
      FIX / "handwritten/ranked_k3.jsonl")
  d = tfds_io.write({"train": demos[:8], "test": demos[8:]}, "demo", "seed_demos", tmp_path)
  assert d == tmp_path / "seed_demos" / "1.0.0" and list(d.glob("*.array_record*"))
  # TFDS shuffles examples by key hash when writing: same multiset, and a fixed order.
  assert _sorted(tfds_io.read(d, "train")) == _sorted(demos[:8])
  assert _sorted(readers.read_demos(d, tfds_split="test")) == _sorted(demos[8:])
  d = tfds_io.write({"train": ranked}, "ranked", "oasst_ranked", tmp_path)
  back = tfds_io.read(d)
  strip = lambda r: {k: r[k] for k in ("prompt", "responses", "ranking")}
  assert _sorted(map(strip, back)) == _sorted(map(strip, ranked))
  assert all(isinstance(x, str) for r in back for x in r["responses"])
  with pytest.raises(ValueError, match="a TFDS dataset of ranked records, expected demo records"):
    readers.read_demos(d)
  with pytest.raises(ValueError, match="no split 'valid'"):
    tfds_io.read(d, "valid")


def test_resumable_step_batches(tmp_path):
  demos = readers.read_demos(FIX / "public/self_instruct_seed_tasks_first10.jsonl")
  d = tfds_io.write({"train": demos}, "demo", "d", tmp_path)
  a = tfds_io.Records(d)
  first = [[a[i]["prompt"] for i in batch_indices(len(a), 4, step, seed=3)] for step in range(5)]
  b = tfds_io.Records(d)   # a "restarted" process reopens the files and asks for step 3 directly
  assert [b[i]["prompt"] for i in batch_indices(len(b), 4, 3, seed=3)] == first[3]


def test_bad_records_refused_and_no_tensorflow(tmp_path):
  with pytest.raises(Exception, match=r"train\[1\]: field 'response' is empty"):
    tfds_io.write({"train": [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": " "}]}, "demo", "x", tmp_path)
  with pytest.raises(FileNotFoundError, match="no dataset_info.json"):
    tfds_io.Records(tmp_path / "nowhere")
  # Writing and reading never import TensorFlow (a fresh interpreter, so other tests cannot mask it).
  code = (f"import sys; from instructrl.data import tfds_io; "
          f"d = tfds_io.write({{'train': [{{'text': 'hello'}}]}}, 'text', 't', {str(tmp_path / 'tf')!r}); "
          f"assert tfds_io.read(d) == [{{'text': 'hello'}}]; print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=FIX.parents[1])
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "False"


def test_cli_prepares_from_public_format(tmp_path):
  from instructrl.tools.prepare_tfds import main
  assert main(["--kind=demo", "--name=alpaca", f"--data_dir={tmp_path}",
               f"--split=train={FIX / 'handwritten/alpaca_format.json'}"]) == 0
  got = readers.read_demos(tmp_path / "alpaca" / "1.0.0")
  assert _sorted(got) == _sorted(readers.read_demos(FIX / "handwritten/alpaca_format.json"))
  assert np.all([isinstance(r["prompt"], str) for r in got])
