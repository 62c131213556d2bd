"""SWRCache and BatchLoader fault paths, third round: a KeyboardInterrupt-like load,
a coroutine returned by mistake, an unhashable cache key, a burst of batches bounded
by a limiter inside ``load_many``."""

from __future__ import annotations

import contextlib
import gc
import sys
import warnings
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

from .test_batch_faults import wait_until
from .test_cache import DictStore

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio


class Interrupt(BaseException):
    """Stands in for KeyboardInterrupt / SystemExit (not an Exception, not a cancellation)."""


# ------------------------------------------------------------------ SWRCache


async def test_a_shared_load_interrupted_by_a_base_exception_is_not_started_again() -> None:
    """Not entered: the leader's loader raises a KeyboardInterrupt-like error while
    another caller waits on the same load. The leader gets the interrupt; the
    follower gets a RuntimeError whose cause is that interrupt, and the loader is
    not called again. The follower used to take the flight for cancelled and start
    a second load of the key while the program was being interrupted."""
    cache = pk.SWRCache(fresh=10, stale=10)
    release = anyio.Event()
    calls = 0

    async def loader(key: str) -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        if calls == 1:
            raise Interrupt("stop")
        return "value"  # pragma: no cover - the failure asserted below

    got: list[BaseException | str] = []

    async def leader() -> None:
        with pytest.raises(Interrupt):
            await cache.get("k", loader)

    async def follower() -> None:
        try:
            got.append(await cache.get("k", loader))
        except Exception as exc:
            got.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(leader)
        await wait_until(lambda: "k" in cache._loads.flights)
        tg.start_soon(follower)
        await wait_until(lambda: cache._loads.flights["k"].waiters == 1)
        release.set()
    assert calls == 1
    [error] = got
    assert isinstance(error, RuntimeError)
    assert isinstance(error.__cause__, Interrupt)
    assert "Interrupt" in str(error)
    assert cache.statistics().load_errors == 0  # not a load error: the interrupt is raised


async def test_an_entered_cache_does_not_start_a_load_again_after_an_interrupt() -> None:
    """Entered: the interrupt leaves ``async with cache`` as raised, and the callers
    waiting for that load do not start it again on the way out."""
    cache = pk.SWRCache(fresh=10, stale=10)
    calls = 0

    async def loader(key: str) -> str:
        nonlocal calls
        calls += 1
        await anyio.lowlevel.checkpoint()
        raise Interrupt("stop")

    async def caller() -> None:
        await cache.get("k", loader)

    with pytest.raises(Interrupt):
        async with cache, anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(caller)
    assert calls == 1


@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
async def test_a_loader_returning_a_coroutine_fails_the_load_and_caches_nothing(
    entered: bool,
) -> None:
    """``async def loader(key): return fetch(key)`` (a forgotten ``await``) gives a
    coroutine: a value that can be awaited once. The load fails with a TypeError
    that says so, the coroutine is closed (no "never awaited" warning) and nothing
    is cached. It used to be cached and handed to every caller."""
    cache = pk.SWRCache(fresh=10, stale=10)

    async def fetch(key: str) -> str:
        return key  # pragma: no cover - never awaited

    async def loader(key: str) -> Any:
        return fetch(key)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with cache if entered else contextlib.nullcontext(cache):
            with pytest.raises(TypeError, match=r"returned a coroutine.*await"):
                await cache.get("k", loader)
            pending = fetch("k")
            with pytest.raises(TypeError, match="coroutine"):
                await cache.set("k", pending)
            pending.close()  # the caller's own coroutine: set leaves it alone
            gc.collect()
    assert await cache.store.get("k") is None
    assert cache.statistics().load_errors == 1


async def test_a_refresh_returning_a_coroutine_keeps_the_stale_value() -> None:
    """A refresh whose loader returns a coroutine is a failed refresh: counted,
    handed to ``on_error``, the stale value stays in service."""
    now = [0.0]
    errors: list[Exception] = []
    cache = pk.SWRCache(
        fresh=1, stale=10, clock=lambda: now[0], on_error=lambda k, e: errors.append(e)
    )
    calls = 0

    async def fetch() -> str:
        return "new"  # pragma: no cover - never awaited

    async def loader(key: str) -> Any:
        nonlocal calls
        calls += 1
        return "old" if calls == 1 else fetch()

    async with cache:
        assert await cache.get("k", loader) == "old"
        now[0] = 5.0
        assert await cache.get("k", loader) == "old"  # stale: refresh in the background
        await wait_until(lambda: cache.statistics().refresh_errors == 1)
        assert await cache.get("k", loader) == "old"
    [error] = errors
    assert isinstance(error, TypeError)


