"""The package graph of pipeline/, computed from the source: acyclic, boundaries kept.

Every module under pipeline/ is parsed with ``ast``; every import counts, the ones inside
functions included, and so do lazy imports spelled as a module-name string (the packages that
resolve their exports on first use name the modules they load). A unit is a subpackage
(``pipeline/encode/...`` -> ``encode``) or a top-level module (``pipeline/config.py`` ->
``config``). The graph must be acyclic, the boundaries below must hold, and no function may
import a pipeline module (an import placed inside a function to dodge a cycle hides the cycle
from a reader; third-party imports inside functions are for optional heavy dependencies).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "pipeline"

# unit -> the only units it may import (None: anything not forbidden below).
ONLY = {
    "models": set(),  # plain torch: no other pipeline package (ARCHITECTURE.md)
    "contracts": set(),  # the stage contracts are a leaf
    "artifacts": {"models", "contracts", "config"},
}
# unit -> units it must not import.
FORBIDDEN = {
    "latents": {"train", "encode", "export"},  # what diffusion training imports stays small
    "encode": {"train"},
    "evaluate": {"train"},
    "export": {"train"},
    "report": {"train"},
    "verify": {"train"},
    "importers": {"train"},
}
# (file relative to pipeline/, imported module) -> why a function imports a pipeline module.
# Empty: optional heavy dependencies are third-party, and pipeline modules import at the top.
ALLOWED_FUNCTION_IMPORTS: dict[tuple[str, str], str] = {}


@dataclass
class Graph:
    units: set[str] = field(default_factory=set)
    edges: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    function_imports: list[tuple[str, str, int]] = field(default_factory=list)

    def add(self, src: str, dst: str, where: str) -> None:
        if src != dst:
            self.edges[src].setdefault(dst, where)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str, root: Path) -> str | None:
    """``pipeline.encode.job`` -> ``encode``; ``pipeline.config`` -> ``config``; else None."""
    parts = module.split(".")
    if parts[0] != root.name or len(parts) < 2:
        return None
    return parts[1]


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(node: ast.ImportFrom, module: str, package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported_modules(node: ast.AST, module: str, package: bool) -> list[str]:
    """Dotted names an import statement brings in (``from pkg import sub`` -> ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = _resolve(node, module, package)
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    return []


def _function_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes that sit inside a function or lambda body."""
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    inside.add(id(node))
    return inside


def build_graph(root: Path) -> Graph:
    graph = Graph()
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        src = unit_of(module, root) or module
        graph.units.add(src)
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(), str(path))
        in_function = _function_nodes(tree)
        for node in ast.walk(tree):
            names = imported_modules(node, module, _is_package(path))
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value] if node.value in modules else []  # lazy, by name
            for name in names:
                dst = unit_of(name, root)
                if dst is None:
                    continue
                graph.add(src, dst, f"{rel}:{node.lineno}")
                if id(node) in in_function and name in modules:
                    graph.function_imports.append((rel, name, node.lineno))
    return graph


def find_cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component with more than one unit."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(u: str) -> None:
        index[u] = low[u] = len(index)
        stack.append(u)
        on_stack.add(u)
        for v in sorted(edges.get(u, {})):
            if v not in index:
                visit(v)
                low[u] = min(low[u], low[v])
            elif v in on_stack:
                low[u] = min(low[u], index[v])
        if low[u] == index[u]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == u:
                    break
            if len(component) > 1:
                cycles.append(_path_within(sorted(component), edges))

    for unit in sorted(edges):
        if unit not in index:
            visit(unit)
    return cycles


def _path_within(component: list[str], edges: dict[str, dict[str, str]]) -> list[str]:
    """A closed path through the component starting at its first unit (breadth-first)."""
    start, members = component[0], set(component)
    previous, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for u in frontier:
            for v in sorted(edges.get(u, {})):
                if v == start:
                    path = [u]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return (
                        [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, u, start]
                    )
                if v in members and v not in previous:
                    previous[v] = u
                    nxt.append(v)
        frontier = nxt
    return component


def problems(graph: Graph) -> list[str]:
    found = []
    for cycle in find_cycles(graph.edges):
        hops = zip(cycle, cycle[1:], strict=False)
        found.append(
            "cycle "
            + " -> ".join(cycle)
            + " ("
            + ", ".join(graph.edges[a][b] for a, b in hops)
            + ")"
        )
    for src, allowed in ONLY.items():
        for dst, where in sorted(graph.edges.get(src, {}).items()):
            if dst not in allowed:
                found.append(f"{src} imports {dst} ({where}); it may import only {sorted(allowed)}")
    for src, banned in FORBIDDEN.items():
        for dst, where in sorted(graph.edges.get(src, {}).items()):
            if dst in banned:
                found.append(f"{src} imports {dst} ({where})")
    for rel, name, line in graph.function_imports:
        if (rel, name) not in ALLOWED_FUNCTION_IMPORTS:
            found.append(f"function-level import of {name} at {rel}:{line}")
    return found


def test_pipeline_package_graph_is_acyclic_and_keeps_its_boundaries():
    graph = build_graph(ROOT)
    assert {"models", "train", "encode", "artifacts", "latents", "config"} <= graph.units
    assert graph.edges["train"] and graph.edges["demo"]  # imports were seen at all
    assert problems(graph) == []


def test_allow_list_names_real_function_imports_with_a_reason():
    graph = build_graph(ROOT)
    present = {(rel, name) for rel, name, _ in graph.function_imports}
    for key, why in ALLOWED_FUNCTION_IMPORTS.items():
        assert key in present and why.strip(), key


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_hidden_cycles_and_broken_boundaries(tmp_path):
    """A synthetic tree with every kind of problem: the checker names each one."""
    root = _write(
        tmp_path / "pipeline",
        {
            "__init__.py": "",
            "models/__init__.py": "from pipeline.config import X\n",
            "evaluate/__init__.py": "def f():\n    from pipeline.train import loop\n",
            "train/__init__.py": "",
            "train/loop.py": "from ..evaluate import quality\n",
            "latents/__init__.py": "_LAZY = {'a': 'pipeline.encode.job'}\n",
            "encode/__init__.py": "",
            "encode/job.py": "",
            "config.py": "",
        },
    )
    found = problems(build_graph(root))
    assert any(p.startswith("cycle evaluate -> train -> evaluate") for p in found), found
    assert any(p.startswith("models imports config (models/__init__.py:1)") for p in found)
    assert "evaluate imports train (evaluate/__init__.py:2)" in found
    assert "latents imports encode (latents/__init__.py:1)" in found
    assert "function-level import of pipeline.train at evaluate/__init__.py:2" in found
    assert len(found) == 6, found  # + the function-level import of pipeline.train.loop
