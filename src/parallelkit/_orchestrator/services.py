"""One service's lifetime: set up, become ready, stay alive, tear down exactly once.

A service is registered as one of three shapes, and this module turns each into
the same lifetime (an async context manager):

- an **async generator** function: set-up code, ``yield value``, tear-down code;
- an **async context-manager factory** (``@asynccontextmanager`` or any callable
  returning an object with ``__aenter__``/``__aexit__``);
- an **async function** returning the value (nothing to tear down).

:class:`ServiceHost` runs that lifetime in a task of its own (the orchestrator's
service task group), so set-up and tear-down happen in the same task, and a
service may keep a task group or cancel scope open across its ``yield`` (a
server's accept loop, a background refresher). The host reports the ready value
through ``task_status.started(value)``, then waits to be told to stop.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from anyio.abc import TaskStatus
from typing_extensions import final

from .._core.retry import RetryLike, to_retrying
from ..probes import Probe

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["ServiceHost", "ServiceSpec", "ServiceState", "open_lifetime"]

logger = logging.getLogger("parallelkit.orchestrator")

ServiceState = Literal[
    "pending", "starting", "ready", "stopping", "stopped", "failed", "crashed", "skipped"
]
LifetimeFactory = Callable[..., Any]


@final
@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """The definition of one service (validated by the orchestrator at the door)."""

    name: str
    fn: LifetimeFactory
    depends_on: tuple[str, ...] = ()
    ready: Probe | None = None
    timeout: float | None = None
    retry: RetryLike | None = None
    stop_timeout: float = 10.0
    critical: bool = True
    kind: Literal["service", "process"] = "service"
    extra: dict[str, Any] = field(default_factory=dict)


def open_lifetime(name: str, fn: LifetimeFactory, kwargs: dict[str, Any]) -> Any:
    """The async context manager for one run of a service, whatever its shape.

    Raises:
        TypeError: ``fn`` returned neither an awaitable nor an async context
            manager (for example a plain sync function).
    """
    if inspect.isasyncgenfunction(fn):
        return asynccontextmanager(fn)(**kwargs)
    result = fn(**kwargs)
    if hasattr(result, "__aenter__") and hasattr(result, "__aexit__"):
        return result
    if inspect.isawaitable(result):
        return _value_of(result)
    if inspect.isasyncgen(result):
        return asynccontextmanager(lambda: result)()
    msg = (
        f"service {name!r}: {fn!r} returned {type(result).__name__}, not an awaitable or "
        "an async context manager; write it as an async generator (set up, yield, tear "
        "down), an async function, or an async context-manager factory"
    )
    raise TypeError(msg)


@asynccontextmanager
async def _value_of(awaitable: Awaitable[Any]) -> AsyncIterator[Any]:
    yield await awaitable


@final
class ServiceHost:
    """Runs one service's lifetime in its own task; stopped on request, once.

    ``value = await task_group.start(host.run)`` returns when the service is ready
    (set up and its probe passed) or raises its start-up error (after undoing a
    partial set-up). :meth:`request_stop` then tears it down, bounded by
    ``stop_timeout``, after which the tear-down is cancelled and
    :attr:`timed_out` is set. A service that dies while running (its task group
    failed, its process exited) is reported through ``on_crash``.
    """

    __slots__ = (
        "_scope",
        "_stop",
        "crash",
        "kwargs",
        "on_crash",
        "on_ready",
        "ready_at",
        "setup_done_at",
        "spec",
        "state",
        "stopped",
        "teardown_error",
        "timed_out",
        "value",
    )

    def __init__(
        self,
        spec: ServiceSpec,
        kwargs: dict[str, Any],
        on_crash: Callable[[ServiceHost, BaseException | None], None],
        on_ready: Callable[[ServiceHost], None] = lambda host: None,
    ) -> None:
        self.spec = spec
        self.kwargs = kwargs
        self.on_crash = on_crash
        self.on_ready = on_ready
        self.state: ServiceState = "pending"
        self.value: Any = None
        self.crash: BaseException | None = None
        self.teardown_error: BaseException | None = None
        self.timed_out = False
        self.setup_done_at = math.nan
        self.ready_at = math.nan
        self._stop = anyio.Event()
        self.stopped = anyio.Event()
        self._scope: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<ServiceHost {self.spec.name!r} {self.state}>"

    # -- control -------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the service to tear down (idempotent); await :attr:`stopped`."""
        self._stop.set()

    def force(self) -> None:
        """Cancel the service's tear-down now (a second Ctrl-C)."""
        self._stop.set()
        if self._scope is not None:
            self._scope.cancel()

    # -- the lifetime ----------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start (with retry, timeout and readiness), report ready, wait, tear down."""
        spec = self.spec
        self.state = "starting"
        try:
            if spec.retry is None:
                stack, scope, value = await self._attempt()
            else:
                async for attempt in to_retrying(spec.retry).copy():
                    with attempt:
                        stack, scope, value = await self._attempt()
                    if attempt.retry_state.attempt_number > 1:
                        logger.info(
                            "service %r started on attempt %d",
                            spec.name,
                            attempt.retry_state.attempt_number,
                        )
        except BaseException:
            self.state = "failed"
            self.stopped.set()
            raise
        # ready: from now on only request_stop() / force() end the service, so that
        # the orchestrator can stop services in reverse dependency order even when
        # the surrounding scope is cancelled.
        scope.shield = True
        self._scope = scope
        self.value = value
        self.state = "ready"
        # recorded here, not when the starter resumes: the starter may be cancelled
        # between started() and its resumption, and a ready service must be stopped
        self.on_ready(self)
        task_status.started(value)
        await self._live(stack, scope)

    async def _attempt(self) -> tuple[AsyncExitStack, anyio.CancelScope, Any]:
        spec = self.spec
        started = anyio.current_time()
        deadline = math.inf if spec.timeout is None else started + spec.timeout
        stack = AsyncExitStack()
        scope = stack.enter_context(anyio.CancelScope(deadline=deadline))
        try:
            cm = open_lifetime(spec.name, spec.fn, self.kwargs)
            value = await stack.enter_async_context(cm)
            self.setup_done_at = anyio.current_time()
            scope.deadline = math.inf  # the probe below has its own, clearer timeout
            if spec.ready is not None:
                left = deadline - self.setup_done_at
                if left <= 0:
                    msg = f"service {spec.name!r} set up, but the timeout ({spec.timeout}s) ran out"
                    raise TimeoutError(msg)
                await spec.ready.wait(value, timeout=None if math.isinf(left) else left)
            self.ready_at = anyio.current_time()
        except BaseException as exc:
            # undo this attempt's partial set-up (the generator's finally runs here)
            suppressed = await stack.__aexit__(type(exc), exc, exc.__traceback__)
            if suppressed and scope.cancelled_caught:
                msg = f"service {spec.name!r} did not finish its set-up within {spec.timeout}s"
                raise TimeoutError(msg) from None
            raise
        return stack, scope, value

    async def _live(self, stack: AsyncExitStack, scope: anyio.CancelScope) -> None:
        spec = self.spec
        error: BaseException | None = None
        try:
            await self._stop.wait()
        except BaseException as exc:  # the service's own task group failed under it
            error = exc
        if error is None:
            self.state = "stopping"
            scope.deadline = anyio.current_time() + spec.stop_timeout
        try:
            if error is None:
                await stack.aclose()
            elif not await stack.__aexit__(type(error), error, error.__traceback__):
                raise error
        except Exception as raised:
            error = _unwrap(raised)
            if self._stop.is_set() and self.crash is None:
                self.teardown_error = error
                logger.error("service %r failed to stop cleanly", spec.name, exc_info=error)  # noqa: TRY400
            else:
                self.crash = error
        finally:
            self.timed_out = scope.cancelled_caught and self.state == "stopping"
            if self.timed_out:
                logger.warning(
                    "service %r did not stop within stop_timeout=%ss; its tear-down was cancelled",
                    spec.name,
                    spec.stop_timeout,
                )
            crashed = not self._stop.is_set()
            self.state = "crashed" if crashed else "stopped"
            self._stop.set()
            self.stopped.set()
            if crashed:
                if self.crash is None:
                    logger.error("service %r ended while running", spec.name)
                else:
                    logger.error("service %r crashed", spec.name, exc_info=self.crash)
                self.on_crash(self, self.crash)


def _unwrap(exc: Exception) -> Exception:
    """The one error inside the (nested) single-error groups a service's task group adds."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        inner = exc.exceptions[0]
        if not isinstance(inner, Exception):
            break
        exc = inner
    return exc
