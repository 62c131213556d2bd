"""Serving: run a started orchestrator until a signal, then stop it gracefully.

:meth:`Orchestrator.serve <parallelkit.Orchestrator.serve>` checks its arguments
and hands the run (``Orchestrator._run``: start, yield, ordered stop) to
:func:`serve_session`, which watches the signals: the first one stops the run (or
aborts a start still in progress: a rollback), each further one forces the stop
(every stop immediate from then on, still in order).
"""

from __future__ import annotations

import inspect
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any

import anyio

from .definitions import signal_number
from .running import Running
from .session import Session

__all__ = ["serve_session", "signal_number"]

logger = logging.getLogger("parallelkit.orchestrator")

#: the signals a serve() in progress handles (serve() runs in the main thread only)
_SERVING: set[signal.Signals] = set()


async def serve_session(
    make_session: Callable[[], Session],
    run: Callable[[Session], AbstractAsyncContextManager[Running]],
    wanted: list[signal.Signals],
    on_ready: Callable[[Running], object] | None,
) -> None:
    """Enter ``run(make_session())`` and serve it until one of ``wanted`` arrives.

    ``serve()``'s docstring says what a signal does; the errors it raises are
    ``start()``'s, each as itself (never in the watcher's ``ExceptionGroup``).

    Raises:
        RuntimeError: not in the main thread (only it can receive signals), or
            another ``serve()`` in progress handles one of ``wanted``; checked before
            any service starts or any signal handler changes.
    """
    if threading.current_thread() is not threading.main_thread():
        msg = (
            "serve() must run in the main thread: only it can handle signals. In another "
            "thread, use `async with orch.start():` and leave it to stop the services"
        )
        raise RuntimeError(msg)
    taken = [s.name for s in wanted if s in _SERVING]
    if taken:
        # a signal reaches one receiver only: a second one would leave the serve()
        # that runs deaf to it (and, on asyncio, with no handler at all once it closes)
        msg = (
            f"another serve() in this program already handles {', '.join(taken)}: a "
            "signal reaches only one of them. Serve one orchestrator per program (run "
            "the others with `async with other.start():` from a service of it), or give "
            "this one other signals="
        )
        raise RuntimeError(msg)
    session = make_session()  # checks the graph: after the checks above, as it freezes it
    _SERVING.update(wanted)
    try:
        await _serve(session, run, wanted, on_ready)
    finally:
        _SERVING.difference_update(wanted)


async def _serve(
    session: Session,
    run: Callable[[Session], AbstractAsyncContextManager[Running]],
    wanted: list[signal.Signals],
    on_ready: Callable[[Running], object] | None,
) -> None:
    """serve_session's work, once the signals are its own."""
    stop = anyio.Event()
    started = False
    ready_scope = anyio.CancelScope()  # an async on_ready runs in it: a signal cancels it
    error: BaseException | None = None
    try:
        with _restoring_handlers(wanted), anyio.open_signal_receiver(*wanted) as received:
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
                except BaseException as exc:
                    if isinstance(exc, (anyio.get_cancelled_exc_class(), GeneratorExit)):
                        raise
                    error = exc  # a KeyboardInterrupt-like error: as itself too
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


@contextmanager
def _restoring_handlers(wanted: list[signal.Signals]) -> Iterator[None]:
    """Put back the handlers that were installed before serve() once it is done.

    anyio on asyncio leaves the defaults (``SIG_DFL``, Python's KeyboardInterrupt
    handler) behind, not the handler the program had; trio restores it itself.
    """
    previous: dict[signal.Signals, Any] = {s: signal.getsignal(s) for s in wanted}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: installed from C, which Python cannot put back; asyncio's own
            # placeholder (loop.add_signal_handler): the loop forgot its callback
            # when anyio replaced it, so putting it back would ignore the signal
            if (
                handler is not None
                and getattr(handler, "__module__", None) != "asyncio.unix_events"
                and signal.getsignal(signum) is not handler
            ):
                signal.signal(signum, handler)
