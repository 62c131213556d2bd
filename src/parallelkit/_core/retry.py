"""Retry: a small retry policy, adapted onto tenacity (the one retry adapter)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import tenacity
from typing_extensions import final

from .backend import is_stray_cancellation
from .check import callable_with, count, is_async_callable, number

__all__ = ["Retry", "RetryLike", "to_retrying", "validate_retry"]

T = TypeVar("T")

ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    """How to retry a failing call: attempts, exponential backoff, which errors.

    A deliberately small policy: it covers what a service needs for flaky I/O and
    is turned into a :class:`tenacity.AsyncRetrying` for the actual work. Anything
    this does not cover (custom stop conditions, callbacks) you get by passing a
    ``tenacity.AsyncRetrying`` wherever ``retry=`` is accepted.

    Each attempt is a new call of your function: a per-item ``timeout`` applies to
    each attempt, a rate limit counts each attempt as a start, and a cancellation,
    ``KeyboardInterrupt`` or ``SystemExit`` is never retried, whatever ``on`` says
    (a cancelled caller's call is not made again). When the attempts run out, the
    **last original exception** is raised (not tenacity's ``RetryError``).

    Args:
        attempts: total attempts including the first (``1`` disables retrying).
        backoff: seconds to wait before the first retry; doubles on each further
            retry (``0`` retries at once).
        max_backoff: the cap for the doubling wait.
        jitter: add up to this many random seconds to each wait, so that many
            clients failing together do not retry together.
        on: the exception types to retry, or a predicate ``exc -> bool``.

    Raises:
        TypeError: ``attempts`` not an int, a wait not a number, ``on`` neither
            exception types nor a plain (not async) callable taking the exception.
        ValueError: ``attempts < 1``, a negative or infinite wait, ``max_backoff``
            below ``backoff``, or ``on=()`` (nothing would be retried).

    Example:
        ```python
        flaky = pk.Retry(attempts=4, backoff=0.2, on=(ConnectionError, TimeoutError))
        rows = await pk.map(fetch_page, pages, limit=8, timeout=5, retry=flaky)
        ```
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 10.0
    jitter: float = 0.0
    on: ExceptionTypes | Callable[[BaseException], bool] = field(default=(Exception,))

    def __post_init__(self) -> None:
        count("attempts", self.attempts)
        given = {name: getattr(self, name) for name in ("backoff", "max_backoff", "jitter")}
        for name, value in given.items():  # stored as floats (a Fraction too)
            object.__setattr__(self, name, number(name, value, zero=True))
        if self.max_backoff < self.backoff:  # the cap would silently replace the first wait
            msg = f"max_backoff ({given['max_backoff']!r}) must be >= backoff "
            msg += f"({given['backoff']!r})"
            raise ValueError(msg)
        on: object = self.on
        if isinstance(on, (tuple, type)):
            types = on if isinstance(on, tuple) else (on,)
            if not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
                msg = f"on must be exception types or a predicate, got {on!r}"
                raise TypeError(msg)
            if not types:  # nothing would ever be retried
                msg = "on must name at least one exception type (or be a predicate), got ()"
                raise ValueError(msg)
        else:  # an async predicate's coroutine would be true: every error retried
            callable_with("on", on, 1, what="exception types or a predicate exc -> bool")

    def to_tenacity(self) -> tenacity.AsyncRetrying:
        """Build the equivalent :class:`tenacity.AsyncRetrying` (anyio sleep, reraise)."""
        on = self.on
        if isinstance(on, (type, tuple)):
            types = on if isinstance(on, tuple) else (on,)
            retry_cond: Any = tenacity.retry_if_exception_type(types)
            stoppable = not all(issubclass(t, Exception) for t in types)
        else:
            retry_cond = tenacity.retry_if_exception(_keeping_context(on))
            stoppable = True
        if stoppable:  # ``on`` may match a cancellation or KeyboardInterrupt: never retried
            retry_cond = _Stoppable(retry_cond)
        wait: Any = tenacity.wait_exponential(
            multiplier=self.backoff, max=self.max_backoff, exp_base=2
        )
        if self.backoff == 0:
            wait = tenacity.wait_none()
        if self.jitter:
            wait = wait + tenacity.wait_random(0, self.jitter)
        return tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=wait,
            retry=retry_cond,
            reraise=True,
            sleep=anyio.sleep,
        )


RetryLike = Retry | tenacity.AsyncRetrying


def _keeping_context(
    predicate: Callable[[BaseException], bool],
) -> Callable[[BaseException], bool]:
    """``predicate``, whose own failure keeps the exception it was asked about as its
    ``__context__``: tenacity asks outside any ``except`` block, so that exception (the
    item's error) would be lost from the traceback."""

    def on(exc: BaseException) -> bool:
        try:
            return predicate(exc)
        except BaseException as failure:
            if failure.__context__ is None and failure is not exc:
                failure.__context__ = exc
            raise

    return on


@final
class _Stoppable(tenacity.retry_base):
    """A retry condition that never retries a stop: a cancellation (a cancelled
    caller's call is not made again, and asyncio's one-shot ``task.cancel()`` is not
    swallowed), ``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``; whatever
    ``on=`` or a user's ``AsyncRetrying`` says. A stray ``CancelledError`` (a future
    other code cancelled) is a failure like any other: the condition decides. Asked
    only after a failed attempt: a success costs nothing."""

    __slots__ = ("inner",)

    def __init__(self, inner: Callable[[tenacity.RetryCallState], bool]) -> None:
        self.inner = inner

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return not _stops(retry_state) and bool(self.inner(retry_state))


@final
class _AsyncStoppable(tenacity.retry_base):
    """:class:`_Stoppable` for an async retry condition (tenacity 8.4+ awaits one: an
    ``async def``, ``tenacity.asyncio.retry_if_exception``): awaited, not called, or
    its coroutine would be taken for ``True`` and every error retried."""

    __slots__ = ("inner",)

    def __init__(self, inner: Callable[[tenacity.RetryCallState], Awaitable[bool]]) -> None:
        self.inner = inner

    async def __call__(self, retry_state: tenacity.RetryCallState) -> bool:  # type: ignore[override]
        return not _stops(retry_state) and bool(await self.inner(retry_state))


def _stops(retry_state: tenacity.RetryCallState) -> bool:
    """Whether the attempt ended with a stop, never retried (see :class:`_Stoppable`)."""
    outcome = retry_state.outcome
    if outcome is not None and outcome.failed:
        exc = outcome.exception()
        return exc is not None and not isinstance(exc, Exception) and not is_stray_cancellation(exc)
    return False


def validate_retry(retry: object, name: str = "retry") -> RetryLike | None:
    """Check a ``retry=`` argument at the door."""
    if retry is None or isinstance(retry, (Retry, tenacity.AsyncRetrying)):
        return retry
    msg = f"{name} must be a parallelkit.Retry, a tenacity.AsyncRetrying or None, got {retry!r}"
    raise TypeError(msg)


def to_retrying(retry: RetryLike) -> tenacity.AsyncRetrying:
    """The one adapter: turn any accepted ``retry=`` value into AsyncRetrying.

    A user's ``AsyncRetrying`` keeps its own policy; only its sleep is switched to
    anyio's so that it works on trio too, and a cancellation, ``KeyboardInterrupt``
    or ``SystemExit`` is never retried (see :class:`_Stoppable`).
    """
    if isinstance(retry, Retry):
        return retry.to_tenacity()
    cond: Any = retry.retry
    if is_async_callable(cond):
        if not isinstance(cond, _AsyncStoppable):
            cond = _AsyncStoppable(cond)
    elif not isinstance(cond, _Stoppable):
        cond = _Stoppable(cond)
    return retry.copy(sleep=anyio.sleep, retry=cond)


def retrying_call(
    retrying: tenacity.AsyncRetrying, fn: Callable[[Any], Awaitable[T]]
) -> Callable[[Any], Awaitable[T]]:
    """Wrap ``fn(item)`` so each call retries under ``retrying``.

    A fresh copy of the policy is used per call: tenacity keeps iteration state on
    the policy object, which concurrent calls must not share.
    """

    async def call(item: Any) -> T:
        result: T = await retrying.copy()(fn, item)
        return result

    return call
