"""The package's modules import one another in one direction: no circles.

Every relative import counts, at the top of a module, inside a function or
under ``TYPE_CHECKING``: a reader follows those too. The package's
``__init__`` imports everything and is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import shmpool

PACKAGE = Path(shmpool.__file__).parent


def imports_of(path: Path) -> set[str]:
    """The package modules that ``path`` imports (relative imports, by module name)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import x, y
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shmpool."):
            found.add(node.module.split(".")[1])  # type: ignore[union-attr]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("shmpool."):
                found.add(str(arg.value).split(".")[1])
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import circle, as the modules along it, or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_finder_sees_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_module_imports_in_a_circle() -> None:
    edges = graph()
    assert {"client", "buffer", "janitor", "sharedbuffer", "registry"} <= set(edges)
    assert "client" in edges["registry"]  # the scan sees the imports it must
    assert find_cycle(edges) == [], " -> ".join(find_cycle(edges))


def test_the_lease_modules_do_not_know_the_client() -> None:
    """A lease, a shared buffer and the janitor talk to typed protocols, not to ``Pool``."""
    edges = graph()
    for name in ("buffer", "sharedbuffer", "janitor"):
        assert "client" not in edges[name], name
        assert "registry" not in edges[name], name
