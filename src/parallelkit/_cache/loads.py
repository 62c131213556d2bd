"""Everything after a missed fresh hit: stale hits, misses, loads and store writes.

:class:`Loads` is the engine behind :class:`~parallelkit.SWRCache`; the cache
itself is its public face (options, ``get``, ``cached``, ``bind``, lifecycle). A
call that is not a fresh local hit (:mod:`parallelkit._cache.front`) comes here:

* **ask the store** when its ``peek`` had no local answer;
* **stale hit**: serve the stale value and start one refresh per key, in the
  cache's task group (or inline when the cache is not entered), unless a refresh
  is running or the key is backing off after a failed one;
* **miss**: join the key's flight or start one (:mod:`~.singleflight`);
* **load**: under the store's ``load_lock`` if it has one, with a
  ``load_token`` if it has the conditional set, then one ordered write
  (:mod:`~.writes`) unless the flight was superseded (invalidation wins);
* **failures**: remembered per key, at most ``maxsize`` keys (least recently used
  forgotten first): the refresh back-off and, with ``error_ttl``, the failed
  load's error.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import reprlib
import time
import warnings
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import Any, NamedTuple, cast

import cachetools
from typing_extensions import final

from .._core.owned import OwnedTaskGroup, detached
from .front import Front, Thunk, check_key, no_local_answer, short_repr
from .singleflight import Flight
from .stats import store_counter
from .store import (
    CacheEntry,
    LoadStart,
    MemoryStore,
    Store,
    SupportsConditionalSet,
    SupportsLoadLock,
    SupportsPeek,
)
from .writes import KeyedWrites

__all__ = ["ErrorCallback", "Loads"]

logger = logging.getLogger("parallelkit.cache")

ErrorCallback = Callable[[Hashable, Exception], object]

_ASK: Any = object()  # no token came with the load lock: ask the store for one


class _Failure(NamedTuple):
    """What the cache remembers about a key whose load failed."""

    failures: int  # consecutive failed refreshes (0: a failed miss load, kept for error_ttl)
    since: float  # when it was recorded: a record after ``now`` (the clock stepped back) is void
    until: float  # no refresh before then / the error is re-raised until then
    error: BaseException | None  # the failed miss load's error (error_ttl), else None
    traceback: TracebackType | None = None  # that error's, as its load raised it

    def holds(self, now: float) -> bool:
        """Whether it still applies at ``now`` (never longer for a clock stepping back)."""
        return self.since <= now < self.until


def _not_awaitable(thunk: Thunk, result: object) -> TypeError:
    """The error for a loader whose call returned something that cannot be awaited."""
    fn = thunk.func if isinstance(thunk, functools.partial) else thunk
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    msg = (
        f"loader must be an async function or return an awaitable, but {name} returned "
        f"{type(result).__name__} {reprlib.repr(result)}: write it with `async def`, or run "
        "blocking work with anyio.to_thread.run_sync"
    )
    return TypeError(msg)


def _coroutine_value(what: str, value: object) -> TypeError:
    """The error for a coroutine where a value was due (it can be awaited only once)."""
    msg = (
        f"{what} a coroutine ({value!r}), not a value: did you forget an `await`? "
        "A coroutine can be awaited only once, so it is never cached"
    )
    return TypeError(msg)


def _waits_for_itself(key: Hashable) -> RuntimeError:
    """The error for a load of ``key`` that would wait for its own load of ``key``."""
    msg = (
        f"SWRCache: the load of key {short_repr(key)} asks the cache for that key again "
        "(its loader, or a load it waits for, calls the cache with it), so it would wait "
        "for itself forever; inside the loader, read the source directly"
    )
    return RuntimeError(msg)


def log_refresh_error(key: Hashable, exc: Exception) -> None:
    """The default ``on_error``: log the failure with the key."""
    logger.warning(
        "SWRCache: refreshing %s failed; serving the stale value", short_repr(key), exc_info=exc
    )


def log_store_error(key: Hashable, exc: Exception) -> None:
    """The default ``on_error`` for a store write that failed after a good load."""
    logger.warning(
        "SWRCache: the store failed to write %s; its loaded value was returned, not cached",
        short_repr(key),
        exc_info=exc,
    )


@final
class Loads:
    """The loads, refreshes, failures and writes of one cache (internal; see module docs)."""

    __slots__ = (
        "_backoff",
        "_cache_none",
        "_clock_given",
        "_conditional",
        "_error_ttl",
        "_failed",
        "_fresh",
        "_front",
        "_jitter",
        "_load_lock",
        "_max_backoff",
        "_on_error",
        "_on_store_error",
        "_owner",
        "_stale",
        "_warned",
        "_whole",
        "flights",
        "load_errors",
        "loads",
        "misses",
        "refresh_errors",
        "refreshes",
        "stale_hits",
        "store",
        "store_errors",
        "writes",
    )

    def __init__(
        self,
        front: Front,
        owner: OwnedTaskGroup,
        *,
        fresh: float,
        stale: float,
        maxsize: int,
        cache_none: bool,
        jitter: float,
        error_ttl: float | None,
        backoff: float,
        max_backoff: float,
        on_error: ErrorCallback | None,
        clock_given: bool,
    ) -> None:
        self._front = front
        front.slow = self.slow
        self._owner = owner
        self._fresh, self._stale, self._jitter = fresh, stale, jitter
        self._cache_none = cache_none
        self._error_ttl = error_ttl
        self._backoff, self._max_backoff = backoff, max_backoff
        self._on_error = on_error or log_refresh_error
        self._on_store_error = on_error or log_store_error
        self._clock_given = clock_given
        self._warned = False
        self._failed: cachetools.LRUCache[Hashable, _Failure] = cachetools.LRUCache(maxsize)
        self.flights: dict[Hashable, Flight] = {}
        self.writes = KeyedWrites()
        self.stale_hits = self.misses = self.loads = self.refreshes = 0
        self.refresh_errors = self.load_errors = self.store_errors = 0

    def use(self, store: Store) -> None:
        """Read ``store``'s capabilities (see :mod:`parallelkit._cache.store`)."""
        self.store = store
        self._whole = isinstance(store, MemoryStore)  # its peek is all it holds
        self._front.peek = store.peek if isinstance(store, SupportsPeek) else no_local_answer
        self._load_lock = store.load_lock if isinstance(store, SupportsLoadLock) else None
        self._conditional = store if isinstance(store, SupportsConditionalSet) else None
        if not self._clock_given:
            self._front.use_clock(getattr(store, "clock", None) or time.monotonic, "store.clock")
        self._failed.clear()  # its times are in the old clock

    @property
    def busy(self) -> int:
        """Loads and store writes in flight."""
        return len(self.flights) + len(self.writes)

    # ------------------------------------------------------------------ writes
    def entry(self, value: object) -> tuple[CacheEntry[Any], float]:
        """An entry loaded now, and its ttl."""
        now = self._front.clock()
        fresh = self._fresh
        if self._jitter:
            fresh -= fresh * self._jitter * random.random()
        fresh_until = now + fresh
        return CacheEntry(value, now, fresh_until, fresh_until + self._stale), fresh + self._stale

    async def set(self, key: Hashable, value: object) -> None:
        """``cache.set``: supersede the loads of ``key``, then store ``value``."""
        if inspect.iscoroutine(value):
            raise _coroutine_value("cache.set was given", value)
        self._front.check_clock()
        self._supersede(key)
        await self.writes.acquire(key)
        try:
            entry, ttl = self.entry(value)
            await self.store.set(key, entry, ttl=ttl)
        finally:
            self.writes.release(key)

    async def delete(self, key: Hashable) -> None:
        """``cache.invalidate``: supersede the loads of ``key``, then delete it."""
        self._supersede(key)
        await self.writes.acquire(key)  # a write of key in flight lands first
        try:
            await self.store.delete(key)
        finally:
            self.writes.release(key)

    async def clear(self) -> None:
        """``cache.clear``: supersede every load, then clear the store."""
        for flight in self.flights.values():
            flight.valid = False
        self.flights.clear()
        self._failed.clear()
        async with self.writes.exclusive():
            await self.store.clear()

    def _supersede(self, key: Hashable) -> None:
        check_key(key)  # an unhashable key: say so, before any write
        flight = self.flights.pop(key, None)
        if flight is not None:
            flight.valid = False
        self._failed.pop(key, None)

    # ------------------------------------------------------------------ reads
    async def slow(self, key: Hashable, thunk: Thunk) -> Any:
        """Everything but a fresh local hit: ask the store, serve stale, or load."""
        front = self._front
        front.check_clock()  # its first reading, before any load (FirstReading)
        entry = front.peek(key)  # (the hit path named an unhashable key it peeked)
        if entry is None and not self._whole:
            check_key(key)  # a store without peek saw no key yet: name an unhashable one
            entry = await self.store.get(key)
        if entry is not None:
            now = front.clock()
            if now < entry.loaded_at:
                # stamped after now: the clock stepped back (or a replica's runs ahead).
                # Its age is unknown: serve it as stale (one refresh stamps it anew),
                # never fresh for the size of the step
                return await self._stale_hit(key, entry, thunk, now)
            if now < entry.fresh_until:
                front.hits += 1
                return entry.value
            if now < entry.stale_until:
                return await self._stale_hit(key, entry, thunk, now)
        return await self._miss(key, thunk)

    async def _stale_hit(
        self, key: Hashable, entry: CacheEntry[Any], thunk: Thunk, now: float
    ) -> Any:
        self.stale_hits += 1
        if key in self.flights:
            return entry.value  # a refresh (or load) is already running
        failed = self._failed.get(key)
        if failed is not None and failed.error is None and failed.holds(now):
            return entry.value  # backing off after a failed refresh
        tg = self._owner.tg
        if tg is None and not self._warned:
            # before the flight is registered: a warning filter may turn this into an
            # error, which must not leave behind a flight that never runs
            self._warned = True
            warnings.warn(
                "SWRCache is not entered, so a stale hit refreshes in the calling task. "
                "Enter the cache once at startup (`async with cache:`) to refresh in the "
                "background.",
                RuntimeWarning,
                stacklevel=4,
            )
        flight, work, done = self._new_flight(key, thunk, refresh=True)
        if tg is not None:
            # the cache's work, not the caller's: no request-scoped context (owned.py)
            detached(flight.start_in, tg, work, done, abandonable=False)
            return entry.value
        await flight.lead(work, done)
        return flight.value if flight.ok else entry.value  # stale-if-error

    async def _miss(self, key: Hashable, thunk: Thunk) -> Any:
        self.misses += 1
        failed = self._failed.get(key)
        if failed is not None:
            if failed.error is not None and failed.holds(self._front.clock()):
                # error_ttl: remembered failure (its traceback as the load left it: a
                # raise adds to it, and this object is raised again and again)
                raise failed.error.with_traceback(failed.traceback)
            del self._failed[key]
        while True:
            flight = self.flights.get(key)
            if flight is None:
                flight, work, done = self._new_flight(key, thunk, refresh=False)
                tg = self._owner.tg
                if tg is not None:
                    flight.start_in(tg, work, done, abandonable=True)
                    await flight.wait()
                else:
                    await flight.lead(work, done)
            else:
                if flight.runs_here():  # its loader asks for its own key: no wait ends
                    raise _waits_for_itself(key)
                await flight.wait()
            if flight.ok:
                return flight.value
            if flight.error is not None:
                # the same object for every waiter; each raise would add its frames to
                # the traceback the others see: raise it with the load's own
                raise flight.error.with_traceback(flight.traceback)
            if flight.interrupted is not None:  # a KeyboardInterrupt-like error: no new load
                raise flight.interruption()
            # the flight was cancelled under us (its leader, or the cache closing): retry

    # ------------------------------------------------------------------ loads
    def _new_flight(
        self, key: Hashable, thunk: Thunk, *, refresh: bool
    ) -> tuple[Flight, Thunk, Callable[[], None]]:
        """Register a flight for ``key``: it, its work and its cleanup."""
        flight = Flight(refresh=refresh)
        self.flights[key] = flight
        work = functools.partial(self._load, key, thunk, flight)
        return flight, work, functools.partial(self._finish, key, flight)

    async def _load(self, key: Hashable, thunk: Thunk, flight: Flight) -> Any:
        """A flight's work: the load, under the store's cross-process lock if it has one."""
        lock = self._load_lock
        if lock is None:
            return await self._fetch(key, thunk, flight)
        async with lock(key) as start:
            if isinstance(start, LoadStart):  # read with the lock (RedisStore: one trip)
                entry, token = start.entry, start.token
            else:
                entry, token = await self.store.get(key), _ASK
            if entry is not None and entry.loaded_at <= self._front.clock() < entry.fresh_until:
                return entry.value  # another process loaded it while we waited
            return await self._fetch(key, thunk, flight, token)

    async def _fetch(
        self, key: Hashable, thunk: Thunk, flight: Flight, token: object = _ASK
    ) -> Any:
        if flight.refresh:
            self.refreshes += 1
        else:
            self.loads += 1
        conditional = self._conditional
        if conditional is not None and token is _ASK:
            token = await conditional.load_token(key)
        try:
            pending = thunk()
            if not inspect.isawaitable(pending):  # a sync loader: fail this flight, clearly
                raise _not_awaitable(thunk, pending)
            value = await pending
            if inspect.iscoroutine(value):  # `return fetch(key)`: an `await` forgotten
                value.close()  # awaitable once: never a value to cache (nor a warning later)
                raise _coroutine_value("loader returned", value)
            if value is None and not self._cache_none:
                if flight.refresh:  # the stale value is gone at the source: stop serving it
                    await self._forget(key, flight)
                return value
            await self.writes.acquire(key)
            try:
                if flight.valid:  # not superseded while loading, nor while waiting for the turn
                    entry, ttl = self.entry(value)
                    counted = store_counter(self.store, "errors")
                    try:
                        if conditional is None:
                            await self.store.set(key, entry, ttl=ttl)
                        else:
                            await conditional.set_if_unchanged(key, entry, ttl=ttl, token=token)
                    except (TypeError, ValueError):
                        # the value itself cannot be stored (a serializer's SerializationError):
                        # a bug in the caller's data, the same on every call, not an outage of
                        # the store: raised to its callers, as a load error
                        raise
                    except Exception as exc:  # the load succeeded: its callers get the value
                        self._write_failed(key, flight, exc, counted)
            finally:
                self.writes.release(key)
            return value
        finally:
            # a traceback keeping this frame (a shared error) must not keep the token,
            # which may hold store state while it lives (MemoryStore watches its key)
            token = None

    async def _forget(self, key: Hashable, flight: Flight) -> None:
        """A refresh found nothing (``None``, not cached): delete the entry it refreshed,
        unless the flight was superseded (then a newer write decides)."""
        await self.writes.acquire(key)
        try:
            if flight.valid:
                counted = store_counter(self.store, "errors")
                try:
                    await self.store.delete(key)
                except Exception as exc:  # the refresh itself succeeded (with None)
                    self._write_failed(key, flight, exc, counted)
        finally:
            self.writes.release(key)

    def _write_failed(self, key: Hashable, flight: Flight, error: Exception, counted: int) -> None:
        """A store write after a successful load failed: the callers get the loaded
        value, so the error reaches no one; count it and report it (once).

        ``counted``: the store's own ``errors`` before the write. A store that
        counted this failure itself (``RedisStore(strict=True)``) is not counted twice.
        """
        if store_counter(self.store, "errors") == counted:
            self.store_errors += 1
        flight.unstored = True  # a refresh backs off (_finish): the store is likely down
        self._report(key, error, self._on_store_error)

    def _finish(self, key: Hashable, flight: Flight) -> None:
        """A flight ended: forget it, and remember (bounded) how it failed."""
        if self.flights.get(key) is flight:
            del self.flights[key]
        error = flight.error
        if error is None:
            if flight.ok and flight.valid:
                if flight.unstored and flight.refresh:
                    self._back_off(key)  # reported as a store error already
                else:
                    self._failed.pop(key, None)
            return
        if not flight.refresh or flight.waiters:
            # callers receive it (a miss, or misses that joined a refresh): theirs, not logged
            self.load_errors += 1
            if self._error_ttl is not None and flight.valid:
                now = self._front.clock()
                self._failed[key] = _Failure(0, now, now + self._error_ttl, error, flight.traceback)
            return
        self.refresh_errors += 1
        if flight.valid:
            self._back_off(key)
        # an Exception, or (asyncio) a CancelledError the loader raised by itself
        self._report(key, cast("Exception", error), self._on_error)

    def _back_off(self, key: Hashable) -> None:
        """One more consecutive failed refresh of ``key``: no refresh for a while."""
        before = self._failed.get(key)
        failures = (before.failures if before is not None and before.error is None else 0) + 1
        try:
            delay = min(self._backoff * 2 ** (failures - 1), self._max_backoff)
        except OverflowError:  # 2 ** 1024 and up is no float: far past any cap
            delay = self._max_backoff
        now = self._front.clock()
        self._failed[key] = _Failure(failures, now, now + delay, None)

    @staticmethod
    def _report(key: Hashable, error: Exception, callback: ErrorCallback) -> None:
        """Hand an error no caller received to ``callback`` (``on_error``)."""
        try:
            callback(key, error)
        except Exception as failure:
            if failure.__context__ is None:  # the error reached no one else: show it
                failure.__context__ = error
            logger.exception("SWRCache: on_error raised for key %s", short_repr(key))

    def __repr__(self) -> str:
        return f"<Loads in_flight={len(self.flights)} failures_kept={len(self._failed)}>"
