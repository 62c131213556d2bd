"""RedisStore, broken as a user would (round 8), against a real Redis.

Each test reproduces one defect: a cache miss counted twice in the store's
statistics, and a load still running when the store exits, whose lease nobody
renewed any more. The last one pins why a give-back's tombstone lives as long as
what it guards (not a bound tied to ``command_timeout``): Redis runs a held
command however late it arrives. No assertion on elapsed time: events, counters,
and the lease's own ttl in Redis (a lease not renewed expires, whatever the clock).
"""

from __future__ import annotations

import time

import anyio
import pytest
import redis.asyncio as aredis

import parallelkit as pk
from parallelkit._cache.store import CacheEntry
from parallelkit.redis import RedisLock, RedisStore, RedisUnavailable

from .redis_helpers import client, eventually, renewals
from .redis_helpers.stall import StallProxy

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    # redis-py's asyncio client runs on asyncio only (see test_redis_store.py)
    return "asyncio"


class Held:
    """A loader that returns ``value`` once ``release`` is set (``started``: it runs)."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        return self.value


# ------------------------------------------------------------------ statistics
async def test_a_cache_miss_counts_one_miss_and_a_stale_hit_one_hit(
    r: aredis.Redis, prefix: str
) -> None:
    store = RedisStore(r, prefix=prefix)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)

    async def load() -> str:
        return "v"

    async with cache:
        assert await cache.get("cold", load) == "v"  # the GET, then the lease's read
        stats = store.statistics()
        assert (stats.hits, stats.misses) == (0, 1)
        # a stale entry: the GET finds it (a hit), its refresh reads it with the lease
        now = time.time()
        stale = CacheEntry("old", loaded_at=now - 40, fresh_until=now - 10, stale_until=now + 50)
        await store.set("stale", stale, ttl=60)
        assert await cache.get("stale", load) == "old"
        await eventually(lambda: cache.statistics().refreshes == 1, "the refresh")
    stats = store.statistics()
    assert (stats.hits, stats.misses) == (1, 1)
    assert cache.statistics().misses == stats.misses  # the cache and its store agree


# ------------------------------------------------------------------ a load at the store's exit
async def test_a_load_running_when_the_store_exits_keeps_its_lease_until_it_ends(
    r: aredis.Redis, prefix: str
) -> None:
    # the cache is not entered: its load runs in the caller's task, which outlives
    # the store's `async with`; the store renews that load's lease from its own task
    store = RedisStore(r, prefix=prefix, lease=1.0, near_maxsize=None)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    other = pk.SWRCache(fresh=30, stale=60, store=RedisStore(r, prefix=prefix, lease=1.0))
    lease_key = f"{prefix}:cache:l:'k'"
    load, again = Held("v1"), Held("v2")
    entered, leave, exited = anyio.Event(), anyio.Event(), anyio.Event()
    results: list[str] = []

    async def enter_the_store() -> None:
        async with store:
            entered.set()
            await leave.wait()
        exited.set()

    async def read(on: pk.SWRCache, loader: Held) -> None:
        results.append(await on.get("k", loader))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(enter_the_store)
            await entered.wait()
            tg.start_soon(read, cache, load)
            await load.started.wait()  # its lease is taken (and renewed by the store)
            leave.set()  # the store exits while the load runs
            # the lease is still renewed: it outlives several `lease`s (it used to
            # expire `lease` after the exit, and another process loaded the key again)
            await renewals(r, lease_key, 3)
            assert not exited.is_set()  # the exit waits for the load it guards
            tg.start_soon(read, other, again)  # another process: waits for the lease
            await renewals(r, lease_key, 2)
            assert again.calls == 0
            load.release.set()
            await exited.wait()  # the load ended, its lease given back: the exit is done
    assert results == ["v1", "v1"]  # the other process read what the load stored
    assert (load.calls, again.calls) == (1, 0)
    assert await r.exists(lease_key) == 0


async def test_a_load_that_starts_while_the_store_exits_renews_its_own_lease(
    r: aredis.Redis, prefix: str
) -> None:
    store = RedisStore(r, prefix=prefix, lease=1.0, near_maxsize=None)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    first, second = Held("a"), Held("b")
    entered, leave, exited = anyio.Event(), anyio.Event(), anyio.Event()

    async def enter_the_store() -> None:
        async with store:
            entered.set()
            await leave.wait()
        exited.set()

    async def read(key: str, loader: Held) -> None:
        assert await cache.get(key, loader) == loader.value

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(enter_the_store)
            await entered.wait()
            tg.start_soon(read, "k1", first)
            await first.started.wait()
            leave.set()  # the exit waits for k1's load...
            await renewals(r, f"{prefix}:cache:l:'k1'", 1)
            tg.start_soon(read, "k2", second)  # ...not for a load that starts meanwhile
            await second.started.wait()
            first.release.set()
            await exited.wait()  # k2's load still runs: it renews its lease itself
            await renewals(r, f"{prefix}:cache:l:'k2'", 3)
            second.release.set()
    assert await r.exists(f"{prefix}:cache:l:'k2'") == 0


async def test_a_cancelled_exit_stops_waiting_for_the_loads(r: aredis.Redis, prefix: str) -> None:
    store = RedisStore(r, prefix=prefix, lease=1.0, near_maxsize=None)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    load = Held("v")
    lease_key = f"{prefix}:cache:l:'k'"

    async def read() -> None:
        assert await cache.get("k", load) == "v"

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as scope:

                async def cancel_once_waiting() -> None:
                    await renewals(r, lease_key, 2)  # the exit waits, renewing the lease
                    scope.cancel()  # e.g. a timeout around a shutdown

                async with store:
                    tg.start_soon(read)
                    await load.started.wait()
                    tg.start_soon(cancel_once_waiting)
            assert scope.cancelled_caught
            # the lease is no longer renewed: it expires after `lease`
            with anyio.fail_after(30):
                while await r.exists(lease_key):
                    await anyio.sleep(0.05)
            load.release.set()


# ------------------------------------------------------------------ a tombstone's life
async def test_an_acquire_held_many_command_timeouts_after_its_give_back_takes_nothing(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    # A tombstone bounded by a multiple of command_timeout would be gone when the held
    # acquire runs: the lock would then be held, by nobody, for its whole ttl.
    timeout = 0.05
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)
        await stalled.ping()
        lock = RedisLock(
            stalled, "late", ttl=600, poll=0.01, prefix=prefix, command_timeout=timeout
        )
        proxy.stall()

        async def acquiring() -> None:
            with pytest.raises(RedisUnavailable):
                async with lock:
                    pytest.fail("Redis did not answer: not acquired")

        async with anyio.create_task_group() as tg:
            tg.start_soon(acquiring)
            await eventually(lambda: proxy.refused >= 1, "a give-back during the stall")
            proxy.let_new_through()  # the give-back overtakes the held acquire
        key = f"{prefix}:lock:{{late}}"
        voids = [k async for k in r.scan_iter(match=f"{key}:void:*")]
        assert len(voids) == 1
        # the acquire is still held on the way, for 40 command_timeouts (a paused VM,
        # a proxy: Redis runs it when it arrives, however late)
        await anyio.sleep(40 * timeout)
        replies = proxy.replies
        await proxy.resume()
        await eventually(lambda: proxy.replies > replies, "Redis ran the held acquire")
        await stalled.aclose()
    assert await r.exists(key) == 0  # it took nothing: not held by nobody for 600 s
    async with RedisLock(r, "late", blocking=False, prefix=prefix):
        pass
