"""Outage handling, written once: every Redis call of every primitive goes through a Guard.

A :class:`Guard` runs one Redis command and decides what its failure means:

* an **outage**: the connection was refused or reset, redis-py timed out, or the
  command did not answer within ``command_timeout`` (a paused or overloaded server
  that keeps the socket open). The guard counts it, opens its circuit for
  ``retry_after`` seconds and raises :class:`Down`; the primitive then applies its
  policy (the store degrades to local memory, the limiter to ``fail=``, the lock
  raises :class:`~parallelkit.redis.RedisUnavailable`);
* anything else (a wrong type at a key, a script error, a full client pool) is a
  bug or a misconfiguration and is raised unchanged. Among those, an answer that
  *refuses a write* (:func:`refuses_writes`: ``READONLY``, ``OOM``, ``MISCONF``,
  ``NOREPLICAS``) is no outage either (Redis answers, and serves reads): the guard
  raises it unchanged too, and each primitive decides; the store skips the write
  (see ``RedisStore``), a lock or a limiter fails.

A client whose connection pool refuses work beyond ``max_connections`` (redis-py's
default ``ConnectionPool``: 100 connections since redis-py 6, then
``MaxConnectionsError``) gets one :class:`~parallelkit.Limiter` of that size, shared
by every guard on that pool (:func:`pool_slots`): a command waits for a free
connection instead of failing when a cache's refreshes, the requests and the
locks of one process together burst past the pool. The near cache's
subscription holds one of those slots while it is open. A
``BlockingConnectionPool`` already waits by itself and gets no limiter. The wait
is not part of ``command_timeout``: a queue in this process is not a Redis outage.

While the circuit is open the guard does not call Redis at all (``Down`` at once,
so a hung Redis costs one ``command_timeout``, not one per call). When it expires
one caller, the *probe*, tries Redis again while the others keep using their
fallback; the probe's success closes the circuit (a *recovery*). Before it does,
``before_recovery`` (when given) runs, the circuit still open for every other
caller: the store replays there what it could only do locally during the outage
(its invalidations), so no process reads from Redis what was invalidated meanwhile.
"""

from __future__ import annotations

import inspect
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from redis import exceptions as redis_exceptions
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from typing_extensions import final

from .._core.limiter import Limiter
from ._common import RedisUnavailable

__all__ = ["OUTAGE_ERRORS", "Down", "Guard", "is_outage", "pool_slots", "refuses_writes"]

T = TypeVar("T")

#: The exceptions that mean "Redis is unreachable right now" (not "you misused it").
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
)

_POOL_FULL: tuple[type[BaseException], ...] = tuple(
    t for t in [getattr(redis_exceptions, "MaxConnectionsError", None)] if t is not None
)


def is_outage(exc: BaseException) -> bool:
    """True unless ``exc`` is a full client connection pool (a local limit, not an outage).

    redis-py raises ``MaxConnectionsError`` (a ``ConnectionError``) when more
    commands run at once than the pool allows; degrading would hide the real fix
    (a ``BlockingConnectionPool`` or a larger ``max_connections``), so callers
    re-raise it.
    """
    if isinstance(exc, _POOL_FULL):
        return False
    return "Too many connections" not in str(exc)  # redis-py < 6 says only this


#: The error codes of a Redis that answers but will not write: a replica (a demoted
#: primary after a failover), ``maxmemory`` reached with ``noeviction``, a failed
#: background save with ``stop-writes-on-bgsave-error``, ``min-replicas-to-write``
#: not met.
_REFUSALS = ("READONLY", "OOM", "MISCONF", "NOREPLICAS")
_REFUSAL_TYPES: tuple[type[BaseException], ...] = tuple(
    t
    for t in [
        getattr(redis_exceptions, "ReadOnlyError", None),
        getattr(redis_exceptions, "OutOfMemoryError", None),
    ]
    if t is not None
)


