"""Fault-path review of SWRCache, ``@cache.cached`` and BatchLoader (defects found, fixed).

Each test names the defect it pins; all run on asyncio and trio, on events and counters
(no elapsed-time asserts; a real timeout only as a hang guard).
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable

import anyio
import pytest

import parallelkit as pk

pytestmark = pytest.mark.anyio


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------------------
# @cache.cached on a bound method: the instance was not in the key, so two instances'
# methods (same name, same code, no closure) were served each other's values.


class Repo:
    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.loads = 0

    async def title(self, conversation_id: str, *, deep: bool = False) -> str:
        self.loads += 1
        return f"{self.tenant}/{conversation_id}/{deep}"


async def test_cached_bound_methods_of_two_instances_keep_their_own_values() -> None:
    cache = pk.SWRCache(fresh=30, stale=300)
    a, b = Repo("acme"), Repo("globex")
    title_a = cache.cached(a.title)
    title_b = cache.cached(b.title)
    async with cache:
        assert await title_a("c1") == "acme/c1/False"
        assert await title_b("c1") == "globex/c1/False"  # was "acme/c1/False"
        assert await title_a("c1") == "acme/c1/False"  # a fresh hit
        assert (a.loads, b.loads) == (1, 1)
        assert title_a.key("c1") != title_b.key("c1")
        await title_b.invalidate("c1")  # forgets b's entry only
        assert await title_a("c1") == "acme/c1/False"
        assert await title_b("c1") == "globex/c1/False"
        assert (a.loads, b.loads) == (1, 2)
    # still the bound method's signature, and a coroutine function
    assert list(inspect.signature(title_a).parameters) == ["conversation_id", "deep"]
    assert inspect.iscoroutinefunction(title_a)


async def test_cached_bound_method_ignore_self_shares_and_class_body_keys_match() -> None:
    cache = pk.SWRCache(fresh=30, stale=300)

    class Tenants:
        @cache.cached
        async def name(self, tenant_id: int) -> str:
            return f"t{tenant_id}"

    a, b = Repo("acme"), Repo("globex")
    shared_a = cache.cached(ignore="self")(a.title)
    shared_b = cache.cached(ignore="self")(b.title)
    assert shared_a.key("c1") == shared_b.key("c1")  # asked for: one entry for all
    t = Tenants()
    # the same key as the method decorated in its class body (one entry for both)
    assert cache.cached(Tenants.name.__wrapped__.__get__(t)).key(3) == t.name.key(3)
    with pytest.raises(ValueError, match="ignore names parameters"):
        cache.cached(ignore="nope")(a.title)


# --------------------------------------------------------------------------------------
# A loader that asks the cache for its own key waited for itself forever; not entered,
# the wait was inside the leader's shielded scope, so not even a timeout ended it.


@pytest.mark.timeout(30)
@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
async def test_loader_asking_for_its_own_key_raises_instead_of_hanging(entered: bool) -> None:
    cache = pk.SWRCache(fresh=30, stale=300)
    calls = 0

    async def loader(key: str) -> str:
        nonlocal calls
        calls += 1
        return await cache.get(key, loader)

    async def call() -> None:
        with pytest.raises(RuntimeError, match="wait for itself"):
            await cache.get("k", loader)

    with anyio.fail_after(30):
        if entered:
            async with cache:
                await call()
        else:
            await call()
    assert calls == 1
    assert cache.statistics().load_errors == 1
    assert not cache._loads.flights  # nothing left in flight


@pytest.mark.timeout(30)
async def test_two_keys_loading_each_other_raise_instead_of_hanging() -> None:
    cache = pk.SWRCache(fresh=30, stale=300)

    @cache.cached
    async def a(n: int) -> int:
        return await b(n) + 1

    @cache.cached
    async def b(n: int) -> int:
        return await a(n) + 1

    with anyio.fail_after(30):
        async with cache:
            with pytest.raises(RuntimeError, match="wait for itself"):
                await a(1)
        with pytest.raises(RuntimeError, match="wait for itself"):
            await b(2)  # not entered: the same


async def test_background_refresh_may_read_the_key_whose_load_started_it() -> None:
    """No false alarm: a background refresh started from inside a load waits for
    nothing of that load's, so it may read its key (only inline waits are cycles)."""
    clock = Clock()
    errors: list[tuple[Hashable, Exception]] = []
    cache = pk.SWRCache(
        fresh=10, stale=100, clock=clock, on_error=lambda k, e: errors.append((k, e))
    )
    refreshed = anyio.Event()
    release = anyio.Event()
    calls: list[str] = []

    async def load_b(key: str) -> str:
        calls.append(key)
        if len(calls) > 1:  # the refresh of b, started by a's load: reads a
            value = await cache.get("a", load_a)
            refreshed.set()
            return f"b2({value})"
        return "b1"

    async def load_a(key: str) -> str:
        calls.append(key)
        value = await cache.get("b", load_b)  # stale: served, refreshed in the background
        await release.wait()
        return f"a({value})"

    async with cache:
        assert await cache.get("b", load_b) == "b1"
        clock.now = 20  # b is stale
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.get, "a", load_a)
            await anyio.wait_all_tasks_blocked()
            release.set()
            await refreshed.wait()
    assert errors == []
    assert calls == ["b", "a", "b"]
    assert await cache.get("b", load_b) == "b2(a(b1))"


