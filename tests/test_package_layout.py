"""The package's shape, as ``gateway/README.md`` draws it: layers in folders, no import cycle of
any kind (those under ``TYPE_CHECKING`` included: a reader follows them too), the pure modules
importing nothing else from the package, and no module or class grown past what one concern
needs. Read from the source with ``ast``, so a cycle fails here before it fails at import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"
PURE = ("gateway.errors", "gateway.settings", "gateway.stream.sse", "gateway.upstream.router",
        "gateway.upstream.health")
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 200
MAX_FLAT_MODULES = 22


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The package's modules that ``name`` imports, wherever the import statement stands."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # ``from . import relay`` imports a module
                if f"{target}.{alias.name}" in MODULES:
                    found.add(f"{target}.{alias.name}")
            if target in MODULES:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
    found.discard(name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _a_cycle() -> list[str] | None:
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return [*path[path.index(name):], name]
        if name in done:
            return None
        path.append(name)
        for imported in sorted(GRAPH[name]):
            # A package's ``__init__`` runs before its modules: importing ``gateway.x.y``
            # imports ``gateway.x`` first, but an ``__init__`` that imports nothing adds nothing.
            if (cycle := visit(imported)) is not None:
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in sorted(GRAPH):
        if (cycle := visit(name)) is not None:
            return cycle
    return None


def test_no_module_imports_itself_back_through_any_chain() -> None:
    assert _a_cycle() is None, " -> ".join(_a_cycle() or [])


@pytest.mark.parametrize("name", PURE)
def test_the_pure_modules_import_nothing_else_from_the_package(name: str) -> None:
    assert GRAPH[name] == set()


def test_no_module_is_past_its_size() -> None:
    too_long = {name: n for name, path in MODULES.items()
                if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert too_long == {}


def test_no_class_is_past_its_size() -> None:
    too_long = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    too_long[f"{name}.{node.name}"] = lines
    assert too_long == {}


def test_the_flat_core_is_glue_and_the_layers_have_folders() -> None:
    flat = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(flat) <= MAX_FLAT_MODULES, sorted(flat)
    for layer in ("handlers", "middleware", "mock", "ratelimit", "records", "redis", "server",
                  "stream", "upstream"):
        assert (PACKAGE / layer / "__init__.py").is_file(), layer