def refuses_writes(exc: BaseException) -> bool:
    """True if ``exc`` is Redis refusing a write (reads still work), not a misuse.

    redis-py maps ``READONLY`` and ``OOM`` to their own classes (without the code
    in the message); ``MISCONF`` and ``NOREPLICAS`` come as a plain
    ``ResponseError`` starting with the code. Redis 6 wraps a script's error as
    ``ERR Error running script ... -READONLY ...``.
    """
    if not isinstance(exc, redis_exceptions.ResponseError):
        return False
    if isinstance(exc, _REFUSAL_TYPES):
        return True
    text = str(exc)
    return any(text.startswith(code + " ") or f"-{code} " in text for code in _REFUSALS)


#: Pools this large are unbounded in practice (redis-py < 6 defaulted to 2**31).
_UNBOUNDED = 1 << 16
_slots: weakref.WeakKeyDictionary[object, Limiter] = weakref.WeakKeyDictionary()


def pool_slots(redis: object) -> Limiter | None:
    """The limiter shared by every guard on ``redis``'s connection pool, or ``None``.

    ``None`` for a pool that waits by itself (``BlockingConnectionPool``), an
    unbounded one, or a client without a ``connection_pool`` (a cluster client).
    """
    pool = getattr(redis, "connection_pool", None)
    size = getattr(pool, "max_connections", None)
    if pool is None or isinstance(pool, BlockingConnectionPool):
        return None
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < _UNBOUNDED:
        return None
    try:
        slots = _slots.get(pool)
        if slots is None:
            # the size when the first primitive came
            slots = _slots[pool] = Limiter(concurrency=size)
    except TypeError:  # a pool that cannot be weakly referenced: no sharing, no bound
        return None
    return slots


class Down(Exception):
    """Internal: a Redis command did not happen (outage, no answer in time, open circuit).

    Attributes:
        what: the operation, for messages (``"get"``, ``"acquire"``).
        cause: the outage error (the last one seen, when the circuit was open).
        sent: whether the command was sent (it may have run in Redis, its reply
            lost), not skipped because the circuit was open.
    """

    def __init__(self, what: str, cause: BaseException, *, sent: bool = True) -> None:
        self.what = what
        self.cause = cause
        self.sent = sent
        super().__init__(f"Redis unreachable during {what}: {cause!r}")

    def unavailable(self, owner: str, why: str) -> RedisUnavailable:
        """The public error for a caller that asked not to degrade: raise it ``from self.cause``."""
        return RedisUnavailable(f"{owner}: Redis unreachable during {self.what} ({why})")


