"""The package layout's two rules, checked on the source: no import cycles inside kiln, and the
run side (what a deployment imports to load and run an engine file) never reaches the build side.

The import graph is read statically from the AST: a module depends on what its import statements
name (`from kiln.kernels import aten` names the submodule kiln.kernels.aten; `from kiln.kernels
import OpCall` names the package, i.e. its __init__). Module-level imports count, including
those inside try/except; imports under `if TYPE_CHECKING:` never run and do not; imports inside
functions are deferred and do not count as cycles, but do count for the run side's isolation.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The run side: loading and running an engine file.
RUN_SIDE = (
    "kiln.runtime",
    "kiln.kernels",
    "kiln.ops",
    "kiln.specs",
    "kiln.errors",
    "kiln.tensorrt.runtime",
    "kiln.tensorrt.api",
)
# The build side and the tools around it: never needed to run an engine.
BUILD_SIDE = (
    "kiln.builder",
    "kiln.capture",
    "kiln.passes",
    "kiln.select",
    "kiln.plan",
    "kiln.graph",
    "kiln.quant",
    "kiln.tensorrt.convert",
    "kiln.tensorrt.partitioning",
    "kiln.bench",
    "kiln.cli",
    "kiln.debug",
    "kiln.onnx",
    "kiln.zoo",
    "kiln.catalog",
)


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _modules() -> dict[str, tuple[Path, bool]]:
    """kiln's modules: dotted name → (file, is a package __init__)."""
    found = {}
    for path in (SRC / "kiln").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _modules()


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The kiln modules an import statement names."""
    out = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
        return out
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, node.module] if node.module else base)
    else:
        source = node.module or ""
    for alias in node.names:
        if f"{source}.{alias.name}" in MODULES:
            out.add(f"{source}.{alias.name}")
        elif source in MODULES:
            out.add(source)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, deferred: bool) -> set[str]:
    """What `module` imports at module level (with `deferred`, also inside functions)."""
    path, is_package = MODULES[module]
    found: set[str] = set()

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(_targets(module, is_package, node))
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body)
                for handler in node.handlers:
                    walk(handler.body)
                walk(node.orelse)
                walk(node.finalbody)
            elif isinstance(node, (ast.With, ast.For, ast.While)):
                walk(node.body)
            elif deferred and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                walk(node.body)

    walk(ast.parse(path.read_text()).body)
    found.discard(module)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """One cycle through `start` inside `members`, for the failure message."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return [start]


def test_the_graph_reader_sees_package_imports_and_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _path(graph, "a", {"a", "b", "c"}) == ["a", "b", "c", "a"]
    # a submodule named in `from package import name` is that module; anything else is the package
    node = ast.parse("from kiln.kernels import aten, OpCall").body[0]
    assert _targets("kiln.x", False, node) == {"kiln.kernels.aten", "kiln.kernels"}
    relative = ast.parse("from .registry import register_kernel").body[0]
    assert _targets("kiln.kernels", True, relative) == {"kiln.kernels.registry"}
    assert "kiln.kernels.registry" in _imports("kiln.kernels", deferred=False)


def test_no_import_cycles_inside_kiln():
    graph = {m: _imports(m, deferred=False) for m in MODULES}
    cycles = _cycles(graph)
    described = [" → ".join(_path(graph, c[0], set(c))) for c in cycles]
    assert not cycles, "import cycles inside kiln:\n  " + "\n  ".join(described)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _within(m, RUN_SIDE)))
def test_the_run_side_never_imports_the_build_side(module):
    """Not even in a function: running an engine must never load the compiler."""
    reached = sorted(t for t in _imports(module, deferred=True) if _within(t, BUILD_SIDE))
    assert not reached, f"{module} (run side) imports build-side {reached}"


def test_loading_kiln_runtime_in_a_fresh_interpreter_loads_no_build_side_module():
    code = (
        "import sys\n"
        "import kiln.runtime\n"
        "from kiln import load, Engine, EngineModule\n"
        f"build = {BUILD_SIDE!r}\n"
        "loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + '.') for b in build))\n"
        "trt = sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] in ('tensorrt', 'tensorrt_rtx', 'tensorrt_rtx_bindings'))\n"
        "print('\\n'.join(loaded + trt))\n"
        "assert 'kiln.kernels' in sys.modules and 'kiln.runtime.engine' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", f"importing kiln.runtime loaded build-side modules:\n{done.stdout}"


# Neither side: the package roots, what both sides share, and the serving layer over the runtime.
SHARED = ("kiln", "kiln.tensorrt", "kiln.tensorrt.check", "kiln.timing", "kiln.shapes", "kiln.dims")
SERVING = ("kiln.serve",)


def test_every_module_is_placed_on_a_side():
    """A new module must say where it belongs, so that the rules above cover it."""
    placed = RUN_SIDE + BUILD_SIDE + SERVING
    unplaced = sorted(m for m in MODULES if not _within(m, placed) and m not in SHARED)
    assert not unplaced, f"modules on no side (add each to RUN_SIDE, BUILD_SIDE or SHARED in this test): {unplaced}"
