"""Small shared helpers for benchmark modules: timing, tables, target checks."""

from __future__ import annotations

import asyncio
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

from examples.crm.loops import close_leftovers

T = TypeVar("T")


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    """Run ``fn`` ``repeat`` times; return median / min / max seconds."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "repeat": repeat,
    }


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned text table (no dependency needed)."""
    cells = [[str(c) for c in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def target(name: str, measured: float, limit: float, *, below: bool = True) -> dict[str, Any]:
    """A target line: ``measured`` must be <= ``limit`` (or >= with below=False)."""
    met = measured <= limit if below else measured >= limit
    op = "<=" if below else ">="
    return {"target": name, "measured": round(measured, 4), "limit": f"{op} {limit}", "met": met}


def exactly(name: str, measured: float, expected: float) -> dict[str, Any]:
    """A target line: ``measured`` must be ``expected``, no more and no less (a count
    that can be too low as well as too high: 0 loads is not "at most 1 load")."""
    return {
        "target": name,
        "measured": round(measured, 4),
        "limit": f"== {expected:g}",
        "met": measured == expected,
    }


class EngineStatements:
    """Counts the statements an engine sends, with a plain SQLAlchemy event.

    Not ``parallelkit.sqlalchemy.count_queries``: a benchmark of parallelkit's loaders
    must not let parallelkit count its own work (a broken parallelkit could miscount it).
    ``engine`` is an ``Engine`` or an ``AsyncEngine``.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = getattr(engine, "sync_engine", engine)
        self.count = 0

    def _seen(self, *_: Any) -> None:
        self.count += 1

    def __enter__(self) -> EngineStatements:
        from sqlalchemy import event

        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *_: object) -> None:
        from sqlalchemy import event

        event.remove(self.engine, "before_cursor_execute", self._seen)


def print_targets(targets: list[dict[str, Any]]) -> None:
    for t in targets:
        mark = "MET " if t["met"] else "MISS"
        print(f"  [{mark}] {t['target']}: {t['measured']} (target {t['limit']})")


def unreachable(url: str, default_port: int) -> str | None:
    """Why the server at ``url`` does not answer (a skip reason), or ``None``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), 1):
            return None
    except OSError as exc:
        return f"nothing answers at {url}: {exc}"


#: Seconds the tasks left over when a benchmark's event loop is done get to finish.
LEFTOVER_GRACE = 2.0


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, except that a stuck leftover task cannot hold the exit.

    A SQLAlchemy query on aiosqlite cancelled at the wrong moment (a Ctrl-C in the
    middle of a benchmark) leaves SQLAlchemy's "close the connection gracefully"
    task waiting for an aiosqlite worker thread that has stopped: it never ends,
    and ``asyncio.run`` waits for it forever. Here the leftovers get
    :data:`LEFTOVER_GRACE` seconds, then the loop closes anyway. Ctrl-C works as in
    ``asyncio.run``: the first cancels ``main`` and raises ``KeyboardInterrupt``
    once it has unwound (even if ``main`` swallowed the cancellation); a second one
    raises ``KeyboardInterrupt`` at once.
    """
    loop = asyncio.new_event_loop()
    task = loop.create_task(main)
    interrupted: list[int] = []

    def on_sigint(signum: int, frame: object) -> None:
        if interrupted or task.done():
            raise KeyboardInterrupt
        interrupted.append(signum)
        loop.call_soon_threadsafe(task.cancel)

    ours = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if ours:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        try:
            result = loop.run_until_complete(task)
        except asyncio.CancelledError:
            if interrupted:
                raise KeyboardInterrupt from None
            raise
        if interrupted:  # main swallowed the cancellation: the user still asked to stop
            raise KeyboardInterrupt
        return result
    finally:
        try:
            _close(loop)
        finally:
            if ours:
                signal.signal(signal.SIGINT, signal.default_int_handler)


def _close(loop: asyncio.AbstractEventLoop) -> None:
    try:
        close_leftovers(loop, LEFTOVER_GRACE)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
