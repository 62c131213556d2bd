"""gather, map, imap: bounded fan-out on a pool of ``limit`` workers.

The engine is a fixed pool of workers pulling from one shared iterator and writing
results by index: no task, lock or semaphore per item, and items are pulled from
the input only when a worker is free. ``imap`` (in ``_imap.py``) runs the same
options over a hand-over buffer and a pull gate so memory stays O(limit).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar, cast, overload

import anyio

from .._core.check import number_or_none
from .._core.limiter import Limiter, SupportsLimit, validate_limit, validate_rate
from .._core.outcome import Outcome
from .._core.retry import RetryLike, retrying_call, to_retrying, validate_retry

__all__ = ["gather", "map"]

T = TypeVar("T")
U = TypeVar("U")

Progress = Callable[[int, "int | None"], object]

_PENDING: Any = object()


# ---------------------------------------------------------------------------- options
class _Options:
    """Validated options and the per-item call built from them, once per call."""

    __slots__ = ("call", "workers")

    def __init__(
        self,
        fn: Callable[[Any], Awaitable[Any]],
        limit: int | SupportsLimit | None,
        rate: float | None,
        timeout: float | None,
        retry: RetryLike | None,
    ) -> None:
        shared: SupportsLimit | None = None
        if limit is not None and not isinstance(limit, int) and isinstance(limit, SupportsLimit):
            shared = limit
            self.workers: int | None = limit.concurrency
        else:
            self.workers = validate_limit(limit)
        rate = validate_rate(rate)
        timeout = number_or_none("timeout", timeout)
        retry = validate_retry(retry)
        call = fn
        # innermost first: timeout per attempt, then limits per attempt, then retry
        if timeout is not None:
            call = _with_timeout(call, timeout)
        if shared is not None:
            call = _with_limiter(call, shared)
        if rate is not None:
            call = _with_rate(call, Limiter(rate=rate))
        if retry is not None:
            call = retrying_call(to_retrying(retry), call)
        self.call = call


def _with_timeout(
    fn: Callable[[Any], Awaitable[T]], timeout: float
) -> Callable[[Any], Awaitable[T]]:
    async def call(item: Any) -> T:
        with anyio.fail_after(timeout):
            return await fn(item)

    return call


def _with_limiter(
    fn: Callable[[Any], Awaitable[T]], limiter: SupportsLimit
) -> Callable[[Any], Awaitable[T]]:
    async def call(item: Any) -> T:
        async with limiter:
            return await fn(item)

    return call


def _with_rate(
    fn: Callable[[Any], Awaitable[T]], limiter: Limiter
) -> Callable[[Any], Awaitable[T]]:
    async def call(item: Any) -> T:
        await limiter.wait_rate()
        return await fn(item)

    return call


def _check_fn(fn: object) -> None:
    if not callable(fn):
        msg = f"fn must be an async callable, got {type(fn).__name__} {fn!r}"
        raise TypeError(msg)
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        msg = f"fn must be an async function returning a value, got generator function {fn!r}"
        raise TypeError(msg)


def _awaited(fn: Callable[[Any], Any]) -> Callable[[Any], Awaitable[Any]]:
    """Call ``fn(item)`` and insist the result is awaitable (for non-async defs)."""

    async def call(item: Any) -> Any:
        result = fn(item)
        if not inspect.isawaitable(result):
            msg = f"fn must be async: {fn!r} returned {type(result).__name__}, not an awaitable"
            raise TypeError(msg)
        return await result

    return call


# ---------------------------------------------------------------------------- the pool
class _Failure:
    """Fail-fast bookkeeping: the first error wins and cancels the pool."""

    __slots__ = ("error", "scope")

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.error: BaseException | None = None
        self.scope = scope

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            self.scope.cancel()


class _AsyncSource:
    """Serialize pulls from an async iterator shared by several workers."""

    __slots__ = ("_iterator", "_lock")

    def __init__(self, iterable: AsyncIterable[Any]) -> None:
        self._iterator = aiter(iterable)
        self._lock = anyio.Lock()

    async def pull(self) -> Any:
        async with self._lock:
            return await anext(self._iterator, _PENDING)


async def _collect(
    call: Callable[[Any], Awaitable[Any]],
    items: Iterable[Any] | AsyncIterable[Any],
    workers: int | None,
    settle: bool,
    progress: Progress | None,
    total: int | None,
) -> list[Any]:
    """Run ``call`` over ``items`` on the pool; results (or outcomes) in input order."""
    results: list[Any] = []
    if workers is None:  # unbounded: one worker per item
        if isinstance(items, AsyncIterable):
            items = [item async for item in items]
        items = list(items)
        total = workers = len(items)
    if not workers:
        return results
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    async with anyio.create_task_group() as tg:
        failure = _Failure(tg.cancel_scope)
        if isinstance(items, AsyncIterable):
            source = _AsyncSource(items)

            async def async_worker() -> None:
                try:
                    while (item := await source.pull()) is not _PENDING:
                        index = len(results)
                        results.append(_PENDING)
                        if settle:
                            try:
                                results[index] = Outcome(await call(item), None)
                            except Exception as exc:
                                results[index] = Outcome(None, exc)
                        else:
                            results[index] = await call(item)
                        advance()
                except Exception as exc:
                    failure.fail(exc)

            for _ in range(workers):
                tg.start_soon(async_worker)
        else:
            iterator = iter(items)
            worker = _settle_worker if settle else _fast_worker
            report = advance if progress is not None else None
            for _ in range(min(workers, total) if total is not None else workers):
                tg.start_soon(worker, iterator, call, results, failure, report)
    if failure.error is not None:
        raise failure.error
    return results


async def _fast_worker(
    iterator: Iterator[Any],
    call: Callable[[Any], Awaitable[Any]],
    results: list[Any],
    failure: _Failure,
    report: Callable[[], None] | None,
) -> None:
    append = results.append
    try:
        for item in iterator:
            index = len(results)
            append(_PENDING)
            results[index] = await call(item)
            if report is not None:
                report()
    except Exception as exc:
        failure.fail(exc)


async def _settle_worker(
    iterator: Iterator[Any],
    call: Callable[[Any], Awaitable[Any]],
    results: list[Any],
    failure: _Failure,
    report: Callable[[], None] | None,
) -> None:
    append = results.append
    try:
        for item in iterator:
            index = len(results)
            append(_PENDING)
            try:
                results[index] = Outcome(await call(item), None)
            except Exception as exc:
                results[index] = Outcome(None, exc)
            if report is not None:
                report()
    except Exception as exc:
        failure.fail(exc)


def _close_unstarted(objs: Iterable[object]) -> None:
    """Close coroutines that never ran, so no 'never awaited' warning appears."""
    for obj in objs:
        if inspect.iscoroutine(obj) and inspect.getcoroutinestate(obj) == inspect.CORO_CREATED:
            obj.close()


def _total(items: object) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


# ---------------------------------------------------------------------------- gather
@overload
async def gather(
    *aws: Awaitable[T] | Callable[[], Awaitable[T]],
    limit: int | SupportsLimit | None = ...,
    rate: float | None = ...,
    timeout: float | None = ...,
    retry: RetryLike | None = ...,
    settle: Literal[False] = ...,
) -> list[T]: ...
@overload
async def gather(
    *aws: Awaitable[T] | Callable[[], Awaitable[T]],
    limit: int | SupportsLimit | None = ...,
    rate: float | None = ...,
    timeout: float | None = ...,
    retry: RetryLike | None = ...,
    settle: Literal[True],
) -> list[Outcome[T]]: ...
async def gather(
    *aws: Awaitable[T] | Callable[[], Awaitable[T]],
    limit: int | SupportsLimit | None = None,
    rate: float | None = None,
    timeout: float | None = None,
    retry: RetryLike | None = None,
    settle: bool = False,
) -> list[T] | list[Outcome[T]]:
    """Await many awaitables with a bound, a rate, timeouts and retries.

    Like :func:`asyncio.gather`, results come back in input order; unlike it, at
    most ``limit`` items run at once, the first failure cancels the rest and is
    raised as the **original exception** (never an ``ExceptionGroup``), and
    coroutines that never got to run are closed (no "never awaited" warning).

    Each item is an awaitable (a coroutine) or a zero-argument async callable
    (``lambda: fetch(1)``, ``functools.partial(fetch, 1)``). Callables are called
    only when a slot is free, and only callables can be retried: a coroutine
    object can be awaited once.

    Args:
        *aws: awaitables or zero-argument async callables.
        limit: most items running at once: an int or a shared
            :class:`~parallelkit.Limiter` (``None``: all at once).
        rate: most item starts per second (each retry attempt is a start).
        timeout: seconds allowed for each item (each attempt); an item over it
            fails with :class:`TimeoutError`.
        retry: a :class:`~parallelkit.Retry` or ``tenacity.AsyncRetrying``.
        settle: return an :class:`~parallelkit.Outcome` per item instead of
            raising the first failure.

    Returns:
        The results (or outcomes, with ``settle=True``) in input order.

    Raises:
        TypeError: an item is neither awaitable nor callable (its index is named),
            or ``retry`` was given with coroutine objects.
        ValueError: a bad ``limit``, ``rate`` or ``timeout``.

    Example:
        ```python
        user, orders = await pk.gather(get_user(uid), get_orders(uid))
        pages = await pk.gather(*(lambda p=p: fetch(p) for p in range(100)),
                                limit=10, timeout=5, retry=pk.Retry(attempts=3))
        ```
    """
    try:
        for index, aw in enumerate(aws):
            if not (inspect.isawaitable(aw) or callable(cast(object, aw))):
                msg = (
                    f"gather item {index} is {type(aw).__name__} {aw!r}: expected an "
                    "awaitable or a zero-argument async callable"
                )
                raise TypeError(msg)
            if retry is not None and not callable(aw):
                msg = (
                    f"gather item {index} is an awaitable, which cannot be retried (it can be "
                    "awaited once): pass zero-argument async callables, e.g. "
                    "`lambda: fetch(x)`, or use pk.map(fn, items, retry=...)"
                )
                raise TypeError(msg)
        options = _Options(_start_gather_item, limit, rate, timeout, retry)
    except BaseException:
        _close_unstarted(aws)
        raise
    try:
        return await _collect(
            options.call, list(enumerate(aws)), options.workers, settle, None, len(aws)
        )
    finally:
        _close_unstarted(aws)


async def _start_gather_item(entry: tuple[int, Any]) -> Any:
    index, aw = entry
    if callable(aw) and not inspect.isawaitable(aw):
        aw = aw()
        if not inspect.isawaitable(aw):
            msg = f"gather item {index} returned {type(aw).__name__}, not an awaitable"
            raise TypeError(msg)
    return await aw


# ---------------------------------------------------------------------------- map
@overload
async def map(
    fn: Callable[[U], Awaitable[T]],
    items: Iterable[U] | AsyncIterable[U],
    /,
    *,
    limit: int | SupportsLimit | None = ...,
    rate: float | None = ...,
    timeout: float | None = ...,
    retry: RetryLike | None = ...,
    settle: Literal[False] = ...,
    progress: Progress | None = ...,
) -> list[T]: ...
@overload
async def map(
    fn: Callable[[U], Awaitable[T]],
    items: Iterable[U] | AsyncIterable[U],
    /,
    *,
    limit: int | SupportsLimit | None = ...,
    rate: float | None = ...,
    timeout: float | None = ...,
    retry: RetryLike | None = ...,
    settle: Literal[True],
    progress: Progress | None = ...,
) -> list[Outcome[T]]: ...
async def map(
    fn: Callable[[U], Awaitable[T]],
    items: Iterable[U] | AsyncIterable[U],
    /,
    *,
    limit: int | SupportsLimit | None = None,
    rate: float | None = None,
    timeout: float | None = None,
    retry: RetryLike | None = None,
    settle: bool = False,
    progress: Progress | None = None,
) -> list[T] | list[Outcome[T]]:
    """Call ``fn(item)`` for every item, at most ``limit`` at once; results in order.

    The items may be any iterable or async iterable and are consumed lazily: a
    worker pulls the next item only when it is free, so a generator of a million
    items never sits in memory as a million coroutines. The pool is ``limit``
    workers, not a task per item, which keeps the per-item cost close to a
    hand-written loop (see the fan-out benchmark).

    ``limit=None`` runs every item at once and therefore reads the whole input
    first; give a limit for large or unbounded inputs.

    Args:
        fn: an async function of one argument.
        items: the inputs, an iterable or async iterable.
        limit: most items running at once: an int or a shared
            :class:`~parallelkit.Limiter`.
        rate: most starts per second (each retry attempt is a start).
        timeout: seconds allowed for each item (each attempt).
        retry: a :class:`~parallelkit.Retry` or ``tenacity.AsyncRetrying``.
        settle: return an :class:`~parallelkit.Outcome` per item instead of
            raising the first failure.
        progress: called as ``progress(done, total)`` after each item; ``total``
            is ``None`` when the input has no length.

    Returns:
        ``[fn(item) for item in items]``, awaited, in input order (or outcomes).

    Raises:
        Exception: the first failing item's exception, unchanged (fail-fast), or
            one raised by the input iterable itself (even with ``settle=True``).

    Example:
        ```python
        async def enroll(contact_id: int) -> Enrollment: ...

        results = await pk.map(enroll, contact_ids, limit=20, settle=True,
                               retry=pk.Retry(attempts=3))
        failed = [r.error for r in results if not r.ok]
        ```
    """
    _check_fn(fn)
    options = _Options(
        _awaited(fn) if not _is_async_callable(fn) else fn, limit, rate, timeout, retry
    )
    _check_items(items)
    return await _collect(options.call, items, options.workers, settle, progress, _total(items))


def _is_async_callable(fn: object) -> bool:
    while hasattr(fn, "func") and hasattr(fn, "args"):  # functools.partial
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


def _check_items(items: object) -> None:
    if not isinstance(items, (Iterable, AsyncIterable)):
        msg = f"items must be an iterable or an async iterable, got {type(items).__name__}"
        raise TypeError(msg)
