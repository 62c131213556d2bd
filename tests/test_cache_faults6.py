"""SWRCache fault review, sixth round: a store write failing after a good load, a
clock stepping backwards, ``@classmethod`` written above ``@cache.cached``, and a
user trying to break the cache."""

from __future__ import annotations

import logging
import sys
from collections.abc import Hashable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk
from parallelkit import CacheEntry

from .test_cache import FakeClock, Source

pytestmark = pytest.mark.anyio


class BrokenWrites:
    """A store without ``peek`` whose writes fail while ``broken`` is set."""

    def __init__(self) -> None:
        self.data: dict[Hashable, CacheEntry[Any]] = {}
        self.broken: Exception | None = None
        self.writes = 0

    async def get(self, key: Hashable) -> CacheEntry[Any] | None:
        await anyio.lowlevel.checkpoint()
        return self.data.get(key)

    async def set(self, key: Hashable, entry: CacheEntry[Any], *, ttl: float) -> None:
        self.writes += 1
        await anyio.lowlevel.checkpoint()
        if self.broken is not None:
            raise self.broken
        self.data[key] = entry

    async def delete(self, key: Hashable) -> None:
        if self.broken is not None:
            raise self.broken
        self.data.pop(key, None)

    async def clear(self) -> None:
        self.data.clear()


# ------------------------------------------------------------ 1. a failed store write
@pytest.mark.parametrize("bad", [TypeError("cannot encode Conversation"), ValueError("nan")])
async def test_a_value_the_store_cannot_encode_is_raised_to_the_callers(bad: Exception) -> None:
    """Not an outage of the store: a write that raises ``TypeError`` / ``ValueError``
    (a serializer's ``SerializationError``) says the value itself cannot be cached,
    on every call. It is the callers' error, raised to them as the load's, as before,
    and neither returned as if cached nor reported only in a log."""
    store, clock, src = BrokenWrites(), FakeClock(), Source()
    reported: list[Exception] = []
    cache = pk.SWRCache(
        fresh=10, stale=100, store=store, clock=clock, on_error=lambda k, e: reported.append(e)
    )
    store.broken = bad
    with pytest.raises(type(bad)) as caught:
        await cache.get("k", src)
    assert caught.value is bad
    assert reported == []  # the caller received it: not reported a second time
    stats = cache.statistics()
    assert stats.load_errors == 1
    assert stats.store_errors == 0


@pytest.mark.parametrize("entered", [True, False])
async def test_a_store_write_failing_after_a_good_load_returns_the_value(entered: bool) -> None:
    """A miss whose load succeeded but whose store write failed used to raise the
    write's error to every caller and count it as a load error (remembered under
    ``error_ttl``, so the next calls got it too without a load). The callers now get
    the loaded value; the write failure is a store error, counted once and handed
    once to ``on_error``, and nothing is remembered for ``error_ttl``."""
    store, clock, src = BrokenWrites(), FakeClock(), Source()
    errors: list[tuple[Hashable, Exception]] = []
    cache = pk.SWRCache(
        fresh=10,
        stale=100,
        store=store,
        clock=clock,
        error_ttl=60,
        on_error=lambda k, e: errors.append((k, e)),
    )
    down = ConnectionError("store down")
    store.broken = down

    async def run() -> list[Any]:
        results: list[Any] = [None] * 5

        async def one(i: int) -> None:
            results[i] = await cache.get("k", src)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
        return results

    if entered:
        async with cache:
            results = await run()
    else:
        results = await run()
    assert results == ["k@0"] * 5  # one shared load, every caller has its value
    assert src.calls == 1
    assert errors == [("k", down)]  # reported once, as what it is
    stats = cache.statistics()
    assert (stats.load_errors, stats.refresh_errors, stats.store_errors) == (0, 0, 1)
    # nothing cached, nothing remembered as a failed load: the next call loads again
    store.broken = None
    assert await cache.get("k", src) == "k@0"
    assert src.calls == 2
    assert store.data["k"].value == "k@0"
    assert cache.statistics().store_errors == 1


