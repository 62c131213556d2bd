"""SWRCache: windows, single flight, stale-if-error, invalidation, lifecycle, keys."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

import parallelkit as pk
from parallelkit import CacheEntry, MemoryStore, SWRCache

pytestmark = pytest.mark.anyio

NOT_ENTERED = pytest.warns(RuntimeWarning, match="not entered")


class FakeClock:
    """An injectable clock: tests move time by hand, nothing sleeps through a window."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Source:
    """A loader that counts calls, can be gated, and can fail on demand."""

    def __init__(self) -> None:
        self.calls = 0
        self.version = 0
        self.gate: anyio.Event | None = None
        self.fail: Exception | None = None
        self.started = 0
        self.cancelled = 0

    async def __call__(self, key: Hashable) -> str:
        self.calls += 1
        self.started += 1
        version = self.version
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await anyio.lowlevel.checkpoint()
        except BaseException:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        return f"{key}@{version}"


def make(**kwargs: Any) -> tuple[SWRCache, FakeClock, Source]:
    clock = FakeClock()
    kwargs.setdefault("fresh", 10.0)
    kwargs.setdefault("stale", 100.0)
    return SWRCache(clock=clock, **kwargs), clock, Source()


async def run_many(n: int, fn: Any, *args: Any) -> list[Any]:
    results: list[Any] = [None] * n

    async def one(i: int) -> None:
        try:
            results[i] = await fn(*args)
        except Exception as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return results


# ---------------------------------------------------------------------------- windows
async def test_fresh_hit_does_not_load() -> None:
    cache, clock, src = make()
    async with cache:
        assert await cache.get("k", src) == "k@0"
        src.version = 1
        clock.advance(9.9)
        assert await cache.get("k", src) == "k@0"
    assert src.calls == 1
    s = cache.stats
    assert (s.hits, s.misses, s.loads, s.refreshes) == (1, 1, 1, 0)
    assert s.hit_rate == 0.5


async def test_stale_serves_at_once_and_refreshes_once_for_1000_callers() -> None:
    cache, clock, src = make()
    async with cache:
        await cache.get("k", src)
        clock.advance(50)  # stale
        src.version = 1
        src.gate = anyio.Event()
        results = await run_many(1000, cache.get, "k", src)
        assert results == ["k@0"] * 1000  # nobody waited for the refresh
        await wait_until(lambda: src.started == 2)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        assert src.calls == 2  # the first load + exactly one refresh, still gated
        src.gate.set()
        await wait_until(lambda: not cache._flights)
        assert await cache.get("k", src) == "k@1"
    s = cache.stats
    assert (s.refreshes, s.stale_hits, s.loads) == (1, 1000, 1)


async def test_past_stale_is_a_miss() -> None:
    cache, clock, src = make()
    async with cache:
        await cache.get("k", src)
        src.version = 1
        clock.advance(110.1)
        assert await cache.get("k", src) == "k@1"
    assert cache.stats.misses == 2
    assert cache.stats.loads == 2


async def test_cold_1000_concurrent_callers_share_one_load_entered() -> None:
    cache, _, src = make()
    src.gate = anyio.Event()
    async with cache, anyio.create_task_group() as tg:
        tg.start_soon(run_many, 1000, cache.get, "k", src)
        await wait_until(lambda: cache.stats.misses == 1000)
        src.gate.set()
    assert src.calls == 1
    assert cache.stats.loads == 1


async def test_cold_1000_concurrent_callers_share_one_load_not_entered() -> None:
    cache, _, src = make()
    results = await run_many(1000, cache.get, "k", src)
    assert results == ["k@0"] * 1000
    assert src.calls == 1


async def wait_until(cond: Any) -> None:
    with anyio.fail_after(5):
        while not cond():
            await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("entered", [True, False])
async def test_cancelled_waiter_does_not_cancel_the_load(entered: bool) -> None:
    cache, _, src = make()
    src.gate = anyio.Event()
    got: list[str] = []

    async def first(scope_box: list[anyio.CancelScope]) -> None:
        with anyio.CancelScope() as scope:
            scope_box.append(scope)
            await cache.get("k", src)  # the leader when not entered

    async def second() -> None:
        got.append(await cache.get("k", src))

    @asynccontextmanager
    async def maybe_entered() -> Any:
        if entered:
            async with cache:
                yield
        else:
            yield

    async with maybe_entered(), anyio.create_task_group() as tg:
        box: list[anyio.CancelScope] = []
        tg.start_soon(first, box)
        await wait_until(lambda: src.started == 1)
        tg.start_soon(second)
        await wait_until(lambda: cache.stats.misses == 2)
        box[0].cancel()
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        src.gate.set()
    assert got == ["k@0"]
    assert src.calls == 1  # the load was neither cancelled nor restarted
    assert src.cancelled == 0


