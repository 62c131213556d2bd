"""The one option builder: ``limit``, ``rate``, ``timeout`` and ``retry`` become the
per-item call, for ``gather``/``map``/``imap`` and for ``Flow.step``.

* :func:`split_limit` is the one **limit → workers** rule: an ``int`` is the number
  of workers; a shared limiter (``SupportsLimit``) gives its ``concurrency`` as the
  number of workers and is also entered around each attempt, so that every user of
  it shares one bound; ``None`` is no bound.
* :func:`build_call` wraps a one-argument async function, innermost first: the
  ``timeout`` of one attempt, the ``rate`` (each attempt is a start, taken once the
  attempt holds its slot), the shared limiter held for one attempt, then ``retry``
  around all of it. When an attempt may wait before it starts (a slot, its turn
  under the rate, a retry's backoff), it does not start if the run was cancelled
  meanwhile: a wait that ends in the same tick as a fail-fast failure (the failing
  item hands its slot on as it leaves the limiter) must not start an item, nor use up
  a turn of a shared :class:`Limiter`'s rate (it is given back).
* :class:`Options` checks the fan-out options at the door and holds the result.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
from typing_extensions import final

from .._core.check import count, count_or_none, number_or_none
from .._core.limiter import Limiter, SupportsLimit, validate_rate
from .._core.retry import RetryLike, retrying_call, to_retrying, validate_retry

__all__ = ["Call", "Options", "build_call", "for_fanout", "split_limit"]

T = TypeVar("T")
Call = Callable[[Any], Awaitable[Any]]


def split_limit(limit: object, name: str = "limit") -> tuple[int | None, SupportsLimit | None]:
    """The one limit → workers rule: ``(most workers, limiter to enter per attempt)``.

    Raises:
        TypeError: neither an int, a shared limiter nor ``None`` (or a ``bool``).
        ValueError: an int below 1.
    """
    if limit is None:
        return None, None
    if isinstance(limit, type):
        msg = f"{name} must be an int, a Limiter (an instance, not the class) or None, "
        msg += f"got {limit!r}"
        raise TypeError(msg)
    if not isinstance(limit, int) and isinstance(limit, SupportsLimit):
        return count_or_none(f"{name}.concurrency", limit.concurrency), limit
    return count(name, limit, extra="a Limiter or None"), None


def for_fanout(limiter: SupportsLimit | None) -> SupportsLimit | None:
    """The limiter a fan-out started in this task uses: ``limiter.for_fanout()`` if it
    has one (see :class:`~parallelkit._core.limiter.SupportsLimit`), else itself."""
    lend = getattr(limiter, "for_fanout", None)
    return limiter if lend is None else lend()


def build_call(
    fn: Call,
    *,
    timeout: float | None = None,
    limiter: SupportsLimit | None = None,
    rate: float | None = None,
    retry: RetryLike | None = None,
) -> Call:
    """Wrap ``fn(arg)`` with the (already checked) options; ``fn`` itself when none."""
    call = fn
    if retry is not None and limiter is None and rate is None:
        call = _unless_cancelled(call)  # after a back-off (the other waits check it)
    if timeout is not None:
        call = _with_timeout(call, timeout)
    # the rate inside the shared limiter's slot (as Limiter.acquire: slot, then rate):
    # a start waits for its turn *after* it has a slot, so starts queued behind a busy
    # limiter cannot all go at once when slots free up
    if rate is not None and isinstance(limiter, Limiter) and limiter.rate is not None:
        call = _with_two_rates(call, limiter, 1.0 / rate)
    else:
        if rate is not None:
            call = _with_rate(call, Limiter(rate=rate))
        if isinstance(limiter, Limiter) and limiter.rate is not None:
            call = _with_shared(call, limiter)
        elif limiter is not None:
            call = _with_limiter(call, limiter)
    if retry is not None:
        call = retrying_call(to_retrying(retry), call)
    return call


# The wait before an attempt (for a slot, the rate, a back-off) may end as the run is
# cancelled (a slot handed over by the item that failed): a rescheduled task sees the
# cancellation only at its next await, after `fn` started (and ran to the end if it
# never awaits). So each wrapper that waits checks right after its wait, in its own
# frame (no extra frame resumed at every await of the item).
_cancelled = anyio.lowlevel.checkpoint_if_cancelled


def _unless_cancelled(fn: Call) -> Call:
    async def call(arg: Any) -> Any:
        await _cancelled()
        return await fn(arg)

    return call


def _with_timeout(fn: Call, timeout: float) -> Call:
    async def call(arg: Any) -> Any:
        with anyio.fail_after(timeout):
            return await fn(arg)

    return call


def _with_limiter(fn: Call, limiter: SupportsLimit) -> Call:
    async def call(arg: Any) -> Any:
        async with limiter:
            await _cancelled()
            return await fn(arg)

    return call


def _with_shared(fn: Call, limiter: Limiter) -> Call:
    """:func:`_with_limiter` for a :class:`Limiter` with a rate: a turn under its rate
    taken as the run was cancelled (handed a slot by the item that failed, with no wait
    for the turn) is given back, not used up by an attempt that never starts."""

    async def rated(arg: Any) -> Any:
        await limiter.acquire_slot()
        try:
            await limiter.wait_rate(unless_cancelled=True)
            return await fn(arg)
        finally:
            limiter.release()

    return rated


def _with_two_rates(fn: Call, shared: Limiter, interval: float) -> Call:
    """The call's own rate (``interval`` apart) and a shared limiter's rate: both must
    hold for the actual starts. Taking the shared limiter's turn first and then waiting
    for our own would use up its turns early and start later, on top of other users'
    turns; so, holding the slot, one attempt at a time waits for its own turn, then
    takes the shared turn, and our next turn counts from the start that followed."""
    lock = anyio.Lock()
    next_start = -math.inf

    async def call(arg: Any) -> Any:
        nonlocal next_start
        await shared.acquire_slot()
        try:
            async with lock:
                delay = next_start - anyio.current_time()
                if delay > 0:
                    await anyio.sleep(delay)
                await shared.wait_rate(unless_cancelled=True)
                next_start = anyio.current_time() + interval
            return await fn(arg)
        finally:
            shared.release()

    return call


def _with_rate(fn: Call, limiter: Limiter) -> Call:
    async def call(arg: Any) -> Any:
        await limiter.wait_rate()
        await _cancelled()
        return await fn(arg)

    return call


@final
class Options:
    """The fan-out options, checked once per call: the per-item ``call`` and the
    most ``workers`` (``None``: one per item)."""

    __slots__ = ("call", "workers")

    def __init__(
        self, fn: Call, limit: object, rate: object, timeout: object, retry: object
    ) -> None:
        workers, limiter = split_limit(limit)
        self.workers = workers
        self.call = build_call(
            fn,
            timeout=number_or_none("timeout", timeout),
            limiter=for_fanout(limiter),
            rate=validate_rate(rate),
            retry=validate_retry(retry),
        )