@final
class Guard:
    """Runs Redis commands with a timeout, classifies failures, keeps a circuit (module docs).

    Args:
        timeout: seconds one command may take (``None``: the client's own timeouts).
        retry_after: seconds the circuit stays open after an outage (0: never open).
        on_recovery: called when a command succeeds after an outage.
        before_recovery: awaited when a command succeeds after an outage, before
            the circuit closes (its own commands go through this guard with
            ``force=True``); if it raises, the circuit stays open and the caller
            gets the error.
        redis: the client, to bound commands by its pool (:func:`pool_slots`).

    Attributes:
        errors: outage errors so far (timeouts included).
        timeouts: commands that did not answer within ``timeout``.
        recoveries: times Redis answered again after an outage.
        last_error: the latest outage error.
        slots: the pool's limiter (``None``: no bound).
        timer: the clock of the circuit (``time.monotonic``; tests replace it).
    """

    __slots__ = (
        "_before_recovery",
        "_on_recovery",
        "_outage",
        "_probing",
        "_recovering",
        "_until",
        "errors",
        "last_error",
        "recoveries",
        "retry_after",
        "slots",
        "timeout",
        "timeouts",
        "timer",
    )

    def __init__(
        self,
        *,
        timeout: float | None,
        retry_after: float,
        on_recovery: Callable[[], None] | None = None,
        before_recovery: Callable[[], Awaitable[None]] | None = None,
        redis: object = None,
    ) -> None:
        self.slots = pool_slots(redis)
        self.timeout = timeout
        self.retry_after = retry_after
        self.errors = self.timeouts = self.recoveries = 0
        self.last_error: BaseException | None = None
        self.timer: Callable[[], float] = time.monotonic
        self._on_recovery = on_recovery
        self._before_recovery = before_recovery
        self._until = -math.inf
        self._probing = False
        self._recovering = False  # before_recovery is running
        self._outage = False  # an outage error since the last recovery

    @property
    def outage(self) -> bool:
        """True from an outage error until the recovery that follows it (which runs
        ``before_recovery``): what a probe of an idle owner is for."""
        return self._outage

    @property
    def down(self) -> bool:
        """True while Redis is presumed down (circuit open, or a probe under way)."""
        return self._until != -math.inf and (self._probing or self.timer() < self._until)

    async def call(
        self,
        what: str,
        command: Awaitable[T],
        *,
        force: bool = False,
        timeout: float | None = None,
    ) -> T:
        """Await one Redis ``command``; raise :class:`Down` if Redis is (presumed) down.

        Args:
            what: the operation's name, for messages.
            command: the redis-py call, not awaited yet (closed when skipped).
            force: call Redis even while the circuit is open (lease renewals).
            timeout: a shorter limit for this command than the guard's.
        """
        probing = False
        if not force and self._until != -math.inf:
            if self._probing or self.timer() < self._until:
                if inspect.iscoroutine(command):
                    command.close()
                raise Down(what, self.last_error or ConnectionError(what), sent=False)
            self._probing = probing = True  # this caller tries Redis; the others wait
        try:
            if probing and self._outage and self._before_recovery is not None:
                try:  # the replay first: the probe's own command reads what it left
                    await self._replay()
                except BaseException:
                    if inspect.iscoroutine(command):
                        command.close()
                    raise
            slots = self.slots
            if slots is None:
                result = await self._run(what, command, timeout)
            else:
                try:
                    await slots.acquire()  # a free connection of the pool, outside the timeout
                except BaseException:
                    if inspect.iscoroutine(command):
                        command.close()
                    raise
                try:
                    result = await self._run(what, command, timeout)
                finally:
                    slots.release()
            if self._outage and not self._recovering:
                await self._recover()  # Redis answers again (outside the pool slot)
            return result
        finally:
            if probing:
                self._probing = False

    async def _run(self, what: str, command: Awaitable[T], timeout: float | None) -> T:
        limit = self.timeout
        if timeout is not None:
            limit = timeout if limit is None else min(limit, timeout)
        with anyio.move_on_after(math.inf if limit is None else limit):
            try:
                result = await command
            except OUTAGE_ERRORS as exc:
                if not is_outage(exc):
                    raise
                self._failed(exc)
                raise Down(what, exc) from exc
            return result
        self.timeouts += 1
        error = TimeoutError(f"Redis did not answer {what} within {limit} s")
        self._failed(error)
        raise Down(what, error)

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = exc
        self._outage = True
        self._until = self.timer() + self.retry_after if self.retry_after else -math.inf

    async def _replay(self) -> None:
        assert self._before_recovery is not None
        self._recovering = True
        try:
            await self._before_recovery()
        finally:
            self._recovering = False

    async def _recover(self) -> None:
        """A command succeeded with the circuit open: run ``before_recovery`` (the
        circuit still open for the others: ``down`` stays true), then close it."""
        if self._before_recovery is not None:
            # again, right before the circuit closes: what was written locally since
            # (nothing, mostly: no command then) must not be left behind
            probing, self._probing = self._probing, True
            try:
                await self._replay()
            finally:
                self._probing = probing
            if not self._outage:  # pragma: no cover - recovered meanwhile
                return
        self._outage = False
        self._until = -math.inf
        self.recoveries += 1
        if self._on_recovery is not None:
            self._on_recovery()