async def test_cancelled_lone_leader_cancels_its_load() -> None:
    cache, _, src = make()
    src.gate = anyio.Event()
    with anyio.move_on_after(0.05):
        await cache.get("k", src)
    assert src.cancelled == 1
    src.gate = None
    assert await cache.get("k", src) == "k@0"  # a new flight, nothing stuck


async def test_miss_error_reaches_every_waiter_and_is_not_cached() -> None:
    cache, _, src = make()
    boom = ConnectionError("db down")
    src.fail = boom
    src.gate = anyio.Event()
    async with cache, anyio.create_task_group() as tg:
        results: list[Any] = []

        async def call() -> None:
            results.append(await run_many(100, cache.get, "k", src))

        tg.start_soon(call)
        await wait_until(lambda: cache.stats.misses == 100)
        src.gate.set()
    assert all(r is boom for r in results[0])  # the same exception object
    assert src.calls == 1
    src.fail, src.gate = None, None
    assert await cache.get("k", src) == "k@0"  # not cached
    assert cache.stats.load_errors == 1


async def test_error_ttl_remembers_a_failed_load() -> None:
    cache, clock, src = make(error_ttl=5.0)
    src.fail = KeyError("gone")
    for _ in range(3):
        with pytest.raises(KeyError):
            await cache.get("k", src)
    assert src.calls == 1
    clock.advance(5.1)
    src.fail = None
    assert await cache.get("k", src) == "k@0"


# ---------------------------------------------------------------------- stale-if-error
async def test_stale_if_error_with_backoff_and_on_error() -> None:
    errors: list[tuple[Hashable, Exception]] = []
    cache, clock, src = make(backoff=2.0, on_error=lambda k, e: errors.append((k, e)))
    async with cache:
        await cache.get("k", src)
        clock.advance(20)
        src.fail = TimeoutError("slow")
        assert await cache.get("k", src) == "k@0"  # stale served, refresh fails behind
        await wait_until(lambda: cache.stats.refresh_errors == 1)
        assert [k for k, _ in errors] == ["k"]
        assert isinstance(errors[0][1], TimeoutError)
        for _ in range(50):  # within the backoff: the failing source is left alone
            assert await cache.get("k", src) == "k@0"
        await anyio.lowlevel.checkpoint()
        assert src.calls == 2
        clock.advance(2.1)  # backoff over: one more attempt
        await cache.get("k", src)
        await wait_until(lambda: cache.stats.refresh_errors == 2)
        assert src.calls == 3
        clock.advance(2.1)  # doubled backoff (4 s) not over yet
        await cache.get("k", src)
        await anyio.lowlevel.checkpoint()
        assert src.calls == 3
        src.fail = None
        clock.advance(2.0)
        await cache.get("k", src)
        await wait_until(lambda: cache.stats.refreshes == 3 and not cache._flights)
        assert await cache.get("k", src) == "k@0"  # refreshed value is k@0 (version unchanged)
    assert cache.stats.refresh_errors == 2


async def test_default_on_error_logs_the_key(caplog: pytest.LogCaptureFixture) -> None:
    cache, clock, src = make()
    async with cache:
        await cache.get("the-key", src)
        clock.advance(20)
        src.fail = RuntimeError("nope")
        with caplog.at_level(logging.WARNING, logger="parallelkit.cache"):
            await cache.get("the-key", src)
            await wait_until(lambda: cache.stats.refresh_errors == 1)
    assert "'the-key'" in caplog.text


async def test_not_entered_stale_hit_refreshes_inline_and_warns_once() -> None:
    cache, clock, src = make()
    await cache.get("k", src)
    clock.advance(20)
    src.version = 1
    with NOT_ENTERED:
        assert await cache.get("k", src) == "k@1"  # waited for the refresh
    clock.advance(20)
    src.version = 2
    assert await cache.get("k", src) == "k@2"  # no second warning (filterwarnings=error)
    clock.advance(20)
    src.fail = OSError("down")
    assert await cache.get("k", src) == "k@2"  # stale-if-error inline too
    assert cache.stats.refresh_errors == 1


