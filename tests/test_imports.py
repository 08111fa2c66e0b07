"""The package's import graph, read from the source with `ast` (nothing is imported): no cycles, and the
library layers (models/, data/) never reach up into the stages or the tools, directly or through another
module.

Every import counts, at module level and inside functions alike: a function-level import breaks a cycle
only at import time, the modules still depend on each other. `from a import b` is an edge to a.b when b is
a submodule, else to a.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "instructrl"
LOWER = ("instructrl.models", "instructrl.data")          # library layers
UPPER = ("instructrl.stages", "instructrl.tools")         # what they must not import


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
  """Every module of the package by dotted name (a package by its __init__.py)."""
  out = {}
  for path in sorted(root.rglob("*.py")):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = path
  return out


def _packages(modules) -> set[str]:
  """The package names: every proper prefix of a module name (namespace packages have no __init__.py)."""
  return {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
  """The package modules `name` imports, anywhere in its source (line numbers in the error messages)."""
  is_package = path.name == "__init__.py"
  packages = _packages(modules)
  known = lambda m: m in modules or m in packages
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.split(".")[0] == "instructrl")
    elif isinstance(node, ast.ImportFrom):
      if node.level:   # relative: from the module's package, up level - 1 more
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ""
      if source.split(".")[0] != "instructrl":
        continue
      for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.add(sub if known(sub) else source)
  # An import of a namespace package without an __init__.py runs no code: no edge.
  return {m for m in out if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
  modules = module_files()
  return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (a path a -> ... -> a) through each strongly connected component that has one (Tarjan)."""
  index, low, stack, on_stack, sccs = {}, {}, [], set(), []

  def visit(v):   # recursion depth is bounded by the package's few dozen modules
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      scc = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        scc.append(w)
        if w == v:
          break
      sccs.append(set(scc))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  cycles = []
  for scc in sccs:
    start = min(scc)
    if len(scc) == 1 and start not in graph.get(start, ()):
      continue
    # Breadth-first from start back to start inside the component: a shortest cycle through it.
    parent, frontier, end = {}, [start], None
    while frontier and end is None:
      nxt = []
      for v in frontier:
        for w in sorted(graph[v] & scc):
          if w == start:
            end = v
            break
          if w not in parent:
            parent[w] = v
            nxt.append(w)
        if end is not None:
          break
      frontier = nxt
    path = [end]
    while path[-1] != start:
      path.append(parent[path[-1]])
    cycles.append(path[::-1] + [start])
  return cycles


# ----------------------------------------------------------------------------- the checker itself

def test_the_checker_resolves_submodules_relative_imports_and_function_level_imports(tmp_path):
  pkg = tmp_path / "instructrl"
  (pkg / "stages").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "stages" / "__init__.py").write_text("")
  (pkg / "stages" / "a.py").write_text("from instructrl.stages import b\n")
  (pkg / "stages" / "b.py").write_text("def f():\n  from . import c\n")
  (pkg / "stages" / "c.py").write_text("import instructrl.stages.a\nfrom instructrl.stages.b import f\n")
  (pkg / "stages" / "d.py").write_text("from instructrl.stages import nothing_here\nfrom .. import stages\n")
  modules = module_files(pkg)
  graph = {n: imports_of(n, p, modules) for n, p in modules.items()}
  assert graph["instructrl.stages.a"] == {"instructrl.stages.b"}        # a submodule named in `from ... import`
  assert graph["instructrl.stages.b"] == {"instructrl.stages.c"}        # inside a function, relative
  assert graph["instructrl.stages.c"] == {"instructrl.stages.a", "instructrl.stages.b"}
  assert graph["instructrl.stages.d"] == {"instructrl.stages"}          # a name of the package: the package
  assert find_cycles(graph) == [["instructrl.stages.a", "instructrl.stages.b", "instructrl.stages.c",
                                 "instructrl.stages.a"]]
  assert find_cycles({"x": {"x"}, "y": set()}) == [["x", "x"]]
  # models/ through a top-level module into stages/: the chain, shortest first
  layered = {"instructrl.models.hf": {"instructrl.util"}, "instructrl.util": {"instructrl.stages.a"},
             "instructrl.stages.a": set()}
  assert import_path(layered, "instructrl.models.hf", lambda d: d.startswith(UPPER)) == [
      "instructrl.models.hf", "instructrl.util", "instructrl.stages.a"]
  assert import_path(layered, "instructrl.stages.a", lambda d: d.startswith(UPPER)) is None


# ----------------------------------------------------------------------------- the package

def test_the_package_has_no_import_cycles():
  cycles = find_cycles(import_graph())
  assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def import_path(graph: dict[str, set[str]], start: str, wanted) -> list[str] | None:
  """A chain of imports start -> ... -> m with wanted(m), through any modules (breadth-first), or None."""
  parent, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v]):
        if w in parent:
          continue
        parent[w] = v
        if wanted(w):
          path = [w]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return path[::-1]
        nxt.append(w)
    frontier = nxt
  return None


@pytest.mark.parametrize("layer", LOWER)
def test_library_layers_do_not_import_stages_or_tools(layer):
  # Directly or through another module: models/ and data/ must work without the pipeline above them.
  graph = import_graph()
  chains = [import_path(graph, m, lambda d: d.startswith(UPPER)) for m in sorted(graph)
            if m == layer or m.startswith(layer + ".")]
  chains = [c for c in chains if c]
  assert not chains, f"{layer} reaches {' / '.join(UPPER)}:\n" + "\n".join("  " + " -> ".join(c) for c in chains)
