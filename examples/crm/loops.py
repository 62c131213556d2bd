"""Closing an asyncio loop whose leftover tasks may never end: the demo's and the
benchmarks' one way to do it.

A SQLAlchemy query on aiosqlite cancelled at the wrong moment (a Ctrl-C in the
middle of a query) leaves behind SQLAlchemy's own "close the connection gracefully"
task, waiting for aiosqlite's worker thread, which has already stopped: it never
ends, and ``asyncio.run`` waits for it forever. :func:`close_leftovers` gives the
tasks still pending ``grace`` seconds, then abandons the rest on purpose.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

__all__ = ["close_leftovers"]


def close_leftovers(loop: asyncio.AbstractEventLoop, grace: float) -> set[asyncio.Task[Any]]:
    """Cancel the loop's pending tasks, wait up to ``grace`` seconds for them, shut down
    its async generators and default executor; return the tasks that did not finish.

    Those are abandoned: the loop's exception handler no longer reports their
    collection ("Task was destroyed but it is pending!"); anything else it still
    reports. The caller closes the loop.
    """
    leftovers = asyncio.all_tasks(loop)
    for task in leftovers:
        task.cancel()
    stuck: set[asyncio.Task[Any]] = set()
    if leftovers:
        _, stuck = loop.run_until_complete(asyncio.wait(leftovers, timeout=grace))
        if stuck:
            loop.set_exception_handler(partial(_quiet_about, stuck))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    return stuck


def _quiet_about(
    abandoned: set[asyncio.Task[Any]], loop: asyncio.AbstractEventLoop, context: dict[str, Any]
) -> None:
    """The loop's exception handler once ``abandoned`` are left behind: their collection
    is expected; anything else is reported."""
    if context.get("task") not in abandoned:
        loop.default_exception_handler(context)