# --------------------------------------------------------------------- invalidation
async def test_invalidation_during_load_keeps_the_newer_value() -> None:
    cache, _, src = make()
    src.gate = anyio.Event()
    old: list[str] = []
    async with cache, anyio.create_task_group() as tg:

        async def slow_old() -> None:
            old.append(await cache.get("k", src))

        tg.start_soon(slow_old)
        await wait_until(lambda: src.started == 1)
        await cache.invalidate("k")  # e.g. the row was updated
        src.version = 1
        gate_old, src.gate = src.gate, None
        assert await cache.get("k", src) == "k@1"  # a new flight, not the old one
        gate_old.set()
    assert old == ["k@0"]  # the old caller gets what it asked for...
    assert await cache.get("k", src) == "k@1"  # ...but it did not overwrite the newer value


async def test_set_during_load_is_not_overwritten() -> None:
    cache, _, src = make()
    src.gate = anyio.Event()
    async with cache, anyio.create_task_group() as tg:
        tg.start_soon(cache.get, "k", src)
        await wait_until(lambda: src.started == 1)
        await cache.set("k", "manual")
        src.gate.set()
    assert await cache.get("k", src) == "manual"


async def test_clear_forgets_everything() -> None:
    cache, _, src = make()
    await cache.get("a", src)
    await cache.get("b", src)
    await cache.clear()
    await cache.get("a", src)
    assert src.calls == 3


# ------------------------------------------------------------------------- lifecycle
async def test_nothing_left_running_after_async_with() -> None:
    cache, clock, src = make()
    async with cache:
        await cache.get("k", src)
        clock.advance(20)
        src.gate = anyio.Event()  # the refresh will hang until cancelled
        await cache.get("k", src)
        await wait_until(lambda: src.started == 2)
    assert src.cancelled == 1  # leaving cancelled the pending refresh and awaited it
    assert not cache._flights
    assert cache._tg is None
    assert "entered=False" in repr(cache)


async def test_cannot_enter_twice() -> None:
    cache = SWRCache()
    async with cache:
        with pytest.raises(RuntimeError, match="already entered"):
            await cache.__aenter__()


async def test_miss_waiters_survive_the_cache_closing() -> None:
    cache, _, src = make()
    src.gate = anyio.Event()
    result: list[str] = []
    async with anyio.create_task_group() as outer:
        async with cache:

            async def waiter() -> None:
                result.append(await cache.get("k", src))

            outer.start_soon(waiter)
            await wait_until(lambda: src.started == 1)
        # the in-group load was cancelled by leaving; the waiter retries in its own task
        src.gate.set()
    assert result == ["k@0"]
    assert src.calls == 2


# ------------------------------------------------------------------- values & store
async def test_none_is_cached_by_default_and_optionally_not() -> None:
    calls = 0

    async def nothing(_: object) -> None:
        nonlocal calls
        calls += 1

    cache = SWRCache()
    assert await cache.get("k", nothing) is None
    assert await cache.get("k", nothing) is None
    assert calls == 1
    cache = SWRCache(cache_none=False)
    await cache.get("k", nothing)
    await cache.get("k", nothing)
    assert calls == 3


async def test_eviction_at_maxsize() -> None:
    cache, _, src = make(maxsize=3)
    for key in "abcd":
        await cache.get(key, src)
    assert cache.stats.evictions == 1
    await cache.get("a", src)  # the least recently used was dropped
    assert src.calls == 5
    assert isinstance(cache.store, MemoryStore)
    assert len(cache.store) == 3


async def test_jitter_shortens_fresh_within_bounds() -> None:
    cache, clock, src = make(fresh=100.0, jitter=0.2)
    for i in range(50):
        await cache.get(i, src)
    entries = [cache.store.peek(i) for i in range(50)]  # type: ignore[attr-defined]
    spans = {e.fresh_until - e.loaded_at for e in entries}
    assert all(80.0 <= s <= 100.0 for s in spans)
    assert len(spans) > 1
    assert all(e.stale_until - e.fresh_until == 100.0 for e in entries)
    assert clock() == 1000.0