# --------------------------------------------------------------------------------------
# A background refresh that hangs, once its stale window ran out: the misses that joined
# it (single flight) left (timed out, cancelled), but the refresh was never cancelled, so
# every later miss of the key joined the same hung refresh: the key was stuck until the
# cache was left. A miss load is cancelled when its last waiter leaves; now so is a
# refresh that misses joined.


async def test_hung_refresh_joined_by_misses_is_cancelled_when_they_all_leave() -> None:
    clock = Clock()
    cache = pk.SWRCache(fresh=10, stale=10, clock=clock)
    calls = 0
    refresh_started = anyio.Event()
    refresh_cancelled = anyio.Event()

    async def loader(key: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:  # the refresh: hangs (a stuck connection)
            refresh_started.set()
            try:
                await anyio.sleep_forever()
            finally:
                refresh_cancelled.set()
        return f"v{calls}"

    async with cache:
        assert await cache.get("k", loader) == "v1"
        clock.now = 15  # stale: served, one refresh starts (and hangs)
        assert await cache.get("k", loader) == "v1"
        await refresh_started.wait()
        clock.now = 25  # the stale window ran out: a miss joins the refresh
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(cache.get, "k", loader)
                tg.start_soon(cache.get, "k", loader)
                await anyio.wait_all_tasks_blocked()
                assert calls == 2  # both joined the refresh: single flight
                scope.cancel()  # both give up (a request timeout)
        with anyio.fail_after(30):
            await refresh_cancelled.wait()  # nobody wants it: cancelled
        assert await cache.get("k", loader) == "v3"  # a new load, not the hung one
        stats = cache.statistics()
        assert (stats.refresh_errors, stats.load_errors) == (0, 0)


async def test_refresh_nobody_joined_is_not_cancelled_by_a_stale_hit_leaving() -> None:
    clock = Clock()
    cache = pk.SWRCache(fresh=10, stale=10, clock=clock)
    release = anyio.Event()
    calls = 0

    async def loader(key: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            await release.wait()
        return f"v{calls}"

    async with cache:
        assert await cache.get("k", loader) == "v1"
        clock.now = 15
        with anyio.CancelScope() as scope:
            assert await cache.get("k", loader) == "v1"  # the refresh goes on alone
            scope.cancel()
        await anyio.wait_all_tasks_blocked()
        release.set()
        await anyio.wait_all_tasks_blocked()
        assert await cache.get("k", loader) == "v2"  # stored by the refresh
        assert calls == 2


# --------------------------------------------------------------------------------------
# BatchLoader.clear(key) with an unhashable key: nothing said on an empty memo (dict.pop
# of an empty dict hashes nothing), Python's bare "unhashable type" on a full one.


async def test_batch_loader_clear_names_an_unhashable_key() -> None:
    async def load_many(keys: list[int]) -> list[int]:
        return keys

    loader = pk.BatchLoader(load_many, cache=True)
    with pytest.raises(TypeError, match=r"key must be hashable, got list \[1\]"):
        loader.clear([1])  # empty memo
    async with loader:
        assert await loader.load(1) == 1
        with pytest.raises(TypeError, match=r"key must be hashable, got list \[1\]"):
            loader.clear(2, [1])
        assert loader.stats.calls == 1
        assert await loader.load(2) == 2  # nothing forgotten before the check
        assert await loader.load(1) == 1
        assert loader.stats.calls == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
async def test_two_loads_started_apart_that_wait_on_each_other_raise(entered: bool) -> None:
    """A's load (started by one caller) reads B while B's load (started by another)
    reads A: each waits for the other. Not entered, both loads are shielded (each has
    a waiter), so nothing ended it; now the wait that closes the loop raises."""
    cache = pk.SWRCache(fresh=30, stale=300)
    a_waiting = anyio.Event()
    b_started = anyio.Event()
    outcomes: dict[str, str] = {}

    async def load_a(key: str) -> str:
        await b_started.wait()
        a_waiting.set()
        return "a+" + await cache.get("b", load_b)

    async def load_b(key: str) -> str:
        b_started.set()
        await a_waiting.wait()
        await anyio.wait_all_tasks_blocked()  # a's load waits for b now
        return "b+" + await cache.get("a", load_a)

    async def call(key: str, loader: object) -> None:
        try:
            outcomes[key] = await cache.get(key, loader)  # type: ignore[arg-type]
        except RuntimeError as exc:
            outcomes[key] = str(exc)

    async def both() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "a", load_a)
            tg.start_soon(call, "b", load_b)

    with anyio.fail_after(30):
        if entered:
            async with cache:
                await both()
        else:
            await both()
    assert "wait for itself" in outcomes["a"]
    assert "wait for itself" in outcomes["b"]
    assert not cache._loads.flights


async def test_a_load_waiting_for_another_key_twice_is_no_loop() -> None:
    """No false alarm: two loads reading one shared key (and a key read twice by one
    load's tasks) wait as usual."""
    cache = pk.SWRCache(fresh=30, stale=300)
    release = anyio.Event()
    shared_calls = 0

    async def load_shared(key: str) -> str:
        nonlocal shared_calls
        shared_calls += 1
        await release.wait()
        return "s"

    async def load_top(key: str) -> str:
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(cache.get, "shared", load_shared)
        return key + "+" + await cache.get("shared", load_shared)

    async with cache, anyio.create_task_group() as tg:
        tg.start_soon(cache.get, "x", load_top)
        tg.start_soon(cache.get, "y", load_top)
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert shared_calls == 1
    assert await cache.get("x", load_top) == "x+s"
    assert await cache.get("y", load_top) == "y+s"
