"""Fan-out: per-item overhead against raw asyncio/trio forms and aiometer; makespan;
streaming memory. Everything compared is measured in the same run."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import anyio
import trio
import trio.lowlevel

import parallelkit as pk

from ._util import print_targets, table, target

TITLE = "gather / map / imap per-item overhead, makespan and memory vs raw forms and aiometer"


# ------------------------------------------------------------------ contenders
def _asyncio_contenders(n: int, limit: int) -> dict[str, Any]:
    async def noop(_: int) -> None:
        await asyncio.sleep(0)

    async def pk_map() -> None:
        await pk.map(noop, range(n), limit=limit)

    async def pk_gather() -> None:
        await pk.gather(*(noop(i) for i in range(n)), limit=limit)

    async def pk_imap(ordered: bool) -> None:
        async with pk.imap(noop, range(n), limit=limit, ordered=ordered) as results:
            async for _ in results:
                pass

    async def hand_pool() -> None:
        items = iter(range(n))
        results: list[Any] = [None] * n

        async def worker() -> None:
            for i in items:
                results[i] = await noop(i)

        async with asyncio.TaskGroup() as tg:
            for _ in range(limit):
                tg.create_task(worker())

    async def gather_semaphore() -> None:
        sem = asyncio.Semaphore(limit)

        async def one(i: int) -> None:
            async with sem:
                await noop(i)

        await asyncio.gather(*(one(i) for i in range(n)))

    async def anyio_capacity() -> None:
        limiter = anyio.CapacityLimiter(limit)

        async def one(i: int) -> None:
            async with limiter:
                await noop(i)

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)

    async def aiometer_run_all() -> None:
        import functools

        import aiometer

        await aiometer.run_all([functools.partial(noop, i) for i in range(n)], max_at_once=limit)

    async def aiometer_amap() -> None:
        import aiometer

        async with aiometer.amap(noop, range(n), max_at_once=limit) as results:
            async for _ in results:
                pass

    return {
        "pk.map": pk_map,
        "pk.gather": pk_gather,
        "pk.imap unordered": lambda: pk_imap(False),
        "pk.imap ordered": lambda: pk_imap(True),
        "hand-written pool (asyncio.TaskGroup)": hand_pool,
        "asyncio.gather + Semaphore": gather_semaphore,
        "anyio task group + CapacityLimiter": anyio_capacity,
        "aiometer.run_all": aiometer_run_all,
        "aiometer.amap": aiometer_amap,
    }


def _trio_contenders(n: int, limit: int) -> dict[str, Any]:
    async def noop(_: int) -> None:
        await trio.lowlevel.checkpoint()

    async def pk_map() -> None:
        await pk.map(noop, range(n), limit=limit)

    async def pk_imap(ordered: bool) -> None:
        async with pk.imap(noop, range(n), limit=limit, ordered=ordered) as results:
            async for _ in results:
                pass

    async def hand_pool() -> None:
        items = iter(range(n))
        results: list[Any] = [None] * n

        async def worker() -> None:
            for i in items:
                results[i] = await noop(i)

        async with trio.open_nursery() as nursery:
            for _ in range(limit):
                nursery.start_soon(worker)

    async def nursery_capacity() -> None:
        limiter = trio.CapacityLimiter(limit)

        async def one(i: int) -> None:
            async with limiter:
                await noop(i)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)

    return {
        "pk.map": pk_map,
        "pk.imap unordered": lambda: pk_imap(False),
        "pk.imap ordered": lambda: pk_imap(True),
        "hand-written pool (trio nursery)": hand_pool,
        "trio nursery + CapacityLimiter": nursery_capacity,
    }


def _overhead(n: int, limit: int, repeat: int) -> dict[str, dict[str, float]]:
    """Median µs per item; contenders are interleaved round by round (after one
    warm-up round), so drift and warm-up do not favour whoever runs last."""
    out: dict[str, dict[str, float]] = {}
    for backend, contenders in (
        ("asyncio", _asyncio_contenders(n, limit)),
        ("trio", _trio_contenders(n, limit)),
    ):
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for round_ in range(repeat + 1):
            for name, fn in contenders.items():
                start = time.perf_counter()
                anyio.run(fn, backend=backend)
                if round_:  # round 0 warms up
                    samples[name].append(time.perf_counter() - start)
        for name, values in samples.items():
            out[f"{backend}: {name}"] = {
                "us_per_item": statistics.median(values) / n * 1e6,
                "spread_us": (max(values) - min(values)) / n * 1e6,
            }
    return out


def _makespan(n: int, limit: int, delay: float, repeat: int) -> dict[str, dict[str, float]]:
    """Ratios to the ideal ``n / limit * delay``, timed inside the event loop.

    Next to ``pk.map``: a hand-written pool of ``limit`` workers (the same work
    with nothing of ours in it) and the timer floor (``n / limit`` sleeps one
    after another), so the part no scheduler can remove is visible.
    """
    rounds = n // limit
    ideal = rounds * delay

    async def sleeper(_: int) -> None:
        await anyio.sleep(delay)

    async def with_pk() -> None:
        await pk.map(sleeper, range(n), limit=limit)

    async def hand_pool() -> None:
        items = iter(range(n))

        async def worker() -> None:
            for i in items:
                await sleeper(i)

        async with anyio.create_task_group() as tg:
            for _ in range(limit):
                tg.start_soon(worker)

    async def timer_floor() -> None:
        for _ in range(rounds):
            await anyio.sleep(delay)

    async def measure() -> dict[str, float]:
        out = {}
        for name, fn in (
            ("pk.map", with_pk),
            ("hand pool", hand_pool),
            ("timer floor", timer_floor),
        ):
            samples = []
            for _ in range(repeat):
                start = anyio.current_time()
                await fn()
                samples.append(anyio.current_time() - start)
            out[name] = statistics.median(samples) / ideal
        return out

    return {backend: anyio.run(measure, backend=backend) for backend in ("asyncio", "trio")}


_MEMORY_SCRIPT = """
import os, sys, anyio, parallelkit as pk
n = int(sys.argv[1])
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
async def noop(i):
    return i