class DictStore:
    """A store without ``peek``: the cache awaits ``get``; it has the load_lock hook."""

    def __init__(self) -> None:
        self.data: dict[Hashable, CacheEntry[Any]] = {}
        self.ttls: list[float] = []
        self.locked: list[Hashable] = []

    async def get(self, key: Hashable) -> CacheEntry[Any] | None:
        await anyio.lowlevel.checkpoint()
        return self.data.get(key)

    async def set(self, key: Hashable, entry: CacheEntry[Any], *, ttl: float) -> None:
        self.ttls.append(ttl)
        self.data[key] = entry

    async def delete(self, key: Hashable) -> None:
        self.data.pop(key, None)

    async def clear(self) -> None:
        self.data.clear()

    @asynccontextmanager
    async def load_lock(self, key: Hashable) -> Any:
        self.locked.append(key)
        yield


async def test_custom_store_with_load_lock() -> None:
    store = DictStore()
    clock = FakeClock()
    cache = SWRCache(fresh=5, stale=7, store=store, clock=clock)
    src = Source()
    assert isinstance(store, pk.Store)
    assert await cache.get("k", src) == "k@0"
    assert await cache.get("k", src) == "k@0"
    assert store.ttls == [12.0]
    assert store.locked == ["k"]
    # another "process" stored a fresh entry while we waited for the lock: no load
    store.data["j"] = CacheEntry("from-peer", clock(), clock() + 5, clock() + 12)
    real_get = store.get
    seen = 0

    async def racing_get(key: Hashable) -> CacheEntry[Any] | None:
        nonlocal seen
        seen += 1
        return None if seen == 1 else await real_get(key)

    store.get = racing_get  # type: ignore[method-assign]
    assert await cache.get("j", src) == "from-peer"
    assert src.calls == 1


async def test_store_counters_are_reported() -> None:
    class CountingStore(DictStore):
        evictions = 4
        errors = 2

    stats = SWRCache(store=CountingStore()).stats
    assert (stats.evictions, stats.store_errors) == (4, 2)
    assert SWRCache(store=DictStore()).stats.store_errors == 0


async def test_store_clock_is_used() -> None:
    class ClockStore(DictStore):
        clock = staticmethod(lambda: 5.0)

    store = ClockStore()
    cache = SWRCache(store=store)
    await cache.get("k", Source())
    assert store.data["k"].loaded_at == 5.0


# -------------------------------------------------------------------------- decorator
async def test_decorator_key_normalization() -> None:
    cache = SWRCache()
    calls: list[tuple[int, int]] = []

    @cache.cached
    async def f(x: int, y: int = 2) -> int:
        calls.append((x, y))
        return x + y

    assert await f(1) == 3
    assert await f(x=1) == 3
    assert await f(1, 2) == 3
    assert await f(1, y=2) == 3
    assert await f(y=2, x=1) == 3
    assert calls == [(1, 2)]
    assert f.key(1) == f.key(x=1, y=2)
    await f.invalidate(x=1)
    await f(1)
    assert len(calls) == 2
    assert f.__name__ == "f"
    assert "f" in repr(f)


async def test_decorator_keyword_only_and_varargs() -> None:
    cache = SWRCache()
    n = 0

    @cache.cached
    async def g(*parts: str, sep: str = "/", **extra: int) -> str:
        nonlocal n
        n += 1
        return sep.join(map(str, parts)) + str(sorted(extra.items()))

    a = await g("a", "b", z=1, y=2)
    b = await g("a", "b", y=2, z=1, sep="/")
    assert a == b
    assert n == 1
    await g("a", ("y", 2))  # a positional tuple is not mistaken for a keyword
    assert n == 2


async def test_decorator_custom_key_and_get_share_entries() -> None:
    cache = SWRCache()
    n = 0

    @cache.cached(key=lambda cid: f"conv:{cid}")
    async def conversation(cid: str) -> str:
        nonlocal n
        n += 1
        return cid.upper()

    assert await conversation("c1") == "C1"
    assert await cache.get("conv:c1", Source()) == "C1"
    await cache.invalidate("conv:c1")
    await conversation("c1")
    assert n == 2


