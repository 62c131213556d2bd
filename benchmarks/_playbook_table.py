"""The playbook's table as it claims it, and the plans it is measured with.

The rows (:mod:`benchmarks._playbook_rows`, :mod:`benchmarks._playbook_bulk`) and
the report (:mod:`benchmarks.bench_playbook`) all read the same few facts: the
timings the playbook claims for each row, the name of the variant written by hand,
and how long each row runs in the main job and with ``--full``. They live here,
apart from any row, so every module of the benchmark can import them.
"""

from __future__ import annotations

from ._measure import Plan

__all__ = ["FULL", "HAND", "PLAYBOOK", "QUICK", "sequential_seconds"]

#: The playbook's own numbers (ms): sequential ("before") and parallel ("after") as claimed.
PLAYBOOK: dict[str, tuple[int, int]] = {
    "Server startup": (2000, 700),
    "100 cadence enrollments": (5000, 150),
    "4 DB queries": (400, 50),
    "Payment processing": (800, 500),
    "50 company detection": (25000, 5000),
}

#: The extra variant every row has: the same work written by hand in asyncio (no
#: parallelkit), run in the same conditions: what parallelkit's own cost is measured against.
HAND = "hand-written asyncio"

#: The main job's plan: each row's sequential code takes 0.2 to 1.4 s, a simulated round
#: trip stays at 2.5 ms or more (a statement alone costs about 1 ms of this machine's
#: time, more on a busy one), two runs of each parallel variant, one of the rest.
#: ``--full`` runs every row at the playbook's own durations (scale 1), five times.
QUICK = Plan(
    scales={
        "Server startup": 0.1,
        "100 cadence enrollments": 0.2,
        "4 DB queries": 0.5,
        "Payment processing": 0.25,
        "50 company detection": 0.04,
    },
    repeat=2,
    before_runs=1,
    floor_runs=1,
)
FULL = Plan(scales=dict.fromkeys(PLAYBOOK, 1.0), repeat=5, before_runs=3, floor_runs=5)


def sequential_seconds(plan: Plan, row: str) -> float:
    """The playbook's sequential time for ``row``, at the plan's time scale for it."""
    return PLAYBOOK[row][0] / 1000 * plan.scales[row]
