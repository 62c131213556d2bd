"""Where the benchmark modules are found, and the contract each one follows.

A benchmark is a module ``benchmarks/bench_<name>.py`` that defines::

    TITLE: str                                   # one line for the progress display
    def run(*, quick: bool, database: str | None) -> dict[str, Any]: ...

``run`` measures everything it compares **in one run, side by side**, prints a
table, and returns a JSON-ready dict (written to ``results/<name>.json``). It
must not assert on timings; targets are reported with their measured ratio and a
``met`` flag, so a missed target is visible, not hidden.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# the order `python -m benchmarks` runs them in
ORDER = ["seed", "fanout", "flow", "cache", "eager", "startup", "redis", "distributed"]


def available() -> list[str]:
    names = [
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules([str(HERE)])
        if m.name.startswith("bench_")
    ]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def load(name: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.bench_{name}")
