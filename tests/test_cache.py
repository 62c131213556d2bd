"""SWRCache: windows, single flight, stale-if-error, invalidation, lifecycle, keys."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Hashable, Sized
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
        await wait_until(lambda: not cache._loads.flights)
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


@asynccontextmanager
async def entered_or_not(cache: SWRCache, entered: bool) -> Any:
    """``async with cache`` if ``entered``, else nothing."""
    if entered:
        async with cache:
            yield
    else:
        yield


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

    async with entered_or_not(cache, entered), anyio.create_task_group() as tg:
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


async def cancel_once_started(src: Source, call: Any) -> None:
    """Run ``call()`` and cancel it as soon as its load has started (no timeout)."""
    async with anyio.create_task_group() as tg:

        async def caller(scope: anyio.CancelScope) -> None:
            with scope:
                await call()

        scope = anyio.CancelScope()
        tg.start_soon(caller, scope)
        await wait_until(lambda: src.started == 1)
        scope.cancel()


async def test_cancelled_lone_leader_cancels_its_load() -> None:
    cache, _, src = make()
    src.gate = anyio.Event()
    await cancel_once_started(src, lambda: cache.get("k", src))
    assert src.cancelled == 1
    src.gate = None
    assert await cache.get("k", src) == "k@0"  # a new flight, nothing stuck


@pytest.mark.parametrize("timeout", [False, True], ids=["cancel", "fail_after"])
@pytest.mark.parametrize("path", ["miss", "stale"])
async def test_cancelled_leader_finishes_the_load_for_a_follower_then_is_cancelled(
    path: str, timeout: bool
) -> None:
    """Not entered: the leader's load is shielded for its follower, not its cancellation."""
    cache, clock, src = make()
    if path == "stale":
        await cache.get("k", src)  # loaded; the leader's call below is a stale hit
        clock.advance(20)
        src.version = 1
    src.gate = anyio.Event()
    started = src.started + 1  # once the leader's load has started
    leader_got: list[str] = []
    follower_got: list[str] = []
    outcome: list[str] = []
    scopes: list[anyio.CancelScope] = []

    async def leader() -> None:
        try:
            with anyio.fail_after(3600) if timeout else anyio.move_on_after(3600) as scope:
                scopes.append(scope)
                leader_got.append(await cache.get("k", src))  # leads the load / the refresh
            outcome.append("cancelled" if scope.cancelled_caught else "not cancelled")
        except TimeoutError:
            outcome.append("timed out")

    async def follower() -> None:
        follower_got.append(await cache.get("k", src))

    warns = NOT_ENTERED if path == "stale" else contextlib.nullcontext()
    with warns:
        async with anyio.create_task_group() as tg:
            tg.start_soon(leader)
            await wait_until(lambda: src.started == started and len(scopes) == 1)
            if path == "stale":
                clock.advance(100)  # past the stale window: the follower misses, joins
            tg.start_soon(follower)
            misses = cache.stats.misses
            await wait_until(lambda: cache.stats.misses == misses + 1)
            if timeout:
                scopes[0].deadline = anyio.current_time()  # the leader's deadline passes
            else:
                scopes[0].cancel()
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            assert not outcome  # the leader still finishes the load for its follower
            src.gate.set()
    expected = "k@1" if path == "stale" else "k@0"
    assert follower_got == [expected]
    assert leader_got == []  # cancelled right after the load, not handed its value
    assert outcome == ["timed out" if timeout else "cancelled"]
    assert src.cancelled == 0
    assert src.calls == (2 if path == "stale" else 1)
    assert await cache.get("k", src) == expected  # the load was cached, for everybody
    assert src.calls == (2 if path == "stale" else 1)


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


def frames(exc: BaseException) -> list[str]:
    """The function names of ``exc``'s traceback, outermost first."""
    names = []
    tb = exc.__traceback__
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


