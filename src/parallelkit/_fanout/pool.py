"""The one worker pool: how ``gather``, ``map``, ``imap``, ``Flow``, the Orchestrator
and the Taskiq ``map`` start and run their workers.

A :class:`Pool` runs **units** of work on workers in one task group. A unit is a
pair ``(key, arg)``: a worker awaits ``call(arg)`` and stores the value as
``sink[key] = value`` (``map``: ``results[index] = await fn(item)``).

Units come from a **source**: an iterator of ``(key, arg)`` pairs, read with a
plain ``for`` loop, so a worker of ``map`` costs what a hand-written worker loop
costs. When the iterator stops, the worker awaits ``refill()``: ``True`` means
"more may come now, look again", ``False`` "never again, exit". Three sources:

* ``enumerate(items)`` for ``map``/``gather`` over a sync iterable (no refill: once
  it stops it is done);
* :class:`AsyncUnits` for an async iterable (refill pulls the next item);
* the graph engine's ready queue (``parallelkit._graph.scheduler``): refill parks
  the worker until a finished node releases more work, or the run is complete.

**Workers start as work arrives**, never before, and never more than
``max_workers`` (the one limit → workers rule is :func:`split_limit`):

* :meth:`Pool.fill` - for a source that can be read without waiting (a sync
  iterator): take units one by one and start one worker for each, in the same
  scheduler pass, until the maximum or the end. ``map(fn, range(5),
  limit=200_000)`` starts 5 workers.
* :meth:`Pool.kick` - "``n`` units may be waiting": make sure ``n`` workers are on
  their way (started or woken, not yet at the source): wake idle ones, then start
  new ones, up to the maximum. A source that can tell how many units are waiting
  (the graph engine's ready queue) kicks for all of them at once, so each starts
  in the same scheduler pass, as in a task group, never behind the work another
  unit started; one that cannot (an async iterable) kicks for one, and the worker
  that takes it kicks for the next.

**Fail-fast** (default): the first exception out of a unit (or out of the source)
wins; it is kept in :attr:`Pool.error`, the pool's task group is cancelled and
:meth:`Pool.run` raises it, unchanged. **Settle** (``settle=True``): each unit's
exception is stored as an :class:`~parallelkit.Outcome` instead and the others go
on; an exception from the source itself still fails the pool.

**What fails the pool.** Every exception of a unit but a cancellation: an
``Exception``, and also a ``BaseException`` such as ``KeyboardInterrupt`` (even in
settle mode: it stops the pool) is raised by :meth:`Pool.run` unchanged, never
wrapped in a ``BaseExceptionGroup`` by the task group. On asyncio, a
``CancelledError`` that no cancellation of the task caused (the unit awaited a
future that someone else cancelled: :func:`is_stray_cancellation`) is that unit's
failure like any other (settle: its ``Outcome``), not a cancellation: let through,
the task group would take it for one and end the pool quietly, results missing. So
is, in a worker task the pool started, a ``task.cancel()`` that no cancel scope made
(a driver cancelling ``asyncio.current_task()``: :func:`is_foreign_cancellation`);
in the caller's own task (:meth:`Pool.run_here`) a cancellation is always one. And so
is, in a worker task, a ``GeneratorExit`` that the unit's code raised, told from the
worker's coroutine being closed (which goes on out of it, never swallowed) by whether
the worker's own task is the one running (:func:`_raised_by_unit`). In the caller's
own task every ``GeneratorExit`` is (its unit's, or the caller's coroutine closed:
either way :meth:`Pool.run_here` raises that object, once the helpers have stopped,
where its task group would wrap it), and so is one raised by the input as
:meth:`Pool.fill` pulls it (a synchronous pull: nothing can close it).

**Failures while the pool is stopped.** A unit whose clean-up fails as the
cancellation reaches it (a ``finally`` whose rollback raises) is never lost. Stopped
by the first failure, its exception goes at the end of that failure's context chain
(:meth:`Pool.fail`, :func:`chain`). Stopped by the caller (a deadline around the
call), the failure is what :meth:`Pool.run` raises, as itself, in place of the
cancellation, as a task group would. In settle mode an item's exception raised while
the pool is being cancelled is such a failure, not an ``Outcome``: the outcomes are
never returned. And a run whose caller was cancelled never returns normally, even
when every unit swallowed its cancellation (trio's task group then ends normally).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType
from typing import Any

import anyio
import anyio.lowlevel
from typing_extensions import final

from .._core.backend import is_failure, is_foreign_cancellation, is_stray_cancellation
from .._core.outcome import Outcome
from .lost import chain as chain

__all__ = ["AsyncUnits", "Pool", "Unit", "chain", "fails"]

Unit = tuple[Any, Any]  # (key, arg)

_END: Any = object()


@final
class Pool:
    """Workers taking units from one source, started as work arrives (module docs).

    Args:
        call: awaited as ``call(arg)`` for each unit.
        units: the source, an iterator of ``(key, arg)``.
        sink: anything with ``sink[key] = value`` (a list, a dict, imap's buffer):
            receives each value (an ``Outcome`` in settle mode).
        max_workers: the most workers at once (``None``: one per waiting unit).
        settle: keep each unit's exception as an ``Outcome`` instead of failing.
        refill: awaited when ``units`` stops: ``True`` to look again, ``False``
            to exit (``None``: the source is done when it stops).
    """

    __slots__ = (
        "_call",
        "_coming",
        "_idle",
        "_max",
        "_refill",
        "_settle",
        "_sink",
        "_tg",
        "_units",
        "error",
        "workers",
    )

    def __init__(
        self,
        call: Callable[[Any], Awaitable[Any]],
        units: Iterator[Unit],
        sink: Any,
        *,
        max_workers: int | None,
        settle: bool = False,
        refill: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._call = call
        self._settle = settle
        self._units = units
        self._sink = sink
        self._max = max_workers
        self._refill = refill
        self._tg: Any = None
        self._idle: deque[anyio.Event] | None = None  # made by the first park
        self._coming = 0  # workers started or woken that have not reached the source yet
        self.error: BaseException | None = None
        """The first failure (fail-fast), once there is one."""
        self.workers = 0
        """How many workers were started so far."""

    def __repr__(self) -> str:
        return f"<Pool workers={self.workers}/{self._max} idle={len(self._idle or ())}>"

    async def run(self, start: Callable[[], None]) -> None:
        """Open the task group, call ``start`` (:meth:`fill` or :meth:`kick`), wait
        for every worker; then raise the first failure, if any (fail-fast), even over
        the caller's cancellation (:meth:`_outcome`)."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                start()
        except BaseException as exc:
            if not self._outranks(exc):
                raise
        finally:
            self._tg = None
        await self._outcome()

    async def run_here(self, leave: Callable[[], None]) -> None:
        """Like :meth:`run`, with the calling task as the first worker (no task for it).

        For a source that has a unit now (the graph engine's ready queue): the caller
        takes it at once, and a helper starts only when more units are waiting. When
        the source has nothing ready, the caller does not park (no event): it calls
        ``leave()``, frees its worker slot and waits for the task group, whose
        workers take (and start helpers for) whatever becomes ready later.
        """
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self.workers += 1
                self._coming += 1
                await self._work(leave)
        except BaseException as exc:
            if not self._outranks(exc):
                raise
        finally:
            self._tg = None
        await self._outcome()

    def _outranks(self, exc: BaseException) -> bool:
        """Whether the pool's failure comes out instead of ``exc``, which ended its task
        group: a cancellation of the caller's (a deadline around the call) that reached
        it after a unit had failed (a clean-up that failed as the cancellation reached
        it). As a task group would, the failure wins, as itself (never in a group)."""
        error = self.error
        return error is not None and error is not exc and not is_failure(exc)

    async def _outcome(self) -> None:
        """After the task group: raise the pool's failure, if any. Raised here, out of
        the handler that caught the caller's cancellation, so that its ``__context__``
        (the cancellation it was raised in, say) is left as it was.

        With no failure and the caller cancelled (every unit swallowed its cancellation
        and returned: trio's task group then ends normally), the cancellation is raised:
        a cancelled call does not return normally, on any backend."""
        error = self.error
        if error is not None:
            raise error
        await anyio.lowlevel.checkpoint_if_cancelled()

    # -- starting workers ------------------------------------------------------------
    def fill(self, size: int | None = None) -> None:
        """Start one worker per unit the source has now, up to the maximum.

        ``size``: how many units the source has, when known (``len(items)``): that
        many workers start (up to the maximum) and nothing is pulled ahead. Else
        (only for a source that is done once it stops, with no ``refill``: a sync
        iterator) the units are pulled here, so that no worker starts without one,
        and handed out again in order. Either way whichever worker runs first takes
        the first unit: items start in input order on every backend.
        """
        limit = self._max
        if size is not None:
            count = size if limit is None else min(size, limit)
        else:
            try:
                pulled = list(itertools.islice(self._units, limit))
            except BaseException as exc:  # the input iterable itself failed: raised as
                # itself, a KeyboardInterrupt too (not in a group), and a GeneratorExit
                # (its own: nothing can close this synchronous pull)
                if not is_failure(exc) and not isinstance(exc, GeneratorExit):
                    raise
                self.fail(exc)
                return
            self._units = itertools.chain(pulled, self._units)
            count = len(pulled)
        self.workers += count
        self._coming += count
        create, work = self._tg.create_task, self._work
        for _ in range(count):  # as start_soon(self._work) names it, without its lookups
            create(work(), name=_WORKER)

    def kick(self, waiting: int = 1) -> None:
        """``waiting`` units may be waiting: have as many workers on their way (those
        already coming count), idle ones woken first, up to the maximum (module docs)."""
        tg = self._tg
        need = waiting - self._coming
        if need <= 0 or tg is None:  # enough on their way, or the pool is done
            return
        idle = self._idle
        while idle and need:
            self._coming += 1
            idle.popleft().set()
            need -= 1
        limit = self._max
        while need and (limit is None or self.workers < limit):
            self.workers += 1
            self._coming += 1
            tg.create_task(self._work(), name=_WORKER)
            need -= 1

    async def park(self) -> None:
        """Wait (in ``refill``) until :meth:`kick` or :meth:`release` wakes this worker."""
        event = anyio.Event()
        idle = self._idle
        if idle is None:
            idle = self._idle = deque()
        idle.append(event)
        await event.wait()
        self._coming -= 1

    def release(self) -> None:
        """Wake every idle worker (the source is done: they will find nothing and exit)."""
        idle = self._idle
        while idle:
            self._coming += 1
            idle.popleft().set()

    def fail(self, exc: BaseException) -> None:
        """Fail-fast: the first failure wins and cancels the pool. A later one (a
        clean-up that failed as that cancellation reached its unit) is not lost: it is
        attached to the end of the first one's context chain (:func:`chain`), so the
        traceback of the error raised shows it; the same object twice is chained once."""
        error = self.error
        if error is None:
            self.error = exc
            self._tg.cancel_scope.cancel()
        elif exc is not error:
            chain(error, exc)

    # -- the worker loop -------------------------------------------------------------
    async def _work(self, leave: Callable[[], None] | None = None) -> None:
        """A worker: take units until the source is done. ``leave`` (the caller as a
        worker, :meth:`run_here`): when the source has nothing now, free the slot and
        call it instead of waiting in ``refill``."""
        call, sink, units, refill = self._call, self._sink, self._units, self._refill
        self._coming -= 1
        try:
            # Fail-fast: once a unit has failed, no worker takes another one. A worker
            # whose unit ended in the same tick as the failure (cancellation reaches it
            # only at its next await) stops here instead of starting one that never
            # awaits, and a worker started just before the failure takes none.
            settle = self._settle
            while self.error is None:
                for key, arg in units:
                    if not settle:
                        sink[key] = await call(arg)
                    else:  # here, not in a wrapper: a frame resumed at each of its awaits
                        try:
                            value = Outcome(await call(arg), None)
                        except Exception as exc:
                            if _cancelled():  # raised as the pool was being cancelled:
                                raise  # no outcome will be returned; the pool's failure
                            value = Outcome(None, exc)
                        except BaseException as exc:
                            if not is_stray_cancellation(exc):
                                if leave is not None or not is_foreign_cancellation(exc):
                                    raise
                                _uncancel()  # the item's failure: this worker goes on
                            value = Outcome(None, exc)
                        sink[key] = value
                    if self.error is not None:  # set while it awaited (mypy sees None)
                        return  # type: ignore[unreachable]
                if leave is not None:
                    self.workers -= 1
                    leave()
                    return
                if refill is None or not await refill():
                    return
        except Exception as exc:
            self.fail(exc)
        except BaseException as exc:  # KeyboardInterrupt, a stray CancelledError, a
            # worker's foreign cancellation, a unit's own GeneratorExit (in the caller's
            # task: every one): raised as itself by run(), not wrapped by the task group
            if not fails(exc, _frame(), caller=leave is not None):
                raise
            self.fail(exc)


def fails(exc: BaseException, worker: FrameType | None, *, caller: bool = False) -> bool:
    """Whether ``exc``, out of a unit, is a failure the pool raises as itself (module
    docs), not a cancellation. Decided here only: :meth:`Pool._work` asks, and so does a
    unit that records how it ended before the pool sees ``exc`` (timeline, spans).

    ``worker``: the frame of the :meth:`Pool._work` running the unit; a unit passes its
    own frame's ``f_back``, which is that worker only while the worker's task resumes
    it (a ``GeneratorExit`` thrown in from outside, a close, reaches the unit's frame
    first, called by the closer's: no failure). ``caller``: the unit runs in the
    caller's own task (:meth:`Pool.run_here`, or no pool): every ``GeneratorExit`` is.
    """
    if is_failure(exc):
        return True
    if caller:
        return isinstance(exc, GeneratorExit)
    return is_foreign_cancellation(exc) or _raised_by_unit(exc, worker)


def _raised_by_unit(exc: BaseException, worker: FrameType | None) -> bool:
    """Whether ``exc`` is a ``GeneratorExit`` that the code of a unit raised in the
    worker whose frame is ``worker`` (:func:`fails`), not one thrown into the worker
    because its coroutine is being closed (its task dropped with a closed event loop,
    a ``coro.close()`` by other code): that one goes on out of the worker, or the
    ``close()`` would find it swallowed.

    A task-identity check: the worker was resumed by its own task, that is, the
    running task's coroutine is the worker's, or anyio's that awaits it (anyio 4.16+
    runs each task's function in a coroutine of its own: the worker's caller is then
    that coroutine, of an ``anyio`` module). A closed coroutine runs in no task, or in
    the closer's, and is called by the closer's frame (its ``f_back``). Public APIs
    only: the running task's coroutine, and frames.
    """
    if not isinstance(exc, GeneratorExit) or worker is None or worker.f_code is not _WORK:
        return False  # (not resumed by its worker: thrown in from outside)
    root: FrameType | None = getattr(_current_coroutine(), "cr_frame", None)
    if root is None:
        return False
    if root is worker:
        return True
    return worker.f_back is root and str(root.f_globals.get("__name__")).startswith("anyio.")


_frame = inspect.currentframe
_WORK = Pool._work.__code__
_WORKER = f"{__name__}.{Pool._work.__qualname__}"  # a worker task's name (start_soon's)


def _current_coroutine() -> object:
    """The coroutine of the running task (asyncio or trio), or ``None``."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop running
        task = None
    if task is not None:
        return task.get_coro()
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return trio.lowlevel.current_task().coro
        except RuntimeError:  # not in a trio run either
            pass
    return None


def _cancelled() -> bool:
    """Whether the current worker is being cancelled (by the caller, or by the pool's
    failure). Settle mode: an item's error raised then (a clean-up that failed, an
    item that turned its cancellation into an error) is no outcome anyone will see:
    the pool does not return; it is a failure, raised (module docs)."""
    return anyio.current_effective_deadline() == -math.inf


def _uncancel() -> None:
    """Settle mode: a worker kept a foreign cancellation as its item's outcome; its task
    is not being cancelled any more (Python 3.11+: ``asyncio.timeout`` and task groups
    in the next items count on ``Task.cancelling()``)."""
    task = asyncio.current_task()
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None:
        uncancel()


@final
class AsyncUnits:
    """The source for an async iterable: ``(index, item)`` units, pulled one at a time.

    Pulls are serialized (one ``anext`` at a time); each item that arrives kicks
    the pool, so one more worker (up to the maximum) waits for the next item:
    workers start as items arrive.
    """

    __slots__ = ("_buffer", "_done", "_index", "_iterator", "_lock", "pool")

    def __init__(self, iterable: Any) -> None:
        self._iterator = aiter(iterable)
        self._lock = anyio.Lock()
        self._buffer: deque[Unit] = deque()
        self._index = 0
        self._done = False
        self.pool: Pool | None = None

    def __iter__(self) -> AsyncUnits:
        return self

    def __next__(self) -> Unit:
        if self._buffer:
            return self._buffer.popleft()
        raise StopIteration

    async def refill(self) -> bool:
        """Pull the next item; ``False`` once the iterable has ended."""
        async with self._lock:
            if self._buffer:
                return True
            if self._done:
                return False
            item = await anext(self._iterator, _END)
            if item is _END:
                self._done = True
                return False
            self._buffer.append((self._index, item))
            self._index += 1
        if self.pool is not None:
            self.pool.kick()
        return True

    async def aclose(self) -> None:
        """Close the input if it is an async generator left unfinished (a failure, a
        cancellation, an ``imap`` block left early): its ``finally`` (a cursor, a
        connection given back) runs now, in the caller's task, not later at garbage
        collection in a task nobody owns. Any other async iterable is the caller's
        and is left open."""
        iterator = self._iterator
        if not self._done and inspect.isasyncgen(iterator):
            self._done = True
            await iterator.aclose()
