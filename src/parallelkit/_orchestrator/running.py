"""A started orchestrator: the values (:class:`Running`), health, and the run session.

:class:`_Session` does the work of one ``orch.start()``: it drives the shared graph
engine (:mod:`parallelkit._graph.graph`) over the services, hosting each one in its own
task (:class:`~parallelkit._orchestrator.services.ServiceHost`), and stops them again by running
the same engine over the *reversed* dependency graph of what actually started, so
a service stops only after everything that depends on it has stopped, and
independent tear-downs run in parallel.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, TypeVar, overload

import anyio
import anyio.abc
from typing_extensions import final

from .._core import instrument
from .._core.check import number
from .._core.errors import DependencyFailed, StartupError
from .._graph.graph import Graph, Node, Param, Plan, RunNode
from .._graph.scheduler import Run
from .._graph.timeline import Span, Timeline
from ..probes import Probe
from .process import ManagedProcess
from .services import ServiceHost, ServiceSpec, ServiceState

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["Health", "Running", "ServiceHealth"]

T = TypeVar("T")
logger = logging.getLogger("parallelkit.orchestrator")

HealthStatus = Literal["ok", "degraded", "failing"]


@final
@dataclass(frozen=True, slots=True)
class ServiceHealth:
    """The health of one service, from :meth:`Running.health`.

    Attributes:
        name: the service.
        state: its lifecycle state (``"ready"``, ``"failed"``, ``"skipped"``,
            ``"crashed"``, ``"stopped"``, …).
        ok: ``True`` when it is ready (and, when the health was awaited, its
            probe, if any, passes now).
        critical: whether its failure fails the whole orchestrator.
        reason: why it is not ok (the probe's last answer, the error), else ``None``.
    """

    name: str
    state: ServiceState
    ok: bool
    critical: bool
    reason: str | None = None


@final
@dataclass(frozen=True, slots=True)
class Health:
    """The aggregate health of a running orchestrator, from :meth:`Running.health`.

    ``running.health()`` is a snapshot taken without I/O; **awaiting** it
    (``await running.health()``) re-runs every readiness probe first and gives
    the fresh answer.

    Attributes:
        status: ``"ok"`` (every service ok), ``"degraded"`` (only non-critical
            services are not ok) or ``"failing"`` (a critical service is not ok).
        services: each service's :class:`ServiceHealth`, by name.
    """

    status: HealthStatus
    services: Mapping[str, ServiceHealth]
    _refresh: Callable[[], Awaitable[Health]] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def ok(self) -> bool:
        """``True`` when :attr:`status` is ``"ok"``."""
        return self.status == "ok"

    def __await__(self) -> Generator[Any, Any, Health]:
        """Re-run the probes now: ``await running.health()``."""
        return self._fresh().__await__()

    async def _fresh(self) -> Health:
        return self if self._refresh is None else await self._refresh()


@final
class Running:
    """The services of a started :class:`~parallelkit.Orchestrator`, by name.

    Returned by ``async with orch.start() as running``. Read a service's value
    with ``running["db"]``, or with the typed accessor ``running.get(db)`` passing
    the decorated function (its return type flows through).

    Attributes:
        timeline: the shared :class:`~parallelkit.Timeline`: one ``"start"`` span
            per service (set-up until ready, ``waited_for`` its dependencies), one
            ``"ready"`` span per service with a probe (its readiness wait) and,
            after shutdown, one ``"stop"`` span each.
        failed: non-critical services that failed to start: name -> exception.
        skipped: services not started because a non-critical dependency failed:
            name -> :class:`~parallelkit.DependencyFailed`.
        teardown_errors: after shutdown, ``(name, exception)`` for each tear-down
            that raised (also logged).
    """

    __slots__ = ("_names", "_session", "failed", "skipped", "teardown_errors", "timeline")

    def __init__(self, session: _Session, names: Mapping[Callable[..., Any], str]) -> None:
        self._session = session
        self._names = names
        self.timeline: Timeline = session.timeline
        self.failed: dict[str, BaseException] = {}
        self.skipped: dict[str, DependencyFailed] = {}
        self.teardown_errors: list[tuple[str, BaseException]] = []

    def __repr__(self) -> str:
        return f"<Running {list(self)} failed={list(self.failed)} skipped={list(self.skipped)}>"

    def __getitem__(self, name: str) -> Any:
        hosts = self._session.hosts
        host = hosts.get(name)
        if host is not None and host.state not in ("pending", "starting", "failed"):
            return host.value
        if name in self.failed:
            msg = f"service {name!r} failed to start: {self.failed[name]!r}"
        elif name in self.skipped:
            msg = f"service {name!r} was not started: {self.skipped[name]}"
        else:
            msg = f"no service named {name!r}; services: {list(self)}"
        raise KeyError(msg)

    def __contains__(self, name: object) -> bool:
        host = self._session.hosts.get(name) if isinstance(name, str) else None
        return host is not None and host.state not in ("pending", "starting", "failed")

    def __iter__(self) -> Iterator[str]:
        return iter([n for n in self._session.ready_order if n in self])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def items(self) -> list[tuple[str, Any]]:
        """``(name, value)`` pairs of the started services, in the order they became ready."""
        return [(name, self[name]) for name in self]

    @overload
    def get(self, service: Callable[..., AsyncIterator[T]]) -> T: ...
    @overload
    def get(self, service: Callable[..., AbstractAsyncContextManager[T]]) -> T: ...
    @overload
    def get(self, service: Callable[..., Awaitable[T]]) -> T: ...
    @overload
    def get(self, service: str, expected: type[T], /) -> T: ...
    @overload
    def get(self, service: str) -> Any: ...
    def get(self, service: Callable[..., Any] | str, expected: type[Any] | None = None) -> Any:
        """A service's value, looked up by its function (typed) or its name.

        Args:
            service: the decorated service function (the value's type flows
                through) or the service's name.
            expected: with a name: the class the value must be an instance of;
                the result is typed as that class.

        Example:
            ```python
            @orch.service
            async def db() -> AsyncIterator[Engine]: ...

            async with orch.start() as running:
                engine = running.get(db)              # mypy: Engine
                engine = running.get("db", Engine)    # mypy: Engine (checked)
            ```

        Raises:
            KeyError: the service is unknown, failed or was skipped.
            TypeError: the value is not an instance of ``expected``.
        """
        return self._lookup(service, expected)

    def _lookup(self, service: Callable[..., Any] | str, expected: type[Any] | None) -> Any:
        if isinstance(service, str):
            name = service
        else:
            found = self._names.get(service)
            if found is None:
                msg = f"{service!r} is not a service of this orchestrator"
                raise KeyError(msg)
            name = found
        value = self[name]
        if expected is not None:
            if not isinstance(expected, type):
                msg = f"expected must be a class, got {expected!r}"  # type: ignore[unreachable]
                raise TypeError(msg)
            if not isinstance(value, expected):
                msg = f"service {name!r} is {type(value).__name__}, not {expected.__name__}"
                raise TypeError(msg)
        return value

    def state(self, name: str) -> ServiceState:
        """The lifecycle state of service ``name`` (``"ready"``, ``"failed"``, …)."""
        if name in self.skipped:
            return "skipped"
        host = self._session.hosts.get(name)
        if host is None:
            msg = f"no service named {name!r}"
            raise KeyError(msg)
        return host.state

    def health(self, *, timeout: float = 5.0) -> Health:
        """The services' health: a snapshot now, or fresh probes when awaited.

        ``running.health()`` reads what is known without I/O: each service's
        state (a crashed service says why), whether a process service's process
        is alive, and the failed and skipped services; a ready service counts as
        ok, since its probe passed when it became ready. ``await
        running.health()`` also re-runs every readiness probe now, concurrently,
        each bounded by ``timeout`` seconds: use that for a health endpoint.

        Example:
            ```python
            snapshot = running.health()        # no I/O: states and processes
            fresh = await running.health()     # probes re-run now
            status = 200 if fresh.status != "failing" else 503
            ```
        """
        return self._aggregate({}, number("timeout", timeout))

    async def _probe(self, timeout: float) -> Health:
        answers: dict[str, str | None] = {}

        async def check(name: str, probe: Probe, value: object) -> None:
            with anyio.move_on_after(timeout) as scope:
                answers[name] = await probe.reason(value)
            if scope.cancelled_caught:
                answers[name] = f"probe did not answer within {timeout}s"

        session = self._session
        async with anyio.create_task_group() as tg:
            for name in session.ready_order:
                host = session.hosts[name]
                if host.state == "ready" and host.spec.ready is not None:
                    tg.start_soon(check, name, host.spec.ready, host.value)
        return self._aggregate(answers, timeout)

    def _aggregate(self, probed: Mapping[str, str | None], timeout: float) -> Health:
        """Build a :class:`Health` from the states and the probe answers in ``probed``."""
        session = self._session
        specs = session.specs
        results: dict[str, ServiceHealth] = {}
        for name in session.ready_order:
            host = session.hosts[name]
            reason: str | None = None
            if host.state != "ready":
                reason = f"service is {host.state}"
                if host.crash is not None:
                    reason += f": {host.crash!r}"
            elif isinstance(host.value, ManagedProcess) and not host.value.running:
                reason = f"process exited with code {host.value.returncode}"
            else:
                reason = probed.get(name)
            spec = host.spec
            results[name] = ServiceHealth(name, host.state, reason is None, spec.critical, reason)
        for name, exc in self.failed.items():
            results[name] = ServiceHealth(name, "failed", False, specs[name].critical, repr(exc))
        for name, why in self.skipped.items():
            results[name] = ServiceHealth(name, "skipped", False, specs[name].critical, str(why))
        bad = [h for h in results.values() if not h.ok]
        status: HealthStatus = "ok"
        if any(h.critical for h in bad):
            status = "failing"
        elif bad:
            status = "degraded"
        ordered = {name: results[name] for name in specs if name in results}
        return Health(status, ordered, functools.partial(self._probe, timeout))


class _Session:
    """The state of one ``orch.start()``: hosts, timeline, failure, shutdown."""

    def __init__(
        self,
        plan: Plan,
        specs: Mapping[str, ServiceSpec],
        names: Mapping[Callable[..., Any], str],
        name: str | None,
    ) -> None:
        self.plan = plan
        self.specs = specs
        self.hosts: dict[str, ServiceHost] = {}
        self.ready_order: list[str] = []
        self.timeline = Timeline(origin=anyio.current_time(), name=name)
        self.running = Running(self, names)
        self.failure: tuple[str, BaseException] | None = None
        self.crashed: tuple[str, BaseException | None] | None = None
        self.tg: anyio.abc.TaskGroup | None = None
        self.start_scope: anyio.CancelScope | None = None
        self.body_scope: anyio.CancelScope | None = None
        self.stopped = False
        self.deps: dict[str, tuple[str, ...]] = dict(zip(plan.names, plan.waited_for, strict=True))

    # -- start ---------------------------------------------------------------------
    async def start_all(self) -> Running:
        """Start every service by the graph; roll back and raise StartupError on failure."""
        hook = instrument.current
        if hook is None:
            return await self._start_all(self._start_node)
        trace = hook.graph("startup", self.timeline, None)
        with trace:
            return await self._start_all(trace.run_node(self._start_node))

    async def _start_all(self, start_node: RunNode) -> Running:
        run = Run(
            self.plan,
            {},
            run_node=start_node,
            settle=True,
            timeline=self.timeline,
            kind="start",
        )
        try:
            with anyio.CancelScope() as self.start_scope:
                await run.execute()
        except BaseException as cancelled:  # cancelled from outside: undo what started
            with anyio.CancelScope(shield=True):
                errors = self.failed_teardowns() + await self.stop_all()
            if self._failed() is None or not isinstance(cancelled, anyio.get_cancelled_exc_class()):
                log_teardown_errors(errors)  # nobody receives them: the start was cancelled
                raise
            # A service had failed, and the start was still unwinding (tearing down
            # the services that had not become ready) when your scope was cancelled:
            # its error is raised, not lost to the cancellation (as trio would have it).
            self._raise_failure(errors)
        if self._failed() is not None:
            self._raise_failure(self.failed_teardowns() + await self.stop_all())
        running = self.running
        for name, outcome in run.results().items():
            if outcome.ok:
                continue
            if isinstance(outcome.error, DependencyFailed):
                running.skipped[name] = outcome.error
                logger.warning("service %r skipped: %s", name, outcome.error)
            else:
                running.failed[name] = outcome.error
                logger.warning(
                    "non-critical service %r failed to start", name, exc_info=outcome.error
                )
        return running

    def _failed(self) -> tuple[str, BaseException] | None:
        """The critical service that failed the start (one that crashed counts), if any."""
        if self.failure is None and self.crashed is not None:
            name, crash = self.crashed
            self.failure = (name, crash or RuntimeError(f"service {name!r} ended while starting"))
        return self.failure

    def _raise_failure(self, errors: list[tuple[str, BaseException]]) -> NoReturn:
        assert self.failure is not None
        name, exc = self.failure
        # raised to the caller, so not logged here (an error is reported once)
        raise StartupError(name, _startup_message(name, exc), teardown_errors=errors) from exc

    async def _start_node(self, node: Node, kwargs: dict[str, Any]) -> Any:
        spec: ServiceSpec = node.data
        host = ServiceHost(spec, kwargs, self._on_crash, self._on_ready)
        self.hosts[spec.name] = host
        assert self.tg is not None
        try:
            value = await _start_soon_and_wait(
                self.tg, host.run, name=f"parallelkit service {spec.name}"
            )
        except Exception as exc:
            if spec.critical and self.failure is None:
                self.failure = (spec.name, exc)
                assert self.start_scope is not None
                self.start_scope.cancel()
            raise
        return value

    def _on_ready(self, host: ServiceHost) -> None:
        name = host.spec.name
        self.ready_order.append(name)
        if host.spec.ready is not None:  # the readiness wait, between set-up and ready
            done, now = host.setup_done_at, anyio.current_time()
            self.timeline._add(Span(name, done, done, now, "ok", (), "ready"))

    def failed_teardowns(self) -> list[tuple[str, BaseException]]:
        """Tear-down errors of services that reached ``yield`` but failed to become ready."""
        return [
            (name, host.teardown_error)
            for name, host in self.hosts.items()
            if host.state == "failed" and host.teardown_error is not None
        ]

    def _on_crash(self, host: ServiceHost, exc: BaseException | None) -> None:
        name = host.spec.name
        if not host.spec.critical or self.stopped or self.crashed is not None:
            # nobody receives this one (not critical, or a failure is already
            # being reported): log it
            if exc is None:
                logger.error("service %r ended while running", name)
            else:
                logger.error("service %r crashed", name, exc_info=exc)
            return
        self.crashed = (name, exc)
        if self.start_scope is not None:
            self.start_scope.cancel()
        if self.body_scope is not None:
            self.body_scope.cancel()

    # -- stop ------------------------------------------------------------------------
    async def stop_all(self) -> list[tuple[str, BaseException]]:
        """Stop what started, dependents first, independent ones in parallel.

        Runs the shared graph engine over the reversed graph of the started
        services. Returns the tear-down errors (also logged); never raises them.
        """
        self.stopped = True
        started = [n for n in self.ready_order if self.hosts[n].state != "pending"]
        if not started:
            return []
        position = {name: i for i, name in enumerate(started)}
        dependents: dict[str, list[str]] = {name: [] for name in started}
        for name in started:
            for dep in self.deps[name]:
                if dep in position:
                    dependents[dep].append(name)
        graph = Graph(kind="service")
        for name in reversed(started):  # every "dependency" (a dependent) added first
            graph.add(Node(name, tuple(Param(d) for d in dependents[name])))
        with anyio.CancelScope(shield=True):
            hook = instrument.current
            if hook is None:
                await self._stop_run(graph, self._stop_node)
            else:
                trace = hook.graph("shutdown", self.timeline, None)
                with trace:
                    await self._stop_run(graph, trace.run_node(self._stop_node))
        errors: list[tuple[str, BaseException]] = []
        for name in started:
            error = self.hosts[name].teardown_error
            if error is not None:
                errors.append((name, error))
        return errors

    async def _stop_run(self, graph: Graph, stop_node: RunNode) -> None:
        run = Run(graph.plan(), {}, run_node=stop_node, timeline=self.timeline, kind="stop")
        await run.execute()

    async def _stop_node(self, node: Node, kwargs: dict[str, Any]) -> None:
        host = self.hosts[node.name]
        host.request_stop()
        await host.stopped.wait()

    def force(self) -> None:
        """Cut short the tear-downs in progress (processes: ``SIGKILL``).

        The order is kept: a service that has not begun its tear-down still
        tears down, exactly once, after everything that depends on it.
        """
        for host in self.hosts.values():
            host.force()


def _startup_message(name: str, exc: BaseException) -> str:
    return f"service {name!r} failed to start: {type(exc).__name__}: {exc}"


def log_teardown_errors(errors: list[tuple[str, BaseException]]) -> None:
    """Log tear-down errors that are not raised to anyone (an error is reported once)."""
    for name, exc in errors:
        logger.error("service %r failed to stop cleanly", name, exc_info=exc)


def teardown_group(errors: list[tuple[str, BaseException]]) -> ExceptionGroup[Exception]:
    """The ``ExceptionGroup`` raised when services failed to stop after a clean run."""
    names = ", ".join(repr(name) for name, _ in errors)
    excs = [e if isinstance(e, Exception) else RuntimeError(repr(e)) for _, e in errors]
    return ExceptionGroup(f"services failed to stop: {names}", excs)


class _StartStatus:
    """The ``task_status`` of a service task: its start value, or its error before it."""

    __slots__ = ("error", "event", "is_started", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.is_started = False
        self.value: Any = None
        self.error: Exception | None = None

    def started(self, value: Any = None) -> None:
        self.value = value
        self.is_started = True
        self.event.set()


async def _start_soon_and_wait(
    tg: anyio.abc.TaskGroup, run: Callable[..., Awaitable[None]], *, name: str
) -> Any:
    """``tg.start(run)``, without the hang of anyio's own ``start`` on asyncio.

    anyio's ``TaskGroup.start`` puts the new task in the *caller's* cancel scope until
    it reports ``started()``. When that scope is cancelled between the spawn and the
    task's first step (a sibling service failed), asyncio kills the task before its
    body runs, so the "finished" event ``start`` waits for (shielded) is never set and
    the start-up hangs (seen on Python 3.13 with anyio 4.15 and 4.16). Here the task
    belongs to ``tg`` and to a cancel scope of its own: the starter, when cancelled,
    cancels that scope and, if the task's body began, waits until it ends or becomes
    ready anyway (a ready service is registered and stopped in order by the
    orchestrator); a task whose body begins after that returns at once, before any
    service code runs.
    """
    status = _StartStatus()
    scope = anyio.CancelScope()
    began = False

    async def task() -> None:
        nonlocal began
        if scope.cancel_called:  # the starter gave up before this task ever ran
            return
        began = True
        try:
            with scope:
                await run(task_status=status)
        except Exception as exc:
            if status.is_started:
                raise  # a failure after start-up belongs to the task group
            status.error = exc  # before it: the starter raises it, as tg.start would
        finally:
            status.event.set()

    tg.start_soon(task, name=name)
    try:
        await status.event.wait()
    except BaseException:
        if not status.is_started:  # a ready service is stopped by the orchestrator, in order
            scope.cancel()
            if began:  # until it ends, or becomes ready anyway (then it is stopped in order)
                with anyio.CancelScope(shield=True):
                    await status.event.wait()
            if status.error is not None:  # nobody receives it: the start was cancelled
                logger.warning(
                    "%s failed while its start was cancelled", name, exc_info=status.error
                )
        raise
    if status.error is not None:
        raise status.error
    if not status.is_started:
        msg = f"{name} ended before it was ready"
        raise RuntimeError(msg)
    return status.value
