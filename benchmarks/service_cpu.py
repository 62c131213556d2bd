"""CPU per request of one endpoint, every variant in one process, side by side.

``python -m benchmarks.service_cpu [--endpoint payment] [--database URL] [--rounds 5]
[--requests 400] [--clients 16]``

The service benchmark (:mod:`benchmarks.bench_service`) measures what a client sees:
real HTTP, one server process per variant. On this shared machine its A/A column moves
by 15-20 % in CPU per request, more than most gaps between the variants.
:mod:`benchmarks.service_calls` counts calls instead, which does not move, but a
count is not a time. This module measures time, with less noise:

* every variant's app (ordinary, expert, parallelkit and a second, identical
  parallelkit app for the A/A ratio) is served **in this process**, its lifespan
  entered, the ASGI app called directly (no HTTP, no uvicorn), each on its own copy
  of the data (``Settings.name``);
* each is warmed up with ``requests`` requests, then each round sends ``requests``
  requests from ``clients`` concurrent clients to each app in turn, the order rotated
  every round, and takes the process's CPU time (:func:`time.process_time`) around
  each batch, after a full garbage collection, so one batch's garbage is not
  collected in another's;
* every answer must be a 200, or the run fails.

Reported: per variant, the median CPU per request and its range over rounds; and
parallelkit's ratios against each variant **paired per round** (its batch against
the other's batch of the same round), with the A/A ratio (the twin against
parallelkit) as the noise level.

What it leaves out: HTTP parsing and uvicorn (the same in every variant), and the
database server's CPU when the database is PostgreSQL (another process). With the
default SQLite file, aiosqlite's thread runs in this process and is counted. The
background tasks of every app (a cache's refreshes) run during every batch.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

from examples.service.app import create_app
from examples.service.shared import VARIANTS, Settings

from ._util import table
from .service_calls import _production_sessions, serve
from .service_load import ENDPOINTS, requests_for

#: The A/A row: a second parallelkit app, identical to the first.
TWIN = "parallelkit (A/A twin)"


async def measure(
    endpoint: str,
    *,
    variants: tuple[str, ...] = VARIANTS,
    clients: int = 16,
    requests: int = 400,
    rounds: int = 5,
    database: str | None = None,
) -> dict[str, Any]:
    """Seconds of CPU per request of each variant's ``endpoint``, per round (module docs).

    Returns ``{"endpoint", "requests", "clients", "rounds", "cpu": {label: [s, ...]},
    "ratios": {name: [ratio per round]}}``; with ``"parallelkit"`` in ``variants`` the
    labels include :data:`TWIN` and the ratios parallelkit's against each variant.
    """
    if endpoint not in ENDPOINTS:
        msg = f"endpoint must be one of {sorted(ENDPOINTS)}, got {endpoint!r}"
        raise ValueError(msg)
    for name, count in (("clients", clients), ("requests", requests), ("rounds", rounds)):
        if count < 1:
            msg = f"{name} must be at least 1, got {count!r}"
            raise ValueError(msg)
    apps = {v: (v, f"cpu_{v}") for v in variants}
    if "parallelkit" in variants:
        apps[TWIN] = ("parallelkit", "cpu_parallelkit_aa")
    labels = list(apps)
    tag = f"cpu-{time.time_ns()}"
    cpu: dict[str, list[float]] = {label: [] for label in labels}
    async with AsyncExitStack() as stack:
        served = {}
        for label, (variant, name) in apps.items():
            app = create_app(Settings(variant=variant, name=name, database=database))
            started = await stack.enter_async_context(app.router.lifespan_context(app))
            served[label] = (app, dict(started or {}))
        for label in labels:  # caches filled, statements prepared, every pool open
            warm = requests_for(endpoint, requests, tag=f"{tag}-w{label}")
            await serve(*served[label], warm, clients)
        for r in range(rounds):
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                batch = requests_for(endpoint, requests, tag=f"{tag}-{r}-{label}")
                gc.collect()
                start = time.process_time()
                statuses = await serve(*served[label], batch, clients)
                cpu[label].append((time.process_time() - start) / requests)
                bad = [s for s in statuses if s != 200]
                if bad or len(statuses) != requests:
                    msg = f"{label} {endpoint}: {len(bad)} of {requests} answers not 200: {bad[:5]}"
                    raise RuntimeError(msg)
    ratios: dict[str, list[float]] = {}
    if "parallelkit" in cpu:
        pk = cpu["parallelkit"]
        for label in labels:
            if label == TWIN:
                ratios["A/A (twin / parallelkit)"] = _paired(cpu[TWIN], pk)
            elif label != "parallelkit":
                ratios[f"parallelkit / {label}"] = _paired(pk, cpu[label])
    return {
        "endpoint": endpoint,
        "requests": requests,
        "clients": clients,
        "rounds": rounds,
        "cpu": cpu,
        "ratios": ratios,
    }


def _paired(mine: list[float], theirs: list[float]) -> list[float]:
    """Round by round: this round's batch against the other's batch of the same round."""
    return [a / b for a, b in zip(mine, theirs, strict=True)]


def report(result: dict[str, Any]) -> str:
    """The two tables of a :func:`measure` result."""
    rows = [
        [label, round(statistics.median(xs) * 1e6), f"{min(xs) * 1e6:.0f}-{max(xs) * 1e6:.0f}"]
        for label, xs in result["cpu"].items()
    ]
    lines = [
        f"{result['endpoint']}: CPU per request in one process ({result['rounds']} rounds of"
        f" {result['requests']} requests, {result['clients']} clients)",
        table(["variant", "CPU us/request (median)", "range"], rows),
    ]
    if result["ratios"]:
        ratio_rows = [
            [name, round(statistics.median(xs), 3), f"{min(xs):.3f}-{max(xs):.3f}"]
            for name, xs in result["ratios"].items()
        ]
        lines += ["", "paired per round:", table(["ratio", "median", "range"], ratio_rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service_cpu")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="payment")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database", default=None, help="default: a SQLite file")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    a = parser.parse_args(argv)
    with _production_sessions():
        result = asyncio.run(
            measure(
                a.endpoint,
                variants=tuple(a.variants),
                clients=a.clients,
                requests=a.requests,
                rounds=a.rounds,
                database=a.database,
            )
        )
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
