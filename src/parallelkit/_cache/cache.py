"""SWRCache: a stale-while-revalidate cache with single-flight loads.

Every entry lives through three windows, measured from the end of its load:

* **fresh** (``fresh`` seconds): served from the store, nothing else happens;
* **stale** (the next ``stale`` seconds): served at once, and exactly one refresh
  per key runs in the background (in the cache's task group);
* **gone** (after that, or never loaded): a miss; concurrent misses of one key
  share one load (:mod:`parallelkit._cache.singleflight`).

The hit path (:mod:`parallelkit._cache.front`) does no task, lock, event or
datetime work: one key tuple, one local store lookup, one clock read, one
chained comparison (``loaded_at <= now < fresh_until``: an entry stamped after
``now``, by a clock that stepped back, is served as stale, never fresh for the
size of the step). Everything else is :mod:`parallelkit._cache.loads`. Storage is behind the
:class:`~parallelkit.Store` protocol (:mod:`parallelkit._cache.store`); writes of
one key are ordered (:mod:`parallelkit._cache.writes`) so that an invalidation
always wins.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from types import TracebackType
from typing import Any, TypeVar, cast, overload

from typing_extensions import ParamSpec, Self, final

from .._core import instrument
from .._core.check import (
    async_callable,
    callable_,
    callable_with,
    count,
    flag,
    fraction,
    implements,
    number,
    number_or_none,
    strings,
    sync_callable,
)
from .._core.owned import OwnedTaskGroup
from .cached import CachedFunction, decorate
from .front import Front, Thunk, check_key
from .loads import ErrorCallback, Loads
from .stats import CacheStats, store_counter
from .store import MemoryStore, Store

__all__ = ["CacheStats", "CachedFunction", "SWRCache"]

P = ParamSpec("P")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Loader = Callable[[K], Awaitable[V]] | Callable[[], Awaitable[V]]

_STORE = "a parallelkit.Store (async get/set/delete/clear)"
_LOADER = "an async function loader(key) -> value, or a callable returning an awaitable"


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


def _loader(loader: object) -> Callable[..., Any]:
    """Check ``get``'s loader (slow path only): callable, and not an async generator
    function, which is known not to return one value without calling it."""
    call = callable_("loader", loader, what=_LOADER)
    fn = call
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.isasyncgenfunction(fn):
        msg = (
            f"loader must return one value (an awaitable), got async generator function "
            f"{fn!r}: write `async def loader(key) -> value` with `return`, not `yield`"
        )
        raise TypeError(msg)
    return call


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
    its callers and is not cached, unless ``error_ttl`` is set; so does a failed
    refresh that misses joined (the stale window ran out while it was running):
    those callers receive the error, so it is not logged as well. A load whose
    value the store then fails to write still answers its callers (uncached);
    that error is counted in ``store_errors`` and handed to ``on_error``. What the cache
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
            a key whose loader returned ``None``; a refresh that returns ``None``
            drops the stale value (it is no longer served).
        jitter: shorten each entry's fresh window by a random fraction up to this
            (``0 <= jitter < 1``) so that keys loaded together refresh apart.
        error_ttl: if set, a failed miss load is remembered for this many seconds
            and re-raised without calling the loader.
        backoff: seconds before retrying a key whose refresh failed (doubles on
            each consecutive failure).
        max_backoff: the cap for that wait (at least ``backoff``).
        on_error: ``on_error(key, exc)`` for every error no caller received: a
            failed refresh, and a store write that failed after a successful load
            (its callers got the value; counted in ``store_errors``); default: a
            warning on the ``parallelkit.cache`` logger with the key. (On asyncio,
            a ``CancelledError`` the loader raised by itself, having awaited a
            future cancelled elsewhere, is a failed load too.)
        clock: a zero-argument function returning seconds. Default: the store's
            ``clock`` if it has one, else :func:`time.monotonic`, which is what
            ``anyio.current_time()`` returns on asyncio but costs 0.05 µs instead
            of 0.45 µs per hit. Pass ``anyio.current_time`` to follow trio's
            ``MockClock``, or any fake clock in tests. An entry stamped after
            ``now`` (the clock stepped back) is served as stale and refreshed.

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

    __slots__ = ("__weakref__", "_fresh", "_front", "_loads", "_owner", "_stale")

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
        maxsize = count("maxsize", maxsize)
        if store is not None:
            implements("store", store, Store, what=_STORE)
        cache_none = flag("cache_none", cache_none)
        jitter = fraction("jitter", jitter)
        error_ttl = number_or_none("error_ttl", error_ttl)
        first, cap = number("backoff", backoff), number("max_backoff", max_backoff)
        if cap < first:  # the cap would silently replace the first wait (as Retry)
            msg = f"max_backoff ({max_backoff!r}) must be >= backoff ({backoff!r})"
            raise ValueError(msg)
        backoff, max_backoff = first, cap
        if on_error is not None:
            callable_with("on_error", on_error, 2, what="a callable (key, exc) or None")
        if clock is not None:
            callable_with("clock", clock, 0, what="a zero-argument callable returning seconds")
        self._owner = OwnedTaskGroup("this SWRCache")
        self._front = Front(clock=clock or time.monotonic, invalidate=self.invalidate)
        self._loads = Loads(
            self._front,
            self._owner,
            fresh=self._fresh,
            stale=self._stale,
            maxsize=maxsize,
            cache_none=cache_none,
            jitter=jitter,
            error_ttl=error_ttl,
            backoff=backoff,
            max_backoff=max_backoff,
            on_error=on_error,
            clock_given=clock is not None,
        )
        self._loads.use(store if store is not None else MemoryStore(maxsize))
        instrument.caches.add(self)  # weakly: metrics read its statistics() when collected

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
        busy = self._loads.busy
        if busy:
            msg = (
                f"SWRCache.bind: {busy} load(s) or store write(s) are in flight; bind the "
                "store at startup, before the cache serves requests"
            )
            raise RuntimeError(msg)
        self._loads.use(store)

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
        loads, hits = self._loads, self._front.hits
        served = hits + loads.stale_hits
        total = served + loads.misses
        return CacheStats(
            hits=hits,
            stale_hits=loads.stale_hits,
            misses=loads.misses,
            loads=loads.loads,
            refreshes=loads.refreshes,
            refresh_errors=loads.refresh_errors,
            load_errors=loads.load_errors,
            evictions=store_counter(loads.store, "evictions"),
            store_errors=store_counter(loads.store, "errors") + loads.store_errors,
            hit_rate=served / total if total else 0.0,
        )

    @property
    def stats(self) -> CacheStats:
        """The same as :meth:`statistics` (an alias: ``cache.stats``)."""
        return self.statistics()

    @property
    def store(self) -> Store:
        """The store holding the entries."""
        return self._loads.store

    # ------------------------------------------------------------------ reading
    async def get(self, key: K, loader: Loader[K, V]) -> V:
        """Return the value for ``key``, loading it with ``await loader(key)`` if needed.

        Fresh: returned, no load. Stale: returned, one background refresh. Missing
        or expired: one shared load for all concurrent callers of ``key``.

        Args:
            key: any hashable (and, for a remote store, serializable) key.
            loader: ``async def loader(key) -> value``, or any callable returning
                an awaitable; a loader that takes no arguments
                (``lambda: fetch(key)``) is called without the key.

        Returns:
            The cached or loaded value.

        Raises:
            TypeError: ``loader`` is not callable (checked whenever the call needs
                more than a fresh hit, before any load starts); or calling it
                returned something that cannot be awaited (a sync function): that
                load fails with this error, and every waiter of it receives it.
            Exception: whatever the loader raised, on a miss (each waiter of the
                flight gets the same exception object).
            RuntimeError: the loader of ``key`` (or a load it waits for) asks the
                cache for ``key`` again: it would wait for its own load forever.
        """
        front = self._front  # the hit path, as in every @cached function (see front.py)
        try:
            entry = front.peek(key)
        except TypeError:
            check_key(key)  # an unhashable key: say so
            raise
        if entry is not None and entry.loaded_at <= front.clock() < entry.fresh_until:
            front.hits += 1
            value: V = entry.value
            return value
        call = _loader(loader)
        thunk: Thunk = call if _takes_no_key(call) else functools.partial(call, key)
        return cast("V", await self._loads.slow(key, thunk))

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
            ValueError: ``ignore`` names a parameter ``fn`` does not have, both
                ``key`` and ``ignore`` are given, or (without ``key``) another
                function with ``fn``'s ``module.qualname`` but other code or closure
                values is cached here already (a factory's inner function: its keys
                would be the same).
        """
        if key is not None:
            sync_callable("key", key, what="a callable (*args, **kwargs) -> Hashable")
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
        if isinstance(fn, (staticmethod, classmethod)):
            # ``@cache.cached`` above ``@staticmethod`` / ``@classmethod``: cache the
            # function inside, and bind it as the wrapper said (to nothing / the class)
            inner = fn.__func__
            async_callable("fn", inner, what="an async function to cache")
            on_class = isinstance(fn, classmethod)
            cached = decorate(inner, self._front, key=key, ignore=ignore, on_class=on_class)
            return cast("CachedFunction[P, R]", cached if on_class else staticmethod(cached))
        async_callable("fn", fn, what="an async function to cache")
        return decorate(fn, self._front, key=key, ignore=ignore)

    # ------------------------------------------------------------------ writing
    async def set(self, key: Hashable, value: object) -> None:
        """Store ``value`` for ``key`` as freshly loaded now.

        A load of ``key`` in flight at this moment will not overwrite it.
        """
        await self._loads.set(key, value)

    async def invalidate(self, key: Hashable) -> None:
        """Forget ``key``: the next call loads it again.

        A load of ``key`` in flight at this moment still answers its waiters but
        never stores its (possibly outdated) result, even if its store write has
        already started; new callers start a new load.
        """
        await self._loads.delete(key)

    async def clear(self) -> None:
        """Forget every key (in-flight loads will not store their results)."""
        await self._loads.clear()

    def __repr__(self) -> str:
        return (
            f"SWRCache(fresh={self._fresh}, stale={self._stale}, store={self._loads.store!r}, "
            f"entered={self._owner.entered}, in_flight={len(self._loads.flights)})"
        )
