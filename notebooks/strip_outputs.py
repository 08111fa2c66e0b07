"""Clear outputs and execution counts before committing: `python notebooks/strip_outputs.py notebooks/*.ipynb`.

tests/test_notebooks.py refuses committed notebooks with outputs (they bloat diffs and go stale)."""

import sys

import nbformat

for path in sys.argv[1:]:
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
    cell.metadata.pop("execution", None)
  nbformat.write(nb, path)
  print("stripped", path)
