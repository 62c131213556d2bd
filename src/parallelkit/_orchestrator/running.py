"""A started orchestrator as the user sees it: the values (:class:`Running`) and health.

The work of one ``orch.start()`` (start-up, rollback, ordered stop) is
:class:`~parallelkit._orchestrator.session.Session`'s.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import anyio
import anyio.abc
from typing_extensions import final

from .._core.check import number
from .._core.errors import DependencyFailed, ParallelkitError
from .._graph.timeline import Timeline
from ..probes import Probe
from .lifetime import ServiceState, only_failure
from .process import ManagedProcess
from .services import ServiceHost

if TYPE_CHECKING:
    from .session import Session

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["Health", "NotServed", "Running", "ServiceHealth"]

T = TypeVar("T")
logger = logging.getLogger("parallelkit.orchestrator")

HealthStatus = Literal["ok", "degraded", "failing"]

#: the states of a service whose value a request must not get: torn down, or tearing down
_GONE = frozenset(("stopping", "stopped", "crashed"))


def _down(host: ServiceHost) -> bool:
    """Whether ``host`` is a process that is not running, and is not a finished one-shot job.

    A process that exited with code 0, is not restarted and has a readiness probe
    is a one-shot job (a migration) that its probe checks: its exit is how it is
    meant to end, and it counts as ok while that probe passes (re-run by an awaited
    health). Without a probe, nothing says the process was meant to end.
    """
    value = host.value
    if not isinstance(value, ManagedProcess) or value.running:
        return False
    return not (value._finished and host.spec.ready is not None)


class NotServed(ParallelkitError, LookupError):
    """A request asked for a service that has stopped, is stopping or crashed.

    Raised by the per-request lookup of :mod:`parallelkit.asgi` (``service(...)``),
    which answers it with a 503, and by ``running_from(request)[name]`` / ``.get``:
    the value of a torn-down service (a disposed engine, a closed client) must not
    reach a handler. A :class:`LookupError` too, so ``except LookupError`` catches it.

    Attributes:
        name: the service asked for.
        state: its state then (``"stopping"``, ``"stopped"``, ``"crashed"``).
    """

    def __init__(self, name: str, state: str, crash: BaseException | None) -> None:
        if state == "crashed":
            super().__init__(f"service {name!r} crashed: {crash!r}")
        else:
            super().__init__(f"service {name!r} is {state}")
        self.name = name
        self.state = state


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
            ``"ready"`` span per service with a probe (its readiness wait; ``"error"``
            when the probe failed) and,
            after shutdown, one ``"stop"`` span each.
        failed: non-critical services that failed to start: name -> exception.
        skipped: services not started because a non-critical dependency failed:
            name -> :class:`~parallelkit.DependencyFailed`.
        teardown_errors: after shutdown, ``(name, exception)`` for each tear-down
            that raised (also logged).
    """

    __slots__ = (
        "_live",
        "_names",
        "_session",
        "failed",
        "skipped",
        "teardown_errors",
        "timeline",
    )

    def __init__(
        self, session: Session, names: Mapping[Callable[..., Any], tuple[str, ...]]
    ) -> None:
        self._session = session
        self._names = names
        self._live = False
        self.timeline: Timeline = session.timeline
        self.failed: dict[str, BaseException] = {}
        self.skipped: dict[str, DependencyFailed] = {}
        self.teardown_errors: list[tuple[str, BaseException]] = []

    def _served(self) -> Running:
        """A view for requests (:mod:`parallelkit.asgi`): a torn-down service is not served.

        Its ``running["db"]`` and ``running.get("db")`` raise :class:`NotServed` for
        a service that is stopping, stopped or crashed (a disposed engine must not
        reach a handler); everything else is this object's.
        """
        view = Running(self._session, self._names)
        view._live = True
        view.timeline, view.failed, view.skipped = self.timeline, self.failed, self.skipped
        view.teardown_errors = self.teardown_errors
        return view

    def __repr__(self) -> str:
        return f"<Running {list(self)} failed={list(self.failed)} skipped={list(self.skipped)}>"

    def __getitem__(self, name: str) -> Any:
        if not isinstance(name, str):
            msg = f"a service's name (str) is needed, got {name!r}; services: {list(self)}"  # type: ignore[unreachable]
            raise TypeError(msg)
        hosts = self._session.hosts
        host = hosts.get(name)
        if host is not None and host.state not in ("pending", "starting", "failed"):
            if self._live and host.state in _GONE:
                raise NotServed(name, host.state, host.crash)
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
        if host is None or host.state in ("pending", "starting", "failed"):
            return False
        return not (self._live and host.state in _GONE)  # a view: what it can serve

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
            KeyError: the service is unknown, failed or was skipped; or the
                function is registered under several names (look one up by name).
            TypeError: ``service`` is neither a name nor a function, or the value
                is not an instance of ``expected``.
            NotServed: (a ``LookupError``) from ``running_from(request)`` of
                :mod:`parallelkit.asgi` only: the service was torn down.
        """
        return self._lookup(service, expected, live=self._live)

    def _lookup(
        self, service: Callable[..., Any] | str, expected: type[Any] | None, *, live: bool = False
    ) -> Any:
        if expected is not None and not isinstance(expected, type):  # before any lookup
            msg = f"expected must be a class, got {expected!r}"  # type: ignore[unreachable]
            raise TypeError(msg)
        if isinstance(service, str):
            name = service
        elif not callable(service):
            msg = f"service must be a service's name or its function, got {service!r}"  # type: ignore[unreachable]
            raise TypeError(msg)
        else:
            try:
                found = self._names.get(service, ())
            except TypeError:  # an unhashable callable: looked up by its name only
                found = ()
            if not found:
                msg = f"{service!r} is not a service of this orchestrator; services: {list(self)}"
                raise KeyError(msg)
            if len(found) > 1:  # which one? a wrong value would be worse than an error
                names = ", ".join(map(repr, found))
                msg = f"{service!r} is registered as services {names}: look one up by name"
                raise KeyError(msg)
            name = found[0]
        if live and not self._live:  # for a request (a view checks in ``self[name]``)
            host = self._session.hosts.get(name)
            if host is not None and host.state in _GONE:
                raise NotServed(name, host.state, host.crash)
        value = self[name]
        if expected is not None and not isinstance(value, expected):
            msg = f"service {name!r} is {type(value).__name__}, not {expected.__name__}"
            raise TypeError(msg)
        return value

    def state(self, name: str) -> ServiceState:
        """The lifecycle state of service ``name`` (``"ready"``, ``"failed"``, …)."""
        if not isinstance(name, str):
            msg = f"name must be a service's name (str), got {name!r}"  # type: ignore[unreachable]
            raise TypeError(msg)
        if name in self.skipped:
            return "skipped"
        host = self._session.hosts.get(name)
        if host is None:
            msg = f"no service named {name!r}; services: {list(self._session.specs)}"
            raise KeyError(msg)
        return host.state

    def health(self, *, timeout: float = 5.0) -> Health:
        """The services' health: a snapshot now, or fresh probes when awaited.

        ``running.health()`` reads what is known without I/O: each service's
        state (a crashed service says why), whether a process service's process
        is alive, and the failed and skipped services; a ready service counts as
        ok, since its probe passed when it became ready (a process that exited
        with code 0 and is not restarted, if it has a probe: a finished one-shot
        job). ``await
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
        only: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                for name in session.ready_order:
                    host = session.hosts[name]
                    if host.state == "ready" and host.spec.ready is not None:
                        tg.start_soon(check, name, host.spec.ready, host.value)
        except BaseExceptionGroup as group:  # a KeyboardInterrupt-like error of a probe
            only = only_failure(group)
            if only is None:
                raise
        if only is not None:
            raise only  # as itself (out of the handler: the group is not its context)
        return self._aggregate(answers, timeout)

    def _running_on(self, name: str) -> list[str]:
        """The ready services that depend on ``name``, directly or through others.

        A non-critical service that crashed leaves them running with the value it
        gave them (a client that may now fail): its health names them.
        """
        session = self._session
        hit, users = {name}, []
        for other in session.ready_order:  # a service is ready after its dependencies
            if other not in hit and any(dep in hit for dep in session.deps.get(other, ())):
                hit.add(other)
                if session.hosts[other].state == "ready":
                    users.append(other)
        return users

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
                if host.state == "crashed" and (users := self._running_on(name)):
                    reason += "; still running on it: " + ", ".join(map(repr, users))
            elif _down(host):
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
