"""SWRCache fault review, eighth round: a clock that returns no number, and a
``MemoryStore`` with more loads of distinct keys in flight than ``maxsize``."""

from __future__ import annotations

import contextlib
import datetime
import math
from collections.abc import Callable, Hashable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk
from parallelkit import CacheEntry

from .test_cache import FakeClock

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------ 1. a clock giving no number
BAD_READINGS: dict[str, Callable[[], object]] = {
    "None": lambda: None,
    "str": lambda: "12:00",
    "datetime": lambda: datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
}


@pytest.mark.parametrize("reading", list(BAD_READINGS), ids=list(BAD_READINGS))
@pytest.mark.parametrize("how", ["get", "cached", "set"])
async def test_a_clock_returning_no_number_is_named_before_any_load(reading: str, how: str) -> None:
    """``SWRCache(clock=...)`` whose clock returns ``None``, a ``str`` or a ``datetime``
    used to fail deep inside the cache (``unsupported operand type(s) for +``), after
    the loader had run. Its first reading is checked now: a ``TypeError`` naming the
    ``clock`` argument and the type it returned, before the loader is called, on every
    call (not once)."""
    calls: list[str] = []
    cache = pk.SWRCache(fresh=10, stale=100, clock=BAD_READINGS[reading])

    async def load(key: str) -> str:
        calls.append(key)
        return key

    @cache.cached
    async def f(key: str) -> str:
        return await load(key)

    kind = type(BAD_READINGS[reading]()).__name__
    for _ in range(2):
        with pytest.raises(TypeError, match=r"\bclock\b") as info:
            if how == "get":
                await cache.get("k", load)
            elif how == "cached":
                await f("k")
            else:
                await cache.set("k", "v")
        assert kind in str(info.value)
        assert "returned" in str(info.value)
    assert calls == []
    assert cache.statistics().load_errors == 0


async def test_a_clock_returning_nan_is_a_value_error() -> None:
    """A clock returning NaN would make every comparison false (never fresh, never
    stale): its first reading is refused with a ``ValueError`` naming ``clock``."""
    cache = pk.SWRCache(fresh=10, stale=100, clock=lambda: math.nan)

    async def load(key: str) -> str:
        return key

    with pytest.raises(ValueError, match=r"clock .*nan"):
        await cache.get("k", load)


async def test_a_bad_clock_is_named_on_the_hit_path_of_a_shared_store() -> None:
    """A cache whose first call is a hit (another cache filled the shared store) reads
    its clock on the hit path: that first reading is checked too."""
    store = pk.MemoryStore(10)
    good = pk.SWRCache(fresh=10, stale=100, store=store, clock=FakeClock())
    bad = pk.SWRCache(fresh=10, stale=100, store=store, clock=lambda: None)
    await good.set("k", "v")

    async def load(key: str) -> str:
        raise AssertionError("not called")

    with pytest.raises(TypeError, match=r"clock must return .*NoneType"):
        await bad.get("k", load)


class ClockedStore:
    """A store whose ``clock`` attribute (the cache adopts it) returns a string."""

    def __init__(self) -> None:
        self.data: dict[Hashable, CacheEntry[Any]] = {}

    def clock(self) -> object:
        return "now"

    async def get(self, key: Hashable) -> CacheEntry[Any] | None:
        return self.data.get(key)

    async def set(self, key: Hashable, entry: CacheEntry[Any], *, ttl: float) -> None:
        self.data[key] = entry

    async def delete(self, key: Hashable) -> None:
        self.data.pop(key, None)

    async def clear(self) -> None:
        self.data.clear()


async def test_a_stores_clock_returning_no_number_names_the_store() -> None:
    """The clock a cache adopts from its store is checked the same way, and the
    message says it is the store's."""
    cache = pk.SWRCache(fresh=10, stale=100, store=ClockedStore())

    async def load(key: str) -> str:
        raise AssertionError("not called")

    with pytest.raises(TypeError, match=r"store\.clock must return .*str"):
        await cache.get("k", load)


async def test_a_good_clock_is_read_as_given_after_its_first_reading() -> None:
    """Once its first reading passed, the cache reads the clock itself (the hit path
    pays nothing for the check), and the readings are used unchanged."""
    clock = FakeClock()
    cache = pk.SWRCache(fresh=10, stale=100, clock=clock)

    async def load(key: str) -> str:
        return key

    assert await cache.get("k", load) == "k"
    assert cache._front.clock is clock
    entry = cache.store.peek("k")  # type: ignore[attr-defined]
    assert entry.loaded_at == clock.now


# --------------------------------------- 3. more loads in flight than a MemoryStore holds
async def test_a_stampede_of_distinct_keys_keeps_the_latest_values() -> None:
    """1,000 distinct keys loading at once on a ``maxsize=10`` cache: a load used to
    be stored only if fewer than ``maxsize`` writes of *other* keys landed while it
    ran, so the store kept the first values written and dropped every later one
    (returned, never cached: under load a slow key was never cached at all). Every
    load is stored now, and the store keeps the last ``maxsize`` of them (LRU)."""
    cache = pk.SWRCache(fresh=10, stale=100, maxsize=10, clock=FakeClock())
    order: list[int] = []

    async def load(key: int) -> int:
        await anyio.lowlevel.checkpoint()
        order.append(key)
        return key

    async with cache, anyio.create_task_group() as tg:
        for key in range(1_000):
            tg.start_soon(cache.get, key, load)
    store = cache.store
    assert isinstance(store, pk.MemoryStore)
    assert sorted(store._data) == sorted(order[-10:])  # the latest loads
    assert cache.statistics().evictions == 990
    loads = cache.statistics().loads
    for key in order[-10:]:
        assert await cache.get(key, load) == key  # fresh hits
    assert cache.statistics().loads == loads


