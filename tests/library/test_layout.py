"""The package's rooms, read from the source (no module is imported, so this runs in a second).

* The import graph of ``src/hypergradients`` has no cycle. Every import counts: at module level,
  inside a function (imported late) and under ``TYPE_CHECKING``, since each still ties one module's
  meaning to the other's.
* Layers import only downward: core ← paths ← hparams ← training ← app. ``core`` imports nothing of
  the package outside itself and no third-party package but torch; only the application layer (and
  the package's own entry points) may import the public face (``hypergradients``,
  ``hypergradients.lightning``).
* Only a package's ``__init__.py`` re-exports names: no module imports ``x as x`` (the spelling of a
  re-export kept for an old import path).
* The library's tests (this folder and ``tests/conftest.py``) import nothing from the application
  layer or the ``cli`` extra, so that they run with torch, pytest and hypothesis alone.
"""

from __future__ import annotations

import ast
import itertools
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "hypergradients"
LAYERS = ("core", "paths", "hparams", "training", "app")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> list[str]:
    """Every module name an import statement of ``path`` (the module ``name``) reads, anywhere in it:
    ``from a import b`` gives ``a`` and ``a.b`` (``b`` may be a submodule)."""
    is_package = path.name == "__init__.py"
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [mod, *(f"{mod}.{a.name}" for a in node.names)]
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(edges, external)``: the package's modules and the package modules each imports, and the
    top-level names of the packages outside it that each imports."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    external: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for target in _imports(p, m):
            if target in modules and target != m:
                edges[m].add(target)
            elif target.split(".")[0] != "hypergradients":
                external[m].add(target.split(".")[0])
    return edges, external


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle() -> None:
    edges, _ = _graph()
    assert len(edges) > 50  # the whole package was read
    assert _cycles(edges) == []


def test_layers_import_only_downward() -> None:
    edges, external = _graph()
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for m, targets in edges.items():
        here = _layer(m)
        if here is None:  # the public face and the entry points sit above every layer
            continue
        for t in sorted(targets):
            there = _layer(t)
            if there is None and here != "app":
                upward.append(f"{m} -> {t} (the public face)")
            elif there is not None and rank[there] > rank[here]:
                upward.append(f"{m} -> {t}")
    assert upward == []
    allowed = set(sys.stdlib_module_names) | {"torch"}
    core_outside = {m: sorted(ext - allowed) for m, ext in external.items() if _layer(m) == "core"}
    assert {m: e for m, e in core_outside.items() if e} == {}


def test_only_the_public_faces_re_export() -> None:
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found += [
                    f"{_module_name(path)}: {a.name} as {a.asname}"
                    for a in node.names
                    if a.asname is not None and a.asname == a.name.split(".")[-1]
                ]
    assert found == []


def _application_imports(source: str, forbidden: set[str]) -> list[str]:
    """Where ``source`` imports a module of ``forbidden`` (a name or the root of a dotted one), or names
    the application layer or the console script in a string (code run in a subprocess)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if "hypergradients.app" in node.value:
                found.append(f"{node.lineno}: {node.value[:60]!r}")
        elif isinstance(
            node, (ast.List, ast.Tuple)
        ):  # [..., "-m", "hypergradients", ...]: the console script
            words = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            if any(a == "-m" and b == "hypergradients" for a, b in itertools.pairwise(words)):
                found.append(f"{node.lineno}: python -m hypergradients")
        found += [
            f"{node.lineno}: import {n}"
            for n in names
            if n.split(".")[0] in forbidden or any(n == f or n.startswith(f + ".") for f in forbidden)
        ]
    return found


def test_library_tests_import_nothing_from_the_application_layer(cli_extra: tuple[str, ...]) -> None:
    here = Path(__file__)
    files = [*sorted(p for p in here.parent.glob("*.py") if p != here), ROOT / "tests" / "conftest.py"]
    assert len(files) > 30
    forbidden = {"hypergradients.app", *cli_extra}
    found = {
        p.name: hits
        for p in files
        if (hits := _application_imports(p.read_text(encoding="utf-8"), forbidden))
    }
    assert found == {}


@pytest.mark.parametrize(
    "source",
    [
        "import numpy as np",
        "def f():\n    import matplotlib.pyplot as plt",
        "from hypergradients.app.config import resolve",
        "from hypergradients.app import cli",
        "import hypergradients.app.cli",
        "code = 'import hypergradients.app.entry'",
        "subprocess.run([sys.executable, '-m', 'hypergradients', 'list'])",
    ],
)
def test_the_check_sees_an_application_import(source: str) -> None:
    assert _application_imports(source, {"hypergradients.app", "numpy", "matplotlib"})
    clean = "import torch\nfrom hypergradients.core import tree\nimport hypergradients as hg\nmode = 'hypergradients'"
    assert _application_imports(clean, {"hypergradients.app", "numpy"}) == []
