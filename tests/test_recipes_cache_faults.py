"""Recipes of the cache, batching and FastAPI pages pasted into a service, under
faults: what broke there, reproduced as unit tests."""

from __future__ import annotations

import gc
from typing import Any

import pytest

import parallelkit as pk

pytestmark = pytest.mark.anyio


def make_loader(cache: pk.SWRCache, table: Any, *, keyed: bool = False) -> Any:
    """A factory of cached loaders, one per table: the functions share a qualname."""

    async def load(row_id: int) -> str:
        return f"{table}:{row_id}"

    if keyed:
        return cache.cached(key=lambda row_id: (table, row_id))(load)
    return cache.cached(load)


async def test_a_second_function_of_one_name_with_other_closure_values_is_refused() -> None:
    """Two functions made by one factory (same ``module.qualname``, different
    closures) used to build the same key: the second returned the first one's
    value, a wrong answer, silently. Now the second is refused at decoration, with
    the way out (``key=``); a counter in the name would depend on the order of
    decoration, which replicas sharing a store need not agree on."""
    cache = pk.SWRCache(fresh=30, stale=300)
    users = make_loader(cache, "users")
    with pytest.raises(ValueError, match=r"make_loader.<locals>.load.*key="):
        make_loader(cache, "orgs")
    async with cache:
        assert await users(1) == "users:1"
    other = pk.SWRCache(fresh=30, stale=300)  # another cache: its own names
    assert make_loader(other, "orgs").key(1) == (f"{__name__}.make_loader.<locals>.load", 1)


async def test_functions_of_one_name_told_apart_by_their_key_do_not_share_entries() -> None:
    cache = pk.SWRCache(fresh=30, stale=300)
    users, orgs = make_loader(cache, "users", keyed=True), make_loader(cache, "orgs", keyed=True)
    async with cache:
        assert await users(1) == "users:1"
        assert await orgs(1) == "orgs:1"
        assert await users(1) == "users:1"
        await orgs.invalidate(1)  # forgets orgs' entry only
        assert await users(1) == "users:1"
    assert cache.statistics().loads == 2
    assert cache.statistics().hits == 2


async def test_the_first_function_of_a_name_keeps_the_documented_key() -> None:
    """The key of the first function decorated under a name is ``(module.qualname,
    *args)`` (what a store shared between replicas relies on); a second function
    with equal closure values is the same function: it shares the entries."""
    cache = pk.SWRCache(fresh=30, stale=300)
    first = make_loader(cache, "users")
    again = make_loader(cache, "users")
    assert first.key(1) == (f"{__name__}.make_loader.<locals>.load", 1)
    assert again.key(1) == first.key(1)
    async with cache:
        assert await first(1) == await again(1) == "users:1"
    assert cache.statistics().loads == 1


async def test_a_function_made_again_after_the_first_is_gone_is_still_checked() -> None:
    """A factory called per request: the earlier function is gone. The same plain
    closure values, or the very same objects, are the same function (its entries
    are right for it); other values must not be served its entries."""
    cache = pk.SWRCache(fresh=30, stale=300)
    async with cache:
        for _ in range(2):
            load = make_loader(cache, ("users", 1))
            assert await load(1) == "('users', 1):1"
            del load
            gc.collect()
        with pytest.raises(ValueError, match="closure values"):
            make_loader(cache, ("orgs", 1))
    assert cache.statistics().loads == 1

    class Table:
        def __init__(self, name: str) -> None:
            self.name = name

        def __str__(self) -> str:
            return self.name

    cache = pk.SWRCache(fresh=30, stale=300)
    users = Table("users")
    load = make_loader(cache, users)
    key = load.key(1)
    del load
    gc.collect()
    assert make_loader(cache, users).key(1) == key  # the same object (an engine, say)
    with pytest.raises(ValueError, match="closure values"):
        make_loader(cache, Table("users"))  # another object
    cache = pk.SWRCache(fresh=30, stale=300)
    tables = ["users"]  # a list takes no weak reference: kept, compared by identity
    load = make_loader(cache, tables)
    del load
    gc.collect()
    assert make_loader(cache, tables).key(1) == key
    with pytest.raises(ValueError, match="closure values"):
        make_loader(cache, ["users"])  # an equal list, but another one (mutable state)
