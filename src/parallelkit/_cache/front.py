"""The hit path's state: what ``SWRCache.get`` and every ``@cache.cached`` function read.

A fresh hit is the one path of the cache that must cost next to nothing, and it is
taken from two places: :meth:`SWRCache.get <parallelkit.SWRCache.get>` and the
functions :mod:`~parallelkit._cache.cached` generates for ``@cache.cached``. Both
read one :class:`Front`, which the cache owns and keeps current (a late
:meth:`~parallelkit.SWRCache.bind` swaps the store's ``peek`` here, and every
decorated function follows). A hit is::

    entry = front.peek(key)                                   # the store's local answer
    if entry is not None and entry.loaded_at <= front.clock() < entry.fresh_until:
        front.hits += 1
        return entry.value
    return await front.slow(key, thunk)                       # stale, miss, or ask the store

No task, lock, event, allocation beyond the key, or datetime. The chained
comparison also refuses an entry stamped after ``now`` (a clock that stepped
back): the slow path serves it as stale rather than fresh for the size of the step. Everything else
(a stale hit's refresh, a miss's single flight, a store without a local answer)
is the cache's ``slow`` path.
"""

from __future__ import annotations

import reprlib
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from typing_extensions import final

from .._core.check import clock_reading
from .names import Names
from .store import CacheEntry

__all__ = ["FirstReading", "Front", "Thunk", "check_key", "no_local_answer", "short_repr"]

Thunk = Callable[[], Awaitable[Any]]
"""A load with its arguments bound: ``await thunk()`` loads the value of one key."""


def no_local_answer(key: Hashable) -> CacheEntry[Any] | None:
    """The ``peek`` of a store that has none: every call asks the store (``get``)."""
    return None


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 200
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 20


def short_repr(key: object) -> str:
    """``repr(key)`` for a message or a log line, cut short (a key may be huge)."""
    return _REPR.repr(key)


def _unhashable_part(key: object) -> object:
    """The innermost item of ``key`` (a tuple of arguments) that cannot be hashed."""
    if isinstance(key, tuple):
        for item in key:
            try:
                hash(item)
            except TypeError:  # noqa: PERF203 - an error path, run once
                return _unhashable_part(item)
    return key


def check_key(key: object, what: str = "key must be hashable", hint: str = "") -> None:
    """Raise a :class:`TypeError` naming the part of ``key`` that cannot be hashed.

    Called where a lookup of ``key`` raised a ``TypeError`` (the hit path pays
    nothing): a hashable key returns, and the caller re-raises the original error.
    """
    try:
        hash(key)
    except TypeError:
        part = _unhashable_part(key)
        msg = f"{what}, got {type(part).__name__} {short_repr(part)}{hint}"
        raise TypeError(msg) from None


@final
class FirstReading:
    """A clock the cache has not read yet: its first reading is checked.

    A clock given by the user (``SWRCache(clock=...)``, or a store's ``clock``) cannot
    be called when the cache is built (``anyio.current_time`` needs a running loop),
    so :class:`Front` holds this in its place until the first reading. A reading that
    is no number (``None``, a ``str``, a ``datetime``) raises a ``TypeError`` naming
    the clock, there, instead of failing deep in the cache after a load; a good one
    puts the clock itself in :attr:`Front.clock`, so a hit never pays for the check.
    """

    __slots__ = ("clock", "front", "name")

    def __init__(self, front: Front, clock: Callable[[], float], name: str) -> None:
        self.front, self.clock, self.name = front, clock, name

    def __call__(self) -> float:
        now = self.clock()
        clock_reading(self.name, now)
        if self.front.clock is self:
            self.front.clock = self.clock
        return now

    def __repr__(self) -> str:
        return f"<FirstReading of {self.name}={self.clock!r}>"


@final
class Front:
    """The state a cache's hit paths read (internal; see the module docs).

    Attributes:
        peek: the store's synchronous local lookup (:func:`no_local_answer` if none),
            set by :meth:`Loads.use <parallelkit._cache.loads.Loads.use>`.
        clock: the cache's clock.
        hits: fresh hits so far (the hit paths increment it).
        slow: ``await slow(key, thunk)``: everything that is not a fresh local hit
            (:meth:`Loads.slow <parallelkit._cache.loads.Loads.slow>`).
        invalidate: ``await invalidate(key)``: the cache's :meth:`SWRCache.invalidate`.
        names: the names in the keys of the cache's decorated functions
            (:class:`~parallelkit._cache.names.Names`).
    """

    __slots__ = ("clock", "hits", "invalidate", "names", "peek", "slow")

    slow: Callable[[Hashable, Thunk], Awaitable[Any]]  # set by the cache's Loads

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        invalidate: Callable[[Hashable], Awaitable[None]],
    ) -> None:
        self.peek: Callable[[Hashable], CacheEntry[Any] | None] = no_local_answer
        self.clock: Callable[[], float] = clock
        self.use_clock(clock, "clock")
        self.invalidate = invalidate
        self.hits = 0
        self.names = Names()

    def use_clock(self, clock: Callable[[], float], name: str) -> None:
        """Read ``clock`` from now on, its first reading checked (see :class:`FirstReading`);
        ``name`` is how the user gave it (``"clock"``, ``"store.clock"``)."""
        self.clock = clock if clock is time.monotonic else FirstReading(self, clock, name)

    def check_clock(self) -> None:
        """Take the clock's first reading now if it was not taken yet (the slow paths
        call this before any load or write, so that a bad clock fails the call, not a
        load after the loader ran)."""
        if type(self.clock) is FirstReading:
            self.clock()

    def __repr__(self) -> str:
        return f"<Front hits={self.hits} peek={self.peek!r}>"
