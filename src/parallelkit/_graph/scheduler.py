"""The scheduler of the graph engine: :class:`Run`, one execution of a plan.

See :mod:`parallelkit._graph.graph` for the engine's API (definition: ``Graph``,
``Node``, ``Plan``; execution: ``Run`` here).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import anyio
from typing_extensions import final

from .._core import backend
from .._core.errors import DependencyFailed
from .._core.limiter import SupportsLimit
from .._core.outcome import Outcome
from .._fanout.options import split_limit
from .._fanout.pool import Pool, Unit
from .graph import Plan, RunNode
from .timeline import Span, Timeline

__all__ = ["Run"]

_PENDING, _DONE, _SKIPPED = 0, 1, 2  # node states


@final
class Run:
    """One execution of a :class:`Plan`: the scheduler and all per-run state.

    See the module docstring for the arguments. After :meth:`execute`,
    :meth:`results` gives values (or outcomes, in settle mode) by name.

    How it schedules: a dependency counter per node and one ready queue, the
    source of the one worker :class:`~parallelkit._fanout.pool.Pool`. A worker that
    finishes a node releases its dependents into the queue and takes the next one
    itself; if more are waiting it kicks the pool, which wakes (or starts) **one**
    helper, which on waking takes one and kicks the next. So a step that never
    suspends costs one coroutine call, with no task, event or context switch, while
    steps that do suspend still all get started. The pool never has more workers
    than ``limit`` (and than nodes). While only one node is ready (a chain, the head
    of a graph), it is awaited in the caller's task with no pool at all; from the
    first fork on, the caller is the pool's first worker.
    """

    __slots__ = (
        "_clock",
        "_errors",
        "_inputs",
        "_kind",
        "_limited",
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
        "_state",
        "_timeline",
        "_values",
        "failed",
        "ready_order",
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
    ) -> None:
        self._plan = plan
        self._inputs = inputs
        self._run_node = run_node
        self._settle = settle
        self._timeline = timeline
        self._kind = kind if kind is not None else plan.kind
        workers, self._limiter = split_limit(limit)
        self._limited = limit is not None
        count = len(plan.names)
        self._max_workers = count if workers is None else min(workers, count)
        self._values: list[Any] = [None] * count
        self._state = [_PENDING] * count
        self._pending = list(plan.pending)
        self._queued = [0.0] * count
        self._remaining = count
        self._ready: deque[int] = deque()
        # settle mode only: the failed and skipped nodes
        self._errors: dict[int, BaseException] = {} if settle else _NO_ERRORS
        self._pool: Pool | None = None
        self._clock: Callable[[], float] = anyio.current_time
        self.failed: str | None = None
        self.ready_order: list[str] = []

    def __repr__(self) -> str:
        done = len(self._plan.names) - self._remaining
        return f"<Run {done}/{len(self._plan.names)} done, failed={self.failed!r}>"

    async def execute(self) -> None:
        """Run the plan to completion; fail-fast raises the first original exception."""
        plan = self._plan
        if not plan.names:
            return
        self._clock = clock = backend.clock()
        now = clock()
        for index, pending in enumerate(plan.pending):
            if not pending:
                self._queued[index] = now
                self._ready.append(index)
        ready = self._ready
        # While one node at a time is ready (a chain, or the head of a graph), run it
        # here, in the caller's task, as a hand-written ``await`` would: no task group,
        # no task. Fail-fast: its exception propagates from here, unchanged.
        while len(ready) == 1:
            await self._node(ready.popleft())
        if not self._remaining:
            return
        # Two or more ready: the pool, with the caller as its first worker.
        pool = Pool(self._node, _Ready(self), _DISCARD, max_workers=self._max_workers,
                    refill=self._refill)  # fmt: skip
        self._pool = pool
        try:
            await pool.run_here(self._leave)
        finally:
            self._pool = None

    def results(self) -> dict[str, Any]:
        """Values by name (settle mode: an :class:`~parallelkit.Outcome` for every node)."""
        names, values = self._plan.names, self._values
        if self._settle:
            errors = self._errors
            return {
                name: Outcome(None, errors[i]) if i in errors else Outcome(values[i], None)
                for i, name in enumerate(names)
            }
        state = self._state
        return {names[i]: values[i] for i in range(len(names)) if state[i] == _DONE}

    # -- the pool's source and unit --------------------------------------------------
    def _leave(self) -> None:
        """The caller found no ready node: it leaves the pool (the task group waits for
        the others). A node still runs somewhere unless the run is complete: then the
        idle workers are let go."""
        if not self._remaining:
            assert self._pool is not None
            self._pool.release()

    async def _refill(self) -> bool:
        """The ready queue is empty: wait for a kick, or leave when the run is complete."""
        if not self._remaining:
            assert self._pool is not None
            self._pool.release()  # let every idle worker go
            return False
        assert self._pool is not None
        await self._pool.park()
        return True

    async def _node(self, item: int) -> None:
        """Run one node: call it, record its span, release its dependents."""
        plan = self._plan
        node = plan.nodes[item]
        values, timeline, clock, limiter = self._values, self._timeline, self._clock, self._limiter
        kwargs = {param: values[dep] for param, dep in plan.dep_args[item]}
        for param in plan.input_args[item]:
            kwargs[param] = self._inputs[param]
        run_node = self._run_node
        queued = self._queued[item]
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
                if not self._limited:
                    queued = start  # no limit: no slot to wait for
                if run_node is None:
                    value = await node.call(**kwargs)  # type: ignore[misc]
                else:
                    value = await run_node(node, kwargs)
        except Exception as exc:
            end = clock()
            if timeline is not None:
                timeline._add(
                    Span(node.name, queued, start or end, end, "error",
                         plan.waited_for[item], self._kind)
                )  # fmt: skip
            self._remaining -= 1
            if not self._settle:
                pool = self._pool
                if pool is None or pool.error is None:  # the first failure (inline: the only)
                    self.failed = node.name
                raise
            self._state[item] = _DONE
            self._errors[item] = exc
            self._skip_downstream(item, end)
        except BaseException:
            if timeline is not None:
                end = clock()
                timeline._add(
                    Span(node.name, queued, start or end, end, "cancelled",
                         plan.waited_for[item], self._kind)
                )  # fmt: skip
            raise
        else:
            end = clock()
            state, pending, ready = self._state, self._pending, self._ready
            state[item] = _DONE
            values[item] = value
            self.ready_order.append(node.name)
            if timeline is not None:
                timeline._add(
                    Span(node.name, queued, start, end, "ok", plan.waited_for[item], self._kind)
                )
            self._remaining -= 1
            for dep in plan.dependents[item]:  # release the dependents
                left = pending[dep] - 1
                pending[dep] = left
                if not left and state[dep] == _PENDING:
                    self._queued[dep] = end
                    ready.append(dep)

    def _skip_downstream(self, failed: int, now: float) -> None:
        """Settle mode: mark everything downstream of ``failed`` as not run."""
        plan, state = self._plan, self._state
        names, timeline = plan.names, self._timeline
        stack = [failed]
        while stack:
            cause = stack.pop()
            for dep in plan.dependents[cause]:
                if state[dep] != _PENDING:
                    continue
                state[dep] = _SKIPPED
                self._errors[dep] = DependencyFailed(names[dep], names[cause])
                self._remaining -= 1
                if timeline is not None:
                    timeline._add(
                        Span(names[dep], now, now, now, "skipped", plan.waited_for[dep], self._kind)
                    )
                stack.append(dep)


class _Ready(Iterator[Unit]):
    """The run's ready queue as the pool's source: ``(node, node)`` units."""

    __slots__ = ("_pool", "_ready", "_run")

    def __init__(self, run: Run) -> None:
        self._run = run
        self._ready = run._ready

    def __next__(self) -> Unit:
        ready = self._ready
        if not ready:
            raise StopIteration
        item = ready.popleft()
        if ready:  # more waiting: one helper more (it kicks the next)
            pool = self._run._pool
            assert pool is not None
            pool.kick()
        return item, item


class _Discard:
    """The pool's sink for a run: each node stores its own value."""

    __slots__ = ()

    def __setitem__(self, key: object, value: object) -> None:
        pass


_DISCARD = _Discard()
_NO_ERRORS: dict[int, BaseException] = {}  # fail-fast runs record no errors (never written)
