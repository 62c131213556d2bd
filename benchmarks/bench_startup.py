"""Start-up: the seed's server start as a graph; Orchestrator vs sequential vs gather phases.

The seed's log (``listen 0 ms, health 10 ms, Socket.IO 50 ms, Next.js 500 ms ∥
Baileys 600 ms, scheduler 700 ms``) read as ready times over this graph::

    listen (0) ─┬─ health (10)
                ├─ socketio (50) ── baileys (550) ── scheduler (100)
                └─ nextjs (500)

(durations in ms; critical path listen → socketio → baileys → scheduler = 700 ms).

Compared in one run, each simulated with sleeps:

- sequential: one service after the other (1,210 ms);
- the seed's ``Promise.all`` phases, written with ``asyncio.gather``: phase 1
  ``[listen+health+socketio, nextjs]``, phase 2 ``[baileys, scheduler]`` (1,050 ms;
  note the scheduler does not wait for Baileys, the hidden dependency);
- ``Orchestrator``: each service starts when its dependencies are ready.

Target: Orchestrator <= 1.02 x critical path + 5 ms. Also a 100-service random
graph of no-op services for the per-service overhead of start + stop.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import statistics
import time
from typing import Any

import anyio

import parallelkit as pk

from ._util import target

TITLE = "start-up: seed graph (sequential / gather phases / Orchestrator) + 100-service overhead"

# name: (duration in seconds, dependencies)
SEED: dict[str, tuple[float, tuple[str, ...]]] = {
    "listen": (0.000, ()),
    "health": (0.010, ("listen",)),
    "socketio": (0.050, ("listen",)),
    "nextjs": (0.500, ("listen",)),
    "baileys": (0.550, ("socketio",)),
    "scheduler": (0.100, ("baileys",)),
}
CRITICAL = 0.700


async def sequential() -> float:
    started = time.perf_counter()
    for duration, _ in SEED.values():
        await asyncio.sleep(duration)
    return time.perf_counter() - started


async def seed_phases() -> float:
    """The seed's startServer(): two Promise.all phases, dependencies implicit."""

    async def server() -> None:  # server.listen + health + Socket.IO, in order
        for name in ("listen", "health", "socketio"):
            await asyncio.sleep(SEED[name][0])

    started = time.perf_counter()
    await asyncio.gather(server(), asyncio.sleep(SEED["nextjs"][0]))
    await asyncio.gather(asyncio.sleep(SEED["baileys"][0]), asyncio.sleep(SEED["scheduler"][0]))
    return time.perf_counter() - started


def seed_orchestrator() -> pk.Orchestrator:
    orch = pk.Orchestrator("seed start-up")
    for name, (duration, deps) in SEED.items():

        def make(name: str, duration: float, deps: tuple[str, ...]) -> Any:
            async def start(**_: Any) -> str:
                await anyio.sleep(duration)
                return name

            start.__name__ = name
            start.__signature__ = _signature(deps)  # type: ignore[attr-defined]
            return start

        orch.service(make(name, duration, deps))
    return orch


def _signature(deps: tuple[str, ...]) -> Any:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(d, kind) for d in deps])


async def orchestrated() -> tuple[float, pk.Timeline]:
    orch = seed_orchestrator()
    started = time.perf_counter()
    async with orch.start() as running:
        took = time.perf_counter() - started
        timeline = running.timeline
    return took, timeline


def random_graph(n: int, seed: int = 7) -> pk.Orchestrator:
    rng = random.Random(seed)
    orch = pk.Orchestrator()
    for i in range(n):
        deps = tuple(f"s{d}" for d in rng.sample(range(i), min(i, rng.randint(0, 3))))

        async def start(**_: Any) -> int:
            return 0

        start.__name__ = f"s{i}"
        start.__signature__ = _signature(deps)  # type: ignore[attr-defined]
        orch.service(start)
    return orch


async def overhead(n: int) -> tuple[float, float]:
    """Seconds per service for start, and for start + stop, of no-op services."""
    orch = random_graph(n)
    t0 = time.perf_counter()
    async with orch.start():
        t1 = time.perf_counter()
    t2 = time.perf_counter()
    return (t1 - t0) / n, (t2 - t0) / n


async def raw_gather(n: int) -> float:
    async def noop() -> int:
        return 0

    t0 = time.perf_counter()
    await asyncio.gather(*(noop() for _ in range(n)))
    return (time.perf_counter() - t0) / n


def run(*, quick: bool, database: str | None) -> dict[str, Any]:
    repeats = 2 if quick else 5
    seq = min(asyncio.run(sequential()) for _ in range(1 if quick else 2))
    phases = min(asyncio.run(seed_phases()) for _ in range(repeats))
    orch_runs = [asyncio.run(orchestrated()) for _ in range(repeats)]
    orch_best, timeline = min(orch_runs, key=lambda r: r[0])
    orch_median = statistics.median(r[0] for r in orch_runs)
    target_s = 1.02 * CRITICAL + 0.005
    n = 100
    over = [asyncio.run(overhead(n)) for _ in range(3 if quick else 20)]
    start_us = statistics.median(o[0] for o in over) * 1e6
    cycle_us = statistics.median(o[1] for o in over) * 1e6
    raw_us = statistics.median(asyncio.run(raw_gather(n)) for _ in range(5)) * 1e6
    ready = {
        s.name: round((s.end - timeline.origin) * 1000, 1) for s in timeline if s.kind == "start"
    }
    chain = [s.name for s in timeline.critical_path("start")]

    print(f"{'variant':<34}{'ms':>10}{'x critical':>12}")
    for label, value in (
        ("sequential", seq),
        ("seed gather phases (as written)", phases),
        ("Orchestrator (best)", orch_best),
        ("Orchestrator (median)", orch_median),
        ("critical path", CRITICAL),
    ):
        print(f"{label:<34}{value * 1000:>10.1f}{value / CRITICAL:>12.3f}")
    print(f"ready at (ms): {ready}")
    print(f"critical chain: {' -> '.join(chain)}")
    print(timeline.to_text())
    print(
        f"100-service random graph: {start_us:.1f} us/service to start, "
        f"{cycle_us:.1f} us/service start+stop (raw asyncio.gather of no-ops: {raw_us:.2f} us)"
    )
    met = orch_median <= target_s
    print(f"target Orchestrator <= {target_s * 1000:.1f} ms: {'met' if met else 'MISSED'}")
    return {
        "sequential_ms": seq * 1000,
        "seed_phases_ms": phases * 1000,
        "orchestrator_best_ms": orch_best * 1000,
        "orchestrator_median_ms": orch_median * 1000,
        "critical_path_ms": CRITICAL * 1000,
        "ready_at_ms": ready,
        "critical_chain": chain,
        "per_service_start_us": start_us,
        "per_service_start_stop_us": cycle_us,
        "raw_gather_per_item_us": raw_us,
        "targets": [
            target(
                "Orchestrator start (median, ms) <= 1.02 x critical path + 5 ms",
                orch_median * 1000,
                round(target_s * 1000, 1),
            )
        ],
    }
