"""imap: stream fan-out results with a bound, in an ``async with`` block."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, overload

import anyio
from typing_extensions import Self, final

from .._core import instrument
from .._core.backend import is_failure
from .._core.check import flag
from .._core.limiter import SupportsLimit
from .._core.outcome import Outcome
from .._core.owned import OwnedTaskGroup
from .._core.retry import RetryLike
from .fanout import check_map_args, size_of
from .options import Options
from .pool import AsyncUnits, Pool, Unit, chain

__all__ = ["imap"]

T = TypeVar("T")
R = TypeVar("R")
U = TypeVar("U")


@final
class imap(Generic[T]):  # noqa: N801 - used like a function: `async with pk.imap(...)`
    """Stream results as they complete, with a bound, in an ``async with`` block.

    ``imap`` is :func:`map` for when you want each result as soon as it exists, or
    for inputs too large to hold the results of: memory stays O(``limit``) however
    many items flow through. Results come in completion order, or in input order
    with ``ordered=True`` (a bounded reorder buffer: workers never run more than
    ``2 * limit`` items ahead of the oldest result not yet consumed).

    Leaving the block, early or by an error, cancels the outstanding work and
    waits for it: no task outlives the block. In fail-fast mode the first failure
    is raised from the ``async for``; with ``settle=True`` you get an
    :class:`~parallelkit.Outcome` per item. Several tasks may read one stream
    (consumers started in the block): each result goes to one of them.

    Workers start as items arrive (never more than ``limit``), on the same pool
    as :func:`map`; every argument is checked when ``imap(...)`` is called.

    Args:
        fn: an async function of one argument (a sync one is a
            :class:`TypeError`, before any call).
        items: the inputs, an iterable or async iterable, pulled lazily.
        limit: most items running at once (``None``: no bound, a worker per
            item pulled).
        ordered: yield in input order instead of completion order.
        rate: as in :func:`map`.
        timeout: as in :func:`map`.
        retry: as in :func:`map`.
        settle: as in :func:`map`.

    Example:
        ```python
        async with pk.imap(read_file, paths, limit=64) as contents:
            async for text in contents:
                index.add(text)
        ```
    """

    __slots__ = ("_owner", "_pool", "_results", "_start", "_trace", "_window", "around")

    @overload
    def __init__(
        self: imap[R],
        fn: Callable[[U], Awaitable[R]],
        items: Iterable[U] | AsyncIterable[U],
        /,
        *,
        limit: int | SupportsLimit | None = ...,
        ordered: bool = ...,
        rate: float | None = ...,
        timeout: float | None = ...,
        retry: RetryLike | None = ...,
        settle: Literal[False] = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: imap[Outcome[R]],
        fn: Callable[[U], Awaitable[R]],
        items: Iterable[U] | AsyncIterable[U],
        /,
        *,
        limit: int | SupportsLimit | None = ...,
        ordered: bool = ...,
        rate: float | None = ...,
        timeout: float | None = ...,
        retry: RetryLike | None = ...,
        settle: Literal[True],
    ) -> None: ...
    def __init__(
        self,
        fn: Callable[[U], Awaitable[Any]],
        items: Iterable[U] | AsyncIterable[U],
        /,
        *,
        limit: int | SupportsLimit | None = None,
        ordered: bool = False,
        rate: float | None = None,
        timeout: float | None = None,
        retry: RetryLike | None = None,
        settle: bool = False,
    ) -> None:
        check_map_args(fn, items, settle)
        flag("ordered", ordered)
        options = Options(fn, limit, rate, timeout, retry)
        workers = options.workers
        call = options.call
        hook = instrument.current
        self._trace = None if hook is None else hook.fanout("imap", workers, settle)
        if self._trace is not None:
            call = self._trace.wrap(call)
        results: _Results = _InOrder() if ordered else _AsDone()
        source: AsyncUnits | None = None
        if isinstance(items, AsyncIterable):
            source = AsyncUnits(items)
            units: Iterator[Unit] = source
        else:
            units = enumerate(items)
        window = _Window(units, None if workers is None else 2 * workers, source, workers)
        pool = Pool(call, window, results, max_workers=workers, settle=settle, refill=window.refill)
        if source is not None:
            source.pool = pool
        window.pool = pool
        size = None if source is not None else size_of(items)
        if size is None:  # one worker; each unit taken kicks one more
            self._start: Callable[[], None] = pool.kick
        else:  # as many workers as items (up to the limit) at once
            self._start = functools.partial(pool.fill, size)
            window.grown()
        self._pool = pool
        self._results = results
        self._window = window
        self._owner = OwnedTaskGroup("this imap(...)")
        self.around: AbstractAsyncContextManager[Any] | None = None
        """Entered before the workers start and left after they end (the Taskiq
        ``imap`` puts its completions subscription here)."""

    def __repr__(self) -> str:
        return f"<imap {self._pool!r} buffered={len(self._results)}>"

    async def __aenter__(self) -> Self:
        if self._results.state:
            msg = "an imap(...) object can be entered once; create a new one"
            raise RuntimeError(msg)
        self._results.state = _OPEN
        around = self.around
        if around is not None:
            await around.__aenter__()
        try:
            tg = await self._owner.enter()
        except BaseException:
            if around is not None:
                await around.__aexit__(None, None, None)
            raise
        tg.start_soon(self._run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # outstanding work is cancelled; the body's own error propagates unchanged (a
        # BaseException that is no cancellation too: see OwnedTaskGroup.exit)
        results = self._results
        try:
            await self._owner.exit(exc_type, exc, tb, cancel=True)
        except BaseException as raised:  # the caller's cancellation, after an item failed:
            if is_failure(raised) or results.error is None or results.delivered:
                raise
            # the failure comes out instead, below (as from a task group; and Pool.run)
        finally:
            results.state = _CLOSED  # a later ``async for`` would miss the cancelled work
            if self.around is not None:
                await self.around.__aexit__(None, None, None)
        error = results.error
        if error is not None and not results.delivered:
            results.delivered = True
            if exc is not None and is_failure(exc):
                chain(exc, error)  # the body's error escapes; the item's shows with it
                return None
            # none in the body, or it was cancelled (a deadline around the block): the
            # item's failure comes out, as itself; its context left as it was (raised
            # here, the body's cancellation would become it)
            context = error.__context__
            try:
                raise error
            finally:
                error.__context__ = context
        return None

    async def _run(self) -> None:
        """The producer: the pool, in its own task group (cancelling it on a failure
        must not cancel the consumer's ``async with`` body)."""
        pool, results, trace = self._pool, self._results, self._trace
        try:
            if trace is None:
                await pool.run(self._start)
            else:  # in this task: its workers see the call's span as their parent
                with trace:
                    await pool.run(self._start)
        except Exception as exc:  # fail-fast: handed to the consumer
            results.error = exc
        except BaseException as exc:  # KeyboardInterrupt, a stray CancelledError too: to
            # the consumer, unchanged (not wrapped by the owner); so is a GeneratorExit
            # an item raised (the pool's failure: Pool._work)
            if not is_failure(exc) and exc is not pool.error:
                raise
            results.error = exc
        finally:
            try:
                await self._window.aclose()
            except Exception as exc:  # the input's own clean-up failed: the consumer's
                if results.error is None:
                    results.error = exc
                else:
                    chain(results.error, exc)
            finally:
                results.finish()

    # --- the consumer side
    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        results = self._results
        if results.state != _OPEN:
            if results.state == _CLOSED:
                msg = (
                    "this imap(...) block has ended (its outstanding work was cancelled): "
                    "read the results inside it, `async with pk.imap(...) as results: "
                    "async for r in results: ...`"
                )
            else:
                msg = "use `async with pk.imap(...) as results: async for r in results: ...`"
            raise RuntimeError(msg)
        while True:
            if results.error is not None and not results.delivered:
                results.delivered = True
                error = results.error
                if isinstance(error, StopAsyncIteration):  # `async for` would end quietly
                    msg = (
                        "an item raised StopAsyncIteration (anext() of an exhausted "
                        "iterator?); raised as a RuntimeError, as PEP 479 does, so that "
                        "`async for` does not take it for the end of the results"
                    )
                    raise RuntimeError(msg) from error
                raise error
            result: Any = results.take()
            if result is not _NOTHING:
                break
            if results.done:
                raise StopAsyncIteration
            # consumers in several tasks wait on one event (the producer clears it)
            wake = results.wake
            if wake is None:
                wake = results.wake = anyio.Event()
            await wake.wait()
        window = self._window  # one result fewer ahead: a parked worker may go on
        window.consumed += 1
        if window.parked:
            self._pool.kick()
        return result  # type: ignore[no-any-return]


class _Window:
    """imap's source: the input's units, pulled only while fewer than ``size`` results
    are pulled and not yet consumed (``None``: no bound).

    Workers start as units are taken: each unit taken kicks one more worker (up to
    ``workers``), which takes the next. A worker that finds the window full parks
    in the pool; each result the consumer takes kicks one parked worker back
    (which kicks the next if there is room).
    """

    __slots__ = (
        "_async",
        "_growing",
        "_units",
        "_workers",
        "consumed",
        "exhausted",
        "parked",
        "pool",
        "pulled",
        "size",
    )

    def __init__(
        self,
        units: Iterator[Unit],
        size: int | None,
        source: AsyncUnits | None,
        workers: int | None,
    ) -> None:
        self._units = units
        self._async = source
        self._workers = workers
        self._growing = True  # until the pool has ``workers`` workers
        self.size = size
        self.pulled = 0
        self.consumed = 0
        self.parked = 0
        self.exhausted = False
        self.pool: Any = None

    def __iter__(self) -> Iterator[Unit]:
        return self

    def __next__(self) -> Unit:
        size = self.size
        if size is not None and self.pulled - self.consumed >= size:
            raise StopIteration  # full: refill parks the worker
        try:
            unit = next(self._units)
        except StopIteration:
            if self._async is None:
                self._end()
            raise
        self.pulled += 1
        if (self._growing or self.parked) and (size is None or self.pulled - self.consumed < size):
            pool = self.pool
            pool.kick()  # room for more: wake a parked worker, or start one
            if self._workers is not None and pool.workers >= self._workers:
                self._growing = False
        return unit

    async def aclose(self) -> None:
        """Close an async generator input left unfinished (:meth:`AsyncUnits.aclose`)."""
        if self._async is not None:
            await self._async.aclose()

    def grown(self) -> None:
        """The pool was filled at once: taking a unit starts no worker."""
        self._growing = False

    def _end(self) -> None:
        self.exhausted = True
        self.pool.release()  # parked workers: nothing more will come

    async def refill(self) -> bool:
        """Park while the window is full; with async input, pull the next item."""
        if self.exhausted:
            return False
        if self.size is not None and self.pulled - self.consumed >= self.size:
            self.parked += 1
            try:
                await self.pool.park()
            finally:
                self.parked -= 1
            return True
        if self._async is not None and not await self._async.refill():
            self._end()
            return False
        return True


_NOTHING: Any = object()
_NEW, _OPEN, _CLOSED = 0, 1, 2


class _Results:
    """imap's sink: results handed over to the consumer as they are stored."""

    __slots__ = ("delivered", "done", "error", "state", "wake")

    def __init__(self) -> None:
        self.wake: anyio.Event | None = None
        self.error: BaseException | None = None
        self.delivered = False
        self.state = _NEW  # _OPEN inside the ``async with`` block, _CLOSED after it
        self.done = False

    def __len__(self) -> int:  # pragma: no cover - each kind has its buffer
        raise NotImplementedError

    def take(self) -> Any:  # pragma: no cover
        """The next result for the consumer, or ``_NOTHING``."""
        raise NotImplementedError

    def finish(self) -> None:
        self.done = True
        self.notify()

    def notify(self) -> None:
        """Wake every waiting consumer (they share one event, cleared here)."""
        wake = self.wake
        if wake is not None:
            self.wake = None
            wake.set()


@final
class _InOrder(_Results):
    """Input order: a reorder buffer by index."""

    __slots__ = ("_buffer", "_next")

    def __init__(self) -> None:
        super().__init__()
        self._buffer: dict[int, Any] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._buffer)

    def __setitem__(self, index: int, value: Any) -> None:
        self._buffer[index] = value
        if self.wake is not None:
            self.notify()

    def take(self) -> Any:
        value = self._buffer.pop(self._next, _NOTHING)
        if value is not _NOTHING:
            self._next += 1
        return value


@final
class _AsDone(_Results):
    """Completion order: a queue."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        super().__init__()
        self._buffer: deque[Any] = deque()

    def __len__(self) -> int:
        return len(self._buffer)

    def __setitem__(self, index: int, value: Any) -> None:
        self._buffer.append(value)
        if self.wake is not None:
            self.notify()

    def take(self) -> Any:
        return self._buffer.popleft() if self._buffer else _NOTHING
