"""Single flight: many callers of one key share one load.

A :class:`Flight` is the shared state of one load. Its work runs either

* in a task group that outlives every caller (:meth:`Flight.start_in`):
  callers only wait, and cancelling one of them never touches the load for the
  others. When the *last* waiter of an abandonable flight (a miss load) leaves,
  the load is cancelled: nobody wants it any more. A background refresh has no
  waiters and is never abandoned, unless misses joined it (its stale window ran
  out): then the last of them to leave cancels it too; or
* in the first caller, the *leader* (:meth:`Flight.lead`), when no such task
  group exists. The leader's load runs in a cancel scope that is **shielded
  exactly while other callers wait on it**: a cancelled leader with followers
  finishes the load for them first (its own cancellation is delivered right
  after); a cancelled leader with no followers stops at once. If a leader's load
  is cancelled anyway, waiters see :attr:`Flight.cancelled` and start over; if a
  ``KeyboardInterrupt``-like error stopped it, they raise
  :meth:`Flight.interruption` instead (the load is not started again).

Callers waiting for a load register as blocked on the task that runs it
(:mod:`parallelkit._core.waits`): a caller holding a database pool slot lends it to
that load when no other slot is to be had (``parallelkit.sqlalchemy.pool_limiter``),
so callers that hold every slot and wait for one load do not wait for ever.

The work never raises an :class:`Exception` out of :meth:`run`: the outcome is
kept on the flight (``ok``/``value``/``error``) and every waiter reads it. Nor
does it raise a ``CancelledError`` that no cancellation caused (asyncio: the
loader awaited a future cancelled elsewhere): that is the load's failure, kept
like any other; let through, the owner's task group would take it for a
cancellation and cancel the cache's ``async with`` body.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from typing_extensions import final

from .._core.backend import is_failure, is_stray_cancellation, task_id
from .._core.waits import BLOCKED, WAKE, WORKERS

__all__ = ["Flight"]

_RUNNING: contextvars.ContextVar[tuple[Flight, ...]] = contextvars.ContextVar(
    "parallelkit_flights_running", default=()
)
"""The flights whose load this task/context runs (inherited by the tasks it starts, a
load it starts in the cache's task group included): a wait for one of them would
wait for itself (see :meth:`Flight.runs_here`)."""


@final
class Flight:
    """The shared state of one in-flight load (internal)."""

    __slots__ = (
        "_blocked",
        "_done",
        "_owned",
        "_scope",
        "error",
        "finished",
        "interrupted",
        "ok",
        "refresh",
        "traceback",
        "unstored",
        "valid",
        "value",
        "waiters",
        "waits_for",
        "worker",
    )

    def __init__(self, *, refresh: bool) -> None:
        self._done = anyio.Event()
        self._scope: anyio.CancelScope | None = None  # lead(): shielded while others wait
        self._owned: anyio.CancelScope | None = None  # start_in(): cancelled when abandoned
        self.refresh = refresh  # a background refresh (stale-if-error applies)
        self.valid = True  # False once invalidated: the result must not be stored
        self.unstored = False  # loaded fine, but the store write failed (a store error)
        self.waiters = 0  # callers waiting, the leader excluded
        self.finished = False
        self.ok = False
        self.value: Any = None
        self.error: BaseException | None = None  # an Exception, or a stray CancelledError
        self.traceback: TracebackType | None = None  # the error's, as the load raised it
        # a KeyboardInterrupt-like BaseException that stopped the load (it goes on up
        # the task that ran it); waiters get a RuntimeError from it, never a new load
        self.interrupted: BaseException | None = None
        self.worker: int | None = None  # the task running the load, once it runs
        self._blocked: list[int] = []  # the tasks waiting for it (see _core/waits.py)
        # while it runs: the flights its load waits for, once per wait (see runs_here)
        self.waits_for: list[Flight] = []

    @property
    def cancelled(self) -> bool:
        """The flight finished with neither a value nor an error (its load was cancelled)."""
        return self.finished and not self.ok and self.error is None and self.interrupted is None

    def interruption(self) -> RuntimeError:
        """What a waiter raises when a ``KeyboardInterrupt``-like error stopped the load."""
        msg = f"the shared load of this key was stopped: its loader raised {self.interrupted!r}"
        error = RuntimeError(msg)
        error.__cause__ = self.interrupted
        return error

    async def run(self, work: Callable[[], Awaitable[Any]], on_done: Callable[[], None]) -> None:
        """Run ``work`` and record its outcome; ``on_done`` always runs (cleanup)."""
        worker = self.worker = task_id()
        running = _RUNNING.set((*_RUNNING.get(), self))
        # a load run inside another load of the same task (a leader's loader missing
        # another key): the outer one's registration is put back when this one ends
        outer = worker in WORKERS, BLOCKED.get(worker)
        WORKERS.add(worker)
        if self._blocked:  # callers waiting already: the load may run on their slots
            BLOCKED[worker] = self._blocked
        try:
            self.value = await work()
            self.ok = True
        except Exception as exc:  # handed to every waiter
            self.error = exc
            self.traceback = exc.__traceback__
        except BaseException as exc:  # a stray CancelledError is the load's failure too
            if not is_stray_cancellation(exc):
                if is_failure(exc):  # KeyboardInterrupt-like: waiters must not retry it
                    self.interrupted = exc
                raise
            self.error = exc
            self.traceback = exc.__traceback__
        finally:
            _RUNNING.reset(running)
            was_worker, outer_blocked = outer
            if not was_worker:
                WORKERS.discard(worker)
            if outer_blocked is not None:
                BLOCKED[worker] = outer_blocked
            elif BLOCKED and BLOCKED.get(worker) is self._blocked:
                del BLOCKED[worker]
            self.finished = True
            on_done()
            self._done.set()

    def start_in(
        self,
        tg: TaskGroup,
        work: Callable[[], Awaitable[Any]],
        on_done: Callable[[], None],
        *,
        abandonable: bool,
    ) -> None:
        """Run the flight as a task of ``tg`` (callers then :meth:`wait`)."""
        tg.start_soon(self._run_owned, work, on_done, abandonable)

    async def _run_owned(
        self, work: Callable[[], Awaitable[Any]], on_done: Callable[[], None], abandonable: bool
    ) -> None:
        if not abandonable:  # a background refresh: no load here waits for it
            _RUNNING.set(())  # (this task's own context)
        with anyio.CancelScope() as scope:
            if abandonable and self.waiters == 0:  # every caller left before it started
                scope.cancel()
            # a refresh too: misses that joined it (its stale window ran out) cancel it
            # when the last of them leaves, as a miss load's, so a hung refresh does not
            # hold its key for ever; a refresh nobody waits for is never cancelled
            self._owned = scope
            try:
                await self.run(work, on_done)
            finally:
                self._owned = None

    async def lead(self, work: Callable[[], Awaitable[Any]], on_done: Callable[[], None]) -> None:
        """Run the flight in the calling task, shielded while followers wait.

        A leader cancelled while the shield was up finished the load for its
        followers; its own cancellation is delivered here, right after.
        """
        running = _RUNNING.get()
        waiter = running[-1] if running else None  # a load leading this one waits for it
        if waiter is not None:
            waiter.waits_for.append(self)
        with anyio.CancelScope(shield=self.waiters > 0) as scope:
            self._scope = scope
            try:
                await self.run(work, on_done)
            finally:
                self._scope = None
                if waiter is not None:
                    waiter.waits_for.remove(self)
        await anyio.lowlevel.checkpoint_if_cancelled()

    def runs_here(self) -> bool:
        """Whether waiting for this flight here would wait for itself, for ever
        (shielded, when a leader runs it): its load runs in the current task/context,
        or started (directly or through other loads) the one running here, or waits,
        directly or through the flights their loads wait for, for one running here
        (two keys whose loaders read each other). Only a wait from inside a load can
        close such a loop, so a caller outside any load pays one lookup."""
        running = _RUNNING.get()
        if not running:
            return False
        if self in running:
            return True
        seen, stack = {id(self)}, [self]
        while stack:
            for other in stack.pop().waits_for:
                if other.finished or id(other) in seen:
                    continue
                if other in running:
                    return True
                seen.add(id(other))
                stack.append(other)
        return False

    async def wait(self) -> None:
        """Wait for the flight as a follower; keeps a leader's load shielded meanwhile."""
        self.waiters += 1
        scope = self._scope
        if scope is not None:
            scope.shield = True
        # blocked on the load's task: a limiter may lend it this task's slot
        blocked, me, worker = self._blocked, task_id(), self.worker
        blocked.append(me)
        if worker is not None and not self.finished:
            BLOCKED[worker] = blocked
            wake = WAKE.get(worker)
            if wake is not None:  # the load waits for a slot: it may run on this task's
                wake()
        # noted on the load this wait is made from, for runs_here
        running = _RUNNING.get()
        waiter = running[-1] if running else None
        if waiter is not None:
            waiter.waits_for.append(self)
        try:
            await self._done.wait()
        finally:
            if waiter is not None:
                waiter.waits_for.remove(self)
            blocked.remove(me)
            if not blocked and worker is not None and BLOCKED.get(worker) is blocked:
                del BLOCKED[worker]
            self.waiters -= 1
            if self.waiters == 0 and not self.finished:
                if self._scope is not None:
                    self._scope.shield = False  # the leader alone decides again
                elif self._owned is not None:
                    self._owned.cancel()  # nobody waits for this load any more

    def __repr__(self) -> str:
        state = "running" if not self.finished else ("ok" if self.ok else "failed")
        kind = "refresh" if self.refresh else "load"
        return f"<Flight {kind} {state} waiters={self.waiters} valid={self.valid}>"
