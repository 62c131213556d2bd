"""The scheduler of the graph engine: :class:`Run`, one execution of a plan.

See :mod:`parallelkit._graph.graph` for the engine's API (definition: ``Graph``,
``Node``, ``Plan``; execution: ``Run`` here).
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any, Literal

import anyio
from typing_extensions import final

from .._core import backend
from .._core.backend import is_foreign_cancellation, is_stray_cancellation
from .._core.errors import DependencyFailed
from .._core.limiter import SupportsLimit
from .._core.outcome import Outcome
from .._fanout.options import for_fanout, split_limit
from .._fanout.pool import Pool, Unit, _cancelled, _uncancel, fails
from .graph import Plan, RunNode
from .timeline import SpanStatus, Timeline

__all__ = ["NodeEnded", "Run"]

# A node's entry in ``Run._pending``: >= 0 while it has not finished (how many of its
# dependencies have not), then one of these.
_DONE, _SKIPPED = -1, -2
_frame = inspect.currentframe


@final
class NodeEnded(Exception):
    """Raised by a ``run_node``: the node ended, but not well; the run goes on.

    The engine records the node's span with ``status`` (``"error"``: it failed;
    ``"cancelled"``: it was cut short) and then treats the node as done, with
    ``value`` as its result: nothing fails, nothing is skipped, its dependents
    run. For a caller whose nodes must all run whatever happens to one (an
    orchestrator's stop: each tear-down's error is reported by the orchestrator
    itself), in a fail-fast run. Only the failure path looks for it: a node that
    returns costs nothing more.

    Args:
        status: the span's status, ``"error"`` or ``"cancelled"``.
        error: what ended it (recorded on a trace's node span), if anything.
        value: the node's result.
    """

    __slots__ = ("error", "status", "value")

    def __init__(
        self,
        status: Literal["error", "cancelled"],
        error: BaseException | None = None,
        *,
        value: Any = None,
    ) -> None:
        if status not in ("error", "cancelled"):
            msg = f"status must be 'error' or 'cancelled', not {status!r}"
            raise ValueError(msg)
        super().__init__(status, error)
        self.status: SpanStatus = status
        self.error = error
        self.value = value


@final
class Run(Iterator[Unit]):
    """One execution of a :class:`Plan`: the scheduler and all per-run state.

    See the module docstring for the arguments. After :meth:`execute`,
    :meth:`results` gives values (or outcomes, in settle mode) by name.

    How it schedules: a dependency counter per node and one ready queue, the
    source of the one worker :class:`~parallelkit._fanout.pool.Pool`. A worker that
    finishes a node releases its dependents into the queue and takes the next one
    itself; if more are waiting it kicks the pool for all of them, which wakes (or
    starts) a worker for each at once: nodes ready together start in the same
    scheduler pass, as in a task group, never each behind what the previous one
    started. A worker goes on with the next ready node when its own ends, so a node
    that never suspends costs one coroutine call. The pool never has more workers
    than ``limit`` (and than nodes). While only one node is ready (a chain, the head
    of a graph), it is awaited in the caller's task with no pool at all; from the
    first fork on, the caller is the pool's first worker. A worker that finds the
    queue empty parks until a kick only while some node is still to start; when none
    is (the last steps are running), it exits: no event, no wake-up.
    """

    __slots__ = (
        "_caller",
        "_clock",
        "_errors",
        "_inputs",
        "_keep_cancelled_errors",
        "_kind",
        "_limiter",
        "_max_workers",
        "_pending",
        "_plan",
        "_pool",
        "_queued",
        "_ready",
        "_remaining",
        "_run_node",
        "_settle",
        "_timeline",
        "_values",
        "_waiting",
        "failed",
    )

    def __init__(
        self,
        plan: Plan,
        inputs: Mapping[str, Any],
        *,
        run_node: RunNode | None = None,
        limit: int | SupportsLimit | None = None,
        settle: bool = False,
        timeline: Timeline | None = None,
        kind: str | None = None,
        keep_cancelled_errors: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._plan = plan
        # settle mode: an error raised while the run is being cancelled is a failure,
        # raised (a Flow: nobody sees a cancelled run's outcomes), or, for a caller that
        # cancels the run itself and reads them (an orchestrator's rollback), an outcome
        self._keep_cancelled_errors = keep_cancelled_errors
        self._inputs = inputs
        self._run_node = run_node
        self._settle = settle
        self._timeline = timeline
        self._kind = kind if kind is not None else plan.kind
        count = len(plan.names)
        if limit is None:  # the usual case: no bound, no limiter
            self._limiter: SupportsLimit | None = None
            self._max_workers = count
        else:
            workers, limiter = split_limit(limit)
            self._limiter = for_fanout(limiter)
            self._max_workers = count if workers is None else min(workers, count)
        self._values: list[Any] = [None] * count
        self._pending = list(plan.pending)
        # when each node became ready: only a limited run has a wait for a slot to show
        self._queued: list[float] | None = [0.0] * count if limit is not None else None
        self._remaining = count
        self._waiting = count  # neither started nor skipped: work that may still come
        self._ready: deque[int] = deque()
        # settle mode only: the failed and skipped nodes (none: no dict built)
        self._errors: dict[int, BaseException] = _NO_ERRORS  # a dict of its own once written
        self._pool: Pool | None = None
        self._caller = 0  # the calling task's id, once the pool opens
        # the readings of anyio.current_time; none given: the backend's, looked up once
        self._clock: Callable[[], float] = anyio.current_time if clock is None else clock
        self.failed: str | None = None

    def __repr__(self) -> str:
        done = len(self._plan.names) - self._remaining
        return f"<Run {done}/{len(self._plan.names)} done, failed={self.failed!r}>"

    async def execute(self) -> None:
        """Run the plan to completion; fail-fast raises the first original exception."""
        plan = self._plan
        if not plan.names:
            return
        clock = self._clock
        if clock is anyio.current_time:
            self._clock = clock = backend.clock()
        ready, queued = self._ready, self._queued
        ready.extend(plan.roots)
        if queued is not None:
            now = clock()
            for index in plan.roots:
                queued[index] = now
        # While one node at a time is ready (a chain, or the head of a graph), run it
        # here, in the caller's task, as a hand-written ``await`` would: no task group,
        # no task. Fail-fast: its exception propagates from here, unchanged.
        while len(ready) == 1:
            self._waiting -= 1
            await self._node(ready.popleft())
        if not self._remaining:
            return
        # Two or more ready: the pool, with the caller as its first worker.
        self._caller = backend.task_id()
        # the sink: each node stores its value itself, and returns it (stored again)
        pool = Pool(self._node, self, self._values, max_workers=self._max_workers,
                    refill=self._refill)  # fmt: skip
        self._pool = pool
        try:
            # the caller's cancellation after a node failed (a clean-up that failed as
            # it was cancelled): the failure comes out, as itself (Pool.run_here)
            await pool.run_here(self._leave)
        finally:
            self._pool = None

    def results(self) -> dict[str, Any]:
        """Values by name (settle mode: an :class:`~parallelkit.Outcome` for every node)."""
        names, values = self._plan.names, self._values
        if self._settle:
            errors = self._errors
            outcomes: dict[str, Any] = {}
            for i, name in enumerate(names):
                if i in errors:
                    outcomes[name] = Outcome(None, errors[i])
                else:
                    value = values[i]  # a step that returns None: one shared (frozen) outcome
                    outcomes[name] = _NONE if value is None else Outcome(value, None)
            return outcomes
        pending = self._pending
        if pending.count(_DONE) == len(names):  # every node done: no test per node
            return dict(zip(names, values, strict=True))
        return {names[i]: values[i] for i in range(len(names)) if pending[i] == _DONE}

    # -- the pool's source and unit --------------------------------------------------
    def _leave(self) -> None:
        """The caller found no ready node: it leaves the pool (the task group waits for
        the others). A node still runs somewhere unless none is left to start: then the
        idle workers are let go."""
        if not self._waiting:
            pool = self._pool
            assert pool is not None
            if pool._idle:  # (no call when none is idle: the usual case)
                pool.release()

    async def _refill(self) -> bool:
        """The ready queue is empty: wait for a kick, or leave when no node is left to
        start (the last ones may still be running: nothing can become ready after them)."""
        pool = self._pool
        assert pool is not None
        if not self._waiting:
            if pool._idle:
                pool.release()  # let every idle worker go
            return False
        await pool.park()
        return True

    async def _node(self, item: int) -> Any:
        """Run one node: call it, record its span, release its dependents. Returns what
        its dependents get (stored here already; the pool's sink stores it again)."""
        plan = self._plan
        node = plan.nodes[item]
        values, timeline, clock, limiter = self._values, self._timeline, self._clock, self._limiter
        kwargs: dict[str, Any] = {}  # loops, not a comprehension: no call (Python 3.11)
        for param, dep in plan.dep_args[item]:
            kwargs[param] = values[dep]
        inputs = self._inputs
        for param in plan.input_args[item]:
            kwargs[param] = inputs[param]
        run_node, queued_at = self._run_node, self._queued
        queued = 0.0 if queued_at is None else queued_at[item]
        start = None
        try:
            if limiter is not None:
                async with limiter:
                    start = clock()
                    if run_node is None:
                        value = await node.call(**kwargs)  # type: ignore[misc]
                    else:
                        value = await run_node(node, kwargs)
            else:
                start = clock()
                if queued_at is None:
                    queued = start  # no limit: no slot to wait for
                if run_node is None:
                    # the step's frame holds its arguments: this one need not, while it runs
                    call = node.call(**kwargs)  # type: ignore[misc]
                    del kwargs
                    value = await call
                else:
                    value = await run_node(node, kwargs)
        except BaseException as exc:
            end = clock()
            if type(exc) is NodeEnded:  # not a failure: the node says how it ended
                began = end if start is None else start
                self._ended(item, queued, began, end, exc)
                return exc.value
            # an Exception, or a CancelledError the step raised by itself (asyncio: it
            # awaited a future cancelled elsewhere, or code it called cancelled the
            # worker task it runs in) is the step's failure; a
            # KeyboardInterrupt-like one is recorded as one and stops the run (never
            # settled); a cancellation is recorded as such and goes on
            failed = (
                isinstance(exc, Exception)
                or is_stray_cancellation(exc)
                or self._foreign_in_worker(exc)
            )
            # fails the run (never settled): a KeyboardInterrupt-like error, a
            # GeneratorExit the step raised itself; as the pool decides it
            stops = failed or self._stops(exc, _frame())
            if timeline is not None:
                status: SpanStatus = "error" if stops else "cancelled"
                began = end if start is None else start
                timeline._record(
                    node.name, queued, began, end, status, plan.waited_for[item], self._kind
                )
            if not failed or not self._settle or self._raised_while_cancelled(exc):
                if stops:
                    self._remaining -= 1
                    pool = self._pool
                    # the first (inline: the only); a later one (a clean-up that failed
                    # as the first cancelled it) the pool chains to the first (Pool.fail)
                    if pool is None or pool.error is None:
                        self.failed = node.name
                raise
            self._remaining -= 1
            self._pending[item] = _DONE
            errors = self._errors
            if errors is _NO_ERRORS:  # the first failure of a settled run
                self._errors = errors = {}
            errors[item] = exc
            self._skip_downstream(item, end)
            return None
        else:
            end = clock()
            pending, ready = self._pending, self._ready
            pending[item] = _DONE
            values[item] = value
            if timeline is not None:
                waited, kind = plan.waited_for[item], self._kind
                if timeline._on_add is None:  # Timeline._record, inline (the hot path)
                    timeline._raw += (node.name, queued, start, end, "ok", waited, kind)
                else:
                    timeline._record(node.name, queued, start, end, "ok", waited, kind)
            self._remaining -= 1
            for dep in plan.dependents[item]:  # release the dependents
                left = pending[dep] - 1
                if left < 0:  # skipped (settle mode): it stays so
                    continue
                pending[dep] = left
                if not left:
                    if queued_at is not None:
                        queued_at[dep] = end
                    ready.append(dep)
            return value

    def _ended(self, item: int, queued: float, start: float, end: float, ended: NodeEnded) -> None:
        """A node raised :class:`NodeEnded`: its span gets that status, and the run goes
        on as if it returned ``ended.value`` (the success path's bookkeeping, written
        there inline: that is the hot path)."""
        plan, pending, ready, queued_at = self._plan, self._pending, self._ready, self._queued
        pending[item] = _DONE
        self._values[item] = ended.value
        if self._timeline is not None:
            self._timeline._record(
                plan.names[item], queued, start, end, ended.status, plan.waited_for[item],
                self._kind,
            )  # fmt: skip
        self._remaining -= 1
        for dep in plan.dependents[item]:
            left = pending[dep] - 1
            if left < 0:
                continue
            pending[dep] = left
            if not left:
                if queued_at is not None:
                    queued_at[dep] = end
                ready.append(dep)

    def _raised_while_cancelled(self, exc: BaseException) -> bool:
        """Settle mode: whether ``exc`` is an error raised while the run is being
        cancelled (a clean-up that failed as the caller's cancellation reached it). It
        is no outcome anyone will see (a cancelled run returns none): a failure, raised,
        as in the pool; unless the run was built to keep such errors as outcomes."""
        return isinstance(exc, Exception) and not self._keep_cancelled_errors and _cancelled()

    def _stops(self, exc: BaseException, frame: FrameType | None) -> bool:
        """Whether ``exc`` (no error the run could settle) fails the run: the pool's
        decision (:func:`~parallelkit._fanout.pool.fails`), asked here because the
        node's span is recorded before the pool sees ``exc``. ``frame``: :meth:`_node`'s
        own, whose caller is the pool's worker loop (in a worker task the pool started)."""
        caller = self._pool is None or backend.task_id() == self._caller
        worker = None if caller or frame is None else frame.f_back
        return fails(exc, worker, caller=caller)

    def _foreign_in_worker(self, exc: BaseException) -> bool:
        """asyncio: whether ``exc`` is a ``task.cancel()`` that no cancel scope made, in
        a worker task of the pool (not the caller's): the node's failure, as the pool
        has it (fail-fast: raised itself; settle: its outcome, the task un-cancelled).
        In the caller's task a cancellation is always one."""
        if self._pool is None or not is_foreign_cancellation(exc):
            return False
        if backend.task_id() == self._caller:
            return False
        if self._settle:  # kept as the node's outcome: its worker goes on, not cancelling
            _uncancel()
        return True

    def _skip_downstream(self, failed: int, now: float) -> None:
        """Settle mode: mark everything downstream of ``failed`` as not run."""
        plan, pending = self._plan, self._pending
        names, timeline = plan.names, self._timeline
        stack = [failed]
        while stack:
            cause = stack.pop()
            for dep in plan.dependents[cause]:
                if pending[dep] < 0:  # already skipped
                    continue
                pending[dep] = _SKIPPED
                self._waiting -= 1
                skipped = DependencyFailed(names[dep], names[cause])
                # the traceback of ``outcomes[dep].unwrap()`` shows why: the chain of
                # skipped steps down to the failure itself
                skipped.__cause__ = self._errors[cause]
                self._errors[dep] = skipped
                self._remaining -= 1
                if timeline is not None:
                    timeline._record(
                        names[dep], now, now, now, "skipped", plan.waited_for[dep], self._kind
                    )
                stack.append(dep)

    # -- the ready queue as the pool's source: ``(node, node)`` units ------------------
    def __iter__(self) -> Iterator[Unit]:
        return self

    def __next__(self) -> Unit:
        ready = self._ready
        if not ready:
            raise StopIteration
        item = ready.popleft()
        self._waiting -= 1
        if ready:  # more waiting: a worker on its way for each (they start together)
            pool = self._pool
            assert pool is not None
            pool.kick(len(ready))
        return item, item


_NONE: Outcome[Any] = Outcome(None, None)  # a step's outcome when it returned None
_NO_ERRORS: dict[int, BaseException] = {}  # no failure recorded yet (never written)
