"""The package's import graph, read with `ast`: no cycle between modules, and no import from a lower layer up.

Layers, lowest first: the core (kvcached/*.py, vmm/, registry/), then the operator tools (cli/), then the engine
integrations (integrations/). A module may import its own layer or lower ones; the core never imports cli,
integrations or an engine. Imports under `if TYPE_CHECKING:` are for type checkers only and are skipped.
"""

from __future__ import annotations

import ast
import os
from typing import Optional

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kvcached")
ENGINES = ("vllm", "sglang")
LAYERS = {"cli": 1, "integrations": 2, "router": 2}  # everything else: the core, layer 0
# Within the core, lowest first: a core module imports only modules listed before it (or inside its own package).
CORE_ORDER = ["units", "errors", "hostmem", "config", "devices", "procinfo", "vmm", "layout", "page_allocator",
              "manager", "registry", "pagetable", "opener"]


def module_name(path: str, root: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def core_rank(module: str) -> Optional[int]:
    parts = module.split(".")
    return CORE_ORDER.index(parts[1]) if len(parts) > 1 and parts[1] in CORE_ORDER else None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(imported module, line) for every import in `tree`, relative ones resolved; TYPE_CHECKING blocks skipped."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # `from . import registry` imports a submodule
                yield f"{target}.{alias.name}", node.lineno
        todo.extend(ast.iter_child_nodes(node))


def import_graph(root: str = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {kvcached module or engine it imports: line}."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                files[module_name(path, root)] = path
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        edges = graph.setdefault(module, {})
        for target, line in _imports(tree, module, path.endswith("__init__.py")):
            top = target.split(".")[0]
            if target in files and target != module:
                edges.setdefault(target, line)
            elif top in ENGINES:
                edges.setdefault(top, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> Optional[list[str]]:
    """A cycle of module-level imports (a package's import of its own submodule included), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                if not node.startswith(nxt + "."):  # a submodule importing its package's __init__ is no cycle
                    return stack[stack.index(nxt):] + [nxt]
            elif nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    bad = []
    for module, edges in sorted(graph.items()):
        for target, line in edges.items():
            if target in ENGINES:
                if layer(module) < LAYERS["integrations"]:
                    bad.append(f"{module}:{line} imports the engine {target}")
            elif layer(target) > layer(module):
                bad.append(f"{module}:{line} imports {target}, a higher layer")
            elif None not in (core_rank(module), core_rank(target)) and core_rank(target) > core_rank(module):
                bad.append(f"{module}:{line} imports {target}, above it in the core")
    return bad


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_no_module_imports_a_higher_layer_or_an_engine_from_below():
    assert upward_imports(import_graph()) == []


@pytest.mark.parametrize("planted, finds", [
    ("kvcached/units.py", "cycle"),  # units -> manager -> ... -> units
    ("kvcached/registry/records.py", "upward"),  # the core importing the CLI
    ("kvcached/layout.py", "engine"),  # the core importing vLLM
    ("kvcached/devices.py", "upward"),  # a low core module importing a higher one (no cycle)
])
def test_a_planted_bad_import_is_caught(tmp_path, planted, finds):
    """The checks read a copy of the package with one bad import added, and must report it."""
    import shutil

    root = tmp_path / "kvcached"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    line = {"cycle": "from .manager import KVCacheManager\n", "engine": "import vllm\n",
            "upward": "from .registry import Registration\n" if planted.endswith("devices.py") else "from ..cli import kvctl\n",
            }[finds]
    target = root / os.path.relpath(planted, "kvcached")
    target.write_text(target.read_text() + line)
    graph = import_graph(str(root))
    if finds == "cycle":
        cycle = find_cycle(graph)
        assert cycle is not None and "kvcached.units" in cycle and "kvcached.manager" in cycle
    else:
        bad = upward_imports(graph)
        module = module_name(str(target), str(root))
        assert bad and all(b.startswith(f"{module}:") for b in bad)
