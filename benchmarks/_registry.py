"""Where the benchmark modules are found, and the contract each one follows.

A benchmark is a module ``benchmarks/bench_<name>.py`` that defines::

    TITLE: str                      # one line for the progress display
    def run(*, quick: bool, database: str | None, redis: str | None = None) -> dict[str, Any]

``run`` measures everything it compares **in one run, side by side**, prints a
table, and returns a JSON-ready dict (written to ``<results>/<name>.json`` and
into ``<results>/results.json``). It must not assert on timings; targets are
reported with their measured ratio and a ``met`` flag, so a missed target is
visible, not hidden. Correctness flags are computed from the results, never
written as constants, and every "ideal" or "floor" is an independent lower bound
written without parallelkit.

* ``quick=True`` is the main job (``python -m benchmarks``): the whole quick
  suite, the CRM demo included, must finish within a minute on a 2-core machine,
  so a module keeps within its share (see :data:`QUICK_BUDGET_S`); the runner
  prints a warning for a module that goes over.
* ``database`` is a SQLAlchemy URL the user asked for with ``--database``, or
  ``None``: then the module uses **embedded SQLite only** and never probes a
  default server address.
* ``redis`` is the URL the user asked for with ``--redis``, or ``None``. A module
  that cannot run at all without Redis is listed in :data:`NEEDS`: the runner
  does not call it without ``--redis`` (it reports "not run: needs --redis URL").
  The runner passes ``redis=`` only to a ``run`` that accepts it.

Optional keys of the returned dict that the runner understands:

* ``"targets"``: a list of ``{"target", "measured", "limit", "met"}`` (see
  ``_util.target``): rendered as a table in the report;
* ``"markdown"``: a Markdown section included verbatim in the report;
* ``"summary"``: a few short lines for the terminal summary of the main job;
* ``"chart"``: ``{"title", "unit", "groups": {row: {series: value}}}`` plus the
  optional ``"highlight"`` (the series drawn as parallelkit, default
  ``"parallelkit"``), ``"bound"`` (a series drawn hatched, as a bound rather than a
  measurement) and ``"note"`` (a line under the chart): drawn as a horizontal
  grouped bar chart into ``<name>.png``;
* ``"wrong"``: a list of wrong results (a result that is not correct): the module
  is reported as WRONG and the run's exit status is 1;
* ``"skipped"``: a reason: shown as skipped, not failed.

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
ROOT = HERE.parent
#: Where a run writes by default: an ignored directory of the checkout (never a tracked
#: file). ``--out DIR`` or ``PARALLELKIT_BENCH_RESULTS`` move it (the tests use a temp dir).
RESULTS = Path(os.environ.get("PARALLELKIT_BENCH_RESULTS") or ROOT / ".benchmarks")

# the order `python -m benchmarks` runs them in (one name per line: easy to merge)
ORDER = [
    "playbook",
    "fanout",
    "flow",
    "cache",
    "batch",
    "eager",
    "peers",
    "startup",
    "otel",
    "redis",
    "distributed",
    "service",
]

#: Run only when named (``python -m benchmarks service``): minutes of real HTTP load.
ON_REQUEST = ("service",)

#: Servers a module cannot run without (one line per module). Without the matching
#: option (``--redis URL``) the runner does not call the module.
NEEDS: dict[str, tuple[str, ...]] = {
    "redis": ("redis",),
    "distributed": ("redis",),
}

#: Seconds a module may take in the main job (quick sizes, SQLite) on a 2-core machine
#: whose cores are busy with other work (``../shared/tools/under-load``); on an idle one a
#: module takes about half to two thirds of it. Every module the main job runs has one.
#: With the CRM demo (3-4 s idle, about 7 s busy) and the runner's own start-up and
#: charts (about 4 s busy) the sum stays under a minute; the runner warns about overruns.
QUICK_BUDGET_S: dict[str, float] = {
    "playbook": 18.0,
    "fanout": 7.0,
    "flow": 4.5,
    "cache": 4.5,
    "eager": 4.5,
    "peers": 4.0,
    "startup": 4.0,
    "otel": 2.5,
}

#: Old names still accepted on the command line.
ALIASES = {"seed": "playbook"}

_hook: list[Callable[[str], None]] = []


def available() -> list[str]:
    names = [
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules([str(HERE)])
        if m.name.startswith("bench_")
    ]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def default() -> list[str]:
    """What ``python -m benchmarks`` runs when no name is given: all but :data:`ON_REQUEST`."""
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