async def main():
    count, peak = 0, rss()
    async with pk.imap(noop, range(n), limit=100) as results:
        async for _ in results:
            count += 1
            if count % 5000 == 0:
                peak = max(peak, rss())
    assert count == n
    return peak
before = rss()  # after imports, before the first item
peak = anyio.run(main)
print(max(0, peak - before) / 2**20)
"""


def _memory(n: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(n)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


def run(*, quick: bool, database: str | None) -> dict[str, Any]:
    del database
    n, repeat = (5_000, 3) if quick else (20_000, 7)
    overhead = _overhead(n, 100, repeat)
    rows = [[name, v["us_per_item"], v["spread_us"]] for name, v in overhead.items()]
    print(f"per-item overhead, {n:,} no-op items, limit 100 (median of {repeat}):")
    print(table(["contender", "µs/item", "spread µs"], rows))

    makespan = _makespan(200 if quick else 1000, 100, 0.01, 3 if quick else 7)
    print("\nmakespan of 1,000 x 10 ms sleeps, limit 100, as a ratio to the ideal 0.1 s:")
    print(
        table(
            ["backend", "pk.map", "hand-written pool", "timer floor"],
            [[b, v["pk.map"], v["hand pool"], v["timer floor"]] for b, v in makespan.items()],
        )
    )

    mem_n = 100_000 if quick else 1_000_000
    memory_mb = _memory(mem_n)
    print(f"\npeak RSS growth streaming {mem_n:,} items through pk.imap(limit=100): ", end="")
    print(f"{memory_mb:.2f} MB")

    a = {
        k.split(": ", 1)[1]: v["us_per_item"]
        for k, v in overhead.items()
        if k.startswith("asyncio")
    }
    t = {k.split(": ", 1)[1]: v["us_per_item"] for k, v in overhead.items() if k.startswith("trio")}
    targets = [
        target(
            "asyncio: pk.map / hand-written pool",
            a["pk.map"] / a["hand-written pool (asyncio.TaskGroup)"],
            1.5,
        ),
        target(
            "trio: pk.map / hand-written pool",
            t["pk.map"] / t["hand-written pool (trio nursery)"],
            1.5,
        ),
        target(
            "asyncio.gather+Semaphore / pk.map (x faster)",
            a["asyncio.gather + Semaphore"] / a["pk.map"],
            4.0,
            below=False,
        ),
        target(
            "aiometer.run_all / pk.map (x faster)",
            a["aiometer.run_all"] / a["pk.map"],
            10.0,
            below=False,
        ),
        target("asyncio: pk.imap unordered / pk.map", a["pk.imap unordered"] / a["pk.map"], 2.0),
        target("asyncio: pk.imap ordered / pk.map", a["pk.imap ordered"] / a["pk.map"], 2.0),
        target("trio: pk.imap unordered / pk.map", t["pk.imap unordered"] / t["pk.map"], 2.0),
        target("makespan asyncio: pk.map / ideal", makespan["asyncio"]["pk.map"], 1.15),
        target("makespan trio: pk.map / ideal", makespan["trio"]["pk.map"], 1.15),
        target(f"imap memory growth MB ({mem_n:,} items)", memory_mb, 20.0),
    ]
    print("\ntargets:")
    print_targets(targets)
    return {
        "items": n,
        "limit": 100,
        "overhead_us_per_item": overhead,
        "makespan_ratio": makespan,
        "imap_memory_mb": memory_mb,
        "targets": targets,
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv, database=None), indent=2))
