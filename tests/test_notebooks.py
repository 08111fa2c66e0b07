"""Every notebook in notebooks/ executes without error (nbclient) against the whole-pipeline smoke run,
and the committed notebooks carry no outputs."""

import json
from pathlib import Path

import nbformat
import pytest
from tests.smoke_pipeline import ROOT, smoke_run  # noqa: F401 -- smoke_run is a fixture

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def execute(path: Path, cwd: Path) -> nbformat.NotebookNode:
  from nbclient import NotebookClient
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
  return nb


def outputs(nb) -> str:
  text = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      text.append(o.get("text", "") if o.output_type == "stream" else json.dumps(o.get("data", {})))
  return "\n".join(text)


def test_notebooks_are_committed_without_outputs():
  assert {p.name for p in NOTEBOOKS} >= {"run_overview.ipynb", "samples.ipynb", "sweep.ipynb"}
  for p in NOTEBOOKS:
    nb = nbformat.read(p, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), f"{p.name}: strip its outputs"
    # STYLE.md: a short "why" in markdown before each code cell
    for prev, cell in zip(nb.cells, nb.cells[1:]):
      assert cell.cell_type != "code" or prev.cell_type == "markdown", f"{p.name}: code cell without a why"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["run_overview", "samples"])
def test_run_notebooks_execute_on_the_smoke_run(name, smoke_run, monkeypatch, tmp_path):
  monkeypatch.setenv("INSTRUCTRL_RUN", str(smoke_run["workdir"]))
  nb = execute(ROOT / "notebooks" / f"{name}.ipynb", tmp_path)
  out = outputs(nb)
  assert "preset smoke" in out and "eval report: yes" in out
  if name == "run_overview":
    assert out.count("image/png") >= 5          # curves, win rates, RM, PPO, alignment tax
    assert "| PPO-ptx |" in out
  else:
    assert "models: ['SFT', 'PPO-ptx', 'PPO']" in out and "PPO-ptx vs SFT by gold score" in out


@pytest.mark.slow
def test_sweep_notebook_executes_on_a_sweep_of_smoke_reports(smoke_run, monkeypatch, tmp_path):
  """sweep.json made by instructrl.tools.sweep.aggregate from member reports (copies of the smoke run's real
  report, one number moved per seed), as tests/test_sweep.py does without training."""
  from instructrl.tools import sweep
  monkeypatch.chdir(ROOT)
  s = sweep.load_sweep(str(ROOT / "configs" / "sweeps" / "kl_coef.py") + ":smoke")
  runs = sweep.plan(s, tmp_path / "sweep")
  rep = json.loads((smoke_run["workdir"] / "eval" / "report.json").read_text())
  for r in runs:
    (r["run_dir"] / "eval").mkdir(parents=True)
    rep["results"]["PPO-ptx"]["win_rate_vs_sft"]["mean"] = 0.4 + 0.05 * r["seed"]
    (r["run_dir"] / "eval" / "report.json").write_text(json.dumps(rep))
  monkeypatch.setattr(sweep, "_SWEEP", type("F", (), {"present": False, "value": None})())
  sweep.aggregate(s, runs, tmp_path / "sweep")
  monkeypatch.setenv("INSTRUCTRL_SWEEP", str(tmp_path / "sweep"))
  out = outputs(execute(ROOT / "notebooks" / "sweep.ipynb", tmp_path))
  assert f"{len(s['members'])} members" in out and "image/png" in out
  assert all(f"| {m['name']} |" in out for m in s["members"])
