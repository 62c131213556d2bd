"""RedisStore's plain writes: ``set``, ``delete``, ``clear``, and their replay.

Everything a store changes in Redis outside a load is here, next to the Lua
scripts that do it (:mod:`._scripts`). A ``set`` gives the entry a new
*generation*, a ``delete`` or ``clear`` removes it, and each publishes an
invalidation for every near cache; a load (:mod:`._store_loads`) stores its value
only if the generation it started from is still there, so no invalidation is
undone by an older load:

* :func:`write` and :func:`clear` (``RedisStore.set`` / ``delete`` / ``clear``),
  to local memory when Redis is down or refuses the write, and replayed
  (:func:`replay`) when it is back or accepts writes again;
* :class:`Scripts`: the Lua scripts of a store's writes and loads.

When Redis answers but refuses writes (:mod:`._store_refusals`), a load runs
without a lease and its value, like a ``set``/``delete``/``clear``, is kept as
during an outage; :func:`masked` keeps this process from reading back from Redis
what it loaded or invalidated meanwhile.

Kept apart from :mod:`._store`, the store's face and read side: ``peek`` and
``get`` never enter this module, so the hit path reads in one place there. The
functions take the store they work for; ``RedisStore``'s methods of the same
names hold the documentation and call them.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from typing_extensions import final

from .._cache.store import CacheEntry
from .._core.check import number
from ._common import MAX_LEASE
from ._near import CLEAR, invalidation
from ._outage import Down, refuses_writes
from ._scripts import LOAD_START, TOKEN, WRITE, WRITE_IF, WRITE_IF_RELEASE

if TYPE_CHECKING:
    from ._store import RedisStore

__all__ = ["Scripts", "clear", "masked", "replay", "ttl_ms", "write"]

Arg = bytes | str | int | float  # what a script argument may be


def ttl_ms(ttl: object) -> int:
    """``ttl`` (seconds, as ``Store.set`` takes it) as Redis's ``PX``: at least 1 ms,
    at most :data:`~._common.MAX_LEASE` seconds (a longer one, ``inf`` included, is
    kept that long: Redis refuses expiry times past its 64-bit milliseconds, and
    ``ttl`` is only a hint of when the entry is worthless).

    Raises:
        TypeError: ``ttl`` is not a number (or is a ``bool``).
        ValueError: ``ttl`` is negative or NaN.
    """
    seconds = number("ttl", ttl, zero=True, finite=False)
    return max(1, round(min(seconds, MAX_LEASE) * 1000))


@final
class Scripts:
    """The Lua scripts of a store's writes and loads, registered once per store."""

    __slots__ = ("load_start", "token", "write", "write_if", "write_if_release")

    def __init__(self, redis: Redis) -> None:
        self.write = redis.register_script(WRITE)
        self.write_if = redis.register_script(WRITE_IF)
        self.token = redis.register_script(TOKEN)
        self.load_start = redis.register_script(LOAD_START)
        self.write_if_release = redis.register_script(WRITE_IF_RELEASE)


# -- plain writes ----------------------------------------------------------------------
async def write(
    store: RedisStore, key: Hashable, entry: CacheEntry[Any] | None, data: bytes, ttl: float
) -> None:
    """Set (``data``) or delete (``b""``) in Redis; publish; local memory if down or refused."""
    name = store._name(key)
    store._local_epoch += 1
    store._near.drop(key, name)
    what = "set" if data else "delete"
    try:
        if store._refusals.error is not None and not await _writable(store, stores=bool(data)):
            store._refusals.write_refused(None, what)
            await _keep(store, key, name, entry, ttl)
            return
        args: list[Arg] = [data, ttl_ms(ttl), store._channel, invalidation(name)]
        command = store._scripts.write(keys=[store._value_prefix + name], args=args)
        await store._guard.call(what, command)
    except Down as down:
        store._degrade(down)
        await _keep(store, key, name, entry, ttl)
        return
    except ResponseError as exc:
        if not refuses_writes(exc):
            raise
        store._refusals.write_refused(exc, what)
        await _keep(store, key, name, entry, ttl)
        return
    if data:
        _accepted(store)


async def _keep(
    store: RedisStore, key: Hashable, name: str, entry: CacheEntry[Any] | None, ttl: float
) -> None:
    """A write Redis did not get (down, or refused): in local memory, and replayed."""
    _missed(store, name)
    if entry is not None:
        await store._local.set(key, entry, ttl=ttl)


