"""The storage protocol behind :class:`~parallelkit.SWRCache`, and its in-memory store.

A :class:`Store` is a small async key/value protocol. The cache decides *when*
to load, refresh, serve stale or evict; the store only keeps :class:`CacheEntry`
records. Freshness metadata travels **with** the value, so a store shared by
many processes (``parallelkit.redis.RedisStore``) gives every process the same
view of what is fresh, what is stale and what is gone.

The protocol (four async methods)::

    async def get(self, key) -> CacheEntry | None          # None: absent (or expired)
    async def set(self, key, entry, *, ttl) -> None    # ttl: seconds the entry is useful
    async def delete(self, key) -> None               # no error if absent
    async def clear(self) -> None

Keys are hashable: :meth:`SWRCache.get` passes yours unchanged and
:meth:`SWRCache.cached` passes ``(function qualname, *arguments)`` tuples (keyword
arguments in signature order, so ``f(1)`` and ``f(x=1)`` give one key). A store
that needs text keys builds them (``repr(key)`` is stable for tuples of str, int,
float, bool and None) and serializes :attr:`CacheEntry.value` as it sees fit.

``ttl`` is a hint: the entry is worthless after ``ttl`` seconds (``fresh + stale``
plus jitter), so a remote store may expire it then (Redis ``PX``). The cache never
relies on the store expiring anything; it compares :attr:`CacheEntry.stale_until`.

Writes of one key are ordered by the cache: ``set``, ``delete`` and ``clear`` of a
key never overlap in one process (a ``delete`` waits for a ``set`` of that key still
in flight), so an invalidation is never undone by a slow write that started before
it. A store needs no locking of its own for that.

A ``set`` (or ``set_if_unchanged``) that raises after a successful load does not
fail the load: its callers get the value, uncached, and the cache counts the
error in :attr:`CacheStats.store_errors` and hands it to ``on_error``. Errors of
``get``, ``delete`` and ``clear`` called for a user's call reach that caller.

Optional capabilities, detected when the cache is built (or :meth:`~SWRCache.bind`
is called):

* ``clock: Callable[[], float]`` (attribute): the time base the entries'
  timestamps use. A store shared across processes must use a clock every process
  agrees on, so ``RedisStore`` sets ``clock = time.time``. Without it the cache
  uses :func:`time.monotonic` (per process), unless you pass
  ``SWRCache(clock=...)``.
* ``peek(key) -> CacheEntry | None`` (sync, :class:`SupportsPeek`): a local
  answer, without I/O, if the store has one. The hit path calls it first; when it
  returns ``None`` the cache awaits :meth:`get`. :class:`MemoryStore`'s ``peek``
  is its whole content; a remote store's is its in-process tier (a near cache).
* ``load_lock(key) -> AsyncContextManager`` (:class:`SupportsLoadLock`): a
  single-flight hook across processes. The cache already runs at most one load
  per key *per process*; with this hook it holds the store's lock around the load
  and, once inside, reads the store again: if another process stored a fresh
  entry while it waited, that entry is used and the loader is not called. The
  store chooses the lease length.
* ``load_token(key)`` and ``set_if_unchanged(key, entry, *, ttl, token)``
  (:class:`SupportsConditionalSet`): invalidation wins **across processes**. The
  cache asks for a token when a load (a miss or a refresh) of ``key`` starts, and
  stores the loaded entry with ``set_if_unchanged`` instead of ``set``: the store
  keeps it only if no ``delete(key)``, ``clear()`` or ``set`` of ``key`` happened
  since the token was handed out, in any process sharing the store. Values stored
  with :meth:`SWRCache.set` still use ``set``.
* ``evictions: int`` (attribute): how many entries the store dropped for room;
  :attr:`CacheStats.evictions` reports it.
* ``errors: int`` (attribute): errors the store absorbed itself (a remote store
  degrading to local memory during an outage); :attr:`CacheStats.store_errors`.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Hashable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from typing_extensions import final

from .._core.check import count

__all__ = [
    "CacheEntry",
    "LoadStart",
    "MemoryStore",
    "Store",
    "SupportsConditionalSet",
    "SupportsLoadLock",
    "SupportsPeek",
]

V = TypeVar("V")


@final
@dataclass(frozen=True, slots=True)
class CacheEntry(Generic[V]):
    """One cached value with the times that decide how it is served.

    All times are in the cache's clock (see the module docs: a shared store uses
    wall-clock time).

    Attributes:
        value: the loaded value (``None`` is a value: negative caching).
        loaded_at: when the load that produced ``value`` finished.
        fresh_until: until then the value is served with no load.
        stale_until: until then the value is served and refreshed in the
            background; after it the entry is a miss.

    Example:
        >>> e = CacheEntry("v", loaded_at=10.0, fresh_until=40.0, stale_until=340.0)
        >>> e.fresh_until - e.loaded_at, e.stale_until - e.fresh_until
        (30.0, 300.0)
    """

    value: V
    loaded_at: float
    fresh_until: float
    stale_until: float


@runtime_checkable
class Store(Protocol):
    """Where an :class:`~parallelkit.SWRCache` keeps its entries.

    Implement these four coroutines to put the cache on any backend; see the
    module documentation (and ``docs/cache.md``) for the optional capabilities
    ``clock``, ``peek``, ``load_lock``, ``load_token`` / ``set_if_unchanged`` and
    ``evictions``.
    """

    async def get(self, key: Hashable) -> CacheEntry[Any] | None:
        """Return the entry stored for ``key``, or ``None``."""
        ...

    async def set(self, key: Hashable, entry: CacheEntry[Any], *, ttl: float) -> None:
        """Store ``entry`` under ``key``; it is useless after ``ttl`` seconds."""
        ...

    async def delete(self, key: Hashable) -> None:
        """Forget ``key`` (no error if it is absent)."""
        ...

    async def clear(self) -> None:
        """Forget every key."""
        ...


@runtime_checkable
class SupportsPeek(Protocol):
    """A store with a local answer it can give synchronously (no I/O)."""

    def peek(self, key: Hashable) -> CacheEntry[Any] | None:
        """Return the local entry for ``key``, or ``None`` (then the cache awaits ``get``)."""
        ...


@runtime_checkable
class SupportsLoadLock(Protocol):
    """A store that can make one load per key happen across processes."""

    def load_lock(self, key: Hashable) -> AbstractAsyncContextManager[object]:
        """An async context manager held around one load of ``key``."""
        ...


@final
class LoadStart:
    """What a store's ``load_lock`` may enter as (``async with lock as start``): the
    entry and the load token, read in the same step as the lock was taken.

    The cache then uses them instead of awaiting ``get(key)`` and
    ``load_token(key)`` inside the lock: ``RedisStore`` starts a load in one round
    trip instead of three. Any other value (``None``) means "ask the store".
    """

    __slots__ = ("entry", "token")

    def __init__(self, entry: CacheEntry[Any] | None, token: object) -> None:
        self.entry = entry
        self.token = token


@runtime_checkable
class SupportsConditionalSet(Protocol):
    """A store that keeps a loaded entry only if ``key`` was not written meanwhile.

    This is how an invalidation wins across processes: a load that started before
    ``delete(key)`` (in this process or another) never stores its value after it.
    """

    async def load_token(self, key: Hashable) -> object:
        """Called when a load (a miss or a refresh) of ``key`` starts; an opaque token."""
        ...

    async def set_if_unchanged(
        self, key: Hashable, entry: CacheEntry[Any], *, ttl: float, token: object
    ) -> bool:
        """Store ``entry`` unless ``key`` was deleted, cleared or set since ``token``.

        Returns:
            Whether the entry was stored.
        """
        ...


@final
class _Watch:
    """What a :class:`MemoryStore` knows about one key hash while loads of it are in
    flight: how recent the last write of it is (see :meth:`MemoryStore.set_if_unchanged`).
    The load tokens of the hash hold it; it goes with the last of them."""

    __slots__ = ("__weakref__", "last")

    def __init__(self) -> None:
        self.last = 0


@final
class _Token:
    """A :class:`MemoryStore` load token: the store's write count when the load
    started, and the watch of its key's hash (kept alive while the load holds this)."""

    __slots__ = ("hash", "watch", "writes")

    def __init__(self, writes: int, key_hash: int, watch: _Watch) -> None:
        self.writes, self.hash, self.watch = writes, key_hash, watch

    def __repr__(self) -> str:
        return f"<MemoryStore load token writes={self.writes}>"


