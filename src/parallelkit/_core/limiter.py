"""Limiter: one object for a concurrency bound and a start rate, shareable."""

from __future__ import annotations

import asyncio
import math
import sys
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, runtime_checkable

import anyio
from anyio.lowlevel import EventLoopToken, checkpoint_if_cancelled, current_token
from typing_extensions import Self, final

from . import instrument
from .check import count, count_or_none, number_or_none

__all__ = ["Limiter", "LimiterStatistics", "SupportsLimit", "validate_limit", "validate_rate"]


@runtime_checkable
class SupportsLimit(Protocol):
    """What ``limit=`` accepts besides an int: a shared limiter.

    :class:`Limiter` is the in-process one; ``parallelkit.redis.RedisLimiter``
    holds the same bound across processes. ``concurrency`` tells the fan-out
    engine how many workers are useful (``None``: as many as there are items).

    A limiter may also have a ``for_fanout()`` method: a fan-out (``gather``,
    ``map``, ``imap``, ``Flow.run``) started with it calls it once, in the calling
    task, and uses what it returns instead. The engine's
    :func:`~parallelkit.sqlalchemy.pool_limiter` uses it to lend a slot its caller
    holds (and cannot give back while it waits) to the fan-out's workers.
    """

    @property
    def concurrency(self) -> int | None: ...

    async def __aenter__(self) -> object: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None: ...


def validate_rate(rate: object, name: str = "rate") -> float | None:
    """Return ``rate`` (starts per second) as a float, or ``None``; raise naming it."""
    checked = number_or_none(name, rate, unit="starts per second", finite=True)
    if checked is not None and math.isinf(1.0 / checked):
        # the interval between starts overflows: its arithmetic (inf - inf) would let
        # every start through at once, the opposite of a rate this low
        msg = f"{name} must be at least {1.0 / sys.float_info.max!r} (starts per second), "
        msg += f"got {rate!r}"
        raise ValueError(msg)
    return checked


def validate_limit(limit: object, name: str = "limit") -> int | None:
    """Return an integer concurrency bound, or ``None``; raise naming the argument."""
    return count_or_none(name, limit)


