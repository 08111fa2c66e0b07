"""Safe loading: no pickle anywhere in the package; weights come from Orbax or safetensors only, and a
crafted file (a pickle whose unpickling would create a marker file) fed to every loader fails to load
without running its payload.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from instructrl import checkpoints
from tests.reliability.test_checkpoint_faults import abstract, state_at

ROOT = Path(__file__).resolve().parents[2]
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def unsafe_calls(path: Path) -> list[str]:
  """Imports of pickle-like modules and calls that unpickle (np.load(allow_pickle=True), torch.load, yaml.load)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found += [f"{path}:{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
      found.append(f"{path}:{node.lineno}: from {node.module} import ...")
    elif isinstance(node, ast.Call):
      name = ast.unparse(node.func)
      pickled = any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                    for k in node.keywords)
      if pickled or name in ("torch.load", "yaml.load", "yaml.unsafe_load", "pd.read_pickle"):
        found.append(f"{path}:{node.lineno}: {name}(...)")
  return found


def test_no_pickle_in_the_package():
  files = sorted((ROOT / "instructrl").rglob("*.py")) + sorted((ROOT / "configs").rglob("*.py"))
  assert len(files) > 20
  bad = [hit for f in files for hit in unsafe_calls(f)]
  assert bad == [], bad


def test_the_scan_catches_what_it_looks_for(tmp_path):
  """The scanner is not vacuous."""
  f = tmp_path / "x.py"
  f.write_text("import pickle\nfrom dill import loads\nimport numpy as np\nnp.load('a', allow_pickle=True)\n"
               "torch.load('w.bin')\nnp.load('b.npy')\n")
  assert len(unsafe_calls(f)) == 4


class Payload:
  """Unpickling this calls Path.touch(marker): the "code execution" a crafted file would get."""

  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    return (Path.touch, (self.marker,))


@pytest.fixture
def crafted(tmp_path):
  marker = tmp_path / "PWNED"
  blob = pickle.dumps(Payload(marker))
  pickle.loads(blob)          # the payload works when unpickled...
  assert marker.exists()
  marker.unlink()             # ... so its absence below means nothing unpickled it
  return blob, marker


def test_crafted_orbax_checkpoint_does_not_execute(tmp_path, crafted):
  blob, marker = crafted
  d = tmp_path / "stage"
  c = checkpoints.StageCheckpoints(d)
  c.save(1, state_at(1), {"complete": True, "model": {}})
  c.close()
  step = d / "1"
  (step / checkpoints.MANIFEST).unlink()      # no manifest: the loaders themselves must refuse the files
  for f in [p for p in step.rglob("*") if p.is_file()]:
    f.write_bytes(blob)                      # every file of the checkpoint replaced by the pickle
  c = checkpoints.StageCheckpoints(d)
  assert c.restore(abstract()) is None       # nothing usable; the step was quarantined
  c.close()
  with pytest.raises(FileNotFoundError):
    checkpoints.load_params(d, abstract()["params"], {})
  assert not marker.exists()


def test_crafted_safetensors_and_tokenizer_do_not_execute(tmp_path, crafted):
  from instructrl.data.tokenizer import Tokenizer
  from instructrl.models import hf
  blob, marker = crafted
  d = tmp_path / "hf"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  (d / "model.safetensors").write_bytes(blob)
  with pytest.raises(hf.ConvertError, match="not a valid safetensors file"):
    hf.read_checkpoint(d)
  (d / "model.safetensors").unlink()
  (d / "pytorch_model.bin").write_bytes(blob)   # a torch pickle checkpoint is not read at all
  with pytest.raises(hf.ConvertError, match="only safetensors checkpoints are read"):
    hf.read_checkpoint(d)
  (tmp_path / "tokenizer.model").write_bytes(blob)
  with pytest.raises(Exception):
    Tokenizer(tmp_path / "tokenizer.model")
  assert not marker.exists()


def test_safetensors_roundtrip_still_loads(tmp_path):
  """Control for the test above: a genuine safetensors file does load."""
  from safetensors.numpy import save_file
  from instructrl.models import hf
  save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(tmp_path / "x.safetensors"))
  got = hf.read_safetensors(tmp_path / "x.safetensors")
  np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
