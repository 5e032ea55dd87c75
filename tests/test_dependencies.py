"""The dependency rules of docs/ARCHITECTURE.md, checked by walking every module's imports (ast, no execution)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("sparse_gguf", "numba_kernels", "converters", "cli")
FRONT_ENDS = {"cli", "sparse_gguf.server", "sparse_gguf.chat", "sparse_gguf.api", "sparse_gguf.bench"}
STDLIB = set(sys.stdlib_module_names)


def _modules() -> dict[str, Path]:
    mods = {"cli": ROOT / "cli.py"}
    for pkg in OURS[:3]:
        for f in sorted((ROOT / pkg).glob("*.py")):
            mods[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return mods


MODULES = _modules()


def _imports(name: str, top_level_only: bool) -> set[str]:
    """Modules `name` imports (ours resolved to full names; others by their top-level package)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].stem == "__init__" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:                                      # `from pkg import module` names a module
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m if m.split(".")[0] in OURS else m.split(".")[0] for m in out}


def _ours(mods: set[str]) -> set[str]:
    return {m for m in mods if m.split(".")[0] in OURS}


def test_the_walk_sees_imports():
    """The checker itself: it resolves relative, absolute and `from package import module` imports."""
    assert "sparse_gguf.ffn" in _imports("sparse_gguf.model", True)
    assert "numba_kernels.sparse_ffn" in _imports("sparse_gguf.ffn", True)
    assert "sparse_gguf.model" in _imports("converters.convert", True)
    assert "gguf" in _imports("sparse_gguf.sparsity", True)


def test_kernels_import_nothing_of_the_package():
    for name in MODULES:
        if name.startswith("numba_kernels"):
            bad = {m for m in _ours(_imports(name, False)) if not m.startswith("numba_kernels")}
            assert not bad, f"{name} imports {bad}"


def test_format_module_is_a_leaf():
    allowed = {"numpy", "gguf", "__future__", "dataclasses"}
    assert _imports("sparse_gguf.format", False) <= allowed


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith("sparse_gguf") and m not in FRONT_ENDS
                                  and m != "sparse_gguf"])
def test_model_layer_never_imports_front_ends_or_the_converter(name):
    bad = {m for m in _ours(_imports(name, False)) if m in FRONT_ENDS or m.startswith("converters")}
    assert not bad, f"{name} imports {bad}"


def test_converter_uses_only_public_names():
    """converters/ neither imports private names of the package nor reaches into private attributes."""
    for name in MODULES:
        if not name.startswith("converters"):
            continue
        tree = ast.parse(MODULES[name].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("sparse_gguf", "numba_kernels")):
                assert not [a.name for a in node.names if a.name.startswith("_")], f"{name}: {ast.dump(node)}"
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                    and not (isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "super")):
                assert False, f"{name} line {node.lineno}: reaches into .{node.attr}"


def test_no_import_cycles_and_none_hidden_in_functions():
    """Module-level imports among our modules form no cycle, and no function imports one of our modules
    (which would hide a cycle). cli.py is exempt from the second rule: it imports each command's modules
    when that command runs, so `--help` starts fast."""
    graph = {name: _ours(_imports(name, True)) & set(MODULES) for name in MODULES}
    for name in MODULES:
        if name != "cli":
            hidden = (_ours(_imports(name, False)) - _ours(_imports(name, True))) & set(MODULES)
            assert not hidden, f"{name} imports {hidden} inside a function"
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
