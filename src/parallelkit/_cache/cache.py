"""SWRCache: a stale-while-revalidate cache with single-flight loads.

Every entry lives through three windows, measured from the end of its load:

* **fresh** (``fresh`` seconds): served from the store, nothing else happens;
* **stale** (the next ``stale`` seconds): served at once, and exactly one refresh
  per key runs in the background (in the cache's task group);
* **gone** (after that, or never loaded): a miss; concurrent misses of one key
  share one load (:mod:`parallelkit._cache.singleflight`).

The hit path (:mod:`parallelkit._cache.front`) does no task, lock, event or
datetime work: one key tuple, one local store lookup, one clock read, one
comparison. Everything else is :meth:`SWRCache._slow`. Storage is behind the
:class:`~parallelkit.Store` protocol (:mod:`parallelkit._cache.store`); writes of
one key are ordered (:mod:`parallelkit._cache.writes`) so that an invalidation
always wins.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import time
import warnings
from collections.abc import Awaitable, Callable, Hashable, Iterable
from types import TracebackType
from typing import Any, NamedTuple, TypeVar, cast, overload

import cachetools
from typing_extensions import ParamSpec, Self, final

from .._core.check import (
    async_callable,
    callable_,
    count,
    flag,
    fraction,
    implements,
    number,
    number_or_none,
    strings,
)
from .._core.owned import OwnedTaskGroup
from .cached import CachedFunction, decorate
from .front import Front, Thunk, no_local_answer
from .singleflight import Flight
from .stats import CacheStats, store_counter
from .store import (
    CacheEntry,
    MemoryStore,
    Store,
    SupportsConditionalSet,
    SupportsLoadLock,
    SupportsPeek,
)
from .writes import KeyedWrites

__all__ = ["CacheStats", "CachedFunction", "SWRCache"]

logger = logging.getLogger("parallelkit.cache")

P = ParamSpec("P")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Loader = Callable[[K], Awaitable[V]] | Callable[[], Awaitable[V]]
ErrorCallback = Callable[[Hashable, Exception], object]

_STORE = "a parallelkit.Store (async get/set/delete/clear)"


class _Failure(NamedTuple):
    """What the cache remembers about a key whose load failed."""

    failures: int  # consecutive failed refreshes (0: a failed miss load, kept for error_ttl)
    until: float  # no refresh before then / the error is re-raised until then
    error: Exception | None  # the failed miss load's error (error_ttl), else None


def _takes_no_key(loader: Callable[..., Any]) -> bool:
    """Whether ``loader`` is a zero-argument callable (checked on slow paths only)."""
    code = getattr(loader, "__code__", None)
    if code is not None and not inspect.ismethod(loader):
        return code.co_argcount == 0 and not code.co_flags & inspect.CO_VARARGS
    try:
        params = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.kind in _ACCEPTS_ONE or p.kind is p.VAR_POSITIONAL for p in params)


_ACCEPTS_ONE = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _log_refresh_error(key: Hashable, exc: Exception) -> None:
    """The default ``on_error``: log the failure with the key."""
    logger.warning("SWRCache: refreshing %r failed; serving the stale value", key, exc_info=exc)


@final
class SWRCache:
    """A stale-while-revalidate cache: fast hits, one refresh per key, one load per miss.

    Values are *fresh* for ``fresh`` seconds after their load, then *stale* for
    ``stale`` more seconds: a stale value is returned immediately and refreshed
    once in the background, however many callers see it. After that (or for a key
    never loaded) the call is a miss, and all concurrent misses of a key share one
    load (single flight): the loader runs once and every waiter gets its value or
    its exception. A waiter that is cancelled does not cancel the load for the
    others.

    Enter the cache once, at startup, so it owns its background refreshes::

        async with cache:        # leaving cancels pending refreshes and awaits them
            ...serve requests...

    Without ``async with``, a stale hit refreshes in the calling task (it waits,
    like a miss) and the cache warns once.

    A failed refresh keeps the stale value in service until ``stale`` runs out
    (stale-if-error), is counted in :meth:`statistics`, handed to ``on_error``,
    and the next refresh of that key waits ``backoff`` seconds (doubling per
    consecutive failure, up to ``max_backoff``). A failed *miss* load raises to
    its callers and is not cached, unless ``error_ttl`` is set. What the cache
    remembers about failures is bounded by ``maxsize`` keys (least recently
    used forgotten first), like the entries.

    An invalidation always wins: a load that started before :meth:`invalidate`
    (or :meth:`set`, :meth:`clear`) never stores its value after it, whatever the
    store (writes of a key are ordered), and across processes with a store that
    supports it (``RedisStore``).

    Args:
        fresh: seconds a value is served without any load (>= 0).
        stale: further seconds it is served while refreshed in the background (>= 0).
        maxsize: entries kept by the default :class:`~parallelkit.MemoryStore`
            (least recently used dropped first), and the most keys whose failures
            the cache remembers (with any store).
        store: where entries live (a :class:`~parallelkit.Store`); default
            ``MemoryStore(maxsize)``. A store made later (at startup) can be
            given with :meth:`bind`.
        cache_none: cache ``None`` results (negative caching). ``False`` reloads
            a key whose loader returned ``None``.
        jitter: shorten each entry's fresh window by a random fraction up to this
            (``0 <= jitter < 1``) so that keys loaded together refresh apart.
        error_ttl: if set, a failed miss load is remembered for this many seconds
            and re-raised without calling the loader.
        backoff: seconds before retrying a key whose refresh failed (doubles on
            each consecutive failure).
        max_backoff: the cap for that wait.
        on_error: ``on_error(key, exc)`` for every failed refresh; default: a
            warning on the ``parallelkit.cache`` logger with the key.
        clock: a zero-argument function returning seconds. Default: the store's
            ``clock`` if it has one, else :func:`time.monotonic`, which is what
            ``anyio.current_time()`` returns on asyncio but costs 0.05 µs instead
            of 0.45 µs per hit. Pass ``anyio.current_time`` to follow trio's
            ``MockClock``, or any fake clock in tests.

    Raises:
        ValueError: a window, size or option out of range (the message names it).
        TypeError: an argument of the wrong type (the message names it).

    Example:
        ```python
        import anyio
        import parallelkit as pk

        cache = pk.SWRCache(fresh=30, stale=300)
        loads = []


        @cache.cached
        async def get_conversation(conversation_id: str) -> dict[str, str]:
            loads.append(conversation_id)  # stands in for the database query
            return {"id": conversation_id}


        async def main() -> None:
            async with cache:
                await get_conversation("c1")  # miss: one load
                await get_conversation("c1")  # fresh hit: no load
            assert loads == ["c1"]


        anyio.run(main)
        ```
    """

    __slots__ = (
        "_backoff",
        "_cache_none",
        "_clock_given",
        "_conditional",
        "_error_ttl",
        "_failed",
        "_flights",
        "_fresh",
        "_front",
        "_jitter",
        "_load_errors",
        "_load_lock",
        "_loads",
        "_max_backoff",
        "_maxsize",
        "_misses",
        "_on_error",
        "_owner",
        "_refresh_errors",
        "_refreshes",
        "_stale",
        "_stale_hits",
        "_store",
        "_warned",
        "_whole",
        "_writes",
    )

    def __init__(
        self,
        *,
        fresh: float = 30.0,
        stale: float = 300.0,
        maxsize: int = 10_000,
        store: Store | None = None,
        cache_none: bool = True,
        jitter: float = 0.0,
        error_ttl: float | None = None,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        on_error: ErrorCallback | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._fresh = number("fresh", fresh, zero=True)
        self._stale = number("stale", stale, zero=True)
        if self._fresh + self._stale == 0:
            msg = "fresh and stale are both 0: nothing would ever be served from the cache"
            raise ValueError(msg)
        self._maxsize = count("maxsize", maxsize)
        if store is not None:
            implements("store", store, Store, what=_STORE)
        self._cache_none = flag("cache_none", cache_none)
        self._jitter = fraction("jitter", jitter)
        self._error_ttl = number_or_none("error_ttl", error_ttl)
        self._backoff = number("backoff", backoff)
        self._max_backoff = number("max_backoff", max_backoff)
        if on_error is not None:
            callable_("on_error", on_error, what="a callable (key, exc) or None")
        if clock is not None:
            callable_("clock", clock, what="a zero-argument callable returning seconds")
        self._on_error: ErrorCallback = on_error or _log_refresh_error
        self._clock_given = clock is not None
        self._front = Front(
            peek=no_local_answer,
            clock=clock or time.monotonic,
            slow=self._slow,
            invalidate=self.invalidate,
        )
        self._flights: dict[Hashable, Flight] = {}
        self._writes = KeyedWrites()
        self._failed: cachetools.LRUCache[Hashable, _Failure] = cachetools.LRUCache(maxsize)
        self._owner = OwnedTaskGroup("this SWRCache")
        self._warned = False
        self._stale_hits = self._misses = 0
        self._loads = self._refreshes = self._refresh_errors = self._load_errors = 0
        self._use(store if store is not None else MemoryStore(self._maxsize))

    def _use(self, store: Store) -> None:
        """Read ``store``'s capabilities (see :mod:`parallelkit._cache.store`)."""
        self._store = store
        self._whole = isinstance(store, MemoryStore)  # its peek is all it holds
        self._front.peek = store.peek if isinstance(store, SupportsPeek) else no_local_answer
        self._load_lock = store.load_lock if isinstance(store, SupportsLoadLock) else None
        self._conditional = store if isinstance(store, SupportsConditionalSet) else None
        if not self._clock_given:
            self._front.clock = getattr(store, "clock", None) or time.monotonic

    def bind(self, store: Store) -> None:
        """Give the cache its store now: for a cache made before its store exists.

        A cache is usually built where its functions are decorated, at import
        time, while a shared store (``RedisStore``) is made when the application
        starts. Bind it then, before serving (in the lifespan, or an orchestrator
        service)::

            cache = pk.SWRCache(fresh=30, stale=300)        # module level

            @cache.cached
            async def get_conversation(conversation_id: str) -> dict: ...

            async def lifespan(app):
                cache.bind(RedisStore(redis, namespace="crm"))
                async with cache:
                    yield

        Until then the cache uses its default ``MemoryStore``. The entries of the
        previous store are not carried over, nor the failures remembered; the
        cache adopts the new store's ``clock`` unless ``clock=`` was given.

        Args:
            store: the new :class:`~parallelkit.Store`.

        Raises:
            TypeError: ``store`` is not a store.
            RuntimeError: a load or a store write is in flight (bind before
                serving, or between requests).
        """
        implements("store", store, Store, what=_STORE)
        busy = len(self._flights) + len(self._writes)
        if busy:
            msg = (
                f"SWRCache.bind: {busy} load(s) or store write(s) are in flight; bind the "
                "store at startup, before the cache serves requests"
            )
            raise RuntimeError(msg)
        self._use(store)
        self._failed.clear()

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Self:
        await self._owner.enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # pending refreshes are cancelled; flights keep their errors for their waiters
        return await self._owner.exit(exc_type, exc, tb, cancel=True)

    def statistics(self) -> CacheStats:
        """A frozen snapshot of the counters (see :class:`CacheStats`)."""
        hits = self._front.hits
        served = hits + self._stale_hits
        total = served + self._misses
        return CacheStats(
            hits=hits,
            stale_hits=self._stale_hits,
            misses=self._misses,
            loads=self._loads,
            refreshes=self._refreshes,
            refresh_errors=self._refresh_errors,
            load_errors=self._load_errors,
            evictions=store_counter(self._store, "evictions"),
            store_errors=store_counter(self._store, "errors"),
            hit_rate=served / total if total else 0.0,
        )

    @property
    def stats(self) -> CacheStats:
        """The same as :meth:`statistics` (an alias: ``cache.stats``)."""
        return self.statistics()

    @property
    def store(self) -> Store:
        """The store holding the entries."""
        return self._store

    # ------------------------------------------------------------------ reading
    async def get(self, key: K, loader: Loader[K, V]) -> V:
        """Return the value for ``key``, loading it with ``await loader(key)`` if needed.

        Fresh: returned, no load. Stale: returned, one background refresh. Missing
        or expired: one shared load for all concurrent callers of ``key``.

        Args:
            key: any hashable (and, for a remote store, serializable) key.
            loader: ``async def loader(key) -> value``; a loader that takes no
                arguments (``lambda: fetch(key)``) is called without the key.

        Returns:
            The cached or loaded value.

        Raises:
            Exception: whatever the loader raised, on a miss (each waiter of the
                flight gets the same exception object).
        """
        front = self._front  # the hit path, as in every @cached function (see front.py)
        entry = front.peek(key)
        if entry is not None and front.clock() < entry.fresh_until:
            front.hits += 1
            value: V = entry.value
            return value
        call = cast("Callable[..., Awaitable[V]]", loader)
        thunk: Thunk = call if _takes_no_key(call) else functools.partial(call, key)
        return cast("V", await self._slow(key, thunk))

    @overload
    def cached(self, fn: Callable[P, Awaitable[R]], /) -> CachedFunction[P, R]: ...
    @overload
    def cached(
        self,
        fn: None = None,
        /,
        *,
        key: Callable[..., Hashable] | None = None,
        ignore: Iterable[str] = (),
    ) -> Callable[[Callable[P, Awaitable[R]]], CachedFunction[P, R]]: ...
    def cached(
        self,
        fn: Callable[P, Awaitable[R]] | None = None,
        /,
        *,
        key: Callable[..., Hashable] | None = None,
        ignore: Iterable[str] = (),
    ) -> Any:
        """Decorate an async function so its results are cached here.

        The key is built from the bound arguments, normalized: ``f(1)``,
        ``f(x=1)`` and ``f(1, y=<default>)`` share one entry. Arguments must be
        hashable. Use as ``@cache.cached`` or ``@cache.cached(key=..., ignore=...)``.

        Args:
            fn: the async function.
            key: ``key(*args, **kwargs) -> Hashable`` replacing the default key;
                its result is used as is (so ``cache.invalidate(k)`` reaches it).
            ignore: parameter names left out of the key, e.g. ``("self",)`` for a
                method whose result does not depend on the instance.

        Returns:
            A :class:`CachedFunction` with the same signature plus
            ``.invalidate(*args, **kwargs)`` and ``.key(*args, **kwargs)``.

        Raises:
            TypeError: ``fn`` is not an async function, ``key`` not callable, or
                ``ignore`` not a str or an iterable of str.
            ValueError: ``ignore`` names a parameter ``fn`` does not have, or both
                ``key`` and ``ignore`` are given.
        """
        if key is not None:
            callable_("key", key, what="a callable (*args, **kwargs) -> Hashable")
        names = frozenset(strings("ignore", ignore, what="parameter names"))
        if key is not None and names:
            msg = "pass either key= or ignore=, not both"
            raise ValueError(msg)
        if fn is None:
            return functools.partial(self._decorate, key=key, ignore=names)
        return self._decorate(fn, key=key, ignore=names)

    def _decorate(
        self,
        fn: Callable[P, Awaitable[R]],
        /,
        *,
        key: Callable[..., Hashable] | None,
        ignore: frozenset[str],
    ) -> CachedFunction[P, R]:
        async_callable("fn", fn, what="an async function to cache")
        return decorate(fn, self._front, key=key, ignore=ignore)

    # ------------------------------------------------------------------ writing
    async def set(self, key: Hashable, value: object) -> None:
        """Store ``value`` for ``key`` as freshly loaded now.

        A load of ``key`` in flight at this moment will not overwrite it.
        """
        self._supersede(key)
        await self._writes.acquire(key)
        try:
            entry, ttl = self._entry(value)
            await self._store.set(key, entry, ttl=ttl)
        finally:
            self._writes.release(key)

    async def invalidate(self, key: Hashable) -> None:
        """Forget ``key``: the next call loads it again.

        A load of ``key`` in flight at this moment still answers its waiters but
        never stores its (possibly outdated) result, even if its store write has
        already started; new callers start a new load.
        """
        self._supersede(key)
        await self._writes.acquire(key)  # a write of key in flight lands first
        try:
            await self._store.delete(key)
        finally:
            self._writes.release(key)

    async def clear(self) -> None:
        """Forget every key (in-flight loads will not store their results)."""
        for flight in self._flights.values():
            flight.valid = False
        self._flights.clear()
        self._failed.clear()
        await self._writes.idle()
        await self._store.clear()

    def _supersede(self, key: Hashable) -> None:
        flight = self._flights.pop(key, None)
        if flight is not None:
            flight.valid = False
        self._failed.pop(key, None)

    def _entry(self, value: object) -> tuple[CacheEntry[Any], float]:
        """An entry loaded now, and its ttl."""
        now = self._front.clock()
        fresh = self._fresh
        if self._jitter:
            fresh -= fresh * self._jitter * random.random()
        fresh_until = now + fresh
        return CacheEntry(value, now, fresh_until, fresh_until + self._stale), fresh + self._stale

    # ------------------------------------------------------------------ slow paths
    async def _slow(self, key: Hashable, thunk: Thunk) -> Any:
        """Everything but a fresh local hit: ask the store, serve stale, or load."""
        front = self._front
        entry = front.peek(key)
        if entry is None and not self._whole:
            entry = await self._store.get(key)
        if entry is not None:
            now = front.clock()
            if now < entry.fresh_until:
                front.hits += 1
                return entry.value
            if now < entry.stale_until:
                return await self._stale_hit(key, entry, thunk, now)
        return await self._miss(key, thunk)

    async def _stale_hit(
        self, key: Hashable, entry: CacheEntry[Any], thunk: Thunk, now: float
    ) -> Any:
        self._stale_hits += 1
        if key in self._flights:
            return entry.value  # a refresh (or load) is already running
        failed = self._failed.get(key)
        if failed is not None and failed.error is None and now < failed.until:
            return entry.value  # backing off after a failed refresh
        flight = Flight(refresh=True)
        self._flights[key] = flight
        work = functools.partial(self._load, key, thunk, flight)
        done = functools.partial(self._finish, key, flight)
        tg = self._owner.tg
        if tg is not None:
            flight.start_in(tg, work, done, abandonable=False)
            return entry.value
        if not self._warned:
            self._warned = True
            warnings.warn(
                "SWRCache is not entered, so a stale hit refreshes in the calling task. "
                "Enter the cache once at startup (`async with cache:`) to refresh in the "
                "background.",
                RuntimeWarning,
                stacklevel=4,
            )
        await flight.lead(work, done)
        return flight.value if flight.ok else entry.value  # stale-if-error

    async def _miss(self, key: Hashable, thunk: Thunk) -> Any:
        self._misses += 1
        failed = self._failed.get(key)
        if failed is not None:
            if failed.error is not None and self._front.clock() < failed.until:
                raise failed.error  # error_ttl: remembered failure
            del self._failed[key]
        while True:
            flight = self._flights.get(key)
            if flight is None:
                flight = Flight(refresh=False)
                self._flights[key] = flight
                work = functools.partial(self._load, key, thunk, flight)
                done = functools.partial(self._finish, key, flight)
                tg = self._owner.tg
                if tg is not None:
                    flight.start_in(tg, work, done, abandonable=True)
                    await flight.wait()
                else:
                    await flight.lead(work, done)
            else:
                await flight.wait()
            if flight.ok:
                return flight.value
            if flight.error is not None:
                raise flight.error
            # the flight was cancelled under us (its leader, or the cache closing): retry

    async def _load(self, key: Hashable, thunk: Thunk, flight: Flight) -> Any:
        """A flight's work: the load, under the store's cross-process lock if it has one."""
        lock = self._load_lock
        if lock is None:
            return await self._fetch(key, thunk, flight)
        async with lock(key):
            entry = await self._store.get(key)
            if entry is not None and self._front.clock() < entry.fresh_until:
                return entry.value  # another process loaded it while we waited
            return await self._fetch(key, thunk, flight)

    async def _fetch(self, key: Hashable, thunk: Thunk, flight: Flight) -> Any:
        if flight.refresh:
            self._refreshes += 1
        else:
            self._loads += 1
        conditional = self._conditional
        token = None if conditional is None else await conditional.load_token(key)
        value = await thunk()
        if value is None and not self._cache_none:
            return value
        await self._writes.acquire(key)
        try:
            if flight.valid:  # not superseded while loading, nor while waiting for the turn
                entry, ttl = self._entry(value)
                if conditional is None:
                    await self._store.set(key, entry, ttl=ttl)
                else:
                    await conditional.set_if_unchanged(key, entry, ttl=ttl, token=token)
        finally:
            self._writes.release(key)
        return value

    def _finish(self, key: Hashable, flight: Flight) -> None:
        """A flight ended: forget it, and remember (bounded) how it failed."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        error = flight.error
        if error is None:
            if flight.ok and flight.valid:
                self._failed.pop(key, None)
            return
        if not flight.refresh:
            self._load_errors += 1
            if self._error_ttl is not None and flight.valid:
                until = self._front.clock() + self._error_ttl
                self._failed[key] = _Failure(0, until, error)
            return
        self._refresh_errors += 1
        before = self._failed.get(key)
        failures = (before.failures if before is not None else 0) + 1
        delay = min(self._backoff * 2 ** (failures - 1), self._max_backoff)
        if flight.valid:
            self._failed[key] = _Failure(failures, self._front.clock() + delay, None)
        try:
            self._on_error(key, error)
        except Exception:
            logger.exception("SWRCache: on_error raised for key %r", key)

    def __repr__(self) -> str:
        return (
            f"SWRCache(fresh={self._fresh}, stale={self._stale}, store={self._store!r}, "
            f"entered={self._owner.entered}, in_flight={len(self._flights)})"
        )