async def test_decorated_methods() -> None:
    cache = SWRCache()

    class Repo:
        def __init__(self, name: str) -> None:
            self.name = name
            self.calls = 0

        @cache.cached
        async def get(self, item: int) -> str:
            self.calls += 1
            return f"{self.name}:{item}"

        @cache.cached(ignore=("self",))
        async def shared(self, item: int) -> int:
            self.calls += 1
            return item * 10

    r1, r2 = Repo("a"), Repo("b")
    assert await r1.get(1) == "a:1"
    assert await r1.get(item=1) == "a:1"
    assert await r2.get(1) == "b:1"  # self is part of the key by default
    assert (r1.calls, r2.calls) == (1, 1)
    await r1.get.invalidate(1)
    await r1.get(1)
    assert r1.calls == 2
    assert await r1.shared(3) == 30
    assert await r2.shared(3) == 30  # ignore=("self",): one entry for all instances
    assert (r1.calls, r2.calls) == (3, 1)
    assert Repo.get.__name__ == "get"


async def test_decorated_stale_hit_warns_when_not_entered() -> None:
    cache, clock, _ = make()

    @cache.cached
    async def f(x: int) -> int:
        return x

    await f(1)
    clock.advance(20)
    with NOT_ENTERED:
        await f(1)


@given(
    x=st.one_of(st.integers(), st.text(max_size=5), st.none()),
    y=st.one_of(st.integers(), st.text(max_size=5)),
)
def test_key_normalization_invariant(x: object, y: object) -> None:
    cache = SWRCache()

    @cache.cached
    async def f(x: object, y: object = 0, *, z: int = 1) -> None:
        return None

    keys = {f.key(x, y), f.key(x=x, y=y), f.key(x, y=y), f.key(x, y, z=1), f.key(y=y, x=x)}
    assert len(keys) == 1
    assert f.key(x, y) != f.key(x, y, z=2)


# ------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"fresh": -1}, ValueError, "fresh"),
        ({"stale": "1"}, TypeError, "stale"),
        ({"fresh": 0, "stale": 0}, ValueError, "both 0"),
        ({"maxsize": 0}, ValueError, "maxsize"),
        ({"store": object()}, TypeError, "store"),
        ({"jitter": 1.0}, ValueError, "jitter"),
        ({"error_ttl": 0}, ValueError, "error_ttl"),
        ({"backoff": 0}, ValueError, "backoff"),
        ({"on_error": 3}, TypeError, "on_error"),
        ({"clock": 3}, TypeError, "clock"),
        ({"cache_none": 1}, TypeError, "cache_none"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], exc: type[Exception], name: str) -> None:
    with pytest.raises(exc, match=name):
        SWRCache(**kwargs)


def test_decorator_rejects_sync_functions_and_bad_ignore() -> None:
    cache = SWRCache()
    with pytest.raises(TypeError, match="async function"):
        cache.cached(lambda: 1)  # type: ignore[arg-type, return-value]

    async def f(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="nope"):
        cache.cached(ignore=("nope",))(f)
    with pytest.raises(ValueError, match="either key= or ignore="):
        cache.cached(key=lambda x: x, ignore=("x",))(f)


def test_stats_is_a_frozen_record() -> None:
    stats = SWRCache().stats
    assert isinstance(stats, pk.CacheStats)
    with pytest.raises(AttributeError):
        stats.hits = 3  # type: ignore[misc]
    assert stats.hit_rate == 0.0


async def test_anyio_clock_on_both_backends() -> None:
    cache = SWRCache(fresh=0.01, stale=60, clock=anyio.current_time)
    src = Source()
    async with cache:
        await cache.get("k", src)
        await anyio.sleep(0.02)  # past fresh on the backend's own clock
        assert await cache.get("k", src) == "k@0"
        await wait_until(lambda: cache.stats.refreshes == 1)
    assert cache.stats.stale_hits == 1


async def test_decorator_on_a_store_without_peek() -> None:
    store = DictStore()
    cache = SWRCache(store=store)
    n = 0

    @cache.cached
    async def f(x: int) -> int:
        nonlocal n
        n += 1
        return x * 2

    assert await f(2) == 4
    assert await f(x=2) == 4
    assert n == 1
    assert list(store.data) == [
        (f"{__name__}.test_decorator_on_a_store_without_peek.<locals>.f", 2)
    ]


async def test_entered_load_is_cancelled_when_its_last_waiter_leaves() -> None:
    cache, _, src = make()
    src.gate = anyio.Event()
    async with cache:
        with anyio.move_on_after(0.05):
            await cache.get("k", src)
        await wait_until(lambda: src.cancelled == 1)  # nobody wanted it any more
        src.gate = None
        assert await cache.get("k", src) == "k@0"
    assert src.calls == 2
