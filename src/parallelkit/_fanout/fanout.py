"""gather and map: bounded fan-out on the one worker pool (:mod:`.pool`).

Both build the per-item call once (:mod:`.options`), then run it on a
:class:`~.pool.Pool` fed by the input: workers start as items are pulled, at most
``limit`` of them, and each writes its results by index. There is no task, lock or
semaphore per item, and the input is read only as workers free up.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar, cast, overload

from .._core import instrument
from .._core.backend import is_failure
from .._core.check import async_callable, callable_with, flag
from .._core.limiter import SupportsLimit
from .._core.outcome import Outcome
from .._core.retry import RetryLike
from .options import Call, Options
from .pool import AsyncUnits, Pool, chain

__all__ = ["gather", "map"]

T = TypeVar("T")
U = TypeVar("U")

Progress = Callable[[int, "int | None"], object]


# ---------------------------------------------------------------------------- the run
async def run_items(
    call: Call,
    items: Iterable[Any] | AsyncIterable[Any],
    workers: int | None,
    settle: bool,
    progress: Progress | None = None,
    kind: str | None = "map",
) -> list[Any]:
    """Run ``call`` over ``items`` on the pool; results (or outcomes) in input order.

    When instrumented (:mod:`parallelkit._core.instrument`) the run is traced as
    one ``kind`` call (``"map"``, ``"gather"``; ``None``: already traced).
    """
    if kind is not None:
        hook = instrument.current
        if hook is not None:
            return await _traced(hook, kind, call, items, workers, settle, progress)
    total = size_of(items)
    results: Any = {}  # an async input's: by index as they come, len() or not
    if total is not None and not isinstance(items, AsyncIterable):
        results = [_UNSET] * total
    sink = results if progress is None else _Progress(results, progress, total)
    if isinstance(items, AsyncIterable):
        source = AsyncUnits(items)
        pool = Pool(call, source, sink, max_workers=workers, settle=settle, refill=source.refill)
        source.pool = pool
        try:
            await pool.run(pool.kick)
        except BaseException as exc:
            try:
                await source.aclose()
            except Exception as lost:  # the input's clean-up failed too
                if not is_failure(exc) and exc is not pool.error:  # the caller's
                    raise  # cancellation: raised in its place (as imap does, and as an
                    # item's failed clean-up is); not an item's GeneratorExit (Pool._work)
                chain(exc, lost)  # shown with the failure that is raised
            raise
        await source.aclose()
    else:
        # a list, or an input whose length cannot change: plain ``enumerate`` (the hot
        # path: a wrapper costs 5 ns per item); any other sized input: len() a hint
        units: Iterator[tuple[int, Any]]
        if total is None or type(items) in _PLAIN:
            units = enumerate(items)
        else:
            units = _sized(items, results, total)
        pool = Pool(call, units, sink, max_workers=workers, settle=settle)
        try:
            await pool.run(functools.partial(pool.fill, total))
        except IndexError as exc:
            if type(items) is list and total is not None and _from_the_results(exc):
                msg = (
                    f"the list of items grew while map ran ({total} items when it was "
                    f"called, {len(items)} now): map runs the items a list holds when "
                    "called; for work that items discover, feed an async iterable "
                    "(an anyio memory stream) to map or imap"
                )
                raise RuntimeError(msg) from exc
            raise
    if isinstance(results, dict):
        return [results[i] for i in range(len(results))]
    while results and results[-1] is _UNSET:  # len() said more than the input iterated
        results.pop()
    return results  # type: ignore[no-any-return]


_UNSET: Any = object()
#: inputs iterated with plain ``enumerate``: a list (a list that grows while map runs is
#: an error: :func:`_from_the_results`; one that shrinks, trimmed), and what cannot change
_PLAIN = (list, tuple, range, str, bytes, frozenset)


def _from_the_results(exc: IndexError) -> bool:
    """Whether ``exc`` was raised by storing a result past the list's length (the
    worker's own ``sink[key] = ...``, or the progress wrapper's), not by an item."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code in _STORES


def _sized(items: Iterable[Any], results: list[Any], total: int) -> Iterator[tuple[int, Any]]:
    """``enumerate(items)`` for an input with a length, taken as a hint of how many
    results to make room for: the results are those of the items it iterates (a list
    its items append to or remove from, a ``len()`` that is wrong), never a result
    missing or an ``IndexError``. (An item appended after a worker found the end is
    not seen: a list's iterator, once exhausted, stays so.) The first ``total`` units
    cost what ``enumerate`` costs; each one after them makes room for its result."""
    iterator = iter(items)
    return itertools.chain(
        enumerate(itertools.islice(iterator, total)), _beyond(iterator, results, total)
    )


