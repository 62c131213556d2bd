"""Distributed map over Taskiq workers: scaling with 1, 2 and 4 workers, Redis overhead.

``python -m benchmarks distributed [--quick]`` starts real ``taskiq worker``
processes on this module (``benchmarks.bench_distributed:broker``), each allowed
``CAPACITY`` concurrent tasks, and measures in one run:

* **scaling**: throughput of :func:`parallelkit.taskiq.map` over items that sleep
  50 ms (I/O-bound) with 1, 2 and 4 workers, as a ratio to one worker (target:
  near-linear, at least 80 % of the worker count), and as a fraction of the ideal
  ``workers * CAPACITY / 50 ms``;
* **against raw Taskiq**: the same items (``VS_RAW_SLEEP`` each) on the same worker
  (``CAPACITY`` concurrent tasks), at the same concurrency (``CAPACITY`` in
  flight): :func:`parallelkit.taskiq.map` against what one writes without it,
  ``task.kiq(x)`` then ``handle.wait_result()`` under an ``asyncio.Semaphore``,
  with Taskiq's default ``check_interval`` (0.2 s) and with a tight one (10 ms).
  Interleaved, repeated; the ideal is ``CAPACITY / VS_RAW_SLEEP`` items per second;
* **overhead**: the round trip of one no-op item through Redis (``limit=1``: kick,
  a worker takes it, the result is stored and polled back) and the amortized
  per-item cost with many in flight, next to in-process :func:`parallelkit.map` of
  the same no-op.

Needs a Redis (``PARALLELKIT_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/0``);
reports ``skipped`` without one. The machine's cores are shared by the workers,
the producer and Redis, so 4 workers on 2 cores measure the machine too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ._util import target, unreachable

TITLE = "parallelkit.taskiq.map: throughput with 1/2/4 Taskiq workers, per-item Redis overhead"

ROOT = Path(__file__).resolve().parent.parent
CAPACITY = 10  # --max-async-tasks per worker process
SLEEP = 0.05  # seconds per I/O-bound item
VS_RAW_SLEEP = 0.1  # seconds per item against raw Taskiq (the vendor's 1,000 x 100 ms)
WORKER_COUNTS = (1, 2, 4)
TARGET_EFFICIENCY = 0.8  # ratio to one worker >= 0.8 * workers counts as near-linear

_built: dict[str, Any] = {}


def _build(url: str, queue: str, consumer: str | None = None) -> dict[str, Any]:
    """The broker and tasks, the same in the workers and in the producer."""
    from redis.asyncio import Redis
    from taskiq import TaskiqEvents, TaskiqState

    from parallelkit.taskiq import redis_broker

    broker = redis_broker(url, queue=queue, consumer=consumer, idle_timeout=60, poll=0.5)

    @broker.on_event(TaskiqEvents.WORKER_STARTUP)
    async def announce(state: TaskiqState) -> None:
        client = Redis.from_url(url)
        await client.set(f"{queue}:ready:{consumer}", 1, ex=600)
        await client.aclose()

    @broker.task(task_name="bench.sleep")
    async def sleep(x: int) -> int:
        await asyncio.sleep(SLEEP)
        return x

    @broker.task(task_name="bench.sleep_long")
    async def sleep_long(x: int) -> int:
        await asyncio.sleep(VS_RAW_SLEEP)
        return x

    @broker.task(task_name="bench.noop")
    async def noop(x: int) -> int:
        return x

    return {"broker": broker, "sleep": sleep, "sleep_long": sleep_long, "noop": noop}


def __getattr__(name: str) -> Any:
    """``broker`` for ``taskiq worker benchmarks.bench_distributed:broker`` (lazy)."""
    if name != "broker":
        raise AttributeError(name)
    if "worker" not in _built:
        _built["worker"] = _build(
            os.environ["PK_BENCH_URL"],
            os.environ["PK_BENCH_QUEUE"],
            os.environ.get("PK_BENCH_CONSUMER"),
        )
    return _built["worker"]["broker"]


# ---------------------------------------------------------------------------- processes
class _Workers:
    def __init__(self, url: str, queue: str) -> None:
        self.url, self.queue = url, queue
        self.procs: list[subprocess.Popen[bytes]] = []

    def grow_to(self, count: int) -> None:
        import redis as redis_sync

        names = [f"w{i}" for i in range(len(self.procs), count)]
        for name in names:
            env = {
                **os.environ,
                "PK_BENCH_URL": self.url,
                "PK_BENCH_QUEUE": self.queue,
                "PK_BENCH_CONSUMER": name,
            }
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "taskiq",
                        "worker",
                        "benchmarks.bench_distributed:broker",
                        "--app-dir",
                        str(ROOT),
                        "--workers",
                        "1",
                        "--max-async-tasks",
                        str(CAPACITY),
                        "--log-level",
                        "ERROR",
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        client = redis_sync.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        try:
            while any(not client.exists(f"{self.queue}:ready:{n}") for n in names):
                if time.monotonic() > deadline:
                    msg = f"benchmark workers {names} did not start within 30 s"
                    raise TimeoutError(msg)
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=10)


def _drop_keys(url: str, prefix: str) -> None:
    import redis as redis_sync

    client = redis_sync.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# ---------------------------------------------------------------------------- measure
async def _timed(coro: Any, items: int) -> float:
    """Seconds ``coro`` (a map of the identity over ``range(items)``) took; its result is
    checked after the clock stops: a map that loses or reorders items fails the benchmark."""
    started = time.perf_counter()
    got = await coro
    elapsed = time.perf_counter() - started
    if list(got) != list(range(items)):
        msg = f"a map of {items} items returned {len(list(got))} results, not range({items})"
        raise AssertionError(msg)
    return elapsed


async def _vs_raw(app: dict[str, Any], n: int, rounds: int) -> dict[str, Any]:
    """pk's map against raw Taskiq on one worker, ``CAPACITY`` in flight, interleaved."""
    import random

    import parallelkit.taskiq as pkt

    task = app["sleep_long"]

    async def raw(check_interval: float) -> list[int]:
        gate = asyncio.Semaphore(CAPACITY)

        async def one(x: int) -> int:
            async with gate:
                handle = await task.kiq(x)
                result = await handle.wait_result(check_interval=check_interval)
                return int(result.return_value)

        return list(await asyncio.gather(*(one(x) for x in range(n))))

    async def with_pk() -> list[int]:
        return await pkt.map(task, range(n), limit=CAPACITY)

    contenders = {
        "raw Taskiq, wait_result(check_interval=0.2) (default)": lambda: raw(0.2),
        "raw Taskiq, wait_result(check_interval=0.01)": lambda: raw(0.01),
        "parallelkit.taskiq.map(limit=10)": with_pk,
    }
    await with_pk()  # warm up
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        order = list(contenders)
        random.shuffle(order)
        for name in order:
            samples[name].append(n / await _timed(contenders[name](), n))  # result checked
    ideal = CAPACITY / VS_RAW_SLEEP
    rows = {
        name: {
            "items_per_s": round(sorted(values)[len(values) // 2], 1),
            "min": round(min(values), 1),
            "max": round(max(values), 1),
            "of_ideal": round(sorted(values)[len(values) // 2] / ideal, 3),
        }
        for name, values in samples.items()
    }
    for name, row in rows.items():
        print(
            f"  {name}: {row['items_per_s']} items/s [{row['min']}-{row['max']}] "
            f"({row['of_ideal']:.0%} of ideal {ideal:.0f})",
            flush=True,
        )
    return {"items": n, "item_sleep_s": VS_RAW_SLEEP, "rounds": rounds, "ideal": ideal, **rows}


async def _measure(url: str, queue: str, workers: _Workers, quick: bool) -> dict[str, Any]:
    import parallelkit as pk
    import parallelkit.taskiq as pkt

    app = _build(url, queue)
    await app["broker"].startup()
    seconds = 1.0 if quick else 3.0
    scaling: list[dict[str, Any]] = []
    try:
        workers.grow_to(1)
        print(
            f"  against raw Taskiq: {100 if quick else 1000} items x {VS_RAW_SLEEP * 1000:.0f} ms,"
            f" 1 worker, {CAPACITY} in flight:",
            flush=True,
        )
        vs_raw = await _vs_raw(app, 100 if quick else 1000, 1 if quick else 3)
        for count in WORKER_COUNTS:
            workers.grow_to(count)
            limit = 2 * CAPACITY * count  # keep every worker busy while results travel
            ideal = count * CAPACITY / SLEEP  # items per second
            n = int(ideal * seconds)
            await pkt.map(app["sleep"], range(limit), limit=limit)  # warm up
            elapsed = await _timed(pkt.map(app["sleep"], range(n), limit=limit), n)
            scaling.append(
                {
                    "workers": count,
                    "items": n,
                    "limit": limit,
                    "seconds": round(elapsed, 3),
                    "items_per_s": round(n / elapsed, 1),
                    "of_ideal": round(n / elapsed / ideal, 3),
                }
            )
            print(
                f"  {count} worker(s): {n} items x {SLEEP * 1000:.0f} ms in {elapsed:.2f} s "
                f"= {n / elapsed:7.1f} items/s ({n / elapsed / ideal:.0%} of ideal {ideal:.0f})",
                flush=True,
            )
        base = scaling[0]["items_per_s"]
        for row in scaling:
            row["ratio_to_1"] = round(row["items_per_s"] / base, 2)
            row["target_ratio"] = round(TARGET_EFFICIENCY * row["workers"], 2)
            row["met"] = row["ratio_to_1"] >= row["target_ratio"]

        # overhead: a no-op item through Redis and back, then many in flight
        n_latency = 100 if quick else 300
        n_amortized = 500 if quick else 2000
        await pkt.map(app["noop"], range(20), limit=1)  # warm up
        latency = await _timed(pkt.map(app["noop"], range(n_latency), limit=1), n_latency)
        amortized = await _timed(pkt.map(app["noop"], range(n_amortized), limit=64), n_amortized)

        async def local_noop(x: int) -> int:
            return x

        local = await _timed(pk.map(local_noop, range(n_amortized), limit=64), n_amortized)
    finally:
        await app["broker"].shutdown()
    overhead = {
        "round_trip_ms": round(latency / n_latency * 1000, 2),
        "amortized_us_per_item": round(amortized / n_amortized * 1e6, 1),
        "in_process_us_per_item": round(local / n_amortized * 1e6, 2),
        "workers": WORKER_COUNTS[-1],
    }
    print(
        f"  overhead: round trip {overhead['round_trip_ms']} ms per no-op item (limit=1); "
        f"{overhead['amortized_us_per_item']} us/item with 64 in flight on "
        f"{WORKER_COUNTS[-1]} workers; in-process pk.map: "
        f"{overhead['in_process_us_per_item']} us/item",
        flush=True,
    )
    return {"scaling": scaling, "overhead": overhead, "vs_raw": vs_raw}


def run(*, quick: bool, database: str | None) -> dict[str, Any]:
    """Measure scaling and overhead; ``database`` is not used (Redis is)."""
    url = os.environ.get("PARALLELKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        import parallelkit.taskiq  # noqa: F401 - needs the `taskiq` extra
    except ImportError as exc:
        why: str | None = f"the taskiq extra is not installed: {exc}"
    else:
        why = unreachable(url, 6379)
    if why is not None:
        print(f"  skipped: {why}", flush=True)
        return {"skipped": why}
    queue = f"pk-bench-{uuid.uuid4().hex[:8]}"
    workers = _Workers(url, queue)
    try:
        result = asyncio.run(_measure(url, queue, workers, quick))
    finally:
        workers.stop()
        _drop_keys(url, queue)
    result.update(
        {
            "capacity_per_worker": CAPACITY,
            "item_sleep_s": SLEEP,
            "cpus": os.cpu_count(),
            "targets": [
                {
                    "target": f"throughput with {row['workers']} workers / 1 worker",
                    "measured": row["ratio_to_1"],
                    "limit": f">= {row['target_ratio']}",
                    "met": row["met"],
                }
                for row in result["scaling"][1:]
            ]
            + [
                target(
                    f"parallelkit.taskiq.map / {name} (throughput)",
                    result["vs_raw"]["parallelkit.taskiq.map(limit=10)"]["items_per_s"]
                    / result["vs_raw"][name]["items_per_s"],
                    1.0,
                    below=False,
                )
                for name in (
                    "raw Taskiq, wait_result(check_interval=0.2) (default)",
                    "raw Taskiq, wait_result(check_interval=0.01)",
                )
            ],
        }
    )
    return result
