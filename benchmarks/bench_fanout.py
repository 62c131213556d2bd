"""Fan-out: per-item overhead against a hand-written worker pool, the raw asyncio/trio
forms and aiometer; makespan against a hand-written pool and the ideal; the cost of
a ``limit`` far above the work; streaming memory.

Everything compared is measured in the same run, interleaved: each round runs every
contender once, in a shuffled order, and a ratio is taken **within a round** (so
the machine's load at that moment affects both sides). Reported: the median of the
per-round ratios and their range. The reference for ``pk.map`` is a hand-written
pool written without parallelkit: ``limit`` tasks pulling from one shared
iterator, results by index (the floor any pool must pay: a task switch per item).

Every contender returns its results, and every run's are checked (outside the timing)
against ``range(items)``: a contender that loses or repeats items did less work, so
it is reported as wrong (the run fails), not as fast.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import trio
import trio.lowlevel

import parallelkit as pk

from ._util import print_targets, table, target

TITLE = "gather / map / imap per-item overhead, makespan and memory vs a hand-written pool"

Contenders = dict[str, Callable[[], Awaitable[Any]]]
Samples = dict[str, list[float]]
HAND = "hand-written pool"
HAND_ANYIO = "hand-written pool on an anyio task group"
#: One task per item: 10 to 40 times the pool's cost per item. In the main job they
#: are timed in the first rounds only (their ratios are taken within those rounds).
SLOW = frozenset(
    {
        "asyncio.gather + Semaphore",
        "anyio task group + CapacityLimiter",
        "aiometer.run_all",
        "aiometer.amap",
        "trio nursery + CapacityLimiter",
    }
)


# ------------------------------------------------------------------ contenders
def _asyncio_contenders(n: int, limit: int) -> Contenders:
    async def noop(item: int) -> int:
        await asyncio.sleep(0)
        return item

    async def hand_pool() -> list[Any]:  # no parallelkit: limit tasks, one shared iterator
        items = enumerate(range(n))
        results: list[Any] = [None] * n

        async def worker() -> None:
            for i, item in items:
                results[i] = await noop(item)

        await asyncio.gather(*(worker() for _ in range(limit)))
        return results

    async def hand_pool_anyio() -> list[Any]:  # the same on an anyio task group
        items = enumerate(range(n))
        results: list[Any] = [None] * n

        async def worker() -> None:
            for i, item in items:
                results[i] = await noop(item)

        async with anyio.create_task_group() as tg:
            for _ in range(limit):
                tg.start_soon(worker)
        return results

    async def pk_map() -> list[Any]:
        return await pk.map(noop, range(n), limit=limit)

    async def pk_gather() -> list[Any]:
        return list(await pk.gather(*(noop(i) for i in range(n)), limit=limit))

    async def pk_imap(ordered: bool) -> list[Any]:
        async with pk.imap(noop, range(n), limit=limit, ordered=ordered) as results:
            return [x async for x in results]

    async def gather_semaphore() -> list[Any]:
        sem = asyncio.Semaphore(limit)

        async def one(i: int) -> int:
            async with sem:
                return await noop(i)

        return list(await asyncio.gather(*(one(i) for i in range(n))))

    async def anyio_capacity() -> list[Any]:
        limiter = anyio.CapacityLimiter(limit)
        results: list[Any] = [None] * n

        async def one(i: int) -> None:
            async with limiter:
                results[i] = await noop(i)

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        return results

    async def aiometer_run_all() -> list[Any]:
        import aiometer

        return list(
            await aiometer.run_all(
                [functools.partial(noop, i) for i in range(n)], max_at_once=limit
            )
        )

    async def aiometer_amap() -> list[Any]:
        import aiometer

        async with aiometer.amap(noop, range(n), max_at_once=limit) as results:
            return [x async for x in results]

    return {
        HAND: hand_pool,
        HAND_ANYIO: hand_pool_anyio,
        "pk.map": pk_map,
        "pk.gather": pk_gather,
        "pk.imap unordered": lambda: pk_imap(False),
        "pk.imap ordered": lambda: pk_imap(True),
        "asyncio.gather + Semaphore": gather_semaphore,
        "anyio task group + CapacityLimiter": anyio_capacity,
        "aiometer.run_all": aiometer_run_all,
        "aiometer.amap": aiometer_amap,
    }


def _trio_contenders(n: int, limit: int) -> Contenders:
    async def noop(item: int) -> int:
        await trio.lowlevel.checkpoint()
        return item

    async def hand_pool() -> list[Any]:
        items = enumerate(range(n))
        results: list[Any] = [None] * n

        async def worker() -> None:
            for i, item in items:
                results[i] = await noop(item)

        async with trio.open_nursery() as nursery:
            for _ in range(limit):
                nursery.start_soon(worker)
        return results

    async def pk_map() -> list[Any]:
        return await pk.map(noop, range(n), limit=limit)

    async def pk_imap(ordered: bool) -> list[Any]:
        async with pk.imap(noop, range(n), limit=limit, ordered=ordered) as results:
            return [x async for x in results]

    async def nursery_capacity() -> list[Any]:
        limiter = trio.CapacityLimiter(limit)
        results: list[Any] = [None] * n

        async def one(i: int) -> None:
            async with limiter:
                results[i] = await noop(i)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        return results

    return {
        HAND: hand_pool,
        "pk.map": pk_map,
        "pk.imap unordered": lambda: pk_imap(False),
        "pk.imap ordered": lambda: pk_imap(True),
        "trio nursery + CapacityLimiter": nursery_capacity,
    }


# ------------------------------------------------------------------ measuring
#: Contenders that yield results as they complete: checked as a set of items, not a list.
UNORDERED = frozenset({"pk.imap unordered", "aiometer.amap"})


def wrong_result(name: str, value: Any, n: int) -> str | None:
    """Why ``value`` is not the result of mapping the identity over ``range(n)``, or None.

    The truth is computed here (``list(range(n))``), not by a contender; a contender
    that loses, repeats or reorders items (where it promises order) is wrong.
    """
    expected = list(range(n))
    got = sorted(value) if name in UNORDERED and isinstance(value, list) else value
    if got == expected:
        return None
    size = len(value) if isinstance(value, list) else type(value).__name__
    return f"{name}: not the {n} results of its {n} items (got {size})"


def interleaved(
    backend: str,
    contenders: Contenders,
    rounds: int,
    slow_rounds: int | None = None,
    *,
    items: int | None = None,
    wrong: list[str] | None = None,
) -> tuple[Samples, Samples]:
    """Seconds per contender per round, CPU (process time) and wall, both read around
    the same run: one warm-up round, then ``rounds`` rounds, each running every
    contender once in a shuffled order in one event loop. The contenders in
    :data:`SLOW` run in the first ``slow_rounds`` rounds only (default: all).

    With ``items``, every run's result (warm-up included) is checked, outside the
    timing, against ``range(items)`` (:func:`wrong_result`); what is wrong is added
    to ``wrong`` (once per contender), and fails the benchmark run."""
    cpu: Samples = {name: [] for name in contenders}
    wall: Samples = {name: [] for name in contenders}

    async def one_round(keep: bool, slow_too: bool) -> None:
        order = [name for name in contenders if slow_too or name not in SLOW]
        random.shuffle(order)
        for name in order:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            value = await contenders[name]()
            end_cpu, end_wall = time.process_time(), time.perf_counter()
            if keep:
                cpu[name].append(end_cpu - start_cpu)
                wall[name].append(end_wall - start_wall)
            if items is not None and wrong is not None:
                why = wrong_result(name, value, items)
                if why is not None and not any(w.startswith(f"{backend}: {name}:") for w in wrong):
                    wrong.append(f"{backend}: {why}")

    anyio.run(one_round, False, True, backend=backend)
    for i in range(rounds):
        anyio.run(one_round, True, slow_rounds is None or i < slow_rounds, backend=backend)
    return cpu, wall


def ratio_stats(samples: Samples, name: str, base: str) -> dict[str, float]:
    """The per-round ratios ``name / base``: median, min and max (over the rounds
    ``name`` ran in: the first ones)."""
    ratios = [a / b for a, b in zip(samples[name], samples[base], strict=False)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _overhead(
    n: int, limit: int, rounds: int, slow_rounds: int | None = None, wrong: list[str] | None = None
) -> dict[str, Any]:
    """µs per item (median, CPU and wall) and the ratio to the hand-written pool."""
    out: dict[str, Any] = {}
    for backend, contenders in (
        ("asyncio", _asyncio_contenders(n, limit)),
        ("trio", _trio_contenders(n, limit)),
    ):
        cpu, wall = interleaved(backend, contenders, rounds, slow_rounds, items=n, wrong=wrong)
        for name in contenders:
            out[f"{backend}: {name}"] = {
                "cpu_us_per_item": statistics.median(cpu[name]) / n * 1e6,
                "wall_us_per_item": statistics.median(wall[name]) / n * 1e6,
                "cpu_ratio_to_hand": ratio_stats(cpu, name, HAND),
                # paired within a round too: a one-task-per-item contender runs in the
                # first rounds only, so a ratio of two medians would pair other rounds
                "cpu_ratio_to_map": ratio_stats(cpu, name, "pk.map"),
                "wall_ratio_to_hand": ratio_stats(wall, name, HAND),
            }
    return out


def to_map(overhead: dict[str, Any], backend: str, name: str) -> float:
    """``name``'s CPU time over ``pk.map``'s, the median of the ratios within a round."""
    stats: dict[str, float] = overhead[f"{backend}: {name}"]["cpu_ratio_to_map"]
    return stats["median"]


def _duel(n: int, limit: int, rounds: int, wrong: list[str] | None = None) -> dict[str, Any]:
    """``pk.map`` against the hand-written pools alone, many short rounds: the fewer
    contenders in a round, the closer in time (and in machine load) the pair is."""
    out: dict[str, Any] = {}
    for backend, everyone in (
        ("asyncio", _asyncio_contenders(n, limit)),
        ("trio", _trio_contenders(n, limit)),
    ):
        contenders = {k: v for k, v in everyone.items() if k in (HAND, HAND_ANYIO, "pk.map")}
        cpu, wall = interleaved(backend, contenders, rounds, items=n, wrong=wrong)
        out[backend] = {
            name: {"cpu": ratio_stats(cpu, name, HAND), "wall": ratio_stats(wall, name, HAND)}
            for name in contenders
            if name != HAND
        }
    return out


def _makespan(
    n: int, limit: int, delay: float, rounds: int, wrong: list[str] | None = None
) -> dict[str, Any]:
    """``n`` sleeps of ``delay`` at ``limit``: pk.map against the hand-written pool
    (ratio per round) and against the ideal, ``ceil(n / limit) * delay``: the
    sleeps of one worker one after the other with zero overhead, a lower bound no
    implementation can beat."""
    ideal = -(-n // limit) * delay

    async def sleeper(item: int) -> int:
        await anyio.sleep(delay)
        return item

    async def with_pk() -> list[Any]:
        return await pk.map(sleeper, range(n), limit=limit)

    async def hand_pool() -> list[Any]:
        items = enumerate(range(n))
        results: list[Any] = [None] * n

        async def worker() -> None:
            for i, item in items:
                results[i] = await sleeper(item)

        async with anyio.create_task_group() as tg:
            for _ in range(limit):
                tg.start_soon(worker)
        return results

    out: dict[str, Any] = {"ideal_s": ideal}
    for backend in ("asyncio", "trio"):
        contenders: Contenders = {HAND: hand_pool, "pk.map": with_pk}
        _, wall = interleaved(backend, contenders, rounds, items=n, wrong=wrong)
        out[backend] = {
            "pk.map / hand-written pool": ratio_stats(wall, "pk.map", HAND),
            "pk.map / ideal": statistics.median(wall["pk.map"]) / ideal,
            "hand-written pool / ideal": statistics.median(wall[HAND]) / ideal,
        }
    return out


def _large_limit(rounds: int, wrong: list[str] | None = None) -> dict[str, Any]:
    """5 items from a generator at ``limit=200_000`` against the same at ``limit=5``:
    workers start as items arrive, so the large limit must cost what 5 items cost."""

    async def noop(i: int) -> int:
        return i

    async def small() -> list[Any]:
        return await pk.map(noop, (i for i in range(5)), limit=5)

    async def huge() -> list[Any]:
        return await pk.map(noop, (i for i in range(5)), limit=200_000)

    contenders: Contenders = {"limit=5": small, "limit=200,000": huge}
    _, wall = interleaved("asyncio", contenders, rounds, items=5, wrong=wrong)
    return {
        "limit=5 us": statistics.median(wall["limit=5"]) * 1e6,
        "limit=200,000 us": statistics.median(wall["limit=200,000"]) * 1e6,
        "ratio": ratio_stats(wall, "limit=200,000", "limit=5"),
    }


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


def _range(stats: dict[str, float]) -> str:
    return f"{stats['median']:.3f} [{stats['min']:.2f}-{stats['max']:.2f}]"


def run(*, quick: bool, database: str | None) -> dict[str, Any]:
    del database
    # the main job: fewer items and, for the one-task-per-item forms, fewer rounds in the
    # table; the target's duel keeps 5,000 items. --full: 20,000 items, every round.
    n, rounds, slow_rounds = (2_000, 5, 2) if quick else (20_000, 15, 15)
    wrong: list[str] = []  # every run's result is checked: a wrong one fails the run
    overhead = _overhead(n, 100, rounds, slow_rounds, wrong)
    duel_n, duel_rounds = (5_000, 10) if quick else (20_000, 40)
    duel = _duel(duel_n, 100, duel_rounds, wrong)
    print(f"1. per-item overhead, {n:,} no-op items, limit 100, {rounds} interleaved rounds")
    if slow_rounds < rounds:
        print(f"   (one task per item, {', '.join(sorted(SLOW))}: the first {slow_rounds} rounds)")
    print(f"   (ratio: per-round {HAND} ratio, median [range]; CPU = process time)")
    rows = [
        [
            name,
            v["cpu_us_per_item"],
            v["wall_us_per_item"],
            _range(v["cpu_ratio_to_hand"]),
            _range(v["wall_ratio_to_hand"]),
        ]
        for name, v in overhead.items()
    ]
    print(table(["contender", "CPU µs/item", "wall µs/item", "CPU x hand", "wall x hand"], rows))
    print(
        f"\n   pk.map against the hand-written pool alone, {duel_n:,} items, {duel_rounds} "
        "rounds (the target):"
    )
    duel_rows = [
        [f"{backend}: {name}", _range(v["cpu"]), _range(v["wall"])]
        for backend, contenders in duel.items()
        for name, v in contenders.items()
    ]
    print(table(["contender", "CPU x hand", "wall x hand"], duel_rows))

    span_n = 200 if quick else 1000
    makespan = _makespan(span_n, 100, 0.01, 3 if quick else 9, wrong)
    print(f"\n2. makespan of {span_n:,} x 10 ms sleeps at limit 100")
    print(f"   ideal = ceil({span_n} / 100) x 10 ms = {makespan['ideal_s'] * 1000:.0f} ms")
    print("   (no overhead at all: a lower bound, computed, not measured)")
    print(
        table(
            ["backend", "pk.map x hand-written pool", "pk.map x ideal", "hand pool x ideal"],
            [
                [
                    b,
                    _range(makespan[b]["pk.map / hand-written pool"]),
                    makespan[b]["pk.map / ideal"],
                    makespan[b]["hand-written pool / ideal"],
                ]
                for b in ("asyncio", "trio")
            ],
        )
    )

    large = _large_limit(rounds, wrong)
    print(
        f"\n3. 5 items at limit=200,000: {large['limit=200,000 us']:.0f} µs; at limit=5: "
        f"{large['limit=5 us']:.0f} µs (ratio {_range(large['ratio'])})"
    )

    mem_n = 100_000 if quick else 1_000_000
    memory_mb = _memory(mem_n)
    print(f"\n4. peak RSS growth streaming {mem_n:,} items through pk.imap(limit=100): ", end="")
    print(f"{memory_mb:.2f} MB")

    def duel_ratio(backend: str) -> float:
        stats: dict[str, float] = duel[backend]["pk.map"]["cpu"]
        return stats["median"]

    def x_map(backend: str, name: str) -> float:
        return to_map(overhead, backend, name)

    targets = [
        target("asyncio: pk.map / hand-written pool (CPU, per item)", duel_ratio("asyncio"), 1.1),
        target("trio: pk.map / hand-written pool (CPU, per item)", duel_ratio("trio"), 1.1),
        target(
            "asyncio.gather+Semaphore / pk.map (x faster)",
            x_map("asyncio", "asyncio.gather + Semaphore"),
            4.0,
            below=False,
        ),
        target(
            "aiometer.run_all / pk.map (x faster)",
            x_map("asyncio", "aiometer.run_all"),
            10.0,
            below=False,
        ),
        target("asyncio: pk.imap unordered / pk.map", x_map("asyncio", "pk.imap unordered"), 2.0),
        target("asyncio: pk.imap ordered / pk.map", x_map("asyncio", "pk.imap ordered"), 2.0),
        target("trio: pk.imap unordered / pk.map", x_map("trio", "pk.imap unordered"), 2.0),
        *[
            target(
                f"makespan {b}: pk.map / hand-written pool",
                makespan[b]["pk.map / hand-written pool"]["median"],
                1.02,
            )
            for b in ("asyncio", "trio")
        ],
        target("5 items: limit=200,000 / limit=5", large["ratio"]["median"], 1.5),
        target(f"imap memory growth MB ({mem_n:,} items)", memory_mb, 20.0),
    ]
    print("\ntargets:")
    print_targets(targets)
    return {
        "wrong": wrong,
        "items": n,
        "limit": 100,
        "rounds": rounds,
        "rounds_one_task_per_item": slow_rounds,
        "duel_items": duel_n,
        "duel_rounds": duel_rounds,
        "overhead": overhead,
        "map_against_hand": duel,
        "makespan": makespan,
        "large_limit": large,
        "imap_memory_mb": memory_mb,
        "targets": targets,
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv, database=None), indent=2))
