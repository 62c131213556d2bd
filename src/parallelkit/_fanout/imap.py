"""imap: stream fan-out results with a bound, in an ``async with`` block."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
from typing_extensions import Self, final

from .._core.limiter import SupportsLimit
from .._core.outcome import Outcome
from .._core.owned import leave
from .._core.retry import RetryLike
from .fanout import (
    _PENDING,
    _AsyncSource,
    _awaited,
    _check_fn,
    _check_items,
    _Failure,
    _is_async_callable,
    _Options,
)

__all__ = ["imap"]

T = TypeVar("T")
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
    :class:`~parallelkit.Outcome` per item.

    Args:
        fn: an async function of one argument.
        items: the inputs, an iterable or async iterable, pulled lazily.
        limit: most items running at once (``None``: all at once, which reads
            the whole input first).
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

    __slots__ = (
        "_buffer",
        "_call",
        "_consumed",
        "_delivered",
        "_done",
        "_error",
        "_items",
        "_next",
        "_ordered",
        "_pulled",
        "_settle",
        "_space",
        "_tg",
        "_wake",
        "_window",
        "_workers",
    )

    def __init__(
        self,
        fn: Callable[[U], Awaitable[T]],
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
        _check_fn(fn)
        _check_items(items)
        options = _Options(
            _awaited(fn) if not _is_async_callable(fn) else fn, limit, rate, timeout, retry
        )
        self._call = options.call
        self._workers = options.workers
        self._items: Iterable[Any] | AsyncIterable[Any] = items
        self._ordered = ordered
        self._settle = settle
        self._tg: anyio.abc.TaskGroup | None = None
        self._buffer: Any = deque()
        self._error: BaseException | None = None
        self._done = False
        self._delivered = False
        self._wake: anyio.Event | None = None
        self._space: anyio.Event | None = None
        self._pulled = 0
        self._consumed = 0
        self._next = 0
        self._window = 0

    async def __aenter__(self) -> Self:
        if self._tg is not None:
            msg = "an imap(...) object can be entered once; create a new one"
            raise RuntimeError(msg)
        items = self._items
        if self._workers is None:
            if isinstance(items, AsyncIterable):
                items = [item async for item in items]
            items = list(items)
            self._workers = max(len(items), 1)
        self._items = items
        self._window = 2 * self._workers
        if self._ordered:
            self._buffer = {}
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._pool)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        assert tg is not None
        # outstanding work is cancelled; the body's own error propagates unchanged
        await leave(tg, exc_type, exc, tb, cancel=True)
        error = self._error
        if exc is None and error is not None and not self._delivered:
            self._delivered = True
            raise error
        return None

    # --- the producer side
    async def _pool(self) -> None:
        items = self._items
        try:
            async with anyio.create_task_group() as tg:
                failure = _Failure(tg.cancel_scope)
                pull: Callable[[], Awaitable[Any]]
                if isinstance(items, AsyncIterable):
                    pull = _AsyncSource(items).pull
                else:
                    iterator = iter(items)

                    async def pull() -> Any:
                        return next(iterator, _PENDING)

                workers = self._workers
                assert workers is not None
                for _ in range(workers):
                    tg.start_soon(self._worker, pull, failure)
            self._error = failure.error
        finally:
            self._done = True
            self._wakeup()

    async def _worker(self, pull: Callable[[], Awaitable[Any]], failure: _Failure) -> None:
        call, settle, ordered, buffer = self._call, self._settle, self._ordered, self._buffer
        try:
            while True:
                while self._pulled - self._consumed >= self._window:
                    if self._space is None:
                        self._space = anyio.Event()
                    await self._space.wait()
                item = await pull()
                if item is _PENDING:
                    return
                index = self._pulled
                self._pulled += 1
                if settle:
                    try:
                        result: Any = Outcome(await call(item), None)
                    except Exception as exc:
                        result = Outcome(None, exc)
                else:
                    result = await call(item)
                if ordered:
                    buffer[index] = result
                else:
                    buffer.append(result)
                if self._wake is not None:
                    self._wake.set()
        except Exception as exc:
            failure.fail(exc)

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- the consumer side
    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        if self._tg is None:
            msg = "use `async with pk.imap(...) as results: async for r in results: ...`"
            raise RuntimeError(msg)
        buffer = self._buffer
        while True:
            if self._error is not None and not self._delivered:
                self._delivered = True
                raise self._error
            if self._ordered:
                if self._next in buffer:
                    result: T = buffer.pop(self._next)
                    self._next += 1
                    self._consumed_one()
                    return result
            elif buffer:
                result = buffer.popleft()
                self._consumed_one()
                return result
            if self._done:
                raise StopAsyncIteration
            self._wake = anyio.Event()
            await self._wake.wait()
            self._wake = None

    def _consumed_one(self) -> None:
        self._consumed += 1
        if self._space is not None:
            self._space.set()
            self._space = None
