"""parallelkit.redis: a hot-key hit through SWRCache on RedisStore (near cache) vs on
MemoryStore (CPU per hit, the 1.1x target); without the near cache vs a plain redis-py
GET; a stale key's refresh (CPU, and the Redis commands it sends); and loads per cold
key across OS processes vs naive cache-aside. Same Redis, same run, interleaved rounds.

Run as a module with ``child ...`` arguments it is one of the worker processes.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from ._util import exactly, print_targets, table, target, unreachable

TITLE = (
    "RedisStore near-cache hit vs MemoryStore hit (CPU); hit without near cache vs raw GET; "
    "a stale key's refresh (CPU, commands); loads per 400 cross-process cold callers"
)


def default_url() -> str:
    """The Redis to use when ``run`` is given none: read when the run starts (not at
    import: a module imported before the variable was set would use a stale one)."""
    return os.environ.get(
        "PARALLELKIT_BENCH_REDIS_URL",
        os.environ.get("PARALLELKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )


ROOT = Path(__file__).resolve().parent.parent


def _client(url: str) -> Any:
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    pool = aredis.BlockingConnectionPool.from_url(
        url, max_connections=50, timeout=10, retry=Retry(NoBackoff(), 1)
    )
    return aredis.Redis.from_pool(pool)


# ------------------------------------------------------------------ near-cache hit
async def _near_hit_cost(url: str, n: int, rounds: int) -> dict[str, Any]:
    """CPU per hot-key hit: SWRCache on MemoryStore vs on an entered RedisStore.

    Also the floor: a ``dict`` lookup inside an async function (written without
    parallelkit: no cache can do less). Every round runs each contender once, in
    turn, so drift hits all alike; per-hit CPU is ``time.process_time``.
    """
    import parallelkit as pk
    from parallelkit.redis import RedisStore

    redis = _client(url)
    prefix = f"pkbench:{uuid.uuid4().hex[:8]}"
    store = RedisStore(redis, prefix=prefix)
    value = {"id": "c1", "status": "open", "owner": "ada", "tags": ["vip", "emea"]}
    memory = pk.SWRCache(fresh=3600, stale=3600)
    near = pk.SWRCache(fresh=3600, stale=3600, store=store)
    plain: dict[str, Any] = {}

    async def loader(key: str) -> dict[str, Any]:
        return value

    @memory.cached
    async def memory_cached(conversation_id: str) -> dict[str, Any]:
        return value

    @near.cached
    async def near_cached(conversation_id: str) -> dict[str, Any]:
        return value

    async def dict_lookup(key: str) -> dict[str, Any]:
        hit = plain.get(key)
        if hit is None:
            hit = plain[key] = value
        return hit

    def loop_get(cache: pk.SWRCache) -> Any:
        async def run() -> None:
            for _ in range(n):
                await cache.get("c1", loader)

        return run

    def loop_call(fn: Any) -> Any:
        async def run() -> None:
            for _ in range(n):
                await fn("c1")

        return run

    contenders = {
        "floor": loop_call(dict_lookup),
        "memory_get": loop_get(memory),
        "near_get": loop_get(near),
        "memory_cached": loop_call(memory_cached),
        "near_cached": loop_call(near_cached),
    }
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        async with store, memory, near:
            for fn in contenders.values():  # warm: loaded, then in the near cache
                for _ in range(3):
                    await fn()
            near_in_memory = store.peek("c1") is not None and store.peek(
                ("benchmarks.bench_redis._near_hit_cost.<locals>.near_cached", "c1")
            )
            before = store.statistics()
            for _ in range(rounds):
                for name, fn in contenders.items():
                    start = time.process_time()
                    await fn()
                    samples[name].append((time.process_time() - start) / n * 1e6)
            after = store.statistics()
        hits = after.near_hits - before.near_hits
        round_trips = (after.hits + after.misses) - (before.hits + before.misses)
        return {
            "cpu_us": {k: statistics.median(v) for k, v in samples.items()},
            "range_us": {k: [min(v), max(v)] for k, v in samples.items()},
            "near_hits": hits,
            "redis_reads_during_hits": round_trips,
            "served_from_near_cache": bool(near_in_memory)
            and hits == 2 * n * rounds
            and round_trips == 0,
        }
    finally:
        await store.clear()
        await redis.aclose()


# ------------------------------------------------------------------ refresh cost
async def _refresh_cost(url: str, n: int, rounds: int) -> dict[str, Any]:
    """CPU per stale key, MemoryStore vs an entered RedisStore: the stale hit, its
    background refresh, and reads until the refreshed value is served (16 at once).

    Also the Redis commands sent, by name: what a refresh costs in round trips
    (``EVALSHA``: the scripts) and whether its next readers read Redis again
    (``GET``). Interleaved rounds; CPU is ``time.process_time``.
    """
    import parallelkit as pk
    from parallelkit._cache.store import CacheEntry
    from parallelkit.redis import RedisStore

    redis = _client(url)
    sent: collections.Counter[str] = collections.Counter()
    send = redis.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        sent[str(args[0]).upper()] += 1
        return await send(*args, **options)

    redis.execute_command = counting
    old = {"id": "c1", "status": "open", "owner": "ada", "tags": ["vip", "emea"]}
    new = {**old, "status": "closed"}

    async def loader(key: str) -> dict[str, Any]:
        return new

    async def one(kind: str) -> tuple[float, collections.Counter[str], int]:
        prefix = f"pkbench:{uuid.uuid4().hex[:8]}"
        store: Any = pk.MemoryStore(2 * n)
        entered: Any = contextlib.nullcontext()
        if kind == "redis":
            store = entered = RedisStore(redis, prefix=prefix, near_maxsize=2 * n)
        cache = pk.SWRCache(fresh=3600, stale=3600, store=store)
        keys = [f"k{i}" for i in range(n)]
        try:
            async with entered, cache:
                now = getattr(store, "clock", time.monotonic)()
                for key in keys:  # stale entries, as after a quiet spell
                    await store.set(key, CacheEntry(old, now - 20, now - 10, now + 3600), ttl=3600)
                if kind == "redis":  # its own sets' messages, heard before the clock starts
                    while store.statistics().near_invalidations < n:
                        await anyio.sleep(0.001)
                sent.clear()
                start = time.process_time()
                work = iter(keys)

                async def reader() -> None:
                    for key in work:
                        assert await cache.get(key, loader) == old  # stale: refreshes
                        while await cache.get(key, loader) != new:  # its next reads
                            await anyio.lowlevel.checkpoint()

                async with anyio.create_task_group() as tg:
                    for _ in range(16):
                        tg.start_soon(reader)
                cpu = (time.process_time() - start) / n
                commands = collections.Counter(sent)
                refreshes = cache.statistics().refreshes
        finally:
            if kind == "redis":
                await store.clear()
        return cpu, commands, refreshes

    try:
        cpu: dict[str, list[float]] = {"memory": [], "redis": []}
        commands: collections.Counter[str] = collections.Counter()
        refreshes = 0
        for _ in range(rounds):  # interleaved: drift hits both alike
            for kind in cpu:
                seconds, sent_now, refreshed = await one(kind)
                cpu[kind].append(seconds)
                if kind == "redis":
                    commands, refreshes = sent_now, refreshed
        return {
            "cpu_us": {k: statistics.median(v) * 1e6 for k, v in cpu.items()},
            "commands_per_key": {k: v / n for k, v in sorted(commands.items())},
            "refreshes": refreshes,
        }
    finally:
        await redis.aclose()


# ------------------------------------------------------------------ per-hit cost
async def _hit_cost(url: str, n: int, rounds: int) -> dict[str, Any]:
    """Without the near cache (the store not entered): every hit is one ``GET``."""
    import parallelkit as pk
    from parallelkit.redis import RedisStore

    redis = _client(url)
    prefix = f"pkbench:{uuid.uuid4().hex[:8]}"
    store = RedisStore(redis, prefix=prefix, near_maxsize=None)
    cache = pk.SWRCache(fresh=3600, stale=3600, store=store)
    value = {"id": "c1", "status": "open", "owner": "ada", "tags": ["vip", "emea"]}

    async def loader(key: str) -> dict[str, Any]:
        return value

    @cache.cached
    async def get_conversation(conversation_id: str) -> dict[str, Any]:
        return value

    raw_key = f"{prefix}:raw"
    await redis.set(raw_key, json.dumps(value).encode())
    try:
        async with cache:
            await cache.get("c1", loader)
            await get_conversation("c1")

            async def raw_get() -> None:
                for _ in range(n):
                    json.loads(await redis.get(raw_key))  # GET + decode: the fair raw form

            async def cache_get() -> None:
                for _ in range(n):
                    await cache.get("c1", loader)

            async def cached_call() -> None:
                for _ in range(n):
                    await get_conversation("c1")

            samples: dict[str, list[float]] = {"raw": [], "get": [], "cached": []}
            contenders = {"raw": raw_get, "get": cache_get, "cached": cached_call}
            for _ in range(rounds):  # interleaved rounds: drift hits all alike
                for name, fn in contenders.items():
                    start = time.perf_counter()
                    await fn()
                    samples[name].append((time.perf_counter() - start) / n)
        per_op = {name: statistics.median(s) for name, s in samples.items()}
        return {"per_op_us": {k: v * 1e6 for k, v in per_op.items()}, "hits": cache.stats.hits}
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


# ------------------------------------------------------------------ cross-process loads
async def _child(
    mode: str, url: str, prefix: str, processes: int, callers: int, parent: int
) -> None:
    import parallelkit as pk
    from parallelkit.redis import RedisStore

    redis = _client(url)
    loads_key = f"{prefix}:loads:{mode}"

    async def load(key: str) -> str:
        await redis.incr(loads_key)
        await anyio.sleep(0.2)  # the database query
        return f"value of {key}"

    async def naive_get(key: str) -> str:  # textbook cache-aside with redis-py
        raw = await redis.get(f"{prefix}:naive:{key}")
        if raw is not None:
            return str(raw.decode())
        value = await load(key)
        await redis.set(f"{prefix}:naive:{key}", value.encode(), ex=60)
        return value

    store = RedisStore(redis, prefix=prefix, poll=0.01, command_timeout=30)
    cache = pk.SWRCache(fresh=60, stale=60, store=store)
    barrier = f"{prefix}:barrier:{mode}"
    # ``parent``: the run's pid, passed in (read here, it may already be init's: a run
    # stopped while this process started up would never be seen to be gone)
    async with store, cache:
        await redis.incr(barrier)
        while int(await redis.get(barrier) or 0) < processes:
            if os.getppid() != parent:  # the run was stopped before starting the others
                msg = f"{mode}: the benchmark that started this process is gone"
                raise SystemExit(msg)
            await anyio.sleep(0.005)
        if mode == "swr":
            got = await pk.gather(*(cache.get("cold", load) for _ in range(callers)))
        else:
            got = await pk.gather(*(naive_get("cold") for _ in range(callers)))
    await redis.aclose()
    if list(got) != ["value of cold"] * callers:  # every caller's value checked
        msg = f"{mode}: a caller got a wrong value"
        raise SystemExit(msg)  # a non-zero exit: the benchmark fails


def _cross_process(
    url: str, mode: str, prefix: str, processes: int, callers: int
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_redis", "child", mode, url, prefix]
    cmd += [str(processes), str(callers), str(os.getpid())]
    start = time.perf_counter()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs += (subprocess.Popen(cmd, cwd=ROOT) for _ in range(processes))
        codes = [p.wait(timeout=120) for p in procs]
    finally:  # stopped (Ctrl-C, SIGTERM, a timeout): a child waiting for the others would wait
        for proc in procs:  # forever, an orphan holding the run's output open
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    elapsed = time.perf_counter() - start
    if any(codes):
        msg = f"a {mode} worker failed: exit codes {codes}"
        raise RuntimeError(msg)

    async def read() -> int:
        redis = _client(url)
        try:
            return int(await redis.get(f"{prefix}:loads:{mode}") or 0)
        finally:
            await redis.aclose()

    return {"loads": anyio.run(read), "seconds": elapsed}


async def _cleanup(url: str, prefix: str) -> None:
    redis = _client(url)
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


# ------------------------------------------------------------------ entry point
def run(*, quick: bool, database: str | None, redis: str | None = None) -> dict[str, Any]:
    """Measure both targets side by side on the Redis at ``redis`` (``None``:
    :func:`default_url`); ``database`` is not used (Redis only)."""
    url = redis or default_url()
    skip = unreachable(url, 6379)
    if skip:
        print(f"  skipped: {skip}")
        return {"skipped": skip}
    near_n, near_rounds = (5000, 7) if quick else (20000, 21)
    near = anyio.run(_near_hit_cost, url, near_n, near_rounds, backend="asyncio")
    cpu, spread = near["cpu_us"], near["range_us"]

    def row(label: str, name: str, against: str) -> list[Any]:
        low, high = spread[name]
        return [label, cpu[name], f"{low:.3g}-{high:.3g}", cpu[name] / cpu[against]]

    print(
        table(
            ["hot-key hit, CPU per hit", "us (median)", "range", "x MemoryStore"],
            [
                row("floor: dict lookup in an async fn", "floor", "memory_get"),
                row("SWRCache.get, MemoryStore", "memory_get", "memory_get"),
                row("SWRCache.get, RedisStore near cache", "near_get", "memory_get"),
                row("@cache.cached, MemoryStore", "memory_cached", "memory_cached"),
                row("@cache.cached, RedisStore near cache", "near_cached", "memory_cached"),
            ],
        )
    )
    print(
        f"  near hits: {near['near_hits']}, Redis reads during the hit loops: "
        f"{near['redis_reads_during_hits']}"
    )

    n, rounds = (1000, 5) if quick else (3000, 9)
    hits = anyio.run(_hit_cost, url, n, rounds, backend="asyncio")
    us = hits["per_op_us"]
    print(
        table(
            ["per hit, no near cache", "us", "x raw GET"],
            [
                ["redis-py GET + json.loads", us["raw"], 1.0],
                ["SWRCache.get on RedisStore", us["get"], us["get"] / us["raw"]],
                ["@cache.cached on RedisStore", us["cached"], us["cached"] / us["raw"]],
            ],
        )
    )

    refresh_n, refresh_rounds = (300, 3) if quick else (1000, 7)
    refresh = anyio.run(_refresh_cost, url, refresh_n, refresh_rounds, backend="asyncio")
    per_key = refresh["commands_per_key"]
    rcpu = refresh["cpu_us"]
    print(
        table(
            [
                f"a stale key ({refresh_n} keys): hit + refresh + reads",
                "CPU us per key",
                "x Memory",
            ],
            [
                ["SWRCache on MemoryStore", rcpu["memory"], 1.0],
                ["SWRCache on RedisStore (entered)", rcpu["redis"], rcpu["redis"] / rcpu["memory"]],
            ],
        )
    )
    print(f"  Redis commands per stale key: {per_key} ({refresh['refreshes']} refreshes)")

    processes, callers = 4, 100
    prefix = f"pkbench:{uuid.uuid4().hex[:8]}"
    try:
        swr = _cross_process(url, "swr", prefix, processes, callers)
        naive = _cross_process(url, "naive", prefix, processes, callers)
    finally:
        anyio.run(_cleanup, url, prefix, backend="asyncio")
    print(
        table(
            [f"{processes} processes x {callers} cold callers", "loads", "seconds"],
            [
                ["SWRCache + RedisStore", swr["loads"], swr["seconds"]],
                ["naive cache-aside (GET, load, SET)", naive["loads"], naive["seconds"]],
            ],
        )
    )
    targets = [
        target(
            "SWRCache.get hit, RedisStore near cache / MemoryStore (CPU)",
            cpu["near_get"] / cpu["memory_get"],
            1.1,
        ),
        target(
            "@cache.cached hit, RedisStore near cache / MemoryStore (CPU)",
            cpu["near_cached"] / cpu["memory_cached"],
            1.1,
        ),
        target(
            "hits served without a Redis round trip",
            float(near["served_from_near_cache"]),
            1,
            below=False,
        ),
        target("SWRCache.get hit on RedisStore / raw GET", us["get"] / us["raw"], 1.3),
        target("@cache.cached hit on RedisStore / raw GET", us["cached"] / us["raw"], 1.3),
        # exactly one: 0 loads is a cache that did not load, not a better single flight
        exactly(f"loads per {processes * callers} cross-process cold callers", swr["loads"], 1),
        target(
            "a refresh's scripts per stale key (lease + read, write + release)",
            per_key.get("EVALSHA", 0.0),
            2,
        ),
        target(
            "GETs per stale key (its first read; again only if the refresh's own message "
            "beat its reply; 3 before the two-script load)",
            per_key.get("GET", 0.0),
            1.5,
        ),
        target("refreshes per stale key", refresh["refreshes"] / refresh_n, 1),
        target("refreshes per stale key", refresh["refreshes"] / refresh_n, 1, below=False),
    ]
    print_targets(targets)
    return {
        "redis_url": url,
        "near_hit_cost": {"n": near_n, "rounds": near_rounds, **near},
        "hit_cost": {"n": n, "rounds": rounds, **hits},
        "refresh_cost": {"n": refresh_n, "rounds": refresh_rounds, **refresh},
        "cross_process": {
            "processes": processes,
            "callers_per_process": callers,
            "swr": swr,
            "naive_cache_aside": naive,
        },
        "targets": targets,
    }


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _, _, mode, url, prefix, processes, callers, parent = sys.argv
    anyio.run(
        _child, mode, url, prefix, int(processes), int(callers), int(parent), backend="asyncio"
    )