@final
@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot of a :class:`Limiter`.

    Attributes:
        concurrency: the configured bound, or ``None``.
        rate: the configured starts per second, or ``None``.
        running: slots held right now.
        waiting: tasks waiting for a slot.
    """

    concurrency: int | None
    rate: float | None
    running: int
    waiting: int


@final
class Limiter:
    """At most ``concurrency`` holders at once and at most ``rate`` starts per second.

    One limiter can be shared by many calls and tasks: pass it as ``limit=`` to
    :func:`~parallelkit.gather`, :func:`~parallelkit.map`, :func:`~parallelkit.imap`,
    :meth:`Flow.run <parallelkit.Flow.run>`, or use it directly with ``async with``.
    Use one per downstream resource (a partner API, a connection pool) so that every
    code path talking to it respects the same bound.

    The rate is enforced with GCRA (a token bucket expressed as a "theoretical
    arrival time") on anyio's clock: starts are spaced ``1/rate`` seconds apart, and
    ``burst`` starts may happen back to back after an idle period. With the default
    ``burst=1`` no window of one second ever holds more than ``rate`` starts.

    Waiters are served first come, first served; one that leaves while it waits
    for its turn (cancelled, timed out) gives the turn to those behind it, so no
    turn is lost. Acquiring an uncontended limiter takes no lock and starts no task.

    It is a semaphore, not a lock: entering it again in the same task takes a
    second slot. It is not thread-safe: use it from one event loop at a time (one
    made at module level serves each ``anyio.run`` in turn).

    Args:
        concurrency: maximum number of holders at once (``None``: unbounded).
        rate: maximum starts per second (``None``: unlimited). May be fractional.
        burst: how many starts may happen at once after an idle period.

    Raises:
        TypeError: ``concurrency`` or ``burst`` not an int (a ``bool`` is refused),
            ``rate`` not a number.
        ValueError: ``concurrency < 1``, ``burst < 1``, ``rate <= 0`` or not finite.

    Example:
        ```python
        stripe = pk.Limiter(concurrency=10, rate=25)   # the partner's documented limits

        async with stripe:
            await client.charge(...)

        await pk.map(refund, charges, limit=stripe)     # same budget, shared
        ```
    """

    __slots__ = ("_available", "_burst", "_concurrency", "_head", "_holes", "_interval", "_last",
                 "_line", "_loop", "_rate", "_tat", "_waiters", "_window")  # fmt: skip

    def __init__(
        self, *, concurrency: int | None = None, rate: float | None = None, burst: int = 1
    ) -> None:
        self._concurrency = validate_limit(concurrency, "concurrency")
        self._rate = validate_rate(rate)
        self._burst = count("burst", burst)
        self._available = self._concurrency if self._concurrency is not None else 0
        # waiting acquirers, first come first served: an asyncio future on asyncio
        # (set_result hands the slot over; anyio's Event adds ~14 Python calls per
        # wait around the same future), an anyio Event on trio
        self._waiters: deque[asyncio.Future[None] | anyio.Event] = deque()
        self._interval = 1.0 / self._rate if self._rate is not None else 0.0
        # how far ahead of its theoretical arrival time a start may be: burst - 1 turns
        # (a burst beyond a float's range is unlimited, not an OverflowError at a start)
        try:
            self._window = (self._burst - 1) * self._interval
        except OverflowError:
            self._window = math.inf if self._rate is not None else 0.0
        self._tat = -math.inf
        self._last = -math.inf  # the clock's reading at the last reservation
        # reservations given back while a later one still stood: theoretical arrival
        # time after it -> before it (see _give_back)
        self._holes: dict[float, float] = {}
        # the rate's waiters: one at a time holds a reservation and sleeps until it (the
        # head); the others wait in line without one, so one that leaves takes no turn
        # from those behind it (a turn is given back, then taken by the next in line)
        self._head = False
        self._line: deque[anyio.Event] = deque()
        self._loop: EventLoopToken | None = None  # the loop of the last head that slept

    @property
    def concurrency(self) -> int | None:
        """The concurrency bound, or ``None``."""
        return self._concurrency

    @property
    def rate(self) -> float | None:
        """The rate in starts per second, or ``None``."""
        return self._rate

    @property
    def burst(self) -> int:
        """How many starts may happen back to back."""
        return self._burst

    def statistics(self) -> LimiterStatistics:
        """Return a frozen snapshot: bound, rate, running and waiting counts."""
        running = 0 if self._concurrency is None else self._concurrency - self._available
        return LimiterStatistics(self._concurrency, self._rate, running, len(self._waiters))

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"Limiter(concurrency={self._concurrency!r}, rate={self._rate!r}, "
            f"burst={self._burst}, running={stats.running}, waiting={stats.waiting})"
        )

    # -- concurrency -----------------------------------------------------------
    async def acquire(self) -> None:
        """Take a slot (waiting for one if needed), then wait for the rate, if any."""
        await self.acquire_slot()
        if self._rate is not None:
            try:
                await self.wait_rate()
            except BaseException:
                self.release()
                raise

    def release(self) -> None:
        """Give back the slot taken by :meth:`acquire`."""
        if self._concurrency is None:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():  # a cancelled waiter's future is done
                    waiter.set_result(None)  # hand the slot over directly: no barging
                    return
            elif not waiter.is_set():
                waiter.set()
                return
        if self._available >= self._concurrency:
            msg = "Limiter.release() called more times than acquire()"
            raise RuntimeError(msg)
        self._available += 1

    async def acquire_slot(self) -> None:
        """Take a slot (waiting for one if needed), without the rate: what a limiter
        with no rate acquires (the pool limiter's hot path, one frame less)."""
        if self._available > 0 and not self._waiters:
            self._available -= 1
            return
        if self._concurrency is None:  # no bound
            return
        try:
            waiter: asyncio.Future[None] | anyio.Event = asyncio.get_running_loop().create_future()
        except RuntimeError:  # not asyncio: trio
            waiter = anyio.Event()
        self._waiters.append(waiter)
        hook = instrument.current
        began = anyio.current_time() if hook is not None else 0.0
        try:
            await (waiter.wait() if isinstance(waiter, anyio.Event) else waiter)
        except BaseException:
            if _handed(waiter):
                self.release()  # the slot was handed to us as we were cancelled
            elif waiter in self._waiters:  # (a release may have dropped a cancelled future)
                self._waiters.remove(waiter)  # no longer waiting (statistics count it no more)
            raise
        if hook is not None:
            hook.limiter_wait(anyio.current_time() - began, "concurrency")

    # -- rate --------------------------------------------------------------------
    def reserve(self) -> float:
        """Reserve the next start and return how long to wait for it (seconds).

        The reservation is made at once (no await), so concurrent callers get
        distinct, correctly spaced start times.
        """
        now = anyio.current_time()
        if now < self._last:
            # the clock went back: another event loop's (a limiter made at module level
            # outlives a loop; trio starts each run's clock at a random offset). The turns
            # reserved on the old clock mean nothing on this one: start afresh
            self._tat = -math.inf
            self._holes.clear()
        self._last = now
        tat = self._tat if self._tat > now else now
        start = tat - self._window
        if start < now:
            start = now
        self._tat = tat + self._interval
        return start - now

    async def wait_rate(self, *, unless_cancelled: bool = False) -> None:
        """Wait until this caller may start under the rate limit.

        Callers take their turns first come, first served. A caller that leaves while
        it waits (cancelled, timed out) gives its turn to the next one in line: a
        start that never happened neither delays the callers after it nor is lost to
        them.

        ``unless_cancelled``: the caller does not start once it is cancelled (a
        fan-out's attempt), even when its turn came without a wait or as the
        cancellation did (handed a slot as a sibling failed): it gives the turn back
        and raises the cancellation here, instead of leaving with a turn it never used.
        """
        began = -1.0
        if not self._head:
            self._head = True
        elif self._loop == current_token():  # a caller waits for the next turn: line up
            began = anyio.current_time()
            await self._line_up(self._loop)
        else:  # that caller's loop was closed while it waited: it never comes back
            self._line.clear()
        before = self._tat
        delay = self.reserve()
        if delay > 0 or unless_cancelled:
            if began < 0 < delay:
                began = anyio.current_time()
            after = self._tat
            loop = self._loop = current_token()
            try:
                if delay > 0:
                    await anyio.sleep(delay)
                if unless_cancelled:
                    await checkpoint_if_cancelled()
            except BaseException:
                if _running(loop):  # (not finalized after its loop closed)
                    self._give_back(before, after)
                    self._pass_on()
                raise
        if self._line:
            self._pass_on()
        else:
            self._head = False
        hook = instrument.current
        if hook is not None and began >= 0:
            hook.limiter_wait(anyio.current_time() - began, "rate")

    async def _line_up(self, loop: EventLoopToken) -> None:
        """Wait until the caller ahead has its start (or left): then reserve the next."""
        turn = anyio.Event()
        self._line.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if not _running(loop):  # finalized after its loop closed: not ours any more
                raise
            if turn.is_set():  # made the head as it was cancelled: the next one's turn
                self._pass_on()
            else:
                self._line.remove(turn)
            raise

    def _pass_on(self) -> None:
        """Make the next caller in line the head (it reserves the next turn), if any."""
        if self._line:
            self._line.popleft().set()
        else:
            self._head = False

    def _give_back(self, before: float, after: float) -> None:
        """Undo a reservation that moved the theoretical arrival time from ``before`` to
        ``after``. The last one is undone at once (and, in turn, any given back before it
        that it was waiting behind); one with later reservations still standing is kept
        as a hole until those are given back too (a start they were spaced after cannot
        move)."""
        holes = self._holes
        if self._tat == after:
            self._tat = before
            while self._tat in holes:
                self._tat = holes.pop(self._tat)
            return
        holes[after] = before
        if len(holes) > 64:  # holes behind the clock can no longer be undone: forget them
            now = anyio.current_time()
            for key in [k for k in holes if k <= now]:
                del holes[key]

    async def __aenter__(self) -> Self:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _running(loop: EventLoopToken) -> bool:
    """Whether ``loop`` is the event loop running in this thread."""
    try:
        return current_token() == loop
    except RuntimeError:  # none is
        return False


def _handed(waiter: asyncio.Future[None] | anyio.Event) -> bool:
    """Whether :meth:`Limiter.release` handed a slot to ``waiter``."""
    if isinstance(waiter, asyncio.Future):
        return waiter.done() and not waiter.cancelled()
    return waiter.is_set()
