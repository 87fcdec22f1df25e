"""Import architecture: the module import graph of ``dist_ast``, read with ``ast`` (no
module is imported), checked for cycles and for private names crossing modules.

What counts as an edge A -> B: A's ``import B`` / ``from B import x`` (relative imports
resolved), or ``from P import B`` when ``P.B`` is a module; the parent packages that
Python initialises on the way are not edges (``dist_ast.data.wds`` importing
``dist_ast.data.shardset`` does not make ``wds`` depend on ``dist_ast/data/__init__``).
Imports under ``if TYPE_CHECKING:`` never run and are left out. Imports inside a function
or class body are edges too by default (``local=True``); ``local=False`` keeps only
module-level imports, the ones that run at import time.

Asserted for the whole package (function-local imports included): no cycle, no private
name of another module, and the layers of docs/architecture.md (a module imports only
its own layer or lower ones).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dist_ast"
CHECKED = ("dist_ast",)  # prefixes held to the rules below


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a module of the package
    name: str | None  # the imported name for ``from target import name``, else None
    line: int
    local: bool  # inside a function or class body


def modules(package: str = PACKAGE, root: Path = ROOT) -> dict[str, Path]:
    """Every module of ``package``: dotted name -> file (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted((root / package.replace(".", "/")).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _walk(tree: ast.AST, local: bool = False):
    """(import node, inside a function/class) for every import that can run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                yield from _walk(ast.Module(body=[child], type_ignores=[]), local)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, local
        inner = local or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        yield from _walk(node, inner)


def imports(package: str = PACKAGE, root: Path = ROOT) -> list[Import]:
    """Every import of a module of ``package`` by a module of ``package``."""
    mods = modules(package, root)
    out = []
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node, local in _walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods:
                        out.append(Import(name, a.name, None, node.lineno, local))
                continue
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in mods:
                    out.append(Import(name, sub, None, node.lineno, local))
                elif base in mods:
                    out.append(Import(name, base, a.name, node.lineno, local))
    return out


def import_graph(
    package: str = PACKAGE, root: Path = ROOT, *, local: bool = True
) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (``local=False``: module level only)."""
    graph: dict[str, set[str]] = {m: set() for m in modules(package, root)}
    for imp in imports(package, root):
        if (local or not imp.local) and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def restrict(graph: dict[str, set[str]], prefix: str) -> dict[str, set[str]]:
    """The subgraph of the modules named ``prefix`` or ``prefix.*``."""

    def inside(m: str) -> bool:
        return m == prefix or m.startswith(prefix + ".")

    return {m: {t for t in ts if inside(t)} for m, ts in graph.items() if inside(m)}


def private_imports(package: str = PACKAGE, root: Path = ROOT) -> list[Import]:
    """Imports of a name ``_x`` (not a dunder) from another module, or of a module ``_x``."""

    def private(part: str) -> bool:
        return part.startswith("_") and not part.startswith("__")

    return [
        i
        for i in imports(package, root)
        if i.target != i.importer
        and ((i.name is not None and private(i.name)) or any(map(private, i.target.split("."))))
    ]


def _touches(imp: Import, prefix: str) -> bool:
    return any(m == prefix or m.startswith(prefix + ".") for m in (imp.importer, imp.target))


@pytest.mark.parametrize("prefix", CHECKED)
def test_no_import_cycle(prefix: str) -> None:
    assert cycles(restrict(import_graph(), prefix)) == []


@pytest.mark.parametrize("prefix", CHECKED)
def test_no_private_name_crosses_modules(prefix: str) -> None:
    bad = [
        f"{i.importer}:{i.line} imports {i.target}.{i.name}"
        for i in private_imports()
        if _touches(i, prefix)
    ]
    assert bad == []


def test_package_has_no_module_level_cycle() -> None:
    assert cycles(import_graph(local=False)) == []


def test_data_layers() -> None:
    """The shared parts import no loader, writer or factory; the loaders do not import
    each other; nothing imports the CLI."""
    g = import_graph()
    shared = {"dist_ast.data.shardset", "dist_ast.data.transforms"}
    upper = {"dist_ast.data", "dist_ast.data.wds", "dist_ast.data.dali"}
    upper |= {"dist_ast.data.writer", "dist_ast.data.shards"}
    for m in shared:
        assert not g[m] & upper, m
    assert "dist_ast.data.dali" not in g["dist_ast.data.wds"]
    assert "dist_ast.data.wds" not in g["dist_ast.data.dali"]
    assert not [m for m, ts in g.items() if "dist_ast.data.shards" in ts]


def test_graph_reader_sees_cycles_and_private_names(tmp_path: Path) -> None:
    """The checks above would catch what they are for: a cycle through a function-local
    and a relative import, and a private name."""
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from p.sub import a\n")
    (pkg / "sub" / "a.py").write_text("from . import b\nfrom .b import _hidden\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import p.sub\n"
        "def f():\n    from p.sub.a import x\n"
    )
    g = import_graph("p", tmp_path)
    assert g == {"p": set(), "p.sub": {"p.sub.a"}, "p.sub.a": {"p.sub.b"}, "p.sub.b": {"p.sub.a"}}
    assert cycles(g) == [["p.sub.a", "p.sub.b"]]
    assert cycles(import_graph("p", tmp_path, local=False)) == []
    assert [(i.importer, i.name) for i in private_imports("p", tmp_path)] == [
        ("p.sub.a", "_hidden")
    ]


# docs/architecture.md: the layers, lowest first. A module may import its own layer and
# the layers below it, never one above.
LAYERS = [
    ["errors", "state_codecs"],
    ["sparsity"],
    ["models"],
    ["config"],
    [
        "data", "distributed", "checkpoint_io", "flops", "nonfinite", "metrics",
        "preemption", "progress",
    ],
    ["checkpoint"],
    ["subnets_io", "cli", "evaluate", "export", "dynamic", "report"],
    ["train"],
]  # fmt: skip


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{module} is in no layer of docs/architecture.md: add it there")


def test_package_layers() -> None:
    up = [
        f"{a} ({LAYERS[layer_of(a)][0]}…) imports {b} ({LAYERS[layer_of(b)][0]}…)"
        for a, targets in import_graph().items()
        if a != PACKAGE
        for b in targets
        if b != PACKAGE and layer_of(b) > layer_of(a)
    ]
    assert up == []


def test_layers_are_documented() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for names in LAYERS:
        for name in names:
            assert f"`{name}" in doc, f"docs/architecture.md does not place {name}"
