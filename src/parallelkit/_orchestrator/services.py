"""One service's lifetime hosted: set up, become ready, stay alive, tear down exactly once.

:class:`ServiceHost` runs a service's lifetime (:func:`~.lifetime.open_lifetime`:
whatever its shape, an async context manager) in a task of its own (the
orchestrator's service task group), so set-up and tear-down happen in the same
task, and a service may keep a task group or cancel scope open across its
``yield`` (a server's accept loop, a background refresher). The host reports the
ready value through ``task_status.started(value)``, then waits to be told to stop.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
from anyio.abc import TaskStatus
from typing_extensions import final

from .._core.backend import is_failure, is_foreign_cancellation, is_stray_cancellation
from .._core.retry import to_retrying
from .lifetime import ExitRecorder, ServiceSpec, ServiceState, open_lifetime, unwrap
from .process import ManagedProcess, process_ready
from .reports import ended_error, stray_error

__all__ = ["PROCESS_KILL_GRACE", "ServiceHost"]

logger = logging.getLogger("parallelkit.orchestrator")

PROCESS_KILL_GRACE = 5.0
"""Seconds a process's tear-down may take beyond its ``stop_timeout``.

The process gets ``SIGKILL`` at ``stop_timeout`` (:mod:`.process`); this is the time
allowed after that for it to die and for its output to drain.
"""


@final
class ServiceHost:
    """Runs one service's lifetime in its own task; stopped on request, once.

    ``value = await start_soon_and_wait(task_group, host.run, ...)`` (``task_group.start``'s
    contract, see starting.py) returns when the service is ready (set up and its probe
    passed) or raises its start-up error. :meth:`request_stop`
    then tears it down, bounded by ``stop_timeout`` (for a process, plus
    :data:`PROCESS_KILL_GRACE`), after which the tear-down is cancelled and
    :attr:`timed_out` is set; :meth:`force` (a second signal) cuts it short at
    once, whether it is under way or begins later, and sets :attr:`forced`
    instead. A service that dies while running (its task group failed, its
    process exited) is reported through ``on_crashing`` at once,
    then ``on_crash`` (with its error) once its tear-down ran. Likewise a start
    that fails after the ``yield`` (its probe failed or timed out, its task group
    failed) is reported through ``on_failing`` before its tear-down runs; its error
    follows, from the start, once the tear-down ended.

    ``timed_out`` is True only when ``stop_timeout`` ran out and cancelled the
    tear-down; ``forced`` is True when :meth:`force` cut short a tear-down that
    was still running (then ``timed_out`` stays False). Each logs one warning
    saying which it was.

    **Tear-down.** Once the lifetime reached its ``yield`` (an async context
    manager: its ``__aenter__`` returned), its tear-down, the code after
    ``yield``, runs exactly once, as a normal exit (not an exception thrown into
    the generator): on stop, when its readiness probe fails or times out, and when
    the start is cancelled (a sibling failed, a signal). It runs shielded from
    the cancellation that stopped the start, bounded by ``stop_timeout``; only
    :meth:`force` cuts it short (after it, a tear-down is cancelled as it
    begins). Before the ``yield``, a failure is thrown into the lifetime as usual
    (its ``finally`` / ``except`` undo the partial set-up).
    """

    __slots__ = (
        "_closing",
        "_exit",
        "_failed_attempt",
        "_force",
        "_scope",
        "_stop",
        "crash",
        "dependents",
        "forced",
        "kwargs",
        "on_crash",
        "on_crashing",
        "on_failing",
        "on_ready",
        "on_unready",
        "setup_done_at",
        "spec",
        "state",
        "stopped",
        "teardown_error",
        "teardown_interrupt",
        "teardown_times",
        "timed_out",
        "torn_down",
        "value",
    )

    def __init__(
        self,
        spec: ServiceSpec,
        kwargs: dict[str, Any],
        on_crash: Callable[[ServiceHost, BaseException | None], None],
        on_ready: Callable[[ServiceHost], None] = lambda host: None,
        on_crashing: Callable[[ServiceHost], None] = lambda host: None,
        on_failing: Callable[[ServiceHost], None] = lambda host: None,
        on_unready: Callable[[ServiceHost, Exception], None] = lambda host, exc: None,
    ) -> None:
        self.spec = spec
        self.kwargs = kwargs
        self.on_crash = on_crash
        self.on_ready = on_ready
        self.on_crashing = on_crashing
        self.on_failing = on_failing
        self.on_unready = on_unready
        # the hosts of the services that depend on this one (set by the orchestrator)
        self.dependents: Callable[[], list[ServiceHost]] = list
        self.state: ServiceState = "pending"
        self.value: Any = None
        self.crash: BaseException | None = None
        self.teardown_error: BaseException | None = None
        # a KeyboardInterrupt-like error its stop's tear-down raised (it goes on as itself)
        self.teardown_interrupt: BaseException | None = None
        self.timed_out = False
        self.forced = False
        self.torn_down = False  # a tear-down (the code after its yield) ran: a "stop" span
        self.teardown_times: tuple[float, float] | None = None  # its last one's start, end
        self.setup_done_at = math.nan
        self._stop = anyio.Event()
        self.stopped = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._closing = False
        self._force = False  # a second signal came: every tear-down from now on is cut short
        self._exit: ExitRecorder | None = None
        # an attempt that failed after its yield, its tear-down not run yet
        self._failed_attempt: tuple[AsyncExitStack, anyio.CancelScope] | None = None

    def __repr__(self) -> str:
        return f"<ServiceHost {self.spec.name!r} {self.state}>"

    # -- control -------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the service to tear down (idempotent); await :attr:`stopped`."""
        self._stop.set()

    def stopping(self) -> None:
        """The orchestrator is stopping: a process that exits from now on is not restarted.

        Its exit is final, as with ``restart="no"`` (a non-zero exit is its crash); it
        still stops in its turn, after everything that depends on it.
        """
        if isinstance(self.value, ManagedProcess):
            self.value._final = True

    def force(self) -> None:
        """Make this service's stop immediate (a second Ctrl-C), now or when it begins.

        A tear-down in progress is cancelled and a process gets ``SIGKILL``. A
        service that has not begun its tear-down is not stopped out of turn: it
        still tears down once, after everything that depends on it, but at once
        (its tear-down cancelled; a process killed, without the SIGTERM grace).
        """
        self._force = True
        if self._closing and self._scope is not None:
            self._cut(kill=True)

    def _cut(self, *, kill: bool) -> None:
        """Cancel the tear-down (``kill``: ``SIGKILL`` a process whose stop is under way)."""
        assert self._scope is not None
        if not self._scope.cancel_called:  # not already cut short by its stop_timeout
            self.forced = True
        if isinstance(self.value, ManagedProcess):
            self.value._forced = True  # its stop kills it at once, not SIGTERM first
            if kill:
                self.value.send_signal(signal.SIGKILL)
        self._scope.cancel()

    async def _turn(self) -> None:
        """Until this service's turn to stop: asked to, or everything on it stopped."""
        for dependent in self.dependents():
            if self._stop.is_set():
                return
            if dependent.state != "pending":  # (a start given up before it ran: none)
                await dependent.stopped.wait()

    # -- the lifetime ----------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start (with retry, timeout and readiness), report ready, wait, tear down."""
        spec = self.spec
        self.state = "starting"
        try:
            if spec.retry is None:
                stack, scope, value = await self._attempt()
            else:
                # a failed attempt is torn down before the wait for the next one
                retrying = to_retrying(spec.retry).copy(sleep=self._retry_after)
                async for attempt in retrying:
                    with attempt:
                        stack, scope, value = await self._attempt()
                    if attempt.retry_state.attempt_number > 1:
                        logger.info(
                            "service %r started on attempt %d",
                            spec.name,
                            attempt.retry_state.attempt_number,
                        )
        except BaseException as exc:
            self.state = "failed"
            if self._failed_attempt is not None and isinstance(exc, Exception):
                self.on_failing(self)  # said before the tear-down: nothing more starts
            await self._close_failed()
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
        await self._close_failed()  # (done by the retry's wait already, if it waited)
        started = anyio.current_time()
        deadline = math.inf if spec.timeout is None else started + spec.timeout
        stack = AsyncExitStack()
        # entered before the lifetime, so that the tear-down can be shielded and
        # bounded by changing this scope (a scope entered later could not be exited
        # before the lifetime's own scopes)
        scope = stack.enter_context(anyio.CancelScope(deadline=deadline))
        try:
            self._exit = ExitRecorder(open_lifetime(spec.name, spec.fn, self.kwargs))
            value = await stack.enter_async_context(self._exit)
        except BaseException as exc:
            stray = is_stray_cancellation(exc)  # (asked before any other await)
            # before the yield: undo the partial set-up (the generator's finally runs)
            suppressed = await stack.__aexit__(type(exc), exc, exc.__traceback__)
            if suppressed and scope.cancelled_caught:
                msg = f"service {spec.name!r} did not finish its set-up within {spec.timeout}s"
                raise TimeoutError(msg) from None
            if stray:  # the service's error, not a cancellation (which would end the start)
                raise stray_error(spec.name, "set-up", exc) from exc
            raise
        # the lifetime reached its yield: from here on its tear-down runs, once
        self.setup_done_at = anyio.current_time()
        self.value = value
        scope.deadline = math.inf  # the probe below has its own, clearer timeout
        if scope.cancel_called:
            # its timeout ran out where the set-up could not be cancelled (a shielded
            # connect, no await after the deadline): it reached its yield too late, in a
            # scope that is cancelled for good. Not ready: a failed start, torn down (at
            # once: the cancellation reaches the tear-down at its first await)
            self._failed_attempt = (stack, scope)
            msg = (
                f"service {spec.name!r} did not finish its set-up within {spec.timeout:g}s "
                "(it reached its yield only after that: was the set-up shielded from "
                "cancellation?)"
            )
            raise TimeoutError(msg)
        if spec.ready is None:
            return stack, scope, value
        try:
            left = deadline - self.setup_done_at
            if left <= 0:
                msg = f"service {spec.name!r} set up, but its timeout ({spec.timeout}s) ran out"
                raise TimeoutError(msg)
            try:
                if isinstance(value, ManagedProcess):
                    await process_ready(spec.ready, value, deadline)
                else:
                    await spec.ready.wait(value, timeout=None if math.isinf(left) else left)
            except TimeoutError as exc:
                msg = f"service {spec.name!r} was not ready within {spec.timeout}s: {exc}"
                raise TimeoutError(msg) from exc
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.on_unready(self, exc)  # its "ready" span: "error", the wait measured
                # the start failed: torn down once the orchestrator knows (run), or before
                # the wait for the next attempt (_retry_after)
                self._failed_attempt = (stack, scope)
                raise
            # asyncio: a Task.cancel() of this task (the event loop cancelling every task)
            # is a cancellation from outside, whatever its scopes say (asked before any await)
            foreign = is_foreign_cancellation(exc)
            if spec.retry is None and not foreign:
                # a cancellation: from outside (then the start is being cancelled, and
                # saying so changes nothing), or its own task group failed, whose error
                # comes out of the tear-down: the start fails, said before that
                self.on_failing(self)
            teardown = await self._close(stack, scope)
            if foreign:
                self.teardown_error = teardown
                raise
            failure = self._failure(exc, teardown)
            if failure is exc:
                raise
            raise failure from None  # the service's own error, not the cancellation it caused
        return stack, scope, value

    async def _close_failed(self) -> None:
        """Tear down the attempt that failed after its ``yield``, if not done yet (once)."""
        if self._failed_attempt is None:
            return
        stack, scope = self._failed_attempt
        self._failed_attempt = None
        self.teardown_error = await self._close(stack, scope)

    async def _retry_after(self, seconds: float) -> None:
        """The retry's wait: the failed attempt is torn down first."""
        await self._close_failed()
        if self.teardown_error is not None:  # nobody receives it: the start goes on
            logger.error(
                "service %r failed to stop cleanly after a failed attempt",
                self.spec.name,
                exc_info=self.teardown_error,
            )
            self.teardown_error = None
        await anyio.sleep(seconds)

    def _failure(self, exc: BaseException, teardown: Exception | None) -> BaseException:
        """What a start cancelled after the yield raises, once its tear-down ran.

        ``exc`` (a cancellation, or a ``KeyboardInterrupt``-like error, which goes on as
        itself) stopped the start; ``teardown`` is what the
        tear-down raised. A cancellation from outside (a sibling failed, a signal)
        goes on as itself; one that came from inside the service (its own task
        group failed, say its process exited) gives way to that task group's error,
        or, when the service caught that error, to a RuntimeError saying so (a
        cancellation nobody asked for must not go on).
        """
        if not isinstance(exc, (Exception, GeneratorExit, anyio.get_cancelled_exc_class())):
            # not a cancellation: a KeyboardInterrupt-like error (from its probe, say)
            # goes on as itself, once the tear-down ran
            self.teardown_error = teardown
            return exc
        cancelled_outside = anyio.current_effective_deadline() == -math.inf
        if teardown is None and not cancelled_outside:
            # the service's own task group failed, and its tear-down was cut short by
            # stop_timeout while that error was in flight: the error, not the cut
            teardown = self._lost_error()
            if teardown is None:
                msg = (
                    f"service {self.spec.name!r} ended before it was ready: its own task "
                    "group was cancelled (a task in it failed?), and the error was caught"
                )
                return RuntimeError(msg)
        if teardown is None or cancelled_outside:
            self.teardown_error = teardown
            return exc
        return teardown

    def _lost_error(self) -> Exception | None:
        """The error the lifetime was raising when its tear-down was cut short, if any.

        A tear-down cut short by ``stop_timeout`` ends in a cancellation that its
        own scope absorbs; the error it was handling (a crash of the service's task
        group) is that cancellation's context, and would be lost with it.
        """
        if self._exit is None or (not self.timed_out and not self.forced):
            return None
        seen: BaseException | None = self._exit.raised
        while seen is not None:
            if isinstance(seen, Exception) and not isinstance(
                seen, anyio.get_cancelled_exc_class()
            ):
                return unwrap(seen)
            seen = seen.__context__
        return None

    async def _close(
        self,
        stack: AsyncExitStack,
        scope: anyio.CancelScope,
        crash: BaseException | None = None,
    ) -> Exception | None:
        """Tear down (the code after ``yield``) once: shielded, bounded by ``stop_timeout``.

        A normal exit, or, for a ``crash`` (the service's own task group failed),
        that error thrown into the lifetime. Returns the error the tear-down raised
        (unwrapped from single-error groups); for a crash, the crash itself unless
        the lifetime swallowed it.
        """
        spec = self.spec
        grace = PROCESS_KILL_GRACE if spec.kind == "process" else 0.0
        # the set-up overran its timeout: the scope was cancelled before the tear-down
        overran = scope.cancel_called
        scope.shield = True
        scope.deadline = anyio.current_time() + spec.stop_timeout + grace
        self._scope = scope
        self._closing = True
        self.torn_down = True
        began = anyio.current_time()
        if self._force:  # the stop was forced before this tear-down began: at once
            # (a process is not signalled from here: its own stop sends SIGKILL, once it
            # knows it is stopping, so that the exit is not taken for a crash)
            self._cut(kill=False)
        error: Exception | None = None
        try:
            if crash is None:
                await stack.aclose()
            elif not await stack.__aexit__(type(crash), crash, crash.__traceback__):
                raise crash
        except Exception as raised:
            error = unwrap(raised)
        except BaseException as raised:
            if raised is crash or not is_stray_cancellation(raised):
                raise
            # the tear-down's error, not a cancellation (which nobody would see)
            error = stray_error(spec.name, "tear-down", raised)
            error.__cause__ = raised
        finally:
            self._closing = False
            self.teardown_times = (began, anyio.current_time())
            self.timed_out = scope.cancelled_caught and not self.forced
            if self.forced:
                logger.warning(
                    "%s %r: the stop was forced (a second signal); its tear-down was cut short",
                    spec.kind,
                    spec.name,
                )
            elif self.timed_out and overran:
                logger.warning(
                    "%s %r: its set-up overran its timeout (%gs), so its tear-down was cut "
                    "short at its first await",
                    spec.kind,
                    spec.name,
                    spec.timeout,
                )
            elif self.timed_out:
                extra = f" (+{grace:g}s to kill it)" if grace else ""
                logger.warning(
                    "%s %r did not stop within stop_timeout=%gs%s; its tear-down was cancelled",
                    spec.kind,
                    spec.name,
                    spec.stop_timeout,
                    extra,
                )
        return error

    async def _live(self, stack: AsyncExitStack, scope: anyio.CancelScope) -> None:
        error: BaseException | None = None
        held = False  # this task was cancelled from outside: it stops in its turn
        while True:
            try:
                if not held:
                    await self._stop.wait()
                else:  # its own task group is cancelled too, as its tasks were: not a crash
                    with anyio.CancelScope(shield=True):
                        await self._turn()
                break
            except BaseException as exc:
                if not held and not is_foreign_cancellation(exc):
                    error = exc  # the service's own task group failed under it
                    break
                # asyncio: a Task.cancel() of this task (the event loop cancelling every
                # task, as asyncio.run does at exit, the orchestrator's included): not a
                # crash. It tears down in its turn, once what depends on it stopped (as
                # the orchestrator's stop would: that may be cancelled too), and the task
                # then ends, as the cancellation asked
                held = True
        try:
            if error is None:
                self.state = "stopping"
                try:
                    self.teardown_error = await self._close(stack, scope)
                except BaseException as exc:
                    if is_failure(exc):  # noted for the stop's span; it goes on as itself
                        self.teardown_interrupt = exc
                    raise
            else:
                # a crash: said at once (nothing must start on a service tearing down),
                # then the error goes into the lifetime, whose task group needs it
                # (bounded by stop_timeout, as any tear-down)
                self.state = "crashed"
                self.on_crashing(self)
                self.crash = await self._close(stack, scope, error)
                if self.crash is None:
                    self.crash = self._lost_error() or ended_error(self.spec.name)
        finally:
            crashed = error is not None
            self.state = "crashed" if crashed else "stopped"
            self._stop.set()
            self.stopped.set()
            if crashed:
                self.on_crash(self, self.crash)
