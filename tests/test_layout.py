"""The architecture's rules, checked on the source (docs/architecture.md states them).

Each rule is read from the code, not from a list kept by hand: a new module that
breaks one fails here with the file and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "parallelkit"
INTEGRATIONS = ("sqlalchemy", "redis", "taskiq", "otel")


def modules() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def imports(tree: ast.Module) -> Iterator[tuple[int, str, int]]:
    """(line, module, level) of every import, ``from . import x`` included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, 0
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, node.module or "", node.level


def absolute(path: Path, module: str, level: int) -> str:
    """The absolute dotted name of an import made in ``path``."""
    if level == 0:
        return module
    package = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(SRC.parent)}:{line}"


def test_no_private_anyio_import() -> None:
    found = [
        where(path, line)
        for path, tree in modules()
        for line, module, level in imports(tree)
        if level == 0 and module.startswith("anyio._")
    ]
    assert not found, f"anyio's private modules imported at {found}"


def test_sqlalchemy_internals_only_in_the_compat_module() -> None:
    """Private SQLAlchemy modules (``sqlalchemy.orm.strategies``, ...) are touched in
    one file, whose own test fails loudly when they move."""
    public = {
        "sqlalchemy",
        "sqlalchemy.orm",
        "sqlalchemy.ext.asyncio",
        "sqlalchemy.engine",
        "sqlalchemy.event",
        "sqlalchemy.exc",
        "sqlalchemy.pool",
        "sqlalchemy.sql",
        "sqlalchemy.inspection",
        "sqlalchemy.types",
        # documented in SQLAlchemy's API reference ("ORM Internals", "ORM Exceptions",
        # "set_committed_value"), not private
        "sqlalchemy.orm.interfaces",
        "sqlalchemy.orm.attributes",
        "sqlalchemy.orm.exc",
    }
    found = [
        f"{where(path, line)} {module}"
        for path, tree in modules()
        if path.name != "_compat.py"
        for line, module, level in imports(tree)
        if level == 0 and module.startswith("sqlalchemy") and module not in public
    ]
    assert not found, f"SQLAlchemy internals outside sqlalchemy/_compat.py: {found}"


def test_the_core_never_imports_an_integration() -> None:
    """``import parallelkit`` must work with no extra installed: nothing outside an
    integration's own folder imports it (the pytest plugin imports it lazily)."""
    found = []
    for path, tree in modules():
        rel = path.relative_to(SRC)
        if rel.parts[0] in INTEGRATIONS:
            continue
        for line, module, level in imports(tree):
            name = absolute(path, module, level)
            top = name.split(".")
            if top[0] == "parallelkit" and len(top) > 1 and top[1] in INTEGRATIONS:
                found.append(f"{where(path, line)} {name}")
            if level == 0 and top[0] in ("redis", "taskiq", "taskiq_redis", "opentelemetry"):
                found.append(f"{where(path, line)} {name}")
    # the pytest plugin uses parallelkit.sqlalchemy inside its fixtures only
    found = [f for f in found if not f.startswith("parallelkit/pytest_plugin.py")]
    assert not found, f"core modules importing an optional integration: {found}"


def test_the_core_imports_sqlalchemy_nowhere() -> None:
    found = [
        where(path, line)
        for path, tree in modules()
        if path.relative_to(SRC).parts[0] not in INTEGRATIONS and path.name != "pytest_plugin.py"
        for node in tree.body  # module level: a lazy import inside a function is fine
        if isinstance(node, ast.Import | ast.ImportFrom)
        for line, module, level in imports(ast.Module(body=[node], type_ignores=[]))
        if level == 0 and module.split(".")[0] == "sqlalchemy"
    ]
    assert not found, f"core modules importing SQLAlchemy at import time: {found}"


@pytest.mark.parametrize("folder", ["_fanout", "_graph", "_flow", "_cache", "_batch"])
def test_ideas_meet_only_through_the_core_or_their_engine(folder: str) -> None:
    """A primitive's folder imports ``_core``, the engines (``_fanout`` pool, ``_graph``)
    and itself; never another primitive's folder (no cycles between ideas)."""
    found = imports_outside({folder: {"_core", "_fanout", "_graph", folder}})
    assert not found, f"{folder} reaches into another idea: {found}"


def test_engines_do_not_import_the_primitives_built_on_them() -> None:
    engines = {"_core", "_fanout", "_graph"}
    found = imports_outside({"_core": {"_core"}, "_fanout": engines, "_graph": engines})
    assert not found, f"an engine imports what is built on it: {found}"


def imports_outside(allowed: dict[str, set[str]]) -> list[str]:
    """Imports of ``parallelkit.<x>`` from a module of a folder in ``allowed`` whose
    ``x`` is not among that folder's allowed folders."""
    found = []
    for path, tree in modules():
        folder = path.relative_to(SRC).parts[0]
        if folder not in allowed:
            continue
        for line, module, level in imports(tree):
            parts = absolute(path, module, level).split(".")
            if parts[0] == "parallelkit" and len(parts) > 1 and parts[1] not in allowed[folder]:
                found.append(f"{where(path, line)} {'.'.join(parts)}")
    return found


def test_every_test_the_guarantees_page_names_exists() -> None:
    import re

    page = SRC.parents[1] / "docs" / "guarantees.md"
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", page.read_text())
    assert len(named) > 30
    missing = []
    for file, test in named:
        path = SRC.parents[1] / file
        if not path.exists():
            missing.append(file)
        elif test and not re.search(rf"def {test}\(", path.read_text()):
            missing.append(f"{file}::{test}")
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"


def test_no_module_is_over_500_lines() -> None:
    """DESIGN.md: "no module over ~500 lines". A module that grows past it is split by
    idea (moved, not copied), so a newcomer reads each file whole."""
    found = [
        f"{path.relative_to(SRC.parent)}: {lines} lines"
        for path in sorted(SRC.rglob("*.py"))
        if (lines := len(path.read_text().splitlines())) > 500
    ]
    assert not found, f"modules over 500 lines: {found}"
