"""Serving: run a started orchestrator until a signal, then stop it gracefully.

:meth:`Orchestrator.serve <parallelkit.Orchestrator.serve>` checks its arguments
and hands the run (``Orchestrator._run``: start, yield, ordered stop) to
:func:`serve_session`, which watches the signals: the first one stops the run (or
aborts a start still in progress: a rollback), each further one forces the stop.
"""

from __future__ import annotations

import inspect
import logging
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import anyio

from .running import Running
from .session import Session

__all__ = ["serve_session", "signal_number"]

logger = logging.getLogger("parallelkit.orchestrator")


async def serve_session(
    session: Session,
    run: Callable[[Session], AbstractAsyncContextManager[Running]],
    wanted: list[signal.Signals],
    on_ready: Callable[[Running], object] | None,
) -> None:
    """Enter ``run(session)`` and serve it until one of ``wanted`` arrives.

    ``serve()``'s docstring says what a signal does; the errors it raises are
    ``start()``'s, each as itself (never in the watcher's ``ExceptionGroup``).
    """
    stop = anyio.Event()
    started = False
    ready_scope = anyio.CancelScope()  # an async on_ready runs in it: a signal cancels it
    error: Exception | None = None
    try:
        with anyio.open_signal_receiver(*wanted) as received:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    count = 0
                    async for signum in received:
                        count += 1
                        label = signal.Signals(signum).name
                        if count == 1:
                            logger.warning("%s received: stopping (again to force)", label)
                            stop.set()
                            if not started:  # still starting: abort the start (rolls back)
                                main_scope.cancel()
                            else:  # an async on_ready still running: cancel it, then stop
                                ready_scope.cancel()
                        else:
                            logger.warning("%s received again: forcing the stop", label)
                            session.force()

                tg.start_soon(watch)
                try:
                    with anyio.CancelScope() as main_scope:
                        async with run(session) as running:
                            started = True
                            if on_ready is not None:
                                with ready_scope:
                                    result = on_ready(running)
                                    if inspect.isawaitable(result):
                                        await result
                            await stop.wait()
                except Exception as exc:
                    # raised below, once the watcher's task group has closed, so that
                    # it comes out as itself (as from start()), not in an ExceptionGroup
                    error = exc
                finally:
                    tg.cancel_scope.cancel()
    except anyio.get_cancelled_exc_class():
        # Your scope was cancelled (a deadline passed) while the services stopped;
        # the watcher's task group met it on its way out. The error in hand still
        # comes out, as it would from start(): an error is never swallowed.
        if error is None:
            raise
    if error is not None:
        raise error


_UNCATCHABLE = frozenset(
    getattr(signal, name) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)
)


def signal_number(name: str, value: object) -> signal.Signals:
    try:
        signum = signal.Signals(value)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        msg = f"{name} must hold signal numbers (signal.SIGTERM, ...), got {value!r}"
        raise (TypeError if not isinstance(value, int) else ValueError)(msg) from None
    if signum in _UNCATCHABLE:  # else a RuntimeError (asyncio) or OSError (trio), unnamed
        msg = f"{name}: {signum.name} cannot be caught, so it cannot stop serve(); got {value!r}"
        raise ValueError(msg)
    return signum
