"""A worker process for the multi-process parallelkit.redis tests.

Run as ``python worker.py MODE URL PREFIX [ARGS...]``. Every mode first waits on
a Redis barrier (``{PREFIX}:barrier`` reaching ``--processes``) so that all
processes start their concurrent work together, then writes what it observed
into Redis (the test reads it there) and prints a JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import anyio
import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import parallelkit as pk
from parallelkit._cache.store import CacheEntry
from parallelkit.redis import RedisLimiter, RedisLock, RedisStore

# the highest number of members a set reached, kept atomically next to it
RECORD_MAX = """
redis.call('SADD', KEYS[1], ARGV[1])
local n = redis.call('SCARD', KEYS[1])
local best = tonumber(redis.call('GET', KEYS[2]) or '0')
if n > best then redis.call('SET', KEYS[2], n) end
return n
"""


def client(url: str) -> aredis.Redis:
    pool = aredis.BlockingConnectionPool.from_url(
        url, retry=Retry(NoBackoff(), 1), socket_timeout=5, max_connections=50, timeout=10
    )
    return aredis.Redis.from_pool(pool)


async def barrier(r: aredis.Redis, prefix: str, processes: int) -> None:
    key = f"{prefix}:barrier"
    await r.incr(key)
    while int(await r.get(key) or 0) < processes:
        await anyio.sleep(0.005)


def store_of(r: aredis.Redis, args: argparse.Namespace) -> RedisStore:
    """The store every process builds (a long command_timeout: these tests are not
    about hangs, and four busy processes' bursts may queue for a while)."""
    return RedisStore(r, prefix=args.prefix, namespace="cache", poll=0.01, command_timeout=30)


async def cold(r: aredis.Redis, args: argparse.Namespace) -> dict[str, Any]:
    """``callers`` concurrent gets of one cold key; the loader counts in Redis."""
    store = store_of(r, args)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)

    async def loader(key: str) -> dict[str, Any]:
        await r.incr(f"{args.prefix}:loads")
        await anyio.sleep(0.3)  # long enough that most processes miss meanwhile
        return {"key": key, "pid": os.getpid()}

    async with store, cache:
        await barrier(r, args.prefix, args.processes)
        values = await pk.gather(*(cache.get("cold", loader) for _ in range(args.callers)))
    pids = {v["pid"] for v in values}
    return {"values": len(values), "distinct": len(pids), "stats": str(cache.stats)}


async def stale(r: aredis.Redis, args: argparse.Namespace) -> dict[str, Any]:
    """``callers`` concurrent gets of a stale key; the refresh counts in Redis.

    The refresh holds its value back until every process has served its callers,
    so each of them is served the stale value whatever the scheduling.
    """
    store = store_of(r, args)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    served = f"{args.prefix}:served"

    async def loader(key: str) -> str:
        await r.incr(f"{args.prefix}:refreshes")
        while int(await r.get(served) or 0) < args.processes:
            await anyio.sleep(0.01)
        return "new"

    async with store, cache:
        await barrier(r, args.prefix, args.processes)
        values = await pk.gather(*(cache.get("hot", loader) for _ in range(args.callers)))
        await r.incr(served)
        with anyio.fail_after(60):  # one process's refresh stores the new value
            while (got := await store.get("hot")) is None or got.value != "new":
                await anyio.sleep(0.02)
    return {"served": sorted(set(values))}


async def limiter(r: aredis.Redis, args: argparse.Namespace) -> dict[str, Any]:
    """``callers`` tasks through a RedisLimiter(concurrency=N); holders go in a set.

    Every holder waits until the bound was reached once (by holders of any
    process), so "reached" does not depend on scheduling; exceeding it would show.
    """
    lim = RedisLimiter(
        r, "shared", concurrency=args.concurrency, prefix=args.prefix, poll=0.01, command_timeout=30
    )
    record = r.register_script(RECORD_MAX)
    holders, best = f"{args.prefix}:holders", f"{args.prefix}:max"

    async def work(i: int) -> None:
        me = f"{os.getpid()}-{i}"
        await record(keys=[holders, best], args=[me])
        while int(await r.get(best) or 0) < args.concurrency:
            await anyio.sleep(0.005)
        await r.srem(holders, me)

    await barrier(r, args.prefix, args.processes)
    await pk.map(work, range(args.callers), limit=lim)
    return {"stats": str(lim.statistics())}


