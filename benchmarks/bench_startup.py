"""Start-up: the seed's server start (one shared model); Orchestrator vs sequential vs phases.

The model lives in ``examples/crm/startup.py`` (``SEED_DURATIONS``, ``DEPENDS``,
``SEED_LOG``): the docs and the seed table in ``bench_seed.py`` use the same one.
Its parts become ready at the seed's logged times (http 10 ms, Socket.IO 50,
Next.js 500, Baileys 600, scheduler 700; the campaign queue, 150, is not logged)
and sum to the seed's 2,000 ms "sequential". Compared in one run, interleaved:

- sequential: one part after the other (2,000 ms);
- the seed's two ``Promise.all`` phases as written, with ``asyncio.gather``
  (500 + 700 = 1,200 ms: phase two waits for Next.js);
- ``Orchestrator``: each part starts when what it needs is ready.

The ideal is the model's critical path (700 ms), computed from the model alone,
without parallelkit. Checked by this code, not claimed: the model reproduces the
seed's log; the Orchestrator's measured ready times are within a stated
tolerance of the model's (a target); every part started after what it depends on,
in every run, recorded by this code around the model's services (not read from
parallelkit's own timeline, which is checked against it too). A wrong result fails
the run. Target: Orchestrator <= 1.02 x critical path + 5 ms. Also a 100-service random graph of
no-op services for the per-service overhead of start + stop.

``--full`` runs the model at the seed's own durations (scale 1), 5 rounds; the main
job at a quarter of them (:data:`QUICK_SCALE`: 500 ms sequential, a 175 ms critical
path), 3 rounds, with the same checks and the same target formula.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import statistics
import time
from typing import Any

from examples.crm import startup

import parallelkit as pk

from ._playbook_rows import _recording_startup, _started_in_order
from ._util import target

TITLE = "start-up: the playbook's model (sequential / gather / Orchestrator), 100-service cost"

#: How far a measured ready time may be from the model's: timer and scheduling slack.
TOLERANCE_S = 0.005
TOLERANCE_REL = 0.05

#: The main job's scale of the model's durations (``--full``: 1, the seed's own).
QUICK_SCALE = 0.25


async def _timed(fn: Any, scale: float) -> float:
    started = time.perf_counter()
    await fn(scale)
    return time.perf_counter() - started


async def orchestrated(scale: float = 1.0) -> tuple[float, pk.Timeline, bool]:
    """One start of the Orchestrator: seconds, its timeline, and whether every service
    started once, each after what it needs was ready (recorded here, without parallelkit)."""
    orch = startup.build_orchestrator(scale, port=0)  # the http part simulated too
    log: list[tuple[str, str]] = []
    with _recording_startup(log):
        started = time.perf_counter()
        async with orch.start() as running:
            took = time.perf_counter() - started
    return took, running.timeline, _started_in_order(log)


def wrong_results(
    runs: list[tuple[float, pk.Timeline, bool]], model_matches_log: bool
) -> list[str]:
    """Every wrong result of the runs (each fails the benchmark run)."""
    wrong = []
    if not all(r[2] for r in runs):
        wrong.append("Orchestrator: a service started before what it needs was ready")
    if not all(respects_dependencies(r[1]) for r in runs):
        wrong.append("Orchestrator: its timeline does not show every part after its dependencies")
    if not model_matches_log:
        wrong.append("examples/crm/startup.py: the model does not reproduce the playbook's log")
    return wrong


def respects_dependencies(timeline: pk.Timeline) -> bool:
    """Every part started, each after everything it depends on was ready."""
    spans = {s.name: s for s in timeline if s.kind == "start" and s.status == "ok"}
    if set(spans) != set(startup.SEED_DURATIONS):
        return False
    return all(
        spans[name].start >= spans[dep].end
        for name, deps in startup.DEPENDS.items()
        for dep in deps
    )


def _within(measured: float, expected: float) -> bool:
    return abs(measured - expected) <= max(TOLERANCE_S, TOLERANCE_REL * expected)


def _signature(deps: tuple[str, ...]) -> Any:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(d, kind) for d in deps])


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
    repeats, scale = (3, QUICK_SCALE) if quick else (5, 1.0)
    seq: list[float] = []
    phases: list[float] = []
    orch_runs: list[tuple[float, pk.Timeline, bool]] = []
    for _ in range(repeats):  # interleaved: a noisy moment hits every variant alike
        seq.append(asyncio.run(_timed(startup.start_sequential, scale)))
        phases.append(asyncio.run(_timed(startup.start_seed_phases, scale)))
        orch_runs.append(asyncio.run(orchestrated(scale)))
    critical = startup.critical_path(scale)
    model = startup.expected_ready(scale)
    orch_times = [r[0] for r in orch_runs]
    orch_median = statistics.median(orch_times)
    _, timeline, _ = sorted(orch_runs, key=lambda r: r[0])[len(orch_runs) // 2]
    target_s = 1.02 * critical + 0.005
    n = 100
    over = [asyncio.run(overhead(n)) for _ in range(3 if quick else 20)]
    start_us = statistics.median(o[0] for o in over) * 1e6
    cycle_us = statistics.median(o[1] for o in over) * 1e6
    raw_us = statistics.median(asyncio.run(raw_gather(n)) for _ in range(5)) * 1e6
    ready = {s.name: s.end - timeline.origin for s in timeline if s.kind == "start"}
    chain = [s.name for s in timeline.critical_path("start")]

    # claims, checked here
    model_matches_log = all(
        round(startup.expected_ready()[name] * 1000) == ms for name, ms in startup.SEED_LOG.items()
    )
    calibrated = all(_within(ready[name], model[name]) for name in model)
    correct = all(r[2] for r in orch_runs)  # recorded by this code, not by parallelkit
    wrong = wrong_results(orch_runs, model_matches_log)

    print(
        f"the playbook's durations x {scale:g}, {repeats} interleaved rounds"
        + (" (quick; --full: x 1, 5 rounds)" if quick else "")
    )
    print(f"{'variant':<34}{'median ms':>11}{'range ms':>18}{'x critical':>12}")
    for label, values in (
        ("sequential", seq),
        ("playbook gather phases (as written)", phases),
        ("Orchestrator", orch_times),
    ):
        med = statistics.median(values)
        span = f"{min(values) * 1000:.1f}-{max(values) * 1000:.1f}"
        print(f"{label:<34}{med * 1000:>11.1f}{span:>18}{med / critical:>12.3f}")
    print(f"{'critical path (model, ideal)':<34}{critical * 1000:>11.1f}{'':>18}{1.0:>12.3f}")
    print("ready at (ms, measured / model): " + ", ".join(
        f"{name} {ready[name] * 1000:.1f}/{model[name] * 1000:.0f}" for name in model
    ))  # fmt: skip
    print(f"model reproduces the playbook's log: {model_matches_log}")
    print(
        f"measured ready times within max({TOLERANCE_S * 1000:.0f} ms, "
        f"{TOLERANCE_REL:.0%}) of the model: {calibrated}"
    )
    print(f"every part started after its dependencies (all runs): {correct}")
    print(f"critical chain: {' -> '.join(chain)}")
    print(timeline.to_text())
    print(
        f"100-service random graph: {start_us:.1f} us/service to start, "
        f"{cycle_us:.1f} us/service start+stop (raw asyncio.gather of no-ops: {raw_us:.2f} us)"
    )
    met = orch_median <= target_s
    print(f"target Orchestrator <= {target_s * 1000:.1f} ms: {'met' if met else 'MISSED'}")
    return {
        "sequential_ms": statistics.median(seq) * 1000,
        "seed_phases_ms": statistics.median(phases) * 1000,
        "orchestrator_median_ms": orch_median * 1000,
        "orchestrator_range_ms": [min(orch_times) * 1000, max(orch_times) * 1000],
        "critical_path_ms": critical * 1000,
        "scale": scale,
        "rounds": repeats,
        "ready_at_ms": {name: round(t * 1000, 1) for name, t in ready.items()},
        "model_ready_at_ms": {name: round(t * 1000, 1) for name, t in model.items()},
        "model_matches_seed_log": model_matches_log,
        "calibrated": calibrated,
        "correct": correct,
        "critical_chain": chain,
        "per_service_start_us": start_us,
        "per_service_start_stop_us": cycle_us,
        "raw_gather_per_item_us": raw_us,
        "wrong": wrong,
        "targets": [
            target(
                "Orchestrator start (median, ms) <= 1.02 x critical path + 5 ms",
                orch_median * 1000,
                round(target_s * 1000, 1),
            ),
            target(
                f"Orchestrator ready times within max({TOLERANCE_S * 1000:g} ms, "
                f"{TOLERANCE_REL:.0%}) of the model (1 = yes)",
                float(calibrated),
                1,
                below=False,
            ),
        ],
    }
