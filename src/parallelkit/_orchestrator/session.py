"""The run session of one ``orch.start()``: start-up, rollback and ordered stop.

:class:`Session` drives the shared graph engine (:mod:`parallelkit._graph.graph`)
over the services, hosting each one in its own task
(:class:`~parallelkit._orchestrator.services.ServiceHost`), and stops them again by
running the same engine over the *reversed* dependency graph of what actually
started, so a service stops only after everything that depends on it has stopped,
and independent tear-downs run in parallel. What the user sees of it is
:class:`~parallelkit._orchestrator.running.Running`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, NoReturn, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel

from .._core import instrument
from .._core.backend import is_stray_cancellation
from .._core.errors import DependencyFailed, StartupError
from .._graph.graph import Graph, Node, Param, Plan, RunNode
from .._graph.scheduler import NodeEnded, Run
from .._graph.timeline import Span, Timeline
from .lifetime import ServiceSpec, only_failure
from .process import ManagedProcess
from .reports import add_note, log_teardown_errors, rollback_note, startup_message, teardown_group
from .running import Running
from .services import ServiceHost
from .starting import start_soon_and_wait

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import (  # type: ignore[import-not-found,unused-ignore]
        BaseExceptionGroup,
    )

__all__ = ["Session", "run_session"]

T = TypeVar("T")
logger = logging.getLogger("parallelkit.orchestrator")


@asynccontextmanager
async def run_session(session: Session) -> AsyncIterator[Running]:
    """Start ``session``'s services, yield them, stop them: ``orch.start()``'s work.

    Errors are raised after the services' task group has closed, so that they
    come out as themselves, never wrapped in an ExceptionGroup.
    """
    startup_error: Exception | None = None
    body_error: BaseException | None = None  # an Exception, or a stray cancellation
    errors: list[tuple[str, BaseException]] = []
    handled = True  # False: a BaseException (a cancellation) left the body
    only: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            session.tg = tg
            try:
                running = await session.start_all()
            except Exception as exc:  # StartupError, after the rollback
                startup_error = exc
            if startup_error is None:
                handled = False
                try:
                    with anyio.CancelScope() as session.body_scope:
                        yield running
                    handled = True
                except BaseException as exc:
                    # a cancellation nothing caused (kept, raised again; a future cancelled
                    # elsewhere) is the body's error: the task group would swallow it
                    if not isinstance(exc, Exception) and not is_stray_cancellation(exc):
                        raise
                    body_error = exc
                    handled = True
                finally:
                    with anyio.CancelScope(shield=True):
                        errors = await session.stop_all()
                    running.teardown_errors.extend(errors)  # in place: views share it
                    if not handled:
                        log_teardown_errors(errors)  # not raised: the cancellation goes on
    except BaseExceptionGroup as group:
        # a KeyboardInterrupt-like error that a service let through (from its set-up,
        # probe, task group or tear-down), once everything stopped: raised as itself
        # (raised below, out of this handler: the group is not made its context)
        only = only_failure(group)
        if only is None:
            raise
    except anyio.get_cancelled_exc_class():
        # Your scope was cancelled, and the task group met it on its way out. The
        # cancellation goes on, unless an error is in hand: as in trio, an error
        # raised where a cancellation is pending still comes out (never lost).
        if startup_error is None and body_error is None and session.crashed is None:
            if handled:
                log_teardown_errors(errors)  # not raised: the cancellation goes on
            raise
    if only is not None:
        if only.__context__ is None:  # an error it ended is still reachable
            only.__context__ = startup_error or body_error
        raise only
    if startup_error is not None:
        raise startup_error
    if body_error is not None:
        log_teardown_errors(errors)  # not raised: the body's error is
        raise body_error
    if session.crashed is not None:
        if handled:  # (else logged already)
            log_teardown_errors(errors)  # not raised: the crash is
        name, crash = session.crashed
        _raise_as_it_was(crash or RuntimeError(f"service {name!r} ended while running"))
    if errors:
        raise teardown_group(errors)


def _raise_as_it_was(exc: BaseException) -> NoReturn:
    """Raise a service's crash with the ``__context__`` it had when the service raised it.

    It is raised from the exit of ``async with orch.start()``, whose body the crash
    ended with a cancellation: raised there, it would get that cancellation as its
    context, and its traceback would print the orchestrator's own cancellation first
    ("During handling of the above exception, another exception occurred").
    """
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context


class Session:
    """The state of one ``orch.start()``: hosts, timeline, failure, shutdown."""

    def __init__(
        self,
        plan: Plan,
        specs: Mapping[str, ServiceSpec],
        names: Mapping[Callable[..., Any], tuple[str, ...]],
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
        self.crashing: ServiceHost | None = None  # crashed, its tear-down not done yet
        # failed to start after its yield, its tear-down not done yet (its error comes then)
        self.failing: ServiceHost | None = None
        self.interrupt: BaseException | None = None  # a KeyboardInterrupt-like set-up error
        self.waits: dict[str, anyio.CancelScope] = {}  # each start's wait for its service
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
            keep_cancelled_errors=True,  # the rollback reads every start's error
        )
        errors: list[tuple[str, BaseException]] | None = None
        try:
            with anyio.CancelScope() as self.start_scope:
                await run.execute()
        except BaseException as cancelled:  # cancelled from outside: undo what started
            with anyio.CancelScope(shield=True):
                errors = rolled_back = self.failed_teardowns() + await self.stop_all()
            if self.interrupt is None:
                if self._failed() is None or not isinstance(
                    cancelled, anyio.get_cancelled_exc_class()
                ):
                    log_teardown_errors(rolled_back)  # nobody receives them: start cancelled
                    raise
                # A service had failed, and the start was still unwinding (tearing down
                # the services that had not become ready) when your scope was cancelled:
                # its error is raised, not lost to the cancellation (as trio would have it).
                self._log_other_failures(run)
                self._raise_failure(rolled_back)
        if self.crashing is not None:  # a service crashed: its error comes after its tear-down
            with anyio.CancelScope(shield=True):
                await self.crashing.stopped.wait()
        if self.interrupt is not None:  # raised here, out of the handler above
            if errors is None:  # (the engine lost it in a start cancelled by a failure)
                errors = self.failed_teardowns()
                with anyio.CancelScope(shield=True):
                    errors += await self.stop_all()
            self._raise_interrupt(run, errors)
        if self._failed() is not None:
            self._log_other_failures(run)
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
                # it reached its yield and was torn down: nobody receives that error either
                teardown_error = self.hosts[name].teardown_error
                if teardown_error is not None:
                    log_teardown_errors([(name, teardown_error)])
        return running

    def _log_other_failures(self, run: Run) -> None:
        """Log the services that failed besides the one the StartupError names.

        Nobody receives those errors (a second critical service failing at the same
        moment, a non-critical one): they are logged, never dropped.
        """
        assert self.failure is not None
        for name, outcome in run.results().items():
            error = outcome.error
            if (
                error is None
                or error is self.failure[1]
                or isinstance(error, DependencyFailed)
                or not isinstance(error, Exception)
            ):
                continue
            logger.warning("service %r failed to start", name, exc_info=error)

    def _raise_interrupt(self, run: Run, errors: list[tuple[str, BaseException]]) -> NoReturn:
        """Raise the ``KeyboardInterrupt``-like error a set-up raised, as itself.

        Once everything that started was torn down (``errors``: what the tear-downs
        raised). A critical failure that came first is not lost: the
        ``StartupError`` it would have raised is the interrupt's ``__context__``
        (printed with it); with none, nobody receives the tear-down errors: logged.
        """
        interrupt = self.interrupt
        assert interrupt is not None
        if self._failed() is None:
            log_teardown_errors(errors)
        else:
            self._log_other_failures(run)
            try:
                self._raise_failure(errors)
            except StartupError as error:
                interrupt.__context__ = error
        raise interrupt

    def _failed(self) -> tuple[str, BaseException] | None:
        """The critical service that failed the start (one that crashed counts), if any."""
        if self.failure is None and self.crashed is not None:
            name, crash = self.crashed
            self.failure = (name, crash or RuntimeError(f"service {name!r} ended while starting"))
        return self.failure

    def _raise_failure(self, errors: list[tuple[str, BaseException]]) -> NoReturn:
        assert self.failure is not None
        name, exc = self.failure
        # raised to the caller, so not logged here (an error is reported once); the
        # rollback's errors ride along, each traceback in a note of the StartupError's
        error = StartupError(name, startup_message(name, exc), teardown_errors=errors)
        for service, teardown_error in errors:
            add_note(error, rollback_note(service, teardown_error))
        raise error from exc

    async def _start_node(self, node: Node, kwargs: dict[str, Any]) -> Any:
        spec: ServiceSpec = node.data
        for dep in self.deps[spec.name]:
            gone = self.hosts.get(dep)
            if gone is not None and gone.state == "crashed":
                # a (non-critical) dependency crashed after it was ready: nothing starts
                # on its torn-down value; skipped, as when it fails to start
                skipped = DependencyFailed(spec.name, dep)
                skipped.__cause__ = gone.crash
                raise skipped
        host = ServiceHost(
            spec,
            kwargs,
            self._on_crash,
            self._on_ready,
            self._on_crashing,
            self._on_failing,
            self._on_unready,
        )
        self.hosts[spec.name] = host
        host.dependents = lambda: [h for n, h in self.hosts.items() if spec.name in self.deps[n]]
        assert self.tg is not None
        self.waits[spec.name] = waiting = anyio.CancelScope()
        try:
            value = await start_soon_and_wait(
                self.tg, host.run, name=f"parallelkit service {spec.name}", waiting=waiting
            )
        except Exception as exc:
            self._fail(host, exc)
            raise
        except BaseException as exc:
            if (
                not isinstance(exc, (anyio.get_cancelled_exc_class(), GeneratorExit))
                and self.interrupt is None
            ):
                # a KeyboardInterrupt-like error in its set-up: it ends the start, raised
                # by start_all once everything stopped (whatever the engine does with it)
                self.interrupt = exc
            raise
        return value

    def _fail(self, host: ServiceHost, exc: Exception) -> None:
        """``host`` failed to start with ``exc``: the first critical failure fails the start."""
        if self.failing is host:
            self.failing = None
        if host.spec.critical and self.failure is None:
            self.failure = (host.spec.name, exc)
            assert self.start_scope is not None
            self.start_scope.cancel()

    def _on_failing(self, host: ServiceHost) -> None:
        """A service failed to start and is about to tear down: start nothing more.

        Its error comes once its tear-down ended (bounded by ``stop_timeout``), to its
        start, which waits for it shielded; the other starts in flight are cancelled now,
        as for a crash.
        """
        if not host.spec.critical or self.stopped or self.crashed or self.crashing:
            return
        if self.failure is not None or self.failing:  # the first one fails the start
            return
        self.failing = host
        self.waits[host.spec.name].shield = True
        assert self.start_scope is not None
        self.start_scope.cancel()

    def _on_ready(self, host: ServiceHost) -> None:
        name = host.spec.name
        self.ready_order.append(name)
        if host.spec.ready is not None:  # the readiness wait, between set-up and ready
            done, now = host.setup_done_at, anyio.current_time()
            self.timeline._add(Span(name, done, done, now, "ok", (), "ready"))

    def _on_unready(self, host: ServiceHost, exc: Exception) -> None:
        """Its readiness failed (its probe raised or timed out): an ``"error"`` span."""
        name = host.spec.name
        if host.spec.ready is not None:  # (not the set-up that overran its timeout)
            done, now = host.setup_done_at, anyio.current_time()
            self.timeline._add(Span(name, done, done, now, "error", (), "ready"))

    def failed_teardowns(self) -> list[tuple[str, BaseException]]:
        """Tear-down errors of services that reached ``yield`` but failed to become ready."""
        return [
            (name, host.teardown_error)
            for name, host in self.hosts.items()
            if host.state == "failed" and host.teardown_error is not None
        ]

    def _on_crashing(self, host: ServiceHost) -> None:
        """A service crashed: start nothing more, end the body (its error comes later)."""
        if not host.spec.critical or self.stopped or self.crashed or self.failure or self.failing:
            return
        self.crashing = host
        if self.start_scope is not None:
            self.start_scope.cancel()
        if self.body_scope is not None:
            self.body_scope.cancel()

    def _on_crash(self, host: ServiceHost, exc: BaseException | None) -> None:
        name = host.spec.name
        if self.crashing is host:  # its tear-down ran: the crash is reported now
            self.crashing = None
        elif not host.spec.critical or self.stopped or self.crashed or self.failure or self.failing:
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
        for host in self.hosts.values():  # no restart begins once the stop has begun
            host.stopping()
        started = [n for n in self.ready_order if self.hosts[n].state != "pending"]
        # a service that reached its yield but did not become ready was torn down as its
        # start failed: a "stop" span of its own too, before those of its dependencies
        # (nothing depends on it: nothing started on it)
        unready = [n for n, h in self.hosts.items() if h.state == "failed" and h.torn_down]
        stopping = started + unready
        if not stopping:
            return []
        position = {name: i for i, name in enumerate(stopping)}
        dependents: dict[str, list[str]] = {name: [] for name in stopping}
        for name in stopping:
            for dep in self.deps[name]:
                if dep in position:
                    dependents[dep].append(name)
        graph = Graph(kind="service")
        for name in reversed(stopping):  # every "dependency" (a dependent) added first
            graph.add(Node(name, tuple(Param(d) for d in dependents[name])))
        recorded = len(self.timeline._done)
        with anyio.CancelScope(shield=True):
            hook = instrument.current
            if hook is None:
                await self._stop_run(graph, self._stop_node)
                self._early_stop_times(recorded)
            else:
                trace = hook.graph("shutdown", self.timeline, None)
                with trace:
                    await self._stop_run(graph, trace.run_node(self._stop_node))
                    # before the trace ends: its stop spans are made with these times
                    self._early_stop_times(recorded)
        errors: list[tuple[str, BaseException]] = []
        for name in started:  # (an unready one's error is its start's: failed_teardowns)
            error = self.hosts[name].teardown_error
            if error is not None:
                errors.append((name, error))
        return errors

    def _early_stop_times(self, recorded: int) -> None:
        """The "stop" spans (from index ``recorded`` on) of tear-downs that began before
        the shutdown reached them (a crash, a start that failed after its ``yield``) get
        the times of those tear-downs, not the moment the shutdown came to them."""
        spans = self.timeline._done
        for index in range(recorded, len(spans)):
            span = spans[index]
            host = self.hosts.get(span.name) if span.kind == "stop" else None
            times = host.teardown_times if host is not None else None
            if times is not None and times[0] < span.start:
                spans[index] = replace(span, queued=times[0], start=times[0], end=times[1])

    async def _stop_run(self, graph: Graph, stop_node: RunNode) -> None:
        run = Run(graph.plan(), {}, run_node=stop_node, timeline=self.timeline, kind="stop")
        await run.execute()

    async def _stop_node(self, node: Node, kwargs: dict[str, Any]) -> None:
        host = self.hosts[node.name]
        host.request_stop()
        await host.stopped.wait()
        # how the tear-down ended, for its "stop" span only: the run goes on (every
        # other service still stops, in order); the error is reported by stop_all's
        # callers, as ever. Raised only when it did not end well: nothing on the way
        # of a clean stop.
        if host.state == "crashed":
            # torn down when it crashed (its crash reported as such): not "ok"; the
            # crash is what ended it, recorded on its trace span either way
            crash = host.crash or RuntimeError(f"service {node.name!r} ended while running")
            raise NodeEnded("cancelled" if host.timed_out or host.forced else "error", crash)
        error = host.teardown_error or host.teardown_interrupt
        if error is not None:
            raise NodeEnded("error", error)
        if host.timed_out or host.forced or _killed(host):
            raise NodeEnded("cancelled")

    def force(self) -> None:
        """Make every stop immediate: the ones in progress and the ones still to come.

        A tear-down is cancelled, a process gets ``SIGKILL``. The order is kept: a
        service that has not begun its tear-down still tears down, exactly once,
        after everything that depends on it, but at once when its turn comes.
        """
        for host in self.hosts.values():
            host.force()


def _killed(host: ServiceHost) -> bool:
    """A process whose stop ran out of its ``stop_timeout``, so it got ``SIGKILL``: cut
    short, as a tear-down that ran out of it (its own warning said so already)."""
    return isinstance(host.value, ManagedProcess) and host.value._killed