async def test_a_refresh_whose_store_write_fails_is_a_store_error_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refresh whose load succeeded but whose write failed is a store error (not
    a refresh error): logged once by default, naming the key; the stale value stays
    in service and the key backs off like after a failed refresh (a store that is
    down is not written on every stale hit)."""
    store, clock, src = BrokenWrites(), FakeClock(), Source()
    cache = pk.SWRCache(fresh=10, stale=100, store=store, clock=clock, backoff=5)
    async with cache:
        assert await cache.get("k", src) == "k@0"
        store.broken = ConnectionError("store down")
        src.version = 1
        clock.advance(20)  # stale
        with caplog.at_level(logging.WARNING, logger="parallelkit.cache"):
            assert await cache.get("k", src) == "k@0"
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert src.calls == 2
            for _ in range(10):  # backing off: no new refresh, no new write
                assert await cache.get("k", src) == "k@0"
                await anyio.lowlevel.checkpoint()
    assert src.calls == 2
    assert store.writes == 2
    stats = cache.statistics()
    assert (stats.refreshes, stats.refresh_errors, stats.load_errors) == (1, 0, 0)
    assert stats.store_errors == 1
    records = [r for r in caplog.records if r.name == "parallelkit.cache"]
    assert len(records) == 1
    assert "'k'" in records[0].getMessage()
    assert "store" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert records[0].exc_info[1] is store.broken


async def test_a_refresh_dropping_a_none_value_whose_delete_fails_returns_it() -> None:
    """``cache_none=False``: a refresh that returns ``None`` deletes the stale entry;
    when that delete fails the load still succeeded: a store error, not a refresh
    error, reported once."""
    store, clock = BrokenWrites(), FakeClock()
    errors: list[Exception] = []
    cache = pk.SWRCache(
        fresh=10,
        stale=100,
        store=store,
        clock=clock,
        cache_none=False,
        on_error=lambda k, e: errors.append(e),
    )
    value: str | None = "v"

    async def load(key: str) -> str | None:
        await anyio.lowlevel.checkpoint()
        return value

    assert await cache.get("k", load) == "v"
    value = None
    store.broken = ConnectionError("down")
    clock.advance(20)
    with pytest.warns(RuntimeWarning, match="not entered"):
        got = await cache.get("k", load)
    assert got is None  # the refresh's own (good) answer
    assert errors == [store.broken]
    stats = cache.statistics()
    assert (stats.refresh_errors, stats.load_errors, stats.store_errors) == (0, 0, 1)


# ------------------------------------------------------------- 2. a clock stepping back
@pytest.mark.parametrize("how", ["get", "cached", "no-peek"])
async def test_a_clock_stepping_back_does_not_extend_freshness(how: str) -> None:
    """An entry stamped at t=1000 (fresh 10 s) used to stay fresh until the clock
    read 1010 again: a step back of 100 s kept it fresh 110 s. An entry stamped
    after ``now`` is now served as stale: answered at once, and refreshed once
    (which stamps it in the new time)."""
    clock, src = FakeClock(), Source()
    store: pk.Store = BrokenWrites() if how == "no-peek" else pk.MemoryStore()
    cache = pk.SWRCache(fresh=10, stale=100, clock=clock, store=store)

    @cache.cached
    async def f(key: str) -> str:
        return await src(key)

    async def call() -> str:
        return await (f("k") if how == "cached" else cache.get("k", src))

    async with cache:
        assert await call() == "k@0"
        src.version = 1
        clock.now -= 100  # NTP, a VM resumed, a test clock reset
        assert await call() == "k@0"  # served (stale), one refresh started
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert src.calls == 2
        assert await call() == "k@1"  # stamped in the new time: fresh again
        clock.advance(9)
        assert await call() == "k@1"
        assert src.calls == 2
    stats = cache.statistics()
    assert (stats.stale_hits, stats.refreshes) == (1, 1)


async def test_a_clock_stepping_back_does_not_extend_a_backoff_or_error_ttl() -> None:
    """The failures the cache remembers (a refresh's back-off, a load's
    ``error_ttl``) are timed on the same clock: one recorded after ``now`` is
    forgotten instead of lasting the size of the step longer."""
    clock, src = FakeClock(), Source()
    cache = pk.SWRCache(
        fresh=10, stale=1000, clock=clock, error_ttl=5, backoff=5, on_error=lambda k, e: None
    )
    async with cache:
        src.fail = ValueError("down")
        with pytest.raises(ValueError, match="down"):
            await cache.get("miss", src)
        clock.now -= 100
        src.fail = None
        assert await cache.get("miss", src) == "miss@0"  # not the remembered error
        assert await cache.get("k", src) == "k@0"
        clock.advance(20)  # stale
        src.fail = ValueError("refresh down")
        assert await cache.get("k", src) == "k@0"
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert cache.statistics().refresh_errors == 1
        src.fail = None
        src.version = 1
        clock.now -= 100  # the entry is now in the future: stale, and the back-off too
        assert await cache.get("k", src) == "k@0"
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert await cache.get("k", src) == "k@1"


# ----------------------------------------------- 3. @classmethod above @cache.cached
async def test_classmethod_above_cached_passes_the_class_and_keys_by_it() -> None:
    """``@classmethod`` written above ``@cache.cached`` (the usual order). Calls pass
    the class, and the class is in the key (a subclass has its own entries), on
    every Python. ``Cls.method.key`` / ``.invalidate`` work where ``classmethod``
    binds what it wraps (before 3.13); on 3.13 it no longer does, and they used to
    build a key without the class (``invalidate(5)`` silently forgot nothing): they
    now raise a ``TypeError`` that says to write ``@cache.cached`` above."""
    cache = pk.SWRCache(fresh=10, stale=10)
    calls: list[tuple[str, int]] = []

    class Base:
        table = "base"

        @classmethod
        @cache.cached
        async def count(cls, limit: int = 5) -> str:
            calls.append((cls.table, limit))
            return f"{cls.table}:{limit}"

    class Child(Base):
        table = "child"

    async with cache:
        assert await Base.count() == "base:5"
        assert await Base().count(5) == "base:5"
        assert await Child.count(limit=5) == "child:5"
        assert await Child().count() == "child:5"
        assert calls == [("base", 5), ("child", 5)]
        store = cache.store
        assert isinstance(store, pk.MemoryStore)
        test = "test_classmethod_above_cached_passes_the_class_and_keys_by_it"
        name = f"{__name__}.{test}.<locals>.Base.count"
        assert store.peek((name, Base, 5)) is not None
        assert store.peek((name, Child, 5)) is not None
        if sys.version_info < (3, 13):
            assert Child.count.key() == (name, Child, 5)
            await Child.count.invalidate(5)
            assert await Child.count() == "child:5"
            assert calls == [("base", 5), ("child", 5), ("child", 5)]
        else:
            with pytest.raises(TypeError, match=r"@cache.cached above @classmethod"):
                Child.count.key()
            with pytest.raises(TypeError, match=r"@cache.cached above @classmethod"):
                await Child.count.invalidate(5)
            with pytest.raises(TypeError, match=r"@cache.cached above @classmethod"):
                await Child.count.invalidate(limit=5)
            await Child.count.invalidate(Child, 5)  # the class given: the right key
            assert await Child.count() == "child:5"
            assert calls == [("base", 5), ("child", 5), ("child", 5)]


async def test_a_failed_write_a_store_counted_itself_is_not_counted_twice() -> None:
    """A store that counts its own errors and raises (``RedisStore(strict=True)``):
    ``store_errors`` counts the failed write once, not once per counter."""

    class CountingStore(BrokenWrites):
        errors = 0

        async def set(self, key: Hashable, entry: CacheEntry[Any], *, ttl: float) -> None:
            if self.broken is not None:
                self.errors += 1
            await super().set(key, entry, ttl=ttl)

    store, errors = CountingStore(), []
    cache = pk.SWRCache(store=store, on_error=lambda k, e: errors.append(k))
    store.broken = ConnectionError("down")
    assert await cache.get("k", Source()) == "k@0"
    assert cache.statistics().store_errors == 1
    assert errors == ["k"]


# ------------------------------------------------------------------ 4. huge keys
async def test_a_huge_key_is_cut_short_in_errors_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key can be huge (a long text, a big tuple). The messages that name it used
    to carry its whole ``repr`` (megabytes in a log line or an exception); they now
    show the start of it."""
    cache = pk.SWRCache(fresh=10, stale=100, clock=(clock := FakeClock()))
    huge_list = list(range(1_000_000))
    with pytest.raises(TypeError, match="key must be hashable") as info:
        await cache.get(("t", huge_list), Source())
    assert len(str(info.value)) < 1_000

    @cache.cached
    async def f(rows: object) -> int:
        return 1

    with pytest.raises(TypeError, match="must be hashable") as info:
        await f(huge_list)
    assert len(str(info.value)) < 1_000

    huge = "x" * 1_000_000
    src = Source()
    async with cache:
        assert await cache.get(huge, src) == f"{huge}@0"
        clock.advance(20)
        src.fail = ValueError("down")
        with caplog.at_level(logging.WARNING, logger="parallelkit.cache"):
            assert await cache.get(huge, src) == f"{huge}@0"
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
    records = [r for r in caplog.records if r.name == "parallelkit.cache"]
    assert len(records) == 1
    assert "'xxxx" in records[0].getMessage()
    assert len(records[0].getMessage()) < 1_000