def _missed(store: RedisStore, name: str) -> None:
    """A write Redis did not get: delete it there when Redis is back (:func:`replay`)."""
    if not store._missed_all:
        store._missed[name] = None
        if len(store._missed) > store._local.maxsize:  # too many to replay one by one
            store._missed_all = True
            store._missed.clear()


async def replay(store: RedisStore) -> None:
    """Redis answers again: before it is read again (the guard's ``before_recovery``),
    delete there what this process wrote or deleted only locally during the outage,
    and tell every replica (an invalidation each; a ``clear`` if there were too many).

    Without it, every process would read from Redis again the entry invalidated
    during the outage, until its ``fresh`` window ran out. Deleting (rather than
    writing the local value) also makes a load that started before the outage
    fail its ``set_if_unchanged``: the invalidation still wins.

    If Redis answers but refuses the deletes (a failover brought the client back to
    a demoted primary), what is left stays kept (:func:`masked`) and the store
    goes on: the recovery is not failed, reads go to Redis again.
    """
    await _replay(store)


async def _replay(store: RedisStore) -> bool:
    """:func:`replay`; ``False`` if Redis refused the writes (kept for the next try)."""
    guard = store._guard
    if not (store._missed or store._missed_all):
        return True
    try:
        if store._missed_all:
            await _clear_redis(store, force=True)
            store._missed_all = False
            store._missed.clear()
        while store._missed:
            name = next(iter(store._missed))
            args: list[Arg] = [b"", 1, store._channel, invalidation(name)]
            command = store._scripts.write(keys=[store._value_prefix + name], args=args)
            await guard.call("replay", command, force=True)
            store._missed.pop(name, None)
    except ResponseError as exc:
        if not refuses_writes(exc):
            raise
        store._refusals.refused(exc, "replay")
        return False
    store._refusals.replayed()
    return True


async def _writable(store: RedisStore, *, stores: bool) -> bool:
    """While Redis refuses writes: whether to send this one. A write that ``stores``
    (a lease, a value) is skipped until its turn to try (``Refusals.waiting``); an
    invalidation is always tried. What is kept from before is replayed first."""
    if stores and store._refusals.waiting():
        return False
    if store._missed or store._missed_all:
        return await _replay(store)
    return True


async def masked(store: RedisStore, name: str) -> bool:
    """While Redis refuses writes: whether a read of ``name`` must be served from local
    memory, not Redis: this process's write of it was refused, and the entry Redis
    holds is older. Replays the kept writes first when it is their turn to try."""
    if not (store._missed or store._missed_all) or store._guard.down:
        return False
    if not store._refusals.waiting():
        try:
            await _replay(store)
        except Down:
            return False  # the read finds the circuit open: local memory (degraded)
    return store._missed_all or name in store._missed


def _accepted(store: RedisStore) -> None:
    """A write that stores was accepted: the refusal episode ends, unless writes it
    refused are still to be replayed (the next write's turn replays them)."""
    if store._refusals.error is not None and not (store._missed or store._missed_all):
        store._refusals.accepted()
        if not store._guard.down:
            store._recovered()  # local memory held only the refused writes: replayed


async def clear(store: RedisStore) -> None:
    """Forget every key of ``store``'s namespace (``SCAN`` + ``UNLINK``), and publish it."""
    store._local_epoch += 1
    store._near.reset(listening=store._near.listening)
    await store._local.clear()
    try:
        await _clear_redis(store)
    except Down as down:
        store._degrade(down)
        store._missed_all = True  # cleared when Redis is back (replay)
        store._missed.clear()
        return
    except ResponseError as exc:
        if not refuses_writes(exc):
            raise
        store._refusals.write_refused(exc, "clear")
        store._missed_all = True  # cleared when Redis accepts writes again
        store._missed.clear()
        return
    if store._missed or store._missed_all:  # older writes kept: this clear covers them
        store._missed_all = False
        store._missed.clear()


async def _clear_redis(store: RedisStore, *, force: bool = False) -> None:
    """``SCAN`` + ``UNLINK`` the namespace's entries, then publish ``CLEAR``."""
    guard, redis = store._guard, store._redis
    pattern = _glob_escape(store._value_prefix) + "*"
    cursor = 0
    while True:
        cursor, names = await guard.call(
            "clear", redis.scan(cursor, match=pattern, count=500), force=force
        )
        if names:
            await guard.call("clear", redis.unlink(*names), force=force)
        if not cursor:
            break
    await guard.call("clear", redis.publish(store._channel, CLEAR), force=force)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
