"""The package's import graph: no module imports one that imports it back, and modules stay small.

Imports inside functions count: a module that borrows a helper from its
caller that way is a cycle all the same.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rcfd_jax"
MAX_LINES = 600


def _module_name(f: Path) -> str:
  parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
  """module -> the rcfd_jax modules it imports, anywhere in its body."""
  files = {_module_name(f): f for f in sorted(PACKAGE.rglob("*.py"))}
  graph = {}
  for name, f in files.items():
    package = name if f.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        # `from rcfd_jax import train` imports the module rcfd_jax.train; `from rcfd_jax.x import f`, rcfd_jax.x.
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
      else:
        continue
      for t in targets:
        while t and t not in files:  # rcfd_jax.models.hf.Tensor -> rcfd_jax.models.hf
          t = t.rpartition(".")[0]
        if t and t != name:
          out.add(t)
    graph[name] = out
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1 on the current path, 2 done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_graph_sees_imports_inside_functions():
  graph = _graph()
  assert "rcfd_jax.train" in graph["rcfd_jax.main"]  # main imports train inside main()
  assert "rcfd_jax.models.hf" in graph["rcfd_jax.train"]


def test_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_package_has_no_import_cycle():
  cycle = _cycle(_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_is_over_600_lines():
  long = {str(f.relative_to(PACKAGE.parent)): n for f in sorted(PACKAGE.rglob("*.py"))
          if (n := len(f.read_text().splitlines())) > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines: {long}"
