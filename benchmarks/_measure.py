"""Measuring helpers of the playbook benchmark: side by side, checked, calibrated.

* :func:`compare` runs variants round-robin and checks every run's result;
* :func:`cpu_bound` is the event loop's CPU time for hand-written forms, latency off;
* :func:`calibrate` sets a database's simulated round trip so that a sequential
  code takes a given time.

Statements are counted with a plain SQLAlchemy event (:class:`Statements`), not
with parallelkit, so a broken parallelkit cannot miscount its own work.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from examples.crm.db import Database
from sqlalchemy import event

Measure = Callable[[], Awaitable[Any]]
Check = Callable[[str, Any], Awaitable[bool]]
Reset = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Plan:
    """How long to measure: each row's time scale and the runs of each variant."""

    scales: Mapping[str, float]  # row -> multiplier of the playbook's durations
    repeat: int  # runs of each parallel variant, interleaved
    before_runs: int  # runs of the (slow) sequential code
    floor_runs: int  # runs of the hand-written CPU bound


class Statements:
    """Counts the statements an engine sends (a plain SQLAlchemy event, not parallelkit)."""

    def __init__(self, db: Database | None) -> None:
        self.engine = db.engine.sync_engine if db is not None else None
        self.count = 0

    def _seen(self, *_: Any) -> None:
        self.count += 1

    def __enter__(self) -> Statements:
        if self.engine is not None:
            event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *_: object) -> None:
        if self.engine is not None:
            event.remove(self.engine, "before_cursor_execute", self._seen)


@contextlib.contextmanager
def no_latency(db: Database | None) -> Iterator[None]:
    if db is None:
        yield
        return
    saved, db.latency.seconds = db.latency.seconds, 0.0
    try:
        yield
    finally:
        db.latency.seconds = saved


def _stats(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "runs": len(samples),
    }


async def compare(
    variants: dict[str, Measure],
    plan: Plan,
    check: Check,
    *,
    db: Database | None = None,
    reset: Reset | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the variants round-robin (a slow phase of a shared machine hits them all alike).

    Each run is checked by ``check(variant, value)`` (latency off); a variant is
    correct only if every run was (a run that raises is wrong; its first error is
    kept). ``before`` runs ``plan.before_runs`` times, the others ``plan.repeat`` times.
    """
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    statements: dict[str, int] = {}
    errors: dict[str, str] = {}
    correct = dict.fromkeys(variants, True)
    for i in range(max(plan.repeat, plan.before_runs)):
        for name, fn in variants.items():
            if i >= (plan.before_runs if name == "before" else plan.repeat):
                continue
            if reset is not None:
                with no_latency(db):
                    await reset()
            with Statements(db) as counter:
                start = time.perf_counter()
                try:
                    value = await fn()
                except Exception as exc:  # a variant that crashes gave a wrong result
                    errors.setdefault(name, f"{type(exc).__name__}: {exc}")
                    value = exc
                seconds[name].append(time.perf_counter() - start)
            statements.setdefault(name, counter.count)
            ok = name not in errors
            if ok:
                with no_latency(db):
                    ok = await check(name, value)
            correct[name] = ok and correct[name]
    return {
        name: {
            **_stats(xs),
            "statements": statements[name] if db is not None else None,
            "correct": correct[name],
            **({"error": errors[name]} if name in errors else {}),
        }
        for name, xs in seconds.items()
    }


async def cpu_bound(
    forms: dict[str, Measure],
    plan: Plan,
    db: Database,
    reset: Reset | None = None,
) -> dict[str, Any]:
    """The least event-loop CPU time of hand-written forms run with the latency off.

    What the forms' statements cost the one thread that runs the event loop (Python,
    SQLAlchemy, the driver's event-loop side), measured with ``time.thread_time``:
    any implementation that sends those statements from one event loop needs at
    least that much wall time. It is not their wall time: that includes waiting for
    the database's threads and its locks, which concurrency can overlap or add.
    """
    best: tuple[float, str] = (math.inf, "")
    with no_latency(db):
        for _ in range(plan.floor_runs):
            for name, fn in forms.items():
                if reset is not None:
                    await reset()
                start = time.thread_time()
                await fn()
                best = min(best, (time.thread_time() - start, name))
        if reset is not None:
            await reset()
    return {"seconds": best[0], "form": best[1]}


async def calibrate(
    db: Database,
    probe: Measure,
    *,
    share: float,
    target: float,
    fixed: float = 0.0,
    reset: Reset | None = None,
) -> dict[str, Any]:
    """Set the simulated round trip so that the sequential code takes ``target`` seconds.

    ``probe`` is ``share`` of the sequential code (its first items, or all of it).
    It runs once with the latency off (its statements and their cost here), then
    twice with the naive round trip ``(target - fixed) / statements``; whatever a
    statement took beyond that round trip in the quicker of the two (Python, the
    driver, the database, the event loop waking up) is taken out of it. ``fixed`` is
    the simulated time that is not the database's (the probe runs without it). The
    round trip is 0 when this machine alone takes longer than the playbook: the
    check then fails.
    """
    with no_latency(db):
        if reset is not None:
            await reset()
        with Statements(db) as counter:
            start = time.perf_counter()
            await probe()
            cost = time.perf_counter() - start
    statements = max(counter.count, 1)
    naive = (target - fixed) * share / statements
    per_statement = math.inf
    for _ in range(2):  # the quieter of two runs: a busy moment is not this machine's cost
        if reset is not None:
            with no_latency(db):
                await reset()
        db.latency.seconds = naive
        start = time.perf_counter()
        await probe()
        per_statement = min(per_statement, (time.perf_counter() - start) / statements)
    if reset is not None:
        with no_latency(db):
            await reset()
    db.latency.seconds = max(0.0, naive - (per_statement - naive))
    return {
        "probe_share": share,
        "probe_statements": counter.count,
        "cost_ms": cost * 1000,
        "round_trip_ms": db.latency.seconds * 1000,
    }
