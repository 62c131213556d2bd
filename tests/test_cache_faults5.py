"""SWRCache fault review, fifth round: ``@cache.cached`` written above
``@staticmethod`` / ``@classmethod``; caches sharing one ``MemoryStore``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

import parallelkit as pk

pytestmark = pytest.mark.anyio


async def test_cached_above_staticmethod_caches_the_function_inside() -> None:
    """``@cache.cached`` over ``@staticmethod`` used to be refused with "got sync
    staticmethod" (the function is async). It now caches the function inside and
    stays a static method: called from the class or an instance, with the same key."""
    cache = pk.SWRCache(fresh=10, stale=10)
    calls: list[int] = []

    class Repo:
        @cache.cached
        @staticmethod
        async def load(row_id: int) -> str:
            calls.append(row_id)
            return f"row {row_id}"

    async with cache:
        assert await Repo.load(1) == "row 1"
        assert await Repo().load(1) == "row 1"  # no self: the same entry
        assert await Repo.load(row_id=1) == "row 1"
        assert calls == [1]
        assert Repo.load.key(1) == Repo().load.key(row_id=1)
        await Repo().load.invalidate(1)
        assert await Repo.load(1) == "row 1"
        assert calls == [1, 1]


async def test_cached_above_classmethod_binds_the_class() -> None:
    """``@cache.cached`` over ``@classmethod`` used to be refused; it now binds the
    class (from the class or an instance), the class is part of the key (a subclass
    has its own entries), and ``Cls.method.invalidate(...)`` forgets that entry."""
    cache = pk.SWRCache(fresh=10, stale=10)
    calls: list[tuple[str, int]] = []

    class Base:
        table = "base"

        @cache.cached
        @classmethod
        async def count(cls, limit: int = 5) -> str:
            calls.append((cls.table, limit))
            return f"{cls.table}:{limit}"

    class Child(Base):
        table = "child"

    async with cache:
        assert await Base.count() == "base:5"
        assert await Base().count(5) == "base:5"
        assert await Child.count() == "child:5"
        assert await Child().count(limit=5) == "child:5"
        assert calls == [("base", 5), ("child", 5)]
        assert Base.count.key() != Child.count.key()
        await Child.count.invalidate(5)
        assert await Base.count() == "base:5"
        assert await Child.count() == "child:5"
        assert calls == [("base", 5), ("child", 5), ("child", 5)]


async def _race(
    action: Callable[[pk.SWRCache], Awaitable[object]], *, maxsize: int = 100
) -> tuple[pk.SWRCache, pk.SWRCache, dict[str, str]]:
    """Two caches on one MemoryStore: ``slow`` loads ``k`` on its own cache; while
    it runs, the source changes and ``action(other)`` runs on the other cache."""
    store = pk.MemoryStore(maxsize)
    slow, other = pk.SWRCache(fresh=10, stale=10, store=store), pk.SWRCache(store=store)
    source = {"k": "old"}
    started, release = anyio.Event(), anyio.Event()

    async def slow_load(key: str) -> str:
        value = source[key]
        started.set()
        await release.wait()
        return value

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow.get, "k", slow_load)
        await started.wait()
        source["k"] = "new"
        await action(other)
        release.set()
    return slow, other, source


@pytest.mark.parametrize("how", ["invalidate", "set", "clear"])
async def test_an_invalidation_wins_across_caches_sharing_a_memory_store(how: str) -> None:
    """Two caches share one MemoryStore. A load cache B started before cache A's
    ``invalidate`` / ``set`` / ``clear`` of the key used to store its (outdated)
    value after it, so A then served the old value for a whole fresh window: the
    per-cache write ordering did not reach the other cache. MemoryStore now has the
    conditional set, as RedisStore has across processes."""
    actions: dict[str, Callable[[pk.SWRCache], Awaitable[object]]] = {
        "invalidate": lambda cache: cache.invalidate("k"),
        "set": lambda cache: cache.set("k", "new"),
        "clear": lambda cache: cache.clear(),
    }
    slow, other, source = await _race(actions[how])

    async def load(key: str) -> str:
        return source[key]

    assert await other.get("k", load) == "new"
    assert await slow.get("k", load) == "new"


async def test_a_memory_store_keeps_a_load_that_outlasted_maxsize_writes() -> None:
    """Writes of other keys, however many, never keep a load's value out (the store
    watches the key of each load in flight; it used to remember only the last
    ``maxsize`` writes and drop such a load): the racing load is stored, a fresh hit."""
    loads: list[str] = []

    async def write_many(cache: pk.SWRCache) -> None:
        for i in range(3):
            await cache.set(("other", i), i)

    slow, _, _ = await _race(write_many, maxsize=2)

    async def load(key: str) -> str:
        loads.append(key)
        return "reloaded"

    assert await slow.get("k", load) == "old"  # the racing load was stored
    assert loads == []