async def test_a_slow_load_is_stored_after_many_writes_of_other_keys() -> None:
    """A load that outlasts more than ``maxsize`` writes of other keys is stored (it
    used to be dropped, and loaded again on the next call)."""
    store = pk.MemoryStore(2)
    cache = pk.SWRCache(fresh=10, stale=100, store=store, clock=FakeClock())
    started, release = anyio.Event(), anyio.Event()
    loads: list[str] = []

    async def slow(key: str) -> str:
        loads.append(key)
        started.set()
        await release.wait()
        return "slow"

    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.get, "k", slow)
        await started.wait()
        for i in range(5):
            await cache.set(("other", i), i)
        release.set()
    assert await cache.get("k", slow) == "slow"  # a fresh hit
    assert loads == ["k"]
    assert store.evictions == 4


@pytest.mark.parametrize("how", ["invalidate", "set", "clear"])
async def test_an_invalidation_still_wins_over_a_load_outlasting_maxsize_writes(
    how: str,
) -> None:
    """What the bounded write record guarded stays true without it: a write of the
    key itself (``invalidate`` / ``set`` / ``clear`` by another cache sharing the
    store) after the load started keeps the load's value out, whatever was written
    in between."""
    store = pk.MemoryStore(2)
    slow_cache = pk.SWRCache(fresh=10, stale=100, store=store, clock=FakeClock())
    other = pk.SWRCache(fresh=10, stale=100, store=store, clock=FakeClock())
    started, release = anyio.Event(), anyio.Event()

    async def slow(key: str) -> str:
        started.set()
        await release.wait()
        return "old"

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow_cache.get, "k", slow)
        await started.wait()
        for i in range(5):
            await other.set(("other", i), i)
        if how == "invalidate":
            await other.invalidate("k")
        elif how == "set":
            await other.set("k", "new")
        else:
            await other.clear()
        for i in range(5, 10):
            await other.set(("other", i), i)
        release.set()

    async def load(key: str) -> str:
        return "new"

    assert await slow_cache.get("k", load) == "new"


async def test_the_load_that_started_last_wins_across_caches_sharing_a_store() -> None:
    """Two caches on one store load one key at once. The load that started later read
    the source later: its value is kept, whichever finishes first. (A load finishing
    second used to be dropped whenever the other had written: an older value stayed.)"""
    store = pk.MemoryStore(10)
    first, second = (pk.SWRCache(fresh=10, stale=100, store=store, clock=FakeClock()) for _ in "ab")
    source = {"k": "v1"}
    gates = {"first": anyio.Event(), "second": anyio.Event()}
    started = {"first": anyio.Event(), "second": anyio.Event()}

    def loader(name: str) -> Callable[[str], Any]:
        async def load(key: str) -> str:
            value = source[key]
            started[name].set()
            await gates[name].wait()
            return value

        return load

    async with anyio.create_task_group() as tg:
        tg.start_soon(first.get, "k", loader("first"))
        await started["first"].wait()
        source["k"] = "v2"
        tg.start_soon(second.get, "k", loader("second"))
        await started["second"].wait()
        gates["first"].set()  # the older load finishes first, then the newer one
        while store.peek("k") is None:
            await anyio.lowlevel.checkpoint()
        gates["second"].set()
    entry = store.peek("k")
    assert entry is not None
    assert entry.value == "v2"

    # and the other order: the newer load lands first, the older one is not stored over it
    await store.clear()
    source["k"] = "v3"
    gates = {"first": anyio.Event(), "second": anyio.Event()}
    started = {"first": anyio.Event(), "second": anyio.Event()}
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.get, "k", loader("first"))
        await started["first"].wait()
        source["k"] = "v4"
        tg.start_soon(second.get, "k", loader("second"))
        await started["second"].wait()
        gates["second"].set()
        while store.peek("k") is None:
            await anyio.lowlevel.checkpoint()
        gates["first"].set()
    entry = store.peek("k")
    assert entry is not None
    assert entry.value == "v4"


async def test_a_memory_store_holds_no_record_of_loads_that_ended() -> None:
    """What the store keeps for loads in flight goes with them: after 1,000 loads of
    distinct keys (some failing, some cancelled) it holds nothing but its entries."""
    store = pk.MemoryStore(10)
    cache = pk.SWRCache(fresh=10, stale=100, store=store, clock=FakeClock())

    async def load(key: int) -> int:
        await anyio.lowlevel.checkpoint()
        if key % 3 == 0:
            raise ValueError(key)
        if key % 3 == 1:
            await anyio.sleep_forever()
        return key

    async def one(key: int) -> None:
        with anyio.move_on_after(0 if key % 3 == 1 else 30):
            with contextlib.suppress(ValueError):
                await cache.get(key, load)

    async with cache, anyio.create_task_group() as tg:
        for key in range(1_000):
            tg.start_soon(one, key)
    assert not cache._loads.flights
    assert len(store._watching) == 0
    assert len(store) == 10