@final
class MemoryStore:
    """An in-process :class:`Store` bounded to ``maxsize`` entries (LRU).

    The default store of :class:`~parallelkit.SWRCache`. Least recently *used*
    entries are dropped first when it is full; expired entries are not swept,
    they are overwritten or pushed out by newer ones. Its :meth:`peek` is its
    whole content, so a hit costs one dictionary lookup and no await.

    It has the conditional set (:class:`SupportsConditionalSet`), so caches
    sharing one ``MemoryStore`` keep "an invalidation always wins" between them: a
    load one cache started before another cache's ``invalidate``, ``set`` or
    ``clear`` of the key does not store its value after it. Of two loads of one
    key (by two caches) the one that started later wins, whichever ends first: its
    value was read later. Writes of *other* keys never keep a load's value out,
    however many: each load in flight has its key watched (by hash: no key is kept
    alive) until it ends, so what the store remembers besides its entries is
    bounded by the loads in flight.

    Args:
        maxsize: the most entries kept (>= 1).

    Example:
        >>> store = MemoryStore(maxsize=2)
        >>> store
        MemoryStore(size=0, maxsize=2, evictions=0)
    """

    __slots__ = ("_cleared", "_data", "_evictions", "_maxsize", "_watching", "_writes")

    def __init__(self, maxsize: int = 10_000) -> None:
        self._maxsize = count("maxsize", maxsize)
        self._data: OrderedDict[Hashable, CacheEntry[Any]] = OrderedDict()
        self._evictions = 0
        # the conditional set: writes (set, delete, clear) and load starts so far, the
        # count of the last clear, and the watches of the key hashes being loaded (a collision
        # only makes a load's write less likely to be kept: never unsafe)
        self._writes = 0
        self._cleared = 0
        self._watching: weakref.WeakValueDictionary[int, _Watch] = weakref.WeakValueDictionary()

    def _wrote(self, key: Hashable) -> None:
        """Note a write of ``key`` (for :meth:`set_if_unchanged`)."""
        self._writes += 1
        if self._watching:
            watch = self._watching.get(hash(key))
            if watch is not None:
                watch.last = self._writes

    @property
    def maxsize(self) -> int:
        """The most entries kept."""
        return self._maxsize

    @property
    def evictions(self) -> int:
        """Entries dropped so far to make room."""
        return self._evictions

    def __len__(self) -> int:
        return len(self._data)

    def peek(self, key: Hashable) -> CacheEntry[Any] | None:
        """Return the entry for ``key`` (marking it recently used) or ``None``."""
        data = self._data
        try:
            entry = data[key]
        except KeyError:
            return None
        data.move_to_end(key)
        return entry

    async def get(self, key: Hashable) -> CacheEntry[Any] | None:
        """Return the entry for ``key`` or ``None``."""
        return self.peek(key)

    async def set(self, key: Hashable, entry: CacheEntry[Any], *, ttl: float) -> None:
        """Store ``entry`` (``ttl`` is not needed: the cache checks the entry's times)."""
        self._put(key, entry)
        self._wrote(key)

    def _put(self, key: Hashable, entry: CacheEntry[Any]) -> None:
        data = self._data
        data[key] = entry
        data.move_to_end(key)
        if len(data) > self._maxsize:
            data.popitem(last=False)
            self._evictions += 1

    async def delete(self, key: Hashable) -> None:
        """Forget ``key``."""
        self._data.pop(key, None)
        self._wrote(key)

    async def clear(self) -> None:
        """Forget every key (the eviction count is kept)."""
        self._data.clear()
        self._writes += 1
        self._cleared = self._writes

    async def load_token(self, key: Hashable) -> object:
        """A token for a load of ``key`` starting now (see :meth:`set_if_unchanged`).

        Holding it keeps ``key`` watched: drop it when the load ends (the cache does).
        """
        key_hash = hash(key)
        watching = self._watching
        watch = watching.get(key_hash)
        if watch is None:
            watch = watching[key_hash] = _Watch()
        self._writes += 1  # one sequence for writes and load starts: they are ordered
        return _Token(self._writes, key_hash, watch)

    async def set_if_unchanged(
        self, key: Hashable, entry: CacheEntry[Any], *, ttl: float, token: object
    ) -> bool:
        """Store ``entry`` unless ``key`` was set, deleted or cleared since ``token``
        (from :meth:`load_token`) by any cache sharing this store, or a load of
        ``key`` that started later has stored its value already."""
        if (
            not isinstance(token, _Token)
            or token.hash != hash(key)
            or self._watching.get(token.hash) is not token.watch  # another store's
            or token.watch.last > token.writes
            or self._cleared > token.writes
        ):
            return False
        self._put(key, entry)
        # a write as recent as the load's start: a load that started before this one
        # (or a write) is not stored over it; one that started after it is
        token.watch.last = token.writes
        return True

    def __repr__(self) -> str:
        return (
            f"MemoryStore(size={len(self._data)}, maxsize={self._maxsize}, "
            f"evictions={self._evictions})"
        )
