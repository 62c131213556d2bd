"""Retry: a small retry policy, adapted onto tenacity (the one retry adapter)."""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import tenacity
from typing_extensions import final

from .backend import clock, is_stray_cancellation
from .check import callable_with, count, is_async_callable, number, real_or_none

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
        object.__setattr__(self, "attempts", count("attempts", self.attempts))  # a plain int
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
            retry_cond = tenacity.retry_if_exception(on)
            stoppable = True  # and _Stoppable keeps the item's error if ``on`` fails
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


def _chain(failure: BaseException, retry_state: tenacity.RetryCallState) -> None:
    """Make the item's error the ``__context__`` of ``failure``, the failure of a hook of
    the policy (a retry condition, ``wait``, ``stop``, ``after``, ``before_sleep``,
    ``retry_error_callback``): tenacity calls them outside any ``except`` block, so the
    error they were asked about would be lost from the traceback."""
    outcome = retry_state.outcome
    if not isinstance(failure, Exception):  # a cancellation passes through untouched
        return
    if failure.__context__ is None and outcome is not None and outcome.failed:
        exc = outcome.exception()
        if exc is not failure:
            failure.__context__ = exc


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
        if _stops(retry_state):
            return False
        try:
            return bool(self.inner(retry_state))
        except BaseException as failure:
            _chain(failure, retry_state)
            raise


@final
class _AsyncStoppable(tenacity.retry_base):
    """:class:`_Stoppable` for an async retry condition (tenacity 8.4+ awaits one: an
    ``async def``, ``tenacity.asyncio.retry_if_exception``): awaited, not called, or
    its coroutine would be taken for ``True`` and every error retried."""

    __slots__ = ("inner",)

    def __init__(self, inner: Callable[[tenacity.RetryCallState], Awaitable[bool]]) -> None:
        self.inner = inner

    async def __call__(self, retry_state: tenacity.RetryCallState) -> bool:  # type: ignore[override]
        if _stops(retry_state):
            return False
        try:
            return bool(await self.inner(retry_state))
        except BaseException as failure:
            _chain(failure, retry_state)
            raise


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
    if not isinstance(retry, bool) and hasattr(type(retry), "__index__"):  # 3, np.int64(3)
        with contextlib.suppress(TypeError, ValueError):
            attempts = operator.index(retry)  # type: ignore[arg-type]
            hint = f"parallelkit.Retry(attempts={attempts})"
            msg += f"; for {attempts} attempts in all, pass {name}={hint}"
    elif isinstance(retry, tenacity.BaseRetrying):  # tenacity.Retrying: time.sleep
        msg += (
            f"; a {type(retry).__name__} sleeps with time.sleep, blocking the event loop: "
            "build a tenacity.AsyncRetrying with the same arguments"
        )
    raise TypeError(msg)


def to_retrying(retry: RetryLike) -> tenacity.AsyncRetrying:
    """The one adapter: turn any accepted ``retry=`` value into AsyncRetrying.

    A user's ``AsyncRetrying`` keeps its own policy, with these changes:

    * its sleep is anyio's, so that it works on trio too;
    * a cancellation, ``KeyboardInterrupt`` or ``SystemExit`` is never retried (see
      :class:`_Stoppable`);
    * its times (``start_time``, ``seconds_since_start``: what ``stop_after_delay``
      and ``stop_before_delay`` read) are on the event loop's clock, as every other
      time in parallelkit, so that they agree with the sleeps on a virtual clock too
      (trio's ``MockClock``), where tenacity's ``time.monotonic`` would barely move;
    * a wait below zero (a computed "retry at" already past) is no wait, as with
      ``asyncio.sleep``; a wait that is not a number or is NaN is a ``ValueError``;
    * a hook that raises (the retry condition, ``wait``, ``stop``, ``after``,
      ``before_sleep``, ``retry_error_callback``) raises with the item's error as its
      ``__context__``, so that error is not lost.
    """
    if isinstance(retry, Retry):
        return retry.to_tenacity()
    cond: Any = retry.retry
    if is_async_callable(cond):
        if not isinstance(cond, _AsyncStoppable):
            cond = _AsyncStoppable(cond)
    elif not isinstance(cond, _Stoppable):
        cond = _Stoppable(cond)
    return retry.copy(
        sleep=anyio.sleep,
        retry=cond,
        before=_hook(retry.before, start=True),
        after=_hook(retry.after, end=True),
        wait=_hook(retry.wait, wait=True),
        stop=_hook(retry.stop),
        before_sleep=_hook(retry.before_sleep),
        retry_error_callback=_hook(retry.retry_error_callback),
    )


Hook = Callable[[tenacity.RetryCallState], Any]


def _hook(inner: Hook | None, *, start: bool = False, end: bool = False, wait: bool = False) -> Any:
    """``inner``, a hook of a user's policy, as :func:`to_retrying` runs it: ``start``
    (the ``before`` hook, run before each attempt) stamps the first attempt's start
    on the loop's clock, ``end`` (``after``, run first once a retry is decided) stamps
    the attempt's end; ``wait`` checks the seconds the hook returns. A failure keeps
    the item's error (:func:`_chain`). Sync stays sync (tenacity 8.2 calls hooks
    without awaiting them), async stays async. ``None`` (or tenacity's do-nothing
    default) stays ``None`` unless a stamp is needed."""
    if inner is tenacity.before_nothing or inner is tenacity.after_nothing:
        inner = None
    if inner is None:
        return _began if start else _ended if end else None
    if getattr(inner, _ADAPTED, False):
        return inner
    stamp = _began if start else _ended if end else None
    user = inner

    if is_async_callable(user):

        async def async_hook(retry_state: tenacity.RetryCallState) -> Any:
            if stamp is not None:
                stamp(retry_state)
            try:
                result = await user(retry_state)
            except BaseException as failure:
                _chain(failure, retry_state)
                raise
            return _seconds(result, retry_state) if wait else result

        setattr(async_hook, _ADAPTED, True)
        return async_hook

    def hook(retry_state: tenacity.RetryCallState) -> Any:
        if stamp is not None:
            stamp(retry_state)
        try:
            result = user(retry_state)
        except BaseException as failure:
            _chain(failure, retry_state)
            raise
        return _seconds(result, retry_state) if wait else result

    setattr(hook, _ADAPTED, True)
    return hook


_ADAPTED = "_parallelkit_hook"


def _began(retry_state: tenacity.RetryCallState) -> None:
    """Before an attempt: the first one's start on the loop's clock."""
    if retry_state.attempt_number == 1:
        retry_state.start_time = clock()()


def _ended(retry_state: tenacity.RetryCallState) -> None:
    """After an attempt to be retried: its end on the loop's clock."""
    retry_state.outcome_timestamp = clock()()


setattr(_began, _ADAPTED, True)
setattr(_ended, _ADAPTED, True)


def _seconds(result: object, retry_state: tenacity.RetryCallState) -> float:
    """The seconds a policy's ``wait`` returned: below zero is no wait; NaN, or not a
    number, is a ``ValueError`` (raised with the item's error as its context)."""
    seconds = real_or_none(result)
    if seconds is None or math.isnan(seconds):
        msg = f"the wait of the retry= policy must return a number of seconds >= 0, got {result!r}"
        failure = ValueError(msg)
        _chain(failure, retry_state)
        raise failure
    return max(seconds, 0.0)


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
