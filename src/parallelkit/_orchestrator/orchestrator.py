"""Orchestrator: start services by their dependency graph, stop them in reverse.

The seed's server starts its parts in hand-written ``Promise.all`` phases: the
dependencies are hidden in the phase layout, nothing checks that a part is
actually *ready*, a failure leaves the parts already started running, and the
stop order is whatever the runtime does. The Orchestrator declares each service
with what it needs (by parameter name, as in :class:`~parallelkit.Flow`; the same
graph engine runs both) and gets, from that one declaration:

- each service starting the moment its dependencies are **ready** (not layer by
  layer), readiness checked by a probe (:mod:`parallelkit.probes`);
- on a start-up failure: the starts in flight cancelled, everything started torn
  down in reverse dependency order, and :class:`~parallelkit.StartupError`;
- shutdown in reverse dependency order, each tear-down exactly once, bounded by
  ``stop_timeout``;
- a measured :class:`~parallelkit.Timeline` with the critical chain.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar, overload

from typing_extensions import ParamSpec, final

from .._core.check import callable_, choice, count_or_none, flag, number, number_or_none
from .._core.retry import RetryLike, validate_retry
from .._graph.graph import Graph, Node, Param, Plan, params_of
from ..probes import Probe, as_probe
from .definitions import (
    check_dependencies,
    process_command,
    process_cwd,
    process_env,
    process_name,
    process_needs,
    service_function,
    service_name_option,
)
from .lifetime import ServiceSpec
from .process import (
    RESTART_POLICIES,
    ManagedProcess,
    Output,
    OutputSink,
    RestartPolicy,
    process_lifetime,
)
from .running import Running
from .serving import serve_session, signal_number
from .session import Session, run_session

__all__ = ["Orchestrator"]

P = ParamSpec("P")
R = TypeVar("R")
logger = logging.getLogger("parallelkit.orchestrator")


@final
class Orchestrator:
    """Start-up orchestration: services by dependency graph, with readiness and rollback.

    Register services with :meth:`service` (async generators, async context-manager
    factories or async functions: their parameters name the services they need)
    and subprocesses with :meth:`process`; then ``async with orch.start() as
    running`` or ``await orch.serve()``.

    Args:
        name: a title for the timeline and log messages.
        output: where process output goes: ``"stdout"`` (``name | line``,
            coloured on a terminal), ``"logging"`` or ``fn(name, stream, line)``.

    Example:
        ```python
        orch = pk.Orchestrator()

        @orch.service
        async def db():
            engine = await connect()
            yield engine                      # ready: dependents start now
            await engine.dispose()            # tear-down, after every dependent stopped

        @orch.service(ready=pk.probes.tcp("127.0.0.1", 8080), timeout=10)
        async def http(db):                   # gets db's value
            ...

        async with orch.start() as running:
            running["db"], running.timeline.to_text()
        ```
    """

    __slots__ = ("_graph", "_names", "_sink", "_specs", "_started", "name")

    def __init__(self, name: str | None = None, *, output: Output = "stdout") -> None:
        if name is not None and not isinstance(name, str):
            msg = f"name must be a str or None, got {name!r}"  # type: ignore[unreachable]
            raise TypeError(msg)
        self.name = name
        self._sink = OutputSink(output)
        self._graph = Graph(kind="service")
        self._specs: dict[str, ServiceSpec] = {}
        self._names: dict[Callable[..., Any], tuple[str, ...]] = {}
        self._started = False  # a start() (or serve()) is open: one at a time

    def __repr__(self) -> str:
        title = f"{self.name!r} " if self.name else ""
        return f"<Orchestrator {title}services={list(self._specs)}>"

    @property
    def services(self) -> Mapping[str, ServiceSpec]:
        """The registered services (and processes) by name, in registration order."""
        return dict(self._specs)

    # -- registration ------------------------------------------------------------------
    @overload
    def service(self, fn: Callable[P, R], /) -> Callable[P, R]: ...
    @overload
    def service(
        self,
        /,
        *,
        name: str | None = None,
        ready: Probe | Callable[..., Any] | None = None,
        timeout: float | None = None,
        retry: RetryLike | None = None,
        stop_timeout: float = 10.0,
        critical: bool = True,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]: ...
    def service(
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        name: str | None = None,
        ready: Probe | Callable[..., Any] | None = None,
        timeout: float | None = None,
        retry: RetryLike | None = None,
        stop_timeout: float = 10.0,
        critical: bool = True,
    ) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
        """Register a service (decorator, with or without options).

        The function is returned unchanged, so it stays callable and can be
        passed to :meth:`Running.get` for a typed lookup. Each parameter names
        another service, whose value is passed in once that service is ready; a
        parameter with a default that names no service keeps its default.

        Args:
            fn: an async generator function (set up, ``yield`` the value, tear
                down), an async context-manager factory, or an async function
                returning the value.
            name: the service name (default: the function's ``__name__``).
            ready: a :mod:`~parallelkit.probes` probe (or any callable, wrapped
                with :func:`~parallelkit.probes.call`) polled after set-up until it
                passes; dependents wait for it.
            timeout: seconds for set-up plus readiness (per attempt); ``None``
                waits for ever.
            retry: a :class:`~parallelkit.Retry` (or tenacity ``AsyncRetrying``) for
                the start: a failed attempt is torn down, then tried again.
            stop_timeout: seconds the tear-down may take before it is cancelled
                (which is logged and reported).
            critical: ``False`` lets the orchestrator start without this service
                when it fails (its dependents are skipped, see
                :attr:`Running.failed` / :attr:`Running.skipped`).

        Raises:
            DefinitionError: a duplicate name, or a dependency cycle closed by
                this service (:class:`~parallelkit.CycleError`).
            TypeError: ``fn`` is a plain sync function or a bad option type.
        """

        probe = as_probe(ready)
        start_timeout = number_or_none("timeout", timeout)
        retry = validate_retry(retry)
        stop_seconds = number("stop_timeout", stop_timeout)
        critical = flag("critical", critical)
        service_name_option(name)

        def register(func: Callable[P, R]) -> Callable[P, R]:
            service_name = service_function(func, name)
            params = params_of(func, kind="service", node=service_name)
            spec = ServiceSpec(
                service_name,
                func,
                depends_on=tuple(p.name for p in params),
                ready=probe,
                timeout=start_timeout,
                retry=retry,
                stop_timeout=stop_seconds,
                critical=critical,
            )
            self._add(spec, params)
            self._remember(func, service_name)
            return func

        if fn is not None:
            return register(fn)
        return register

    def process(
        self,
        name: str,
        cmd: str | Sequence[str | os.PathLike[str]],
        /,
        *,
        ready: Probe | Callable[..., Any] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        restart: RestartPolicy = "no",
        max_restarts: int | None = 5,
        stop_timeout: float = 10.0,
        depends_on: Sequence[str] = (),
        timeout: float | None = None,
        critical: bool = True,
    ) -> None:
        """Register a subprocess as a service (a dev server, a watcher, a worker).

        The process runs in its own process group. Its stdout/stderr lines are
        prefixed with ``name`` (see the orchestrator's ``output``). Stopping sends
        ``SIGTERM`` to the group and ``SIGKILL`` to what is left of it after
        ``stop_timeout`` (the whole group has that grace, a shell's child too);
        nothing it started outlives the orchestrator, unless it left the group (a
        daemon that calls ``setsid()``: run it in the foreground). Its value
        (``running[name]``) is a ``ManagedProcess`` (``pid``, ``returncode``,
        ``restarts``).

        Args:
            name: the service name.
            cmd: a shell command string, or an argument list of str or paths (no shell).
            ready: a probe polled until the process is ready (e.g.
                ``probes.tcp("127.0.0.1", 3000)``); without one it is ready once
                spawned.
            env: extra environment variables, on top of this process's own
                (``PYTHONUNBUFFERED=1`` is set unless you set it).
            cwd: the working directory.
            restart: on an unexpected exit: ``"no"`` (a non-zero exit fails the
                service; exit 0 just ends it), ``"on-failure"`` (restart on a
                non-zero exit) or ``"always"``. An exit 0 that is not restarted
                before ``ready`` passes gives the probe one last check (a one-shot
                job may have done its work); if that fails, the start fails at
                once with :class:`~parallelkit.ProcessError`. No restart begins
                once the orchestrator has begun to stop: an exit is final then.
            max_restarts: restarts allowed (a positive int) before the exit fails
                the service (``None``: unlimited). Restarts pause 50 ms, doubling
                to 2 s.
            stop_timeout: seconds between ``SIGTERM`` and ``SIGKILL``.
            depends_on: services that must be ready before this one starts.
            timeout: seconds for the process to become ready.
            critical: as for :meth:`service`.

        A process that exits for good fails the orchestrator (if ``critical``)
        with :class:`~parallelkit.ProcessError` (a
        :class:`subprocess.CalledProcessError`) whose message has the exit code and
        the process's last lines of output; before it is ready, that error is the
        ``__cause__`` of the :class:`~parallelkit.StartupError`.

        Raises:
            DefinitionError: ``name`` is not an identifier, or is taken.
            TypeError: an argument of the wrong type (``name``, ``cmd``, ``env``, ``cwd``,
                ``depends_on``, ``critical``, ...).
            ValueError: an option out of range (an empty ``cmd`` or ``cwd``,
                ``restart`` not one of the policies, ``max_restarts`` < 1, a timeout
                <= 0, ...).
        """
        process_name(name)
        command = process_command(cmd)
        probe = as_probe(ready)
        restart = choice("restart", restart, RESTART_POLICIES)
        max_restarts = count_or_none("max_restarts", max_restarts)
        stop = number("stop_timeout", stop_timeout)
        start_timeout = number_or_none("timeout", timeout)
        critical = flag("critical", critical)
        needs = process_needs(depends_on)
        env_copy = process_env(env)
        process_cwd(cwd)
        sink = self._sink

        def lifetime(**_deps: Any) -> AbstractAsyncContextManager[ManagedProcess]:
            return process_lifetime(
                name,
                command,
                env=env_copy,
                cwd=cwd,
                restart=restart,
                max_restarts=max_restarts,
                stop_timeout=stop,
                sink=sink,
            )

        spec = ServiceSpec(
            name,
            lifetime,
            depends_on=needs,
            ready=probe,
            timeout=start_timeout,
            stop_timeout=stop,
            critical=critical,
            kind="process",
            extra={"cmd": command, "restart": restart, "max_restarts": max_restarts},
        )
        self._add(spec, tuple(Param(d) for d in needs))

    def _remember(self, func: Callable[..., Any], name: str) -> None:
        """Note the service(s) ``func`` registers, for ``running.get(func)``.

        An unhashable callable (a dataclass instance with an async ``__call__``) cannot
        be a key: it is looked up by name, and its registration does not fail half
        done. A function registered under several names is told apart by name only.
        """
        with contextlib.suppress(TypeError):  # unhashable: `running.get(func)` refuses it
            self._names[func] = (*self._names.get(func, ()), name)

    def _add(self, spec: ServiceSpec, params: tuple[Param, ...]) -> None:
        if self._graph.frozen:
            msg = f"cannot add service {spec.name!r}: the orchestrator has already started"
            raise RuntimeError(msg)
        self._graph.add(Node(spec.name, params, data=spec))
        self._specs[spec.name] = spec

    # -- running -----------------------------------------------------------------------
    def start(self) -> AbstractAsyncContextManager[Running]:
        """Start every service; the context manager stops them again.

        Definition errors (an unknown dependency, with a suggestion) are raised
        here, before anything starts. Inside ``async with``, each service starts
        as soon as all of its dependencies are ready.

        Raises:
            DefinitionError: the graph is malformed.
            StartupError: a critical service failed to start (its error is the
                ``__cause__``); everything that had started was torn down first.
            RuntimeError: entering while this orchestrator is already started
                (its services would run twice: two of every process), or entering
                the object one ``start()`` returned a second time (call
                ``start()`` again: each start is a new one).

        On exit, services stop in reverse dependency order. If a critical service
        crashes while running, the body is cancelled, everything stops, and the
        service's error is raised. If the body finished cleanly but tear-downs
        failed, an ``ExceptionGroup`` of those errors is raised (otherwise they are
        logged and kept in ``running.teardown_errors``).
        """
        plan = self._checked_plan()  # here, not when entered: before anything starts
        # the session (its timeline's origin: the clock) is made when it is entered
        return _OneStart(self._run(lambda: self._new_session(plan)))

    def _session(self) -> Session:
        """Check the graph (before anything starts) and make the state of one start."""
        return self._new_session(self._checked_plan())

    def _checked_plan(self) -> Plan:
        """Check the graph and freeze it: its plan (no event loop needed)."""
        check_dependencies(self._graph, self._specs)
        plan = self._graph.plan()
        self._graph.freeze()
        self._sink.width = max(
            (len(n) for n, s in self._specs.items() if s.kind == "process"), default=0
        )
        return plan

    def _new_session(self, plan: Plan) -> Session:
        """The state of one start; its timeline begins now."""
        return Session(plan, self._specs, self._names, self.name)

    def _refuse_second_start(self) -> None:
        """One start at a time: the services of an orchestrator are one set."""
        if self._started:
            title = f" {self.name!r}" if self.name else ""
            msg = (
                f"this Orchestrator{title} is already started: stop it (leave its "
                "`async with orch.start()` or serve()) before starting it again, or build "
                "a second Orchestrator for a second set of services"
            )
            raise RuntimeError(msg)

    def _run_session(self, session: Session) -> AbstractAsyncContextManager[Running]:
        """:meth:`_run` of a session made already (serve's: its signals force it)."""
        return self._run(lambda: session)

    @asynccontextmanager
    async def _run(self, make: Callable[[], Session]) -> AsyncIterator[Running]:
        """One start at a time: the services of an orchestrator are one set."""
        self._refuse_second_start()
        session = make()
        self._started = True
        try:
            async with run_session(session) as running:
                yield running
        finally:
            self._started = False

    async def serve(
        self,
        *,
        signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
        on_ready: Callable[[Running], object] | None = None,
    ) -> None:
        """Start, run until SIGINT/SIGTERM, then stop gracefully.

        The first signal stops the services in reverse dependency order (a signal
        during start-up aborts the start and rolls back; a signal while an async
        ``on_ready`` is awaited cancels it, then the stop goes on). A second signal
        forces the stop, like a second Ctrl-C to docker compose or honcho: from
        then on every stop is immediate, the ones in progress and the ones that
        begin later alike: a tear-down is cancelled (the code after ``yield``
        runs until its first ``await``, where it gets the cancellation) and a
        process gets ``SIGKILL`` (no ``SIGTERM`` grace). The order still holds:
        every service that reached its ``yield`` still tears down exactly once,
        after everything that depends on it, and no process is left running.
        Returns normally after a signal-initiated stop. Must run in the main
        thread.

        Args:
            signals: the signals that stop it.
            on_ready: called with the :class:`Running` once every service is ready
                (a function, or an async function that is awaited; the first
                signal cancels it, so a long warm-up does not hold up the stop).
                An error it raises stops the services and is raised.

        Raises:
            StartupError: a service failed to start (its error is the
                ``__cause__``), as from :meth:`start`.
            Exception: a critical service crashed while running, or ``on_ready``
                raised: that error itself.
            ExceptionGroup: the services stopped, but tear-downs raised (as from
                :meth:`start`); the only case where ``serve()`` raises a group.
            RuntimeError: before anything starts or any signal handler changes: not
                in the main thread, this orchestrator is already started, or another
                ``serve()`` in progress handles one of ``signals`` (a signal reaches
                only one of them).
        """
        if isinstance(signals, (str, bytes)) or not isinstance(signals, Sequence) or not signals:
            msg = f"signals must be a non-empty sequence of signal numbers, got {signals!r}"
            raise TypeError(msg)
        wanted = [signal_number("signals", s) for s in signals]
        if on_ready is not None:
            callable_("on_ready", on_ready)
        # refused before serve_session touches the signal handlers: a second receiver
        # would take the signals from the serve() that runs, and leave none behind
        self._refuse_second_start()
        await serve_session(self._session, self._run_session, wanted, on_ready)


@final
class _OneStart:
    """What :meth:`Orchestrator.start` returns: entered once (a clear error the second time)."""

    __slots__ = ("_cm", "_used")

    def __init__(self, cm: AbstractAsyncContextManager[Running]) -> None:
        self._cm = cm
        self._used = False

    async def __aenter__(self) -> Running:
        if self._used:
            msg = "this orch.start() was already entered: call orch.start() again to start again"
            raise RuntimeError(msg)
        self._used = True
        return await self._cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._cm.__aexit__(exc_type, exc, tb)
