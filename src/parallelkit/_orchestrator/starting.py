"""Starting a service's task and waiting until it is ready: ``tg.start``, without its hang.

:func:`start_soon_and_wait` is what the session (:mod:`.session`) starts each
service with: the service's task belongs to the session's task group (so a ready
service outlives its starter, and is stopped in order), its start-up error, or a
``KeyboardInterrupt``-like error before it is ready, is raised by the starter.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from .._core.backend import is_foreign_cancellation

__all__ = ["start_soon_and_wait"]

logger = logging.getLogger("parallelkit.orchestrator")


class _StartStatus:
    """The ``task_status`` of a service task: its start value, or its error before it."""

    __slots__ = ("error", "event", "is_started", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.is_started = False
        self.value: Any = None
        # an Exception, or a KeyboardInterrupt-like error (raised by the starter as itself)
        self.error: BaseException | None = None

    def started(self, value: Any = None) -> None:
        self.value = value
        self.is_started = True
        self.event.set()


async def start_soon_and_wait(
    tg: anyio.abc.TaskGroup,
    run: Callable[..., Awaitable[None]],
    *,
    name: str,
    waiting: anyio.CancelScope | None = None,
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
    service code runs. The wait runs in ``waiting``, a scope the caller may shield
    (the task said its start failed: its error, which comes after its tear-down, is
    received as that of any failed start).

    An error the task raises before ``started()`` is raised here, as ``tg.start``
    would: a ``KeyboardInterrupt``-like one too (so the start is recorded as failed
    with it, not as cancelled by the task group it would otherwise end), even over
    a cancellation of this start; an ``Exception`` that comes after the start was
    cancelled is logged (nobody receives it).
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
        except BaseException as exc:
            if not status.is_started and is_foreign_cancellation(exc):
                # asyncio: a Task.cancel() of this task alone (a watchdog, a driver), no
                # cancel scope's: raised, it would cancel the whole task group without a
                # word (anyio does so for a task that ends cancelled), the start ending
                # with no error. The starter says the service ended before it was ready;
                # if everything is being cancelled (asyncio.run at exit), so is the starter
                return
            if status.is_started or isinstance(
                exc, (anyio.get_cancelled_exc_class(), GeneratorExit)
            ):
                raise  # a failure after start-up belongs to the task group; a cancellation
            # before it: the starter raises it, as tg.start would (a KeyboardInterrupt-like
            # error too, so that the service's start is recorded as failed with it, not
            # as cancelled by the task group it would otherwise end)
            status.error = exc
        finally:
            status.event.set()

    tg.start_soon(task, name=name)
    try:
        with waiting if waiting is not None else anyio.CancelScope():
            await status.event.wait()
    except BaseException:
        if not status.is_started:  # a ready service is stopped by the orchestrator, in order
            scope.cancel()
            if began:  # until it ends, or becomes ready anyway (then it is stopped in order)
                with anyio.CancelScope(shield=True):
                    await status.event.wait()
            if isinstance(status.error, Exception):  # nobody receives it: start cancelled
                logger.warning(
                    "%s failed while its start was cancelled", name, exc_info=status.error
                )
        if status.error is None or isinstance(status.error, Exception):
            raise
    if status.error is not None:
        # (a KeyboardInterrupt-like error goes on over the cancellation of this start,
        # raised out of the handler: the cancellation is not made its context)
        raise status.error
    if not status.is_started:
        # it ended by a cancellation from outside: when that reaches this start too
        # (its wait was shielded, so it has not yet), it goes on
        await anyio.lowlevel.checkpoint()
        msg = (
            f"{name} ended before it was ready: its task was cancelled, but not by a "
            "cancel scope (asyncio: a Task.cancel() of it, by a watchdog or a driver?)"
        )
        raise RuntimeError(msg)
    return status.value
