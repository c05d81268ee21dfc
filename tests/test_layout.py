"""The package's shape: no import cycles, a core that imports nothing above it, small files and functions.

The import graph is read from the source with ``ast`` (function-level imports included, ``TYPE_CHECKING``
blocks excluded), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "deltafm"

#: the core: maths, sampling engine, seeding, normalisation; imports nothing but itself
CORE = {"paths", "timesteps", "losses", "negatives", "schedules", "objective", "correction", "guidance",
        "solvers", "generate", "seeding", "pixels", "checks", "images", "errors", "sample_store", "atomic", "safe_load",
        "alignment", "conditioning", "provenance", "hub"}
#: which top-level parts each part may import (besides itself)
ALLOWED = {
    "core": {"core"},
    "models": {"core"},
    "data": {"core"},
    "eval": {"core", "data"},
    "vae": {"core"},
    "encoders": {"core"},
    "adapters": {"core"},
    "train": {"core", "models", "data", "vae", "encoders", "typed_config"},
    "toy": {"core", "models"},
    "convert": {"core", "models", "data", "vae", "train", "typed_config"},
    "prepare": {"core", "models", "data", "eval", "vae", "encoders", "train", "typed_config"},
    "study": {"core", "models", "data", "eval", "vae", "encoders", "train", "typed_config"},
    "typed_config": {"core"},
    "cli": {"core", "models", "data", "eval", "vae", "encoders", "train", "prepare", "study", "toy", "typed_config"},
}
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
#: functions allowed over the limit, with the reason
LONG_FUNCTIONS: dict[str, str] = {}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    visit(c)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                out.append(child)
            visit(child)

    visit(tree)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the deltafm modules it imports (``from a import b`` points at ``a.b`` when that is a module)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t.startswith("deltafm") and t != name:
                    graph[name].add(t)
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # the package namespace re-exports the core
        return "core"
    head = parts[1]
    if head in CORE:
        return "core"
    if head in ("cli", "__main__", "sample_cli", "sample_options", "sample_conditions"):
        return "cli"
    return head


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_the_graph_reader_sees_lazy_and_relative_imports():
    g = import_graph()
    assert "deltafm.losses" in g["deltafm.objective"]  # relative: from .losses import ...
    assert "deltafm.train.loop" in g["deltafm.cli"]  # inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_each_part_imports_only_the_parts_below_it():
    bad = []
    for mod, deps in import_graph().items():
        part = _part(mod)
        allowed = ALLOWED[part] | {part}
        for d in deps:
            if _part(d) not in allowed:
                bad.append(f"{mod} -> {d}")
    assert bad == []


def test_no_core_module_imports_from_the_framework():
    g = import_graph()
    for mod, deps in g.items():
        if _part(mod) == "core":
            assert {_part(d) for d in deps} <= {"core"}, (mod, deps)


def test_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                key = f"{name}.{node.name}"
                if n > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                    long_functions.append(f"{key}: {n} lines")
    assert long_files == []
    assert long_functions == []
