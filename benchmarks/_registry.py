"""Where the benchmark modules are found, and the contract each one follows.

A benchmark is a module ``benchmarks/bench_<name>.py`` that defines::

    TITLE: str                                   # one line for the progress display
    def run(*, quick: bool, database: str | None) -> dict[str, Any]: ...

``run`` measures everything it compares **in one run, side by side**, prints a
table, and returns a JSON-ready dict (written to ``results/<name>.json`` and into
``results/results.json``). It must not assert on timings; targets are reported
with their measured ratio and a ``met`` flag, so a missed target is visible, not
hidden. ``quick=True`` must keep the module short (the whole ``--quick`` suite
runs in under two minutes); ``database`` is a SQLAlchemy URL or ``None`` for the
embedded SQLite default.

Optional keys of the returned dict that the runner understands:

* ``"targets"``: a list of ``{"target", "measured", "limit", "met"}`` (see
  ``_util.target``): rendered as a table in ``results/report.md``;
* ``"markdown"``: a Markdown section included verbatim in the report;
* ``"chart"``: ``{"title", "unit", "groups": {row: {series: value}}}``: drawn
  as a grouped bar chart into ``results/<name>.png``;
* ``"skipped"``: a reason (e.g. "Redis not reachable"): shown as skipped, not failed.

A module may call :func:`report_progress` to show what it is measuring now.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
#: Where results go; ``PARALLELKIT_BENCH_RESULTS`` moves them (the smoke test uses a temp dir).
RESULTS = Path(os.environ.get("PARALLELKIT_BENCH_RESULTS") or HERE / "results")

# the order `python -m benchmarks` runs them in
ORDER = [
    "seed",
    "fanout",
    "flow",
    "cache",
    "batch",
    "eager",
    "peers",
    "startup",
    "redis",
    "distributed",
]
ORDER += ["service"]
#: run only when named (``python -m benchmarks service``): minutes of real HTTP load
ON_REQUEST = ("service",)

_hook: list[Callable[[str], None]] = []


def available() -> list[str]:
    names = [
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules([str(HERE)])
        if m.name.startswith("bench_")
    ]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def default() -> list[str]:
    """What ``python -m benchmarks`` runs when no name is given."""
    return [n for n in available() if n not in ON_REQUEST]


def load(name: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.bench_{name}")


def report_progress(text: str) -> None:
    """Tell the progress display what the running benchmark measures now (else a no-op)."""
    for hook in _hook:
        hook(text)


def set_progress_hook(hook: Callable[[str], None] | None) -> None:
    """Used by the runner: where :func:`report_progress` goes (``None``: nowhere)."""
    _hook.clear()
    if hook is not None:
        _hook.append(hook)