# ------------------------------------------------------------ 5. a user trying to break it
async def test_a_stampede_of_distinct_keys_keeps_maxsize_and_consistent_stats() -> None:
    """1,000 distinct keys at once, some failing, on a ``maxsize=10`` cache: the
    store and the failures remembered stay within 10, nothing is left in flight,
    only values are stored (no error), and the counters add up (every call is a
    hit or a miss; every miss flight is one load; every failed one one load error)."""
    cache = pk.SWRCache(fresh=10, stale=100, maxsize=10, error_ttl=5, clock=FakeClock())

    async def load(key: int) -> int:
        await anyio.lowlevel.checkpoint()
        if key % 3 == 0:
            raise ValueError(key)
        return key

    failed = 0

    async def one(key: int) -> None:
        nonlocal failed
        try:
            assert await cache.get(key, load) == key
        except ValueError:
            failed += 1

    async with cache, anyio.create_task_group() as tg:
        for key in range(1_000):
            tg.start_soon(one, key)
            tg.start_soon(one, key)  # a second caller of each key joins its flight
    store = cache.store
    assert isinstance(store, pk.MemoryStore)
    assert len(store) <= 10
    assert len(cache._loads._failed) <= 10
    assert not cache._loads.flights
    assert len(cache._loads.writes) == 0
    stats = cache.statistics()
    assert failed == 2 * 334
    assert stats.misses == 2_000
    assert stats.hits + stats.stale_hits == 0
    assert stats.loads == 1_000
    assert stats.load_errors == 334
    # (MemoryStore stores every load whose own key was not written meanwhile: the
    # 666 values went in, the least recently used of them evicted)
    assert stats.evictions <= 666 - len(store)
    assert all(entry.value % 3 for entry in store._data.values())
    assert (stats.refreshes, stats.refresh_errors, stats.store_errors) == (0, 0, 0)