async def rate(r: aredis.Redis, args: argparse.Namespace) -> dict[str, Any]:
    """``callers`` starts through a RedisLimiter(rate=R) on a frozen shared clock.

    Each reservation's delay goes into a Redis list: on a frozen clock the k-th
    reservation of all processes together must wait exactly k intervals.
    """
    lim = RedisLimiter(
        r, "rated", rate=args.rate, prefix=args.prefix, clock=lambda: 1e6, command_timeout=30
    )
    delays = f"{args.prefix}:delays"
    reserve = RedisLimiter._reserve

    async def recording(self: RedisLimiter) -> Any:
        turn = await reserve(self)
        await r.rpush(delays, repr(turn.delay))
        return turn

    RedisLimiter._reserve = recording  # type: ignore[method-assign]

    async def work(i: int) -> None:
        await r.incr(f"{args.prefix}:starts")

    await barrier(r, args.prefix, args.processes)
    await pk.map(work, range(args.callers), limit=lim)
    return {}


async def near(r: aredis.Redis, args: argparse.Namespace) -> dict[str, Any]:
    """Hold ``hot`` in the near cache, then wait until an invalidation reaches it."""
    store = store_of(r, args)
    cache = pk.SWRCache(fresh=300, stale=300, store=store)
    loads = 0

    async def loader(key: str) -> str:
        nonlocal loads
        loads += 1
        return f"{key} #{loads} from {os.getpid()}"

    async with store, cache:
        first = await cache.get("hot", loader)
        with anyio.fail_after(30):
            while store.peek("hot") is None:  # the value is in this process's near cache
                first = await cache.get("hot", loader)
                await anyio.sleep(0.01)
        await r.incr(f"{args.prefix}:ready")
        with anyio.fail_after(60):  # another process invalidates "hot" (no round trip here)
            while store.peek("hot") is not None:
                await anyio.sleep(0.001)
        second = await cache.get("hot", loader)
        stats = store.statistics()
    return {
        "first": first,
        "second": second,
        "near_hits": stats.near_hits,
        "near_invalidations": stats.near_invalidations,
    }


async def token(r: aredis.Redis, args: argparse.Namespace) -> dict[str, Any]:
    """Start a load of ``k`` (its token), wait for "go", then store conditionally."""
    store = store_of(r, args)
    load_token = await store.load_token("k")
    await r.incr(f"{args.prefix}:started")
    with anyio.fail_after(60):
        while not await r.exists(f"{args.prefix}:go"):
            await anyio.sleep(0.01)
    now = time.time()
    entry = CacheEntry("from the old load", now, now + 30, now + 60)
    stored = await store.set_if_unchanged("k", entry, ttl=60, token=load_token)
    return {"stored": stored}


async def lock(r: aredis.Redis, args: argparse.Namespace) -> dict[str, Any]:
    """Take the lock, record the fencing token, then hold it until killed (or done)."""
    async with RedisLock(r, "leader", ttl=args.ttl, prefix=args.prefix, poll=0.05) as held:
        await r.rpush(f"{args.prefix}:fences", held.fencing_token or 0)
        if args.hold:
            await anyio.sleep(3600)  # the test SIGKILLs us here
    return {"fence": held.fencing_token}


async def slowload(r: aredis.Redis, args: argparse.Namespace) -> dict[str, Any]:
    """Load ``k`` through the cache; the load waits for "go" (the test invalidates first)."""
    store = store_of(r, args)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)

    async def loader(key: str) -> str:
        await r.incr(f"{args.prefix}:loading")
        while not await r.exists(f"{args.prefix}:go"):
            await anyio.sleep(0.01)
        return "from the old load"

    async with store, cache:
        value = await cache.get("k", loader)
    return {"value": value}


MODES = {
    "cold": cold,
    "stale": stale,
    "limiter": limiter,
    "rate": rate,
    "lock": lock,
    "near": near,
    "token": token,
    "slowload": slowload,
}


async def main(args: argparse.Namespace) -> None:
    r = client(args.url)
    try:
        result = await MODES[args.mode](r, args)
    finally:
        await r.aclose()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("url")
    parser.add_argument("prefix")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--callers", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=5)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--hold", action="store_true")
    anyio.run(main, parser.parse_args(), backend="asyncio")
    sys.exit(0)