@pytest.mark.parametrize("entered", [False, True], ids=["not-entered", "entered"])
async def test_a_shared_error_keeps_the_traceback_of_its_load(entered: bool) -> None:
    # every waiter (and, with error_ttl, every later caller) raises the same object:
    # each raise must not pile its frames onto the traceback all the others see
    cache, _, src = make(error_ttl=60.0)
    src.fail = ConnectionError("db down")
    src.gate = anyio.Event()
    async with contextlib.AsyncExitStack() as stack:
        if entered:
            await stack.enter_async_context(cache)
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def call() -> None:
                results.extend(await run_many(50, cache.get, "k", src))

            tg.start_soon(call)
            await wait_until(lambda: cache.stats.misses == 50)
            src.gate.set()
        for _ in range(50):
            with pytest.raises(ConnectionError) as info:
                await cache.get("k", src)
    assert src.calls == 1
    assert all(r is info.value for r in results)
    names = frames(info.value)
    assert names.count("__call__") == 1  # the loader's frame, once
    assert names.count("_miss") == 1  # and one raise, the last one
    assert len(names) < 15


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
        await wait_until(lambda: cache.stats.refreshes == 3 and not cache._loads.flights)
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
    assert len(caplog.records) == 1  # nobody else received it: logged, once
    assert cache.stats.load_errors == 0


