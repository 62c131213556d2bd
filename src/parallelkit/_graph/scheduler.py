"""The scheduler of the graph engine: :class:`Run`, one execution of a plan.

See :mod:`parallelkit._graph.graph` for the engine's API (definition: ``Graph``,
``Node``, ``Plan``; execution: ``Run`` here).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from typing_extensions import final

from .._core.errors import DependencyFailed
from .._core.limiter import SupportsLimit, validate_limit
from .._core.outcome import Outcome
from .graph import Plan, RunNode
from .timeline import Span, Timeline

__all__ = ["Run"]

_PENDING, _DONE, _SKIPPED = 0, 1, 2  # node states


def _clock() -> Callable[[], float]:
    """:func:`anyio.current_time`, resolved to the running backend's clock once.

    ``anyio.current_time()`` looks the backend up on every call (about half the
    engine's per-node cost); the function it ends up calling is the same.
    """
    try:
        from anyio._core._eventloop import get_async_backend

        clock: Callable[[], float] = get_async_backend().current_time
        return clock
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - anyio moved it
        return anyio.current_time


@final
class Run:
    """One execution of a :class:`Plan`: the scheduler and all per-run state.

    See the module docstring for the arguments. After :meth:`execute`,
    :meth:`results` gives values (or outcomes, in settle mode) by name.

    How it schedules: a dependency counter per node and one ready queue, served
    by a pool of workers that grows only when work is waiting while every worker
    is busy. A worker that finishes a node releases its dependents into the queue
    and takes the next one itself; if more are waiting it wakes (or starts) **one**
    helper, which on waking takes one and wakes the next. So a step that never
    suspends costs one coroutine call, with no task, event or context switch, while
    steps that do suspend still all start within one scheduler pass of each other.
    """

    __slots__ = (
        "_error",
        "_errors",
        "_idle",
        "_inputs",
        "_kind",
        "_limiter",
        "_max_workers",
        "_pending",
        "_plan",
        "_queued",
        "_ready",
        "_remaining",
        "_run_node",
        "_scope",
        "_settle",
        "_state",
        "_tg",
        "_timeline",
        "_values",
        "_waking",
        "_workers",
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
        self._limiter: SupportsLimit | None = None
        if limit is not None and not isinstance(limit, int) and isinstance(limit, SupportsLimit):
            self._limiter = limit
            workers = limit.concurrency
        else:
            workers = validate_limit(limit)
        count = len(plan.names)
        self._max_workers = count if workers is None else min(workers, count)
        self._values: list[Any] = [None] * count
        self._state = [_PENDING] * count
        self._pending = list(plan.pending)
        self._queued = [0.0] * count
        self._remaining = count
        self._ready: deque[int] = deque()
        self._idle: deque[anyio.Event] = deque()
        self._workers = 0
        self._waking = False
        self._error: BaseException | None = None
        self._errors: dict[int, BaseException] = {}  # settle mode: failed and skipped nodes
        self._tg: Any = None
        self._scope: anyio.CancelScope | None = None
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
        now = anyio.current_time()
        for index, pending in enumerate(plan.pending):
            if not pending:
                self._queued[index] = now
                self._ready.append(index)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._scope = tg.cancel_scope
            self._kick()
        self._tg = None
        if self._error is not None:
            raise self._error

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

    # -- scheduling -------------------------------------------------------------------
    def _kick(self) -> None:
        """Work is waiting: wake one idle worker, or start one, unless one is on its way."""
        if self._waking or not self._ready:
            return
        if self._idle:
            self._waking = True
            self._idle.popleft().set()
        elif self._workers < self._max_workers:
            self._waking = True
            self._workers += 1
            self._tg.start_soon(self._worker)

    async def _worker(self) -> None:
        plan = self._plan
        nodes, dep_args, input_args = plan.nodes, plan.dep_args, plan.input_args
        dependents, waited_for = plan.dependents, plan.waited_for
        values, state, pending, queued = self._values, self._state, self._pending, self._queued
        inputs, run_node, limiter = self._inputs, self._run_node, self._limiter
        settle, timeline, kind = self._settle, self._timeline, self._kind
        ready, idle, clock = self._ready, self._idle, _clock()
        self._waking = False
        while True:
            if not ready:
                if not self._remaining:
                    while idle:  # the run is complete: let every idle worker go
                        idle.popleft().set()
                    return
                event = anyio.Event()
                idle.append(event)
                await event.wait()
                self._waking = False
                continue
            item = ready.popleft()
            if ready:
                self._kick()
            node = nodes[item]
            kwargs = {param: values[dep] for param, dep in dep_args[item]}
            for param in input_args[item]:
                kwargs[param] = inputs[param]
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
                    if run_node is None:
                        value = await node.call(**kwargs)  # type: ignore[misc]
                    else:
                        value = await run_node(node, kwargs)
            except Exception as exc:
                end = clock()
                if timeline is not None:
                    timeline._add(
                        Span(node.name, queued[item], start or end, end, "error",
                             waited_for[item], kind)
                    )  # fmt: skip
                self._remaining -= 1
                if not settle:
                    if self._error is None:
                        self._error = exc
                        self.failed = node.name
                        assert self._scope is not None
                        self._scope.cancel()
                    return
                state[item] = _DONE
                self._errors[item] = exc
                self._skip_downstream(item, end)
            except BaseException:
                if timeline is not None:
                    end = clock()
                    timeline._add(
                        Span(node.name, queued[item], start or end, end, "cancelled",
                             waited_for[item], kind)
                    )  # fmt: skip
                raise
            else:
                end = clock()
                state[item] = _DONE
                values[item] = value
                self.ready_order.append(node.name)
                if timeline is not None:
                    timeline._add(
                        Span(node.name, queued[item], start, end, "ok", waited_for[item], kind)
                    )
                self._remaining -= 1
                for dep in dependents[item]:  # release the dependents
                    left = pending[dep] - 1
                    pending[dep] = left
                    if not left and state[dep] == _PENDING:
                        queued[dep] = end
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