async def test_an_invalidation_during_a_refresh_keeps_its_value_out() -> None:
    """``invalidate(key)`` while the key's background refresh runs: the refresh ends
    (counted) but stores nothing; the next call loads anew, and a refresh failing
    after the invalidation is still reported once."""
    clock, src = FakeClock(), Source()
    errors: list[Exception] = []
    cache = pk.SWRCache(fresh=10, stale=100, clock=clock, on_error=lambda k, e: errors.append(e))
    async with cache:
        assert await cache.get("k", src) == "k@0"
        clock.advance(20)
        src.gate, src.version = anyio.Event(), 1
        assert await cache.get("k", src) == "k@0"  # stale; the refresh waits on the gate
        while src.started < 2:
            await anyio.lowlevel.checkpoint()
        await cache.invalidate("k")
        src.version = 2
        src.gate.set()
        while cache._loads.flights:
            await anyio.lowlevel.checkpoint()
        src.gate = None
        assert await cache.get("k", src) == "k@2"  # not the refresh's k@1
        # once more, with the refresh failing after the invalidation
        clock.advance(20)
        src.gate, src.fail = anyio.Event(), ValueError("down")
        assert await cache.get("k", src) == "k@2"
        while src.started < 4:
            await anyio.lowlevel.checkpoint()
        await cache.invalidate("k")
        src.gate.set()
        while cache._loads.flights:
            await anyio.lowlevel.checkpoint()
    assert errors == [src.fail]
    stats = cache.statistics()
    assert (stats.refreshes, stats.refresh_errors, stats.loads) == (2, 1, 2)


async def test_a_cache_serves_after_exit_and_refreshes_in_the_background_again() -> None:
    """After ``async with cache`` ends, calls still work (a stale hit refreshes
    inline, with the one-time warning); entered again, refreshes go back to the
    background; entering it while entered is refused with what to do instead."""
    clock, src = FakeClock(), Source()
    cache = pk.SWRCache(fresh=10, stale=100, clock=clock)
    async with cache:
        assert await cache.get("k", src) == "k@0"
        with pytest.raises(RuntimeError, match="already entered"):
            async with cache:
                pass
    clock.advance(20)
    src.version = 1
    with pytest.warns(RuntimeWarning, match="not entered"):
        assert await cache.get("k", src) == "k@1"  # refreshed inline
    clock.advance(20)
    src.version, src.gate = 2, anyio.Event()
    async with cache:
        assert await cache.get("k", src) == "k@1"  # stale: served, refresh in background
        while src.started < 3:
            await anyio.lowlevel.checkpoint()
        src.gate.set()
        while cache._loads.flights:
            await anyio.lowlevel.checkpoint()
        assert await cache.get("k", src) == "k@2"
    assert cache.statistics().refreshes == 2
