"""RedisStore's near cache, "invalidation wins" across processes, and a Redis that hangs."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import anyio
import pytest
import redis.asyncio as aredis
from redis.exceptions import TimeoutError as RedisTimeoutError

import parallelkit as pk
from parallelkit.redis import RedisLimiter, RedisLock, RedisStore, RedisUnavailable
from parallelkit.redis._near import NearCache, invalidation

from .redis_helpers import (
    Commands,
    FakeTimer,
    RedisServer,
    client,
    entry,
    eventually,
    heard,
    start_workers,
    stop_workers,
    wait_workers,
)

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    # redis-py's asyncio client runs on asyncio only (see test_redis_store.py)
    return "asyncio"


class Loader:
    """A loader that counts its calls and says which call made the value."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, key: Hashable) -> str:
        self.calls += 1
        return f"{key} #{self.calls}"


async def warm(store: RedisStore, cache: pk.SWRCache, key: str, loader: Loader) -> Any:
    """Read ``key`` through the cache until it sits in the store's near cache."""
    value = await cache.get(key, loader)
    with anyio.fail_after(30):
        while store.peek(key) is None:
            value = await cache.get(key, loader)
    return value


# ------------------------------------------------------------------ the near tier
async def test_a_hot_key_hit_costs_no_round_trip(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(r, prefix=prefix)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    loader = Loader()
    async with store, cache:
        assert store.statistics().listening
        value = await warm(store, cache, "hot", loader)
        commands = Commands(r, monkeypatch)
        before = store.statistics().near_hits
        for _ in range(100):
            assert await cache.get("hot", loader) == value
        assert commands.count == 0  # not one command reached Redis
        assert store.statistics().near_hits == before + 100
    assert loader.calls == 1
    assert not store.statistics().listening
    assert store.statistics().near_size == 0  # leaving the store empties it


async def test_without_async_with_there_is_no_near_cache(r: aredis.Redis, prefix: str) -> None:
    store = RedisStore(r, prefix=prefix)
    await store.set("k", entry("v"), ttl=10)
    got = await store.get("k")
    assert got is not None
    assert store.peek("k") is None  # nothing would tell this process about invalidations
    stats = store.statistics()
    assert (stats.listening, stats.near_size, stats.hits) == (False, 0, 1)


async def test_near_maxsize_none_turns_it_off(r: aredis.Redis, prefix: str) -> None:
    store = RedisStore(r, prefix=prefix, near_maxsize=None)
    async with store:
        await store.set("k", entry("v"), ttl=10)
        assert await store.get("k") is not None
        assert store.peek("k") is None
        assert not store.statistics().listening


async def test_the_near_cache_is_bounded(r: aredis.Redis, prefix: str) -> None:
    store = RedisStore(r, prefix=prefix, near_maxsize=3)
    async with store:
        for i in range(10):
            await store.set(i, entry(i), ttl=10)
        await heard(store, 10)
        for i in range(10):
            assert await store.get(i) is not None
        assert store.statistics().near_size == 3
        assert len(store._near.index) == 3  # the reverse index is bounded with it
        assert [store.peek(i) is not None for i in range(10)] == [False] * 7 + [True] * 3


async def test_invalidate_on_one_replica_reaches_the_other(r: aredis.Redis, prefix: str) -> None:
    a, b = RedisStore(r, prefix=prefix), RedisStore(r, prefix=prefix)
    cache_a = pk.SWRCache(fresh=30, stale=60, store=a)
    cache_b = pk.SWRCache(fresh=30, stale=60, store=b)
    loader = Loader()
    async with a, b, cache_a, cache_b:
        old = await warm(b, cache_b, "c1", loader)
        await cache_a.invalidate("c1")
        await eventually(lambda: b.peek("c1") is None, "b's near entry dropped")
        assert b.statistics().near_invalidations >= 1
        assert await cache_b.get("c1", loader) != old  # loaded again

        # a write (a load, cache.set) by one replica drops the others' copies too
        await warm(b, cache_b, "c2", loader)
        await cache_a.set("c2", "set by a")
        await eventually(lambda: b.peek("c2") is None, "b's copy dropped after a's set")
        assert await cache_b.get("c2", loader) == "set by a"


async def test_clear_empties_every_near_cache(r: aredis.Redis, prefix: str) -> None:
    a, b = RedisStore(r, prefix=prefix), RedisStore(r, prefix=prefix)
    async with a, b:
        for i in range(5):
            await a.set(i, entry(i), ttl=10)  # each set is an invalidation for b, too
        await eventually(lambda: b.statistics().near_invalidations == 5, "b heard the sets")
        for i in range(5):
            assert await b.get(i) is not None
        assert b.statistics().near_size == 5
        await a.clear()
        await eventually(lambda: b.statistics().near_size == 0, "b emptied by a's clear")
        assert [await b.get(i) for i in range(5)] == [None] * 5


async def test_near_ttl_bounds_what_a_lost_message_leaves_stale(
    r: aredis.Redis, prefix: str
) -> None:
    store = RedisStore(r, prefix=prefix, near_ttl=5)
    timer = FakeTimer()
    store._near.timer = timer
    async with store:
        await store.set("k", entry("old"), ttl=60)
        await heard(store, 1)  # its own set's message: it would drop the copy read next
        assert await store.get("k") is not None
        await r.delete(store.redis_key("k"))  # behind the store's back: no message
        timer.now += 3.9
        store._near.sweep()  # (the listening task sweeps at least every second)
        stale = store.peek("k")
        assert stale is not None  # within near_ttl the lost invalidation is not seen
        assert stale.value == "old"
        timer.now += 0.2  # the next sweep would come after near_ttl: this one drops it
        await eventually(lambda: store.peek("k") is None, "swept by the listening task")
        assert await store.get("k") is None


def test_a_read_overtaken_by_an_invalidation_is_not_kept() -> None:
    near = NearCache("chan", 10, 5.0)
    near.reset(listening=True)
    ticket = near.begin("'k'")  # a read of k is sent...
    near.received(invalidation("'k'"))  # ...an invalidation of k arrives...
    near.put("k", "'k'", entry("old"), ticket, b"old")  # ...then the read's (maybe old) value
    near.end("'k'")
    assert near.entries == {}
    ticket = near.begin("'k'")
    near.put("k", "'k'", entry("new"), ticket, b"new")
    near.end("'k'")
    assert near.entries["k"].value == "new"
    near.received(invalidation("'k'"))
    assert (near.entries, near.meta, near.index) == ({}, {}, {})
    ticket = near.begin("'k'")
    near.drop("j", "'j'")  # this process writes k while the read is out: not kept
    near.drop("k", "'k'")
    near.put("k", "'k'", entry("v"), ticket, b"v")
    near.end("'k'")
    assert near.entries == {}
    ticket = near.begin("'k'")
    near.reset(listening=True)  # a reset (a clear, a new subscription) voids every read
    near.put("k", "'k'", entry("v"), ticket, b"v")
    near.end("'k'")
    assert near.entries == {}
    near.reset(listening=False)
    near.put("k", "'k'", entry("v"), near.begin("'k'"), b"v")  # not subscribed: never kept
    near.end("'k'")
    assert near.entries == {}
    assert (near.watchers, near.marks) == ({}, {})  # nothing kept once no read is out


def test_an_invalidation_of_another_key_does_not_void_a_read() -> None:
    """Per key: a burst of refreshes of other keys (a message each) must not make
    every read in flight pay for nothing (with one counter for all keys it did)."""
    near = NearCache("chan", 10, 5.0)
    near.reset(listening=True)
    ticket = near.begin("'k'")
    for other in range(50):
        near.received(invalidation(f"'o{other}'"))
        near.drop(f"w{other}", f"'w{other}'")
    assert near.current("'k'", ticket)
    near.put("k", "'k'", entry("v"), ticket, b"v")
    near.end("'k'")
    assert near.entries["k"].value == "v"


def test_a_write_of_this_process_is_kept_unless_a_message_overtook_it() -> None:
    near = NearCache("chan", 10, 5.0)
    near.reset(listening=True)
    near.put("k", "'k'", entry("old"), near.begin("'k'"), b"old")  # k, read before
    near.end("'k'")
    read = near.begin("'k'")  # a read of k is sent (it may see the old bytes)...
    ticket = near.begin("'k'")  # ...and this process writes k (a load's conditional set)
    assert near.entries["k"].value == "old"  # the old entry serves while the write is out
    near.wrote("k", "'k'", entry("new"), ticket, b"new")  # the write's reply: kept
    near.end("'k'")
    near.put("k", "'k'", entry("old"), read, b"old")  # the read's answer: not kept over it
    near.end("'k'")
    assert near.entries["k"].value == "new"
    near.received(invalidation("'k'"))  # the write's own message: skipped
    assert near.entries["k"].value == "new"
    near.received(invalidation("'k'"))  # the next is another write's: dropped
    assert (near.entries, near.own) == ({}, {})

    ticket = near.begin("'k'")  # the write's own message arrives before its reply
    near.received(invalidation("'k'"))  # (another connection): it cannot be told apart
    near.wrote("k", "'k'", entry("new"), ticket, b"new")
    near.end("'k'")
    assert (near.entries, near.own) == ({}, {})  # so nothing is kept, nothing skipped

    ticket = near.begin("'k'")
    near.wrote("k", "'k'", entry("new"), ticket, b"new")
    near.end("'k'")
    near.reset(listening=True)  # the subscription changed: its message may be lost
    assert (near.entries, near.own) == ({}, {})  # so no later message is skipped
    near.reset(listening=False)
    near.wrote("k", "'k'", entry("new"), near.begin("'k'"), b"new")  # not subscribed
    near.end("'k'")
    assert (near.entries, near.own, near.watchers, near.marks) == ({}, {}, {}, {})


async def test_a_load_keeps_what_it_stored_for_its_next_readers(
    r: aredis.Redis, prefix: str
) -> None:
    store = RedisStore(r, prefix=prefix)
    other = RedisStore(r, prefix=prefix)  # another process
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    loads = 0

    async def load(key: str) -> str:
        nonlocal loads
        loads += 1
        return f"v{loads}"

    async with store, cache:
        assert await cache.get("k", load) == "v1"  # a miss: loaded and stored
        await heard(store, 1)  # its own write's message came back...
        kept = store.peek("k")
        assert kept is not None  # ...and did not drop what the write stored
        assert kept.value == "v1"
        gets = store.statistics().hits + store.statistics().misses
        assert await cache.get("k", load) == "v1"
        assert store.statistics().hits + store.statistics().misses == gets  # no GET
        await other.delete("k")  # another process invalidates it: that message drops it
        await heard(store, 2)
        assert store.peek("k") is None
        assert await cache.get("k", load) == "v2"
    assert loads == 2


# ------------------------------------------------------------------ renewal of near entries
async def test_near_entries_are_renewed_by_one_check_not_a_get_per_reader(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(r, prefix=prefix, near_ttl=5)  # sweeps (and renews) every 1 s
    timer = FakeTimer()
    store._near.timer = timer
    start = timer.now
    async with store:
        for key in ("hot", "other"):
            await store.set(key, entry(key), ttl=60)
        await heard(store, 2)  # their own sets' messages: they would drop what is read next
        assert await store.get("hot") is not None
        assert await store.get("other") is not None
        timer.now = start + 2.9
        await store._renew()  # (what the store's renewing task does every interval)
        assert store.statistics().near_renewals == 0  # not due yet: 5 > 2.9 + 2 x 1 s
        timer.now = start + 3.5  # both due within two sweep intervals
        commands = Commands(r, monkeypatch)
        await store._renew()
        assert commands.count == 1  # one MGET for both
        assert store.statistics().near_renewals == 2
        assert store._near.meta["hot"][0] == start + 3.5 + 5  # read again at the check
        timer.now = start + 4.5
        store._near.sweep()
        hot = store.peek("hot")
        assert hot is not None  # no GET for its next readers
        assert hot.value == "hot"

        # changed behind the store's back (no message): the check drops it
        await r.set(store.redis_key("hot"), await r.get(store.redis_key("other")))
        await r.delete(store.redis_key("other"))  # and gone: dropped too
        timer.now = start + 7.0
        assert store.peek("hot") is not None  # within near_ttl of the last check
        await store._renew()
        assert store.peek("hot") is None
        assert store.peek("other") is None
        assert store.statistics().near_renewals == 2
        got = await store.get("hot")
        assert got is not None
        assert got.value == "other"


def test_a_renewal_is_refused_when_overtaken_or_out_of_order() -> None:
    near = NearCache("chan", 10, 5.0)
    timer = FakeTimer(0.0)
    near.timer = timer
    near.reset(listening=True)

    def fill(key: str, raw: bytes) -> None:
        near.put(key, f"'{key}'", entry(key), near.begin(f"'{key}'"), raw)
        near.end(f"'{key}'")

    fill("k", b"v")  # expires at 5
    timer.now = 2.9
    assert near.due() == []  # not due yet (5 > 2.9 + 2 intervals of 1 s)
    timer.now = 3.5
    batch = near.due()
    assert batch == [("k", "'k'", b"v")]
    near.received(invalidation("'k'"))  # k invalidated while the check is out
    near.renew(batch, [b"v"], 3.5)
    assert (near.renewals, near.entries) == (0, {})  # dropped, and not brought back

    timer.now = 0.0
    fill("k", b"v")  # read again: expires at 5
    timer.now = 3.5
    batch = near.due()
    fill("k", b"v2")  # read again (a newer value) while the check is out
    near.renew(batch, [b"v"], 3.5)  # the check saw the older bytes: not renewed
    assert (near.renewals, near.meta["k"][0], near.meta["k"][2]) == (0, 8.5, b"v2")

    timer.now = 0.0
    fill("k", b"v")
    timer.now = 3.5
    batch = near.due()
    timer.now = 3.6
    fill("j", b"j")  # filled while a check is out (expires at 8.6)
    near.renew(batch, [b"v"], 3.5)  # k would expire before j, after it
    assert (near.renewals, list(near.meta)) == (0, ["k", "j"])

    near.renew(batch, [b"v"], 3.6)
    assert (near.renewals, list(near.meta), near.meta["k"][0]) == (1, ["j", "k"], 8.6)
    near.renew([("j", "'j'", b"j")], [None], 3.6)  # gone from Redis: dropped
    assert (near.renewals, list(near.meta), list(near.index)) == (1, ["k"], ["'k'"])


def test_a_renewal_check_is_cut_into_bounded_commands() -> None:
    from parallelkit.redis._store import _parts

    small = [(i, f"'{i}'", b"x") for i in range(1200)]
    assert [len(p) for p in _parts(small)] == [500, 500, 200]
    big = b"x" * 600_000
    mixed = [
        ("a", "'a'", big),
        ("b", "'b'", big),
        ("c", "'c'", b"x"),
        ("d", "'d'", b"x" * 3_000_000),
    ]
    assert [[k for k, _, _ in p] for p in _parts(mixed)] == [["a"], ["b", "c"], ["d"]]
    assert _parts([]) == []


async def test_an_entered_store_renews_its_hot_entries_in_the_background(
    r: aredis.Redis, prefix: str
) -> None:
    store = RedisStore(r, prefix=prefix, near_ttl=0.3)  # renewal rounds every 0.15 s
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    loader = Loader()
    async with store, cache:
        with anyio.fail_after(30):
            while store.statistics().near_renewals < 3:
                assert await cache.get("hot", loader) == "hot #1"
                await anyio.sleep(0.01)
        assert store.statistics().near_renewal_errors == 0
    assert loader.calls == 1


# ------------------------------------------------------------------ lost subscriptions
@pytest.mark.slow
async def test_a_redis_restart_empties_the_near_cache(server: RedisServer, prefix: str) -> None:
    conn = client(server.url, retry=None, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        store = RedisStore(conn, prefix=prefix, retry_after=0.1, command_timeout=0.5)
        async with store:
            await store.set("k", entry("before"), ttl=60)
            await heard(store, 1)
            assert await store.get("k") is not None
            assert store.peek("k") is not None
            server.kill()  # the restart loses the data, and every message meanwhile
            await eventually(lambda: not store.statistics().listening, "subscription lost")
            assert store.peek("k") is None
            server.start()
            await eventually(lambda: store.statistics().listening, "subscribed again")
            assert store.statistics().near_resets == 1
            assert store.peek("k") is None
            await eventually_async(lambda: store.get("k"), None)
    finally:
        await conn.aclose()


async def eventually_async(read: Any, expected: Any) -> None:
    with anyio.fail_after(30):
        while await read() != expected:
            await anyio.sleep(0.05)


# ------------------------------------------------------------------ a Redis that hangs
@pytest.mark.slow
async def test_a_hung_redis_costs_one_command_timeout_then_degrades(
    server: RedisServer, prefix: str
) -> None:
    # the client alone would wait a minute for the paused server
    conn = client(server.url, retry=None, socket_connect_timeout=60, socket_timeout=60)
    raw = client(server.url)
    try:
        store = RedisStore(conn, prefix=prefix, command_timeout=0.2, retry_after=30)
        timer = FakeTimer()
        store._guard.timer = timer
        cache = pk.SWRCache(fresh=30, stale=60, store=store)
        loader = Loader()
        async with store, cache:
            assert await cache.get("before", loader) == "before #1"
            server.pause()  # ---- Redis stops answering, its sockets stay open
            values = [await cache.get(f"k{i}", loader) for i in range(5)]
            assert values == [f"k{i} #{i + 2}" for i in range(5)]
            assert [await cache.get(f"k{i}", loader) for i in range(5)] == values  # local
            stats = store.statistics()
            assert (stats.timeouts, stats.errors) == (1, 1)  # one command waited, once
            assert stats.degraded >= 10
            assert isinstance(store._guard.last_error, TimeoutError)
            # the near cache's subscription notices the silence and stops serving
            await eventually(lambda: not store.statistics().listening, "near cache off")

            server.resume()  # ---- Redis answers again
            timer.now += 31  # past retry_after: the next call tries Redis
            assert await cache.get("after", loader) == "after #7"
            assert await raw.exists(store.redis_key("after")) == 1
            assert store.statistics().recoveries == 1
            await eventually(lambda: store.statistics().listening, "near cache back")
    finally:
        await conn.aclose()
        await raw.aclose()


@pytest.mark.slow
async def test_a_hung_redis_and_the_limiter_and_lock(server: RedisServer, prefix: str) -> None:
    conn = client(server.url, retry=None, socket_connect_timeout=60, socket_timeout=60)
    try:
        limiter = RedisLimiter(
            conn, "api", concurrency=2, prefix=prefix, command_timeout=0.2, retry_after=30
        )
        async with limiter:
            pass
        server.pause()
        for _ in range(3):
            async with limiter:  # fail="local": served by the in-process fallback
                pass
        stats = limiter.statistics()
        assert (stats.redis_errors, stats.fallbacks, stats.held) == (1, 3, 0)
        with pytest.raises(RedisUnavailable, match="acquiring the lock") as info:
            async with RedisLock(conn, "job", prefix=prefix, command_timeout=0.2):
                pytest.fail("must not run")
        assert isinstance(info.value.__cause__, (TimeoutError, RedisTimeoutError))
        server.resume()
    finally:
        await conn.aclose()


# ------------------------------------------------------------------ processes
@pytest.mark.slow
async def test_an_invalidation_reaches_every_process(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    procs = start_workers("near", redis_url, prefix, 3)
    try:
        with anyio.fail_after(60):
            while int(await r.get(f"{prefix}:ready") or 0) < 3:
                await anyio.sleep(0.02)
        await RedisStore(r, prefix=prefix).delete("hot")  # what cache.invalidate does
        results = wait_workers(procs)
    finally:
        stop_workers(procs)
    for res in results:
        assert res["near_hits"] > 0  # it served from process memory before
        assert res["near_invalidations"] >= 1  # the message reached it
        assert res["second"] != res["first"]  # after it: a new load, never the old value


@pytest.mark.slow
@pytest.mark.parametrize("invalidate", [True, False])
async def test_a_load_older_than_an_invalidation_is_not_stored_across_processes(
    r: aredis.Redis, redis_url: str, prefix: str, invalidate: bool
) -> None:
    store = RedisStore(r, prefix=prefix)
    await store.set("k", entry("current"), ttl=60)
    procs = start_workers("token", redis_url, prefix, 2)
    try:
        with anyio.fail_after(60):  # both loads have started
            while int(await r.get(f"{prefix}:started") or 0) < 2:
                await anyio.sleep(0.02)
        if invalidate:
            await store.delete("k")
        await r.set(f"{prefix}:go", 1)
        results = wait_workers(procs)
    finally:
        stop_workers(procs)
    got = await store.get("k")
    if invalidate:
        assert [res["stored"] for res in results] == [False, False]
        assert got is None  # the invalidation was not undone
    else:
        assert [res["stored"] for res in results] == [True, True]
        assert got is not None
        assert got.value == "from the old load"


@pytest.mark.slow
async def test_invalidate_wins_over_a_load_in_another_process(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    store = RedisStore(r, prefix=prefix)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    (proc,) = start_workers("slowload", redis_url, prefix, 1)
    try:
        with anyio.fail_after(60):  # the other process's load of "k" has started
            while not await r.get(f"{prefix}:loading"):
                await anyio.sleep(0.02)
        async with store, cache:
            await cache.invalidate("k")
        await r.set(f"{prefix}:go", 1)
        (result,) = wait_workers([proc])
    finally:
        stop_workers([proc])
    assert result["value"] == "from the old load"  # its caller still got its value ...
    assert await store.get("k") is None  # ... but it did not undo the invalidation
