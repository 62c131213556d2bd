"""Checked by `mypy --strict tests/typing` (pytest collects nothing here): cache/batch types."""

from __future__ import annotations

from collections.abc import Hashable

from typing_extensions import assert_type

import parallelkit as pk

cache = pk.SWRCache(fresh=30.0, stale=300.0, maxsize=10_000, store=None)


@cache.cached
async def get_conversation(conversation_id: str, *, deep: bool = False) -> dict[str, str] | None:
    return {"id": conversation_id} if deep else None


@cache.cached(key=lambda cid: f"contact:{cid}")
async def get_contact(cid: int) -> str:
    return str(cid)


class Repo:
    @cache.cached
    async def name(self, item: int) -> str:
        return str(item)


async def load_user(key: int) -> str:
    return str(key)


async def contacts(ids: list[int]) -> dict[int, str]:
    return {i: str(i) for i in ids}


async def check() -> None:
    # decorators keep the signature and the result type
    assert_type(await get_conversation("c1"), dict[str, str] | None)
    assert_type(await get_conversation("c1", deep=True), dict[str, str] | None)
    assert_type(await get_contact(3), str)
    await get_conversation.invalidate("c1")
    assert_type(get_conversation.key("c1"), Hashable)
    # methods: self is bound, .invalidate works on the bound method
    assert_type(await Repo().name(1), str)
    await Repo().name.invalidate(1)
    # get() infers the loader's value type
    assert_type(await cache.get(3, load_user), str)
    await cache.set("k", 1)
    await cache.invalidate("k")
    await cache.clear()
    stats = cache.stats
    assert_type(stats, pk.CacheStats)
    assert_type(cache.statistics(), pk.CacheStats)
    cache.bind(pk.MemoryStore(maxsize=100))  # a late-bound store
    assert_type(cache.store, pk.Store)
    contact_fn: pk.CachedFunction[[int], str] = get_contact  # the decorator's type
    assert_type(await contact_fn(1), str)
    assert_type(stats.hit_rate, float)
    assert_type(pk.MemoryStore(maxsize=10), pk.MemoryStore)
    store: pk.Store = pk.MemoryStore()
    entry = await store.get("k")
    if entry is not None:
        assert_type(entry.fresh_until, float)
    async with cache as entered:
        assert_type(entered, pk.SWRCache)

    async with pk.BatchLoader(contacts, max_batch=500) as loader:
        assert_type(loader, pk.BatchLoader[int, str])
        assert_type(await loader.load(1), str)
        assert_type(await loader.load_many([1, 2]), list[str])
        assert_type(loader.stats, pk.BatchStats)
        assert_type(loader.statistics(), pk.BatchStats)