async def test_an_unhashable_argument_of_a_cached_function_is_named() -> None:
    """``f([1, 2])`` on a ``@cache.cached`` function raises a TypeError that names the
    function and the argument's value, not Python's bare "unhashable type"; the same
    for ``get`` and for a ``key=`` function returning an unhashable key."""
    cache = pk.SWRCache()

    @cache.cached
    async def tags(ids: object) -> int:
        return 1  # pragma: no cover - never called

    @cache.cached(key=lambda ids: ["tags", ids])  # type: ignore[arg-type,return-value]
    async def tags_keyed(ids: object) -> int:
        return 1  # pragma: no cover - never called

    async def loader(key: object) -> int:
        return 1  # pragma: no cover - never called

    with pytest.raises(TypeError, match=r"tags.*hashable.*list \[1, 2\]"):
        await tags([1, 2])
    with pytest.raises(TypeError, match=r"key must be hashable.*list \['tags', 3\]"):
        await tags_keyed(3)
    with pytest.raises(TypeError, match=r"key must be hashable.*list \[1\]"):
        await cache.get([1], loader)  # type: ignore[type-var]
    with pytest.raises(TypeError, match=r"key must be hashable.*dict"):
        await cache.invalidate({})  # type: ignore[arg-type]
    assert cache.statistics().misses == 0


async def test_an_unhashable_key_is_named_before_a_store_without_peek_sees_it() -> None:
    """With a store that has no ``peek`` the key reaches no dict on the hit path: it is
    named before the store is asked, and the store never sees it."""
    store = DictStore()
    asked: list[object] = []
    get = store.get

    async def spy(key: Any) -> Any:
        asked.append(key)
        return await get(key)

    store.get = spy  # type: ignore[method-assign]
    cache = pk.SWRCache(store=store)

    @cache.cached
    async def tags(ids: object) -> int:
        return 1  # pragma: no cover - never called

    with pytest.raises(TypeError, match=r"key must be hashable.*list \[1, 2\]"):
        await tags([1, 2])
    assert asked == []


# ------------------------------------------------------------------ BatchLoader


@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
async def test_an_interrupted_batch_tells_its_callers_why(entered: bool) -> None:
    """``load_many`` raising a KeyboardInterrupt-like error: the interrupt goes on
    (out of ``async with loader``, or from the caller that ran the batch), and the
    other callers of that batch get a RuntimeError that names it, with the interrupt
    as its cause. They used to be told the loader "was closed", with no cause."""

    async def load_many(keys: list[int]) -> dict[int, int]:
        await anyio.lowlevel.checkpoint()
        raise Interrupt("stop")

    loader = pk.BatchLoader(load_many)
    errors: list[BaseException] = []

    async def call(key: int) -> None:
        try:
            await loader.load(key)
        except RuntimeError as exc:
            errors.append(exc)

    owner = loader if entered else contextlib.nullcontext(loader)
    with pytest.raises((Interrupt, BaseExceptionGroup)) as info:
        async with owner, anyio.create_task_group() as tg:
            for key in range(3):
                tg.start_soon(call, key)
    if isinstance(info.value, BaseExceptionGroup):
        assert info.value.subgroup(Interrupt) is not None
    assert len(errors) == (3 if entered else 2)
    for error in errors:
        assert "load_many raised Interrupt('stop')" in str(error)
        assert isinstance(error.__cause__, Interrupt)


async def test_a_load_many_returning_a_coroutine_fails_clearly_and_closes_it() -> None:
    """``load_many`` returning a coroutine (a forgotten ``await``) fails the batch with
    a TypeError that says so; the coroutine is closed (no "never awaited" warning)."""

    async def query(keys: list[int]) -> dict[int, int]:
        return {}  # pragma: no cover - never awaited

    async def load_many(keys: list[int]) -> Any:
        return query(keys)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with pk.BatchLoader[int, int](load_many) as loader:
            with pytest.raises(TypeError, match=r"returned a coroutine.*await"):
                await loader.load(1)
        gc.collect()


async def test_a_limiter_in_load_many_bounds_the_batches_running_at_once() -> None:
    """A burst of 1,000 keys with ``max_batch=10`` is 100 batches, all dispatched at
    once; a ``pk.Limiter`` entered in ``load_many`` bounds how many run (the
    documented way to bound them). Every caller still gets its value."""
    limiter = pk.Limiter(concurrency=3)
    running = peak = 0

    async def load_many(keys: list[int]) -> dict[int, int]:
        nonlocal running, peak
        async with limiter:
            running += 1
            peak = max(peak, running)
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            running -= 1
            return {k: k * 2 for k in keys}

    async with pk.BatchLoader(load_many, max_batch=10) as loader:
        values = await loader.load_many(range(1000))
    assert values == [k * 2 for k in range(1000)]
    assert peak == 3
    assert loader.statistics().calls == 100