def _beyond(iterator: Iterator[Any], results: list[Any], index: int) -> Iterator[tuple[int, Any]]:
    for item in iterator:
        results.append(_UNSET)
        yield index, item
        index += 1


async def _traced(
    hook: instrument.Instrumentation,
    kind: str,
    call: Call,
    items: Iterable[Any] | AsyncIterable[Any],
    workers: int | None,
    settle: bool,
    progress: Progress | None,
) -> list[Any]:
    trace = hook.fanout(kind, workers, settle)
    with trace:
        return await run_items(trace.wrap(call), items, workers, settle, progress, kind=None)


class _Progress:
    """A sink that reports ``progress(done, total)`` after each stored result."""

    __slots__ = ("_progress", "_total", "done", "results")

    def __init__(self, results: Any, progress: Progress, total: int | None) -> None:
        self.results = results
        self._progress = progress
        self._total = total
        self.done = 0

    def __setitem__(self, index: int, value: Any) -> None:
        self.results[index] = value
        self.done += 1
        self._progress(self.done, self._total)


def _close_unstarted(objs: Iterable[object]) -> None:
    """Close coroutines that never ran, so no 'never awaited' warning appears."""
    for obj in objs:
        if inspect.iscoroutine(obj) and inspect.getcoroutinestate(obj) == inspect.CORO_CREATED:
            obj.close()


def size_of(items: object) -> int | None:
    """``len(items)``, or ``None`` for an input without a length, or one too long for
    ``len()`` (``range(10**20)``: ``OverflowError``), which is streamed as such."""
    try:
        return len(items)  # type: ignore[arg-type]
    except (TypeError, OverflowError):
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
            or ``retry`` was given with coroutine objects, or an option of the
            wrong type (``limit=1.5``, ``settle=1``); a callable item that returns
            no awaitable, when its turn comes.
        ValueError: a bad ``limit``, ``rate`` or ``timeout`` (checked before any
            item starts).

    Example:
        ```python
        user, orders = await pk.gather(get_user(uid), get_orders(uid))
        pages = await pk.gather(*(lambda p=p: fetch(p) for p in range(100)),
                                limit=10, timeout=5, retry=pk.Retry(attempts=3))
        ```
    """
    try:
        options = Options(_start_gather_item, limit, rate, timeout, retry)
        flag("settle", settle)
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
    except BaseException:
        _close_unstarted(aws)
        raise
    try:
        units = list(enumerate(aws))
        return await run_items(options.call, units, options.workers, settle, kind="gather")
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
    items never sits in memory as a million coroutines. The pool is at most
    ``limit`` workers, not a task per item, which keeps the per-item cost close to
    a hand-written loop (see the fan-out benchmark); workers start as items arrive,
    so a ``limit`` far above the number of items costs what the items cost.

    ``limit=None`` runs every item at once and therefore reads the whole input
    first; give a limit for large or unbounded inputs.

    Every argument is checked before any item is pulled or runs.

    Args:
        fn: an async function of one argument (``async def``, a
            ``functools.partial`` of one, or an object with an ``async def
            __call__``); a sync function is a :class:`TypeError`, before any call.
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
        TypeError: a sync ``fn``, ``items`` not iterable, or an option of the
            wrong type (``limit=1.5``, ``settle=1``, ``progress=5``).
        ValueError: an option out of range (``limit=0``, ``rate=-1``,
            ``timeout=nan``).

    Example:
        ```python
        async def enroll(contact_id: int) -> Enrollment: ...

        results = await pk.map(enroll, contact_ids, limit=20, settle=True,
                               retry=pk.Retry(attempts=3))
        failed = [r.error for r in results if not r.ok]
        ```
    """
    options = map_options(fn, items, limit, rate, timeout, retry, settle, progress)
    return await run_items(options.call, items, options.workers, settle, progress)


def map_options(
    fn: object,
    items: object,
    limit: object,
    rate: object,
    timeout: object,
    retry: object,
    settle: object,
    progress: object,
) -> Options:
    """Every check of ``map`` (and of the Taskiq ``map``), at the door."""
    check_map_args(fn, items, settle)
    if progress is not None:
        callable_with("progress", progress, 2, what="a callable (done, total)")
    return Options(fn, limit, rate, timeout, retry)  # type: ignore[arg-type]


def check_map_args(fn: object, items: object, settle: object) -> None:
    """The checks ``map`` and ``imap`` share: an async ``fn``, an iterable, a flag."""
    async_callable("fn", fn)
    if not isinstance(items, (Iterable, AsyncIterable)):
        msg = f"items must be an iterable or an async iterable, got {type(items).__name__}"
        raise TypeError(msg)
    flag("settle", settle)


_STORES = (Pool._work.__code__, _Progress.__setitem__.__code__)  # (see _from_the_results)
