"""RedisStore on a Redis that answers but refuses writes (READONLY, OOM, MISCONF, NOREPLICAS).

Every test runs a private ``redis-server`` and makes it refuse writes for real: a
demoted primary (``REPLICAOF`` a master that does not answer: it keeps serving its
data), ``maxmemory`` with ``noeviction``, a failed ``BGSAVE`` with save points set
(stop-writes-on-bgsave-error), ``min-replicas-to-write`` without replicas.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

import parallelkit as pk
from parallelkit.redis import (
    RedisLimiter,
    RedisLock,
    RedisStore,
    RedisUnavailable,
    SerializationError,
)
from parallelkit.redis._outage import refuses_writes

from .conftest import need_service
from .redis_helpers import FakeTimer, RedisServer, client, eventually, free_port

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

MODES = ["readonly", "oom", "misconf", "noreplicas"]


@pytest.fixture
def anyio_backend() -> str:
    # redis-py's asyncio client runs on asyncio only (see test_redis_store.py)
    return "asyncio"


@pytest.fixture
def private() -> Iterator[RedisServer]:
    """A private ``redis-server`` whose snapshots cannot be saved (``--dir /proc``)."""
    srv = RedisServer("--dir", "/proc")
    if srv.binary is None:
        need_service("redis-server (the binary, for the write refusal tests)", "not on PATH")
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
async def admin(private: RedisServer) -> AsyncIterator[aredis.Redis]:
    conn = client(private.url)
    yield conn
    await conn.aclose()


@pytest.fixture
async def conn(private: RedisServer) -> AsyncIterator[aredis.Redis]:
    conn = client(private.url)
    yield conn
    await conn.aclose()


async def refuse(admin: aredis.Redis, mode: str) -> None:
    """Make the server refuse writes, as ``mode`` does in production."""
    if mode == "readonly":  # a failover demoted it: a replica of a master not there
        await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    elif mode == "oom":
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)
    elif mode == "misconf":  # a failed background save, with save points set
        await admin.config_set("save", "3600 1")
        await admin.bgsave()

        async def failed() -> bool:
            info = await admin.info("persistence")
            return info["rdb_bgsave_in_progress"] == 0 and info["rdb_last_bgsave_status"] == "err"

        with anyio.fail_after(30):
            while not await failed():
                await anyio.sleep(0.01)
    else:
        await admin.config_set("min-replicas-to-write", 1)
    with pytest.raises(ResponseError):
        await admin.set("pktest:probe", "x")  # it refuses writes now


async def accept(admin: aredis.Redis, mode: str) -> None:
    """Make the server accept writes again."""
    if mode == "readonly":
        await admin.execute_command("REPLICAOF", "NO", "ONE")
    elif mode == "oom":
        await admin.config_set("maxmemory", 0)
    elif mode == "misconf":
        await admin.config_set("save", "")
    else:
        await admin.config_set("min-replicas-to-write", 0)
    await admin.delete("pktest:probe")


class Loader:
    """A loader that counts its calls and returns ``f"{key}:{version}"``."""

    def __init__(self, version: str = "v1") -> None:
        self.calls = 0
        self.version = version

    async def __call__(self, key: str) -> str:
        self.calls += 1
        return f"{key}:{self.version}"


def refusal_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refuses writes" in r.getMessage()]


@pytest.mark.parametrize(
    ("error", "refusal"),
    [
        (ReadOnlyError("You can't write against a read only replica."), True),
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), True),
        (ResponseError("MISCONF Redis is configured to save RDB snapshots, but ..."), True),
        (ResponseError("NOREPLICAS Not enough good replicas to write."), True),
        (  # Redis 6 wraps a script's error
            ResponseError(
                "Error running script (call to f_1): @user_script:2: -READONLY You can't "
                "write against a read only replica."
            ),
            True,
        ),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), False),
        (ResponseError("ERR value is not an integer or out of range"), False),
        (RedisConnectionError("Connection refused"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_which_errors_refuse_writes(error: Exception, refusal: bool) -> None:
    assert refuses_writes(error) is refusal


@pytest.mark.parametrize("mode", MODES)
async def test_a_redis_that_refuses_writes_serves_loads_and_stores_again_when_it_accepts(
    conn: aredis.Redis,
    admin: aredis.Redis,
    prefix: str,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="parallelkit.redis")
    store = RedisStore(conn, prefix=prefix, retry_after=1.0)
    timer = store._guard.timer = FakeTimer()
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    load = Loader()
    async with store, cache:
        assert await cache.get("before", load) == "before:v1"
        await refuse(admin, mode)
        for n in range(3):  # every miss gets its loaded value: no 500
            assert await cache.get(f"k{n}", load) == f"k{n}:v1"
        assert load.calls == 4
        assert await conn.exists(store.redis_key("k0")) == 0  # the write was skipped
        # reads keep working (a replica serves them): from Redis, not the loader
        got = await store.get("before")
        assert got is not None
        assert got.value == "before:v1"
        assert await cache.get("before", load) == "before:v1"
        assert load.calls == 4
        stats = store.statistics()
        assert stats.write_refusals == 3
        assert stats.refusing
        assert (stats.errors, stats.degraded) == (0, 0)  # no outage: Redis answers
        assert len(refusal_logs(caplog)) == 1  # once per episode, not per miss

        await accept(admin, mode)
        timer.now += 1.0  # retry_after: the next write tries Redis again
        assert await cache.get("after", load) == "after:v1"
        assert await conn.exists(store.redis_key("after")) == 1  # stored again
        stats = store.statistics()
        assert not stats.refusing
        assert stats.write_refusals == 3
        assert any("accepts writes again" in r.getMessage() for r in caplog.records)
        assert len(refusal_logs(caplog)) == 1
        # a second episode is logged again
        await refuse(admin, mode)
        assert await cache.get("k9", load) == "k9:v1"
        assert len(refusal_logs(caplog)) == 2


@pytest.mark.parametrize("mode", ["readonly", "misconf"])
async def test_a_refused_invalidation_is_kept_and_written_when_redis_accepts_writes(
    private: RedisServer, admin: aredis.Redis, prefix: str, mode: str
) -> None:
    conns = [client(private.url) for _ in "ab"]
    here, there = (RedisStore(c, prefix=prefix) for c in conns)  # two processes
    timer = here._guard.timer = FakeTimer()
    caches = [pk.SWRCache(fresh=30, stale=60, store=s) for s in (here, there)]
    try:
        async with here, there, caches[0], caches[1]:
            assert await caches[0].get("k", Loader("old")) == "k:old"
            assert await caches[1].get("k", Loader("unused")) == "k:old"
            await refuse(admin, mode)
            await caches[0].invalidate("k")  # not raised: kept for later
            assert here.statistics().write_refusals == 1
            # this process does not read back what it invalidated
            assert await caches[0].get("k", Loader("new")) == "k:new"
            kept = await here.get("k")  # the new value: kept here, not in Redis
            assert kept is not None
            assert kept.value == "k:new"
            # another process still reads the old entry: Redis did not get the delete
            got = await there.get("k")
            assert got is not None
            assert got.value == "k:old"

            await accept(admin, mode)
            timer.now += 1.0
            await here.get("other")  # the next call replays the invalidation
            assert await conns[0].exists(here.redis_key("k")) == 0
            assert here.statistics().refusing  # until a write that stores is accepted
            assert await caches[0].get("j", Loader()) == "j:v1"
            assert not here.statistics().refusing

            async def there_reads_new() -> bool:
                return await caches[1].get("k", Loader("new")) == "k:new"

            with anyio.fail_after(30):  # its near cache heard the invalidation
                while not await there_reads_new():
                    await anyio.sleep(0.01)
    finally:
        for c in conns:
            await c.aclose()


async def test_a_set_redis_refuses_is_read_back_here_and_replayed_as_a_delete(
    conn: aredis.Redis, admin: aredis.Redis, prefix: str
) -> None:
    store = RedisStore(conn, prefix=prefix)
    timer = store._guard.timer = FakeTimer()
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    async with store, cache:
        assert await cache.get("k", Loader("old")) == "k:old"
        await refuse(admin, "readonly")
        await cache.set("k", "mine")
        assert await cache.get("k", Loader("unused")) == "mine"  # read your own write
        await accept(admin, "readonly")
        timer.now += 1.0
        assert await cache.get("j", Loader()) == "j:v1"  # replays, then stores
        assert await conn.exists(store.redis_key("k")) == 0
        assert await conn.exists(store.redis_key("j")) == 1


@pytest.mark.parametrize("mode", ["readonly", "oom"])
async def test_a_value_loaded_while_redis_refuses_writes_is_not_loaded_again_on_every_read(
    conn: aredis.Redis, admin: aredis.Redis, prefix: str, mode: str
) -> None:
    # the playbook's cache bug, brought back by a refusing Redis: a miss (or a stale
    # key's refresh) whose value is dropped loads again at the next read, and the next
    store = RedisStore(conn, prefix=prefix)
    timer = store._guard.timer = FakeTimer()
    now = [0.0]
    cache = pk.SWRCache(fresh=30, stale=60, store=store, clock=lambda: now[0])
    load = Loader()
    async with store, cache:
        assert await cache.get("hot", load) == "hot:v1"  # stored while Redis writes
        await refuse(admin, mode)
        for _ in range(5):  # a miss: loaded once, then read back here
            assert await cache.get("cold", load) == "cold:v1"
        assert load.calls == 2
        assert await conn.exists(store.redis_key("cold")) == 0  # Redis did not take it
        now[0] += 31  # "hot" is stale in Redis: one refresh, then its value is read here
        load.version = "v2"
        assert await cache.get("hot", load) == "hot:v1"  # stale: served, refreshed behind
        with anyio.fail_after(10):
            while load.calls < 3:
                await anyio.sleep(0.01)
        for _ in range(5):
            assert await cache.get("hot", load) in ("hot:v1", "hot:v2")
            await anyio.sleep(0.01)
        assert await cache.get("hot", load) == "hot:v2"
        assert load.calls == 3
        await accept(admin, mode)
        timer.now += 1.0  # retry_after: the next write tries Redis again
        assert await cache.get("after", load) == "after:v2"  # replays, then stores
        # the kept keys were deleted in Redis (every replica loads them afresh)
        assert await conn.exists(store.redis_key("cold")) == 0
        assert await conn.exists(store.redis_key("hot")) == 0
        assert await conn.exists(store.redis_key("after")) == 1
        assert not store.statistics().refusing


async def test_a_refused_clear_is_kept_and_replayed(
    conn: aredis.Redis, admin: aredis.Redis, prefix: str
) -> None:
    store = RedisStore(conn, prefix=prefix)
    timer = store._guard.timer = FakeTimer()
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    async with store, cache:
        assert await cache.get("k", Loader("old")) == "k:old"
        await refuse(admin, "readonly")
        await cache.clear()
        assert await cache.get("k", Loader("new")) == "k:new"  # not the old entry
        await accept(admin, "readonly")
        timer.now += 1.0
        await store.get("x")
        assert await conn.exists(store.redis_key("k")) == 0


@pytest.mark.parametrize("mode", ["readonly", "oom"])
async def test_a_load_whose_write_back_is_refused_returns_its_value_and_frees_its_lease(
    conn: aredis.Redis, admin: aredis.Redis, prefix: str, mode: str
) -> None:
    store = RedisStore(conn, prefix=prefix)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)

    async def load(key: str) -> str:
        await refuse(admin, mode)  # after the lease was taken
        return "loaded"

    async with store, cache:
        assert await cache.get("k", load) == "loaded"
        assert store.statistics().write_refusals == 1
        assert await store.get("k") is None  # not stored (a placeholder at most)
        await accept(admin, mode)
        if mode == "oom":  # the lease was given back (DEL is allowed under OOM)
            assert await conn.exists(f"{prefix}:cache:l:'k'") == 0


async def test_a_value_the_serializer_cannot_encode_still_raises_while_refused(
    conn: aredis.Redis, admin: aredis.Redis, prefix: str
) -> None:
    store = RedisStore(conn, prefix=prefix)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)

    async def load(key: str) -> object:
        return object()

    async with store, cache:
        await refuse(admin, "readonly")
        with pytest.raises(SerializationError):
            await cache.get("k", load)


async def test_strict_raises_redis_unavailable_when_redis_refuses_writes(
    conn: aredis.Redis, admin: aredis.Redis, prefix: str
) -> None:
    store = RedisStore(conn, prefix=prefix, strict=True)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    await refuse(admin, "readonly")
    with pytest.raises(RedisUnavailable) as info:
        await cache.get("k", Loader())
    assert isinstance(info.value.__cause__, ReadOnlyError)
    with pytest.raises(RedisUnavailable):
        await cache.invalidate("k")
    assert store.statistics().write_refusals == 2
    assert not store.statistics().refusing


async def test_an_outage_whose_replay_redis_refuses_does_not_fail_reads(
    private: RedisServer, prefix: str
) -> None:
    # the failover case: the connection drops (an outage), the client comes back to a
    # demoted node; the invalidation made during the outage is kept, reads go on
    conn = client(private.url, retry=None)
    admin = client(private.url)
    try:
        store = RedisStore(conn, prefix=prefix, retry_after=1.0)
        timer = store._guard.timer = FakeTimer()
        cache = pk.SWRCache(fresh=30, stale=60, store=store)
        assert await cache.get("k", Loader("old")) == "k:old"
        private.kill()
        await cache.invalidate("k")  # during the outage: local, replayed later
        assert store.statistics().degraded >= 1
        private.start()  # same port, no data
        await refuse(admin, "readonly")
        timer.now += 1.0
        assert await cache.get("j", Loader()) == "j:v1"  # the probe: replay refused
        assert await cache.get("k", Loader("new")) == "k:new"
        stats = store.statistics()
        assert stats.refusing
        assert stats.recoveries == 1
    finally:
        await conn.aclose()
        await admin.aclose()


async def test_a_lock_and_a_limiter_still_fail_when_redis_refuses_writes(
    conn: aredis.Redis, admin: aredis.Redis, prefix: str
) -> None:
    await refuse(admin, "readonly")
    with pytest.raises(ReadOnlyError):
        async with RedisLock(conn, f"{prefix}:lock"):
            pytest.fail("a lock Redis cannot write is not held")
    limiter = RedisLimiter(conn, f"{prefix}:lim", concurrency=1)
    with pytest.raises(ReadOnlyError):
        async with limiter:
            pytest.fail("a limiter slot Redis cannot write is not taken")


async def test_reads_and_near_cache_keep_working_on_a_read_only_replica(
    conn: aredis.Redis, admin: aredis.Redis, prefix: str
) -> None:
    store = RedisStore(conn, prefix=prefix)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    load = Loader()
    async with store, cache:
        assert await cache.get("k", load) == "k:v1"
        await refuse(admin, "readonly")
        for _ in range(5):
            assert await cache.get("k", load) == "k:v1"
        assert load.calls == 1
        await eventually(lambda: store.statistics().listening, "still subscribed")