@pytest.mark.parametrize("entered", [True, False])
async def test_a_failed_refresh_that_misses_joined_is_theirs_not_logged(
    entered: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Logged once: the misses that waited for a failing refresh receive its error."""
    cache, clock, src = make()
    boom = ConnectionError("database is down")
    stale_got: list[str] = []
    miss_got: list[Any] = []
    await cache.get("k", src)  # k@0, counted as one miss load
    clock.advance(20)  # stale
    src.gate, src.fail = anyio.Event(), boom

    async def stale_caller() -> None:  # starts the refresh (inline when not entered)
        stale_got.append(await cache.get("k", src))

    async def missing_callers() -> None:
        miss_got.extend(await run_many(3, cache.get, "k", src))

    warns = contextlib.nullcontext() if entered else NOT_ENTERED
    with caplog.at_level(logging.WARNING, logger="parallelkit.cache"), warns:
        async with entered_or_not(cache, entered), anyio.create_task_group() as tg:
            tg.start_soon(stale_caller)
            await wait_until(lambda: src.started == 2)  # the slow refresh is running
            clock.advance(100)  # past the stale window: the next calls miss
            tg.start_soon(missing_callers)
            await wait_until(lambda: cache.stats.misses == 4)  # they joined the refresh
            src.gate.set()
    assert len(miss_got) == 3
    assert all(r is boom for r in miss_got)  # each of them received the error ...
    assert stale_got == ["k@0"]  # the stale caller was served the stale value
    assert src.calls == 2  # one refresh, shared by the three misses
    assert not [r for r in caplog.records if r.name == "parallelkit.cache"]  # ... once
    assert not cache._loads.flights
    s = cache.stats
    assert (s.refreshes, s.refresh_errors, s.loads, s.load_errors) == (1, 0, 1, 1)


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
async def test_the_not_entered_warning_raised_as_an_error_leaves_no_stuck_load() -> None:
    # under `-W error` (or filterwarnings = error) the one-time warning is raised: the
    # refresh it announced must not stay registered, never run, and hang every later miss
    cache, clock, src = make()
    assert await cache.get("k", src) == "k@0"
    clock.advance(20)  # stale
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="not entered"):
            await cache.get("k", src)
    assert "in_flight=0" in repr(cache)
    clock.advance(200)  # gone: a miss loads (it waited forever for that refresh)
    src.version = 1
    with anyio.fail_after(5):
        assert await cache.get("k", src) == "k@1"
    assert src.calls == 2


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
    assert not cache._loads.flights
    assert not cache._owner.entered
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


@pytest.mark.parametrize("entered", [False, True], ids=["not-entered", "entered"])
async def test_a_refresh_returning_none_not_cached_drops_the_stale_value(entered: bool) -> None:
    # cache_none=False: the row is gone; the old value must not be served (and
    # refreshed) on every stale hit until the stale window runs out
    cache, clock, _ = make(cache_none=False)
    rows: dict[str, str] = {"k": "old"}
    calls = 0

    async def load(key: str) -> str | None:
        nonlocal calls
        calls += 1
        await anyio.lowlevel.checkpoint()
        return rows.get(key)

    async with contextlib.AsyncExitStack() as stack:
        if entered:
            await stack.enter_async_context(cache)
        assert await cache.get("k", load) == "old"
        del rows["k"]
        clock.advance(20)  # stale
        with contextlib.ExitStack() as warns:
            if not entered:
                warns.enter_context(NOT_ENTERED)
            got = await cache.get("k", load)  # the refresh finds nothing
        assert got == ("old" if entered else None)
        store = cache.store
        assert isinstance(store, MemoryStore)
        await wait_until(lambda: calls == 2 and store.peek("k") is None)
        assert await cache.get("k", load) is None  # a miss: loaded, not the old value
        assert calls == 3
    assert cache.stats.stale_hits == 1


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
NAN, INF = float("nan"), float("inf")

BAD_CACHE_ARGUMENTS = [
    # (keyword, value, exception): durations are real, not bool, finite, > 0 (>= 0 for windows)
    *[("fresh", v, TypeError) for v in ("1", True, None)],
    *[("fresh", v, ValueError) for v in (-1, NAN, INF)],
    *[("stale", v, TypeError) for v in ("1", False)],
    *[("stale", v, ValueError) for v in (-0.5, NAN, INF)],
    *[("error_ttl", v, TypeError) for v in ("1", True)],
    *[("error_ttl", v, ValueError) for v in (0, -1, NAN, INF)],
    *[("backoff", v, TypeError) for v in ("1", True, None)],
    *[("backoff", v, ValueError) for v in (0, -1, NAN, INF)],
    *[("max_backoff", v, TypeError) for v in ("60", True)],
    *[("max_backoff", v, ValueError) for v in (0, NAN, INF)],
    # counts are int, not bool, >= 1
    *[("maxsize", v, TypeError) for v in (1.5, True, "10", None)],
    *[("maxsize", v, ValueError) for v in (0, -3)],
    # a fraction in [0, 1)
    *[("jitter", v, TypeError) for v in ("0.1", True, None)],
    *[("jitter", v, ValueError) for v in (1.0, 1, -0.1, NAN, INF)],
    # flags are bool; callables are callable; a store is a Store
    *[("cache_none", v, TypeError) for v in (1, "yes", None)],
    *[("on_error", v, TypeError) for v in (3, "log")],
    *[("clock", v, TypeError) for v in (3, 1.0)],
    *[("store", v, TypeError) for v in (object(), {}, pk.MemoryStore)],
]


@pytest.mark.parametrize(("name", "value", "exc"), BAD_CACHE_ARGUMENTS)
def test_bad_cache_arguments_name_the_argument(
    name: str, value: object, exc: type[Exception]
) -> None:
    with pytest.raises(exc, match=rf"^{name} must be "):
        SWRCache(**{name: value})


def test_a_max_backoff_below_backoff_is_refused() -> None:
    # as pk.Retry: the cap would silently replace the first wait
    with pytest.raises(ValueError, match=r"^max_backoff \(1\) must be >= backoff \(10\)$"):
        SWRCache(backoff=10, max_backoff=1)
    assert SWRCache(backoff=5, max_backoff=5).stats.hits == 0


def test_fresh_and_stale_both_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="both 0"):
        SWRCache(fresh=0, stale=0)
    assert SWRCache(fresh=0, stale=5).stats.hits == 0  # one of them may be 0


@pytest.mark.parametrize(
    ("value", "exc"), [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_bad_memory_store_size(value: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=r"^maxsize must be "):
        MemoryStore(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "exc", "message"),
    [
        ({"key": 3}, TypeError, r"^key must be a callable"),
        ({"key": "conv:{id}"}, TypeError, r"^key must be a callable"),
        ({"ignore": 3}, TypeError, r"^ignore must be a str or an iterable of str"),
        ({"ignore": [1]}, TypeError, r"^ignore must be a str or an iterable of str"),
        ({"ignore": ("nope",)}, ValueError, r"^ignore names parameters \['nope'\]"),
        ({"ignore": "x", "key": str}, ValueError, r"either key= or ignore="),
    ],
)
def test_bad_decorator_options(options: dict[str, Any], exc: type[Exception], message: str) -> None:
    cache = SWRCache()

    async def f(x: int) -> int:
        return x

    with pytest.raises(exc, match=message):
        cache.cached(**options)(f)


def test_decorator_refuses_a_sync_function_before_calling_it() -> None:
    cache = SWRCache()
    calls = 0

    def sync(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    for fn in (sync, lambda: 1, 3):
        with pytest.raises(TypeError, match=r"^fn must be an async function"):
            cache.cached(fn)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^fn must be an async function"):
            cache.cached(ignore=())(fn)  # type: ignore[arg-type]
    assert calls == 0


@pytest.mark.parametrize("entered", [True, False])
async def test_get_refuses_a_loader_that_is_not_callable(entered: bool) -> None:
    cache, _, src = make()
    async with entered_or_not(cache, entered):
        for loader in (3, "load_row", None):
            with pytest.raises(TypeError, match=r"^loader must be an async function"):
                await cache.get("k", loader)  # type: ignore[arg-type]
        assert await cache.get("k", src) == "k@0"  # nothing left behind
    s = cache.stats
    assert (s.misses, s.loads, s.load_errors) == (1, 1, 0)  # refused before any work


class GatedLockStore(DictStore):
    """Holds every load at its lock until ``gate`` is set, so callers can pile up."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()

    @asynccontextmanager
    async def load_lock(self, key: Hashable) -> Any:
        await self.gate.wait()
        yield


@pytest.mark.parametrize("entered", [True, False])
async def test_get_with_a_loader_returning_no_awaitable_fails_its_callers(entered: bool) -> None:
    store = GatedLockStore()
    cache = SWRCache(store=store)
    calls: list[str] = []

    def load_row(key: str) -> str:  # forgot `async`
        calls.append(key)
        return f"row {key}"

    results: list[Any] = []

    async def callers() -> None:
        results.extend(await run_many(3, cache.get, "k", load_row))

    async with entered_or_not(cache, entered), anyio.create_task_group() as tg:
        tg.start_soon(callers)
        await wait_until(lambda: cache.stats.misses == 3)  # all three on one flight
        store.gate.set()
    assert calls == ["k"]  # a sync callable is only found out by calling it, once
    assert len(results) == 3
    error = results[0]
    assert isinstance(error, TypeError)
    assert all(r is error for r in results)  # every caller of the flight, nobody hangs
    assert str(error).startswith(
        "loader must be an async function or return an awaitable, but "
        f"{load_row.__qualname__} returned str 'row k'"
    )
    assert not cache._loads.flights
    assert "k" not in store.data
    s = cache.stats
    assert (s.misses, s.loads, s.load_errors, s.refresh_errors) == (3, 1, 1, 0)

    async def fetch(key: str) -> str:
        return f"fetched {key}"

    # a sync thunk returning an awaitable is a loader (the docs' `lambda: fetch(key)`)
    assert await cache.get("k", lambda: fetch("k")) == "fetched k"
    # a fresh hit calls no loader
    assert await cache.get("k", load_row) == "fetched k"  # type: ignore[arg-type]


def test_ignore_accepts_one_name_or_several() -> None:
    cache = SWRCache()

    async def f(db: object, x: int, y: int = 0) -> int:
        return x

    one = cache.cached(ignore="db")(f)
    several = cache.cached(ignore=["db", "y"])(f)
    assert one.key(object(), 1) == one.key("other db", 1)
    assert several.key(object(), 1, 2) == several.key(None, 1, 3)


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
        start = anyio.current_time()
        while anyio.current_time() < start + 0.01:  # past fresh on the backend's own clock
            await anyio.sleep(0.01)
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
        await cancel_once_started(src, lambda: cache.get("k", src))
        await wait_until(lambda: src.cancelled == 1)  # nobody wanted it any more
        src.gate = None
        assert await cache.get("k", src) == "k@0"
    assert src.calls == 2


# ------------------------------------------------------------- the hit path & peek
async def test_a_fresh_hit_never_suspends() -> None:
    """No task, lock, event or checkpoint on a hit: the coroutine finishes in one step."""
    cache, _, src = make()

    @cache.cached
    async def f(x: int, *, scale: int = 2) -> int:
        return x * scale

    assert await f(3) == 6
    assert await cache.get("k", src) == "k@0"
    for hit in (f(3), f(x=3, scale=2), cache.get("k", src)):
        with pytest.raises(StopIteration) as done:
            hit.send(None)
        assert done.value.value in (6, "k@0")
    assert cache.statistics().hits == 3


def test_decorated_function_keeps_its_signature_and_is_a_coroutine_function() -> None:
    import inspect

    cache = SWRCache()

    async def f(x: int, /, y: str = "a", *rest: int, z: bool = False, **extra: int) -> str:
        """Doc."""
        return y

    cached = cache.cached(f)
    assert inspect.signature(cached) == inspect.signature(f)
    assert inspect.iscoroutinefunction(cached)  # frameworks see an async endpoint
    assert (cached.__name__, cached.__doc__, cached.__wrapped__) == ("f", "Doc.", f)
    assert isinstance(cached, pk.CachedFunction)
    assert cached.key(1) == cached.key(1, "a", z=False)
    assert cached.key(1, "a", 2, z=True, w=3) == (
        f"{__name__}.{f.__qualname__}",
        (1, "a", 2),
        (("z", True), ("w", 3)),
    )


class NearStore(DictStore):
    """A remote store with an in-process tier: ``peek`` answers from ``near`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.near: dict[Hashable, CacheEntry[Any]] = {}
        self.gets = 0

    def peek(self, key: Hashable) -> CacheEntry[Any] | None:
        return self.near.get(key)

    async def get(self, key: Hashable) -> CacheEntry[Any] | None:
        self.gets += 1
        return await super().get(key)


async def test_peek_then_get_a_local_miss_asks_the_store() -> None:
    store, clock, src = NearStore(), FakeClock(), Source()
    cache = SWRCache(fresh=10, stale=100, store=store, clock=clock)

    @cache.cached
    async def f(x: str) -> str:
        return await src(x)

    now = clock()
    from_peer = CacheEntry("from another process", now, now + 10, now + 110)
    store.data["k"] = from_peer  # in the shared store, not in this process's near tier
    store.data[f.key("k")] = from_peer
    assert await cache.get("k", src) == "from another process"
    assert await f("k") == "from another process"
    assert (src.calls, store.gets) == (0, 2)  # no load: the store had it
    store.near["k"] = CacheEntry("near", now, now + 10, now + 110)
    assert await cache.get("k", src) == "near"
    assert store.gets == 2  # a local answer: no await on the store
    assert cache.statistics().hits == 3


# --------------------------------------------------------- invalidation always wins
class SlowSetStore(DictStore):
    """A network-like store: the next ``set`` waits on ``gate`` (a slow round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: anyio.Event | None = None
        self.setting = 0

    async def set(self, key: Hashable, entry: CacheEntry[Any], *, ttl: float) -> None:
        self.setting += 1
        gate, self.gate = self.gate, None  # later writes are fast
        if gate is not None:
            await gate.wait()
        await super().set(key, entry, ttl=ttl)


async def let_others_run() -> None:
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("entered", [True, False])
@pytest.mark.parametrize("write", ["invalidate", "set", "clear"])
async def test_invalidation_wins_over_a_slow_store_write(entered: bool, write: str) -> None:
    store, src = SlowSetStore(), Source()
    cache = SWRCache(fresh=10, stale=100, store=store, clock=FakeClock())
    store.gate = gate = anyio.Event()
    old: list[str] = []

    async with entered_or_not(cache, entered), anyio.create_task_group() as tg:

        async def load() -> None:
            old.append(await cache.get("k", src))

        tg.start_soon(load)
        await wait_until(lambda: store.setting == 1)  # loaded; its store write is in flight
        if write == "invalidate":
            tg.start_soon(cache.invalidate, "k")
        elif write == "set":
            tg.start_soon(cache.set, "k", "newer")
        else:
            tg.start_soon(cache.clear)
        await let_others_run()  # the invalidation runs now, while the old write hangs
        gate.set()
    assert old == ["k@0"]  # the old load still answered its caller
    expected = {"set": "newer"}.get(write)
    assert (store.data["k"].value if "k" in store.data else None) == expected
    src.version = 1
    assert await cache.get("k", src) == (expected or "k@1")


class SharedStore(DictStore):
    """A store shared by processes, with the conditional set: a token is a write version."""

    def __init__(self) -> None:
        super().__init__()
        self.versions: dict[Hashable, int] = {}
        self.epoch = 0
        self.events: list[str] = []

    def peer_writes(self, key: Hashable) -> None:
        """Another process deleted or set ``key``."""
        self.versions[key] = self.versions.get(key, 0) + 1

    async def set(self, key: Hashable, entry: CacheEntry[Any], *, ttl: float) -> None:
        self.events.append("set")
        self.peer_writes(key)
        await super().set(key, entry, ttl=ttl)

    async def delete(self, key: Hashable) -> None:
        self.peer_writes(key)
        await super().delete(key)

    async def clear(self) -> None:
        self.epoch += 1
        await super().clear()

    async def load_token(self, key: Hashable) -> object:
        self.events.append("token")
        return (self.epoch, self.versions.get(key, 0))

    async def set_if_unchanged(
        self, key: Hashable, entry: CacheEntry[Any], *, ttl: float, token: object
    ) -> bool:
        stored = token == (self.epoch, self.versions.get(key, 0))
        self.events.append(f"set_if_unchanged:{stored}")
        if stored:
            self.peer_writes(key)
            self.data[key] = entry
        return stored


async def test_invalidation_in_another_process_wins_with_a_conditional_store() -> None:
    from parallelkit._cache.store import SupportsConditionalSet

    store, clock = SharedStore(), FakeClock()
    assert isinstance(store, SupportsConditionalSet)
    cache = SWRCache(fresh=10, stale=100, store=store, clock=clock)
    events = store.events

    async def loader(key: str) -> str:
        events.append("load")
        return await src(key)

    src = Source()
    assert await cache.get("k", loader) == "k@0"
    assert events == ["token", "load", "set_if_unchanged:True"]  # a token before the load
    events.clear()

    src.gate = anyio.Event()
    clock.advance(50)  # stale: a refresh starts
    async with cache:
        assert await cache.get("k", loader) == "k@0"
        await wait_until(lambda: src.started == 2)
        store.peer_writes("k")  # another replica invalidated k while the refresh ran
        src.gate.set()
        await wait_until(lambda: cache.stats.refreshes == 1 and not cache._loads.flights)
    assert events == ["token", "load", "set_if_unchanged:False"]
    assert store.data["k"].value == "k@0"  # the refreshed value was not stored
    events.clear()
    await cache.set("k", "by hand")  # an explicit set is a plain set
    assert events == ["set"]


# ------------------------------------------------------------- bounded memory
def remembered(obj: object, store: object) -> int:
    """How many things a cache holds besides its store: every sized attribute, inside out."""
    total = 0
    for name in getattr(type(obj), "__slots__", ()):
        value = getattr(obj, name, None)
        if value is store or isinstance(value, str):
            continue
        if isinstance(value, Sized):
            total += len(value)
        elif type(value).__module__.startswith("parallelkit._cache"):
            total += remembered(value, store)
    return total


async def failing(key: Hashable) -> str:
    raise LookupError(f"no row {key}")  # a new exception each time (a reused one grows)


async def test_failed_loads_remembered_are_bounded_by_maxsize() -> None:
    cache, _, _ = make(maxsize=10, error_ttl=60.0)
    with pytest.raises(LookupError):
        await cache.get("first", failing)
    assert remembered(cache, cache.store) == 1  # the measure sees the failure kept
    for i in range(20_000):
        with pytest.raises(LookupError):
            await cache.get(i, failing)
    assert remembered(cache, cache.store) <= 10
    assert cache.stats.load_errors == 20_001
    with pytest.raises(LookupError, match="no row 19999"):
        await cache.get(19_999, failing)  # the most recent failures are still remembered
    assert cache.stats.load_errors == 20_001  # ... and re-raised without a load


async def test_failed_refreshes_remembered_are_bounded_by_maxsize_with_any_store() -> None:
    store, clock = DictStore(), FakeClock()
    cache = SWRCache(
        fresh=1, stale=1000, maxsize=10, store=store, clock=clock, on_error=lambda k, e: None
    )
    now = clock()
    keys = 2_000
    for i in range(keys):
        store.data[i] = CacheEntry(f"{i}@old", now - 5, now - 4, now + 990)  # stale
    async with cache:
        for i in range(keys):
            assert await cache.get(i, failing) == f"{i}@old"  # stale-if-error
        await wait_until(lambda: cache.stats.refresh_errors == keys)
    assert remembered(cache, cache.store) <= 10
    assert len(cache._loads.flights) == 0


# ------------------------------------------------------------- late-bound store
async def test_bind_gives_a_store_to_a_cache_decorated_before_it_existed() -> None:
    cache = SWRCache(fresh=10, stale=100)  # e.g. at module level
    calls = 0

    @cache.cached
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x * 2

    class ClockStore(DictStore):
        clock = staticmethod(lambda: 5.0)

    assert await f(1) == 2  # before bind: the default MemoryStore
    store = ClockStore()  # e.g. a RedisStore made when the application starts
    cache.bind(store)
    assert cache.store is store
    assert await f(1) == 2  # a miss in the new store: entries are not carried over
    assert await f(1) == 2  # a hit through the new store
    assert calls == 2
    assert store.data[f.key(1)].loaded_at == 5.0  # the store's clock is adopted
    assert cache.statistics().hits == 1
    cache.bind(pk.MemoryStore(5))  # a store with a local answer: the hit path follows
    await f(1)
    await f(1)
    assert calls == 3
    assert isinstance(cache.store, pk.MemoryStore)
    assert len(cache.store) == 1


async def test_bind_keeps_a_clock_given_by_the_user() -> None:
    class ClockStore(DictStore):
        clock = staticmethod(lambda: 5.0)

    clock = FakeClock()
    cache = SWRCache(clock=clock)
    store = ClockStore()
    cache.bind(store)
    await cache.get("k", Source())
    assert store.data["k"].loaded_at == clock()


async def test_bind_is_refused_while_a_load_is_in_flight() -> None:
    cache, _, src = make()
    src.gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.get, "k", src)
        await wait_until(lambda: src.started == 1)
        with pytest.raises(RuntimeError, match="in flight"):
            cache.bind(DictStore())
        src.gate.set()
    cache.bind(DictStore())  # nothing in flight now
    with pytest.raises(TypeError, match=r"^store must be a parallelkit.Store"):
        cache.bind(object())  # type: ignore[arg-type]


# ---------------------------------------------------------------- statistics & store
def test_statistics_is_the_convention_and_stats_its_alias() -> None:
    cache = SWRCache()
    assert cache.statistics() == cache.stats == pk.CacheStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0)


async def test_memory_store_drops_the_least_recently_used() -> None:
    store = MemoryStore(2)
    entry = CacheEntry("v", 0.0, 1.0, 2.0)
    await store.set("a", entry, ttl=2)
    await store.set("b", entry, ttl=2)
    assert store.peek("a") is entry  # a is now the most recently used
    await store.set("c", entry, ttl=2)
    assert (store.peek("b"), len(store), store.evictions) == (None, 2, 1)
    await store.set("a", entry, ttl=2)  # overwriting is not an eviction
    assert store.evictions == 1
    await store.delete("a")
    await store.clear()
    assert len(store) == 0


async def test_partials_and_async_callables_can_be_cached_apart() -> None:
    import functools

    cache = SWRCache()

    async def scaled(factor: int, x: int) -> int:
        return factor * x

    double = cache.cached(functools.partial(scaled, 2))
    triple = cache.cached(functools.partial(scaled, 3))
    assert (await double(5), await triple(5)) == (10, 15)  # two partials, two entries
    assert double.key(5) == (f"{__name__}.{scaled.__qualname__}(2)", 5)

    class Fetch:
        async def __call__(self, x: int) -> int:
            return x + 1

    assert await cache.cached(Fetch())(1) == 2
