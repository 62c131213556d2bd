"""Tasks blocked on another task's work: what a limiter that lends slots needs to know.

A cache miss's callers wait for a load that runs in another task (the cache's task
group, or the first caller's task). A limiter whose slots are held per task
(``parallelkit.sqlalchemy.pool_limiter``) would deadlock once every slot is held
by such callers: the load waits for a slot, the holders wait for the load. So a
task that waits for another task's work registers here, and that limiter, asked
for a slot by a task whose waiters hold one, runs it on a waiter's slot (the
waiter does no work meanwhile), as a fan-out's workers run on their waiting
caller's slot.

One event loop per thread: each loop's tasks have their own ids (the dictionary
is keyed by :func:`~parallelkit._core.backend.task_id`), and entries live only
while a wait lasts.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["BLOCKED", "WAKE", "WORKERS"]

BLOCKED: dict[int, list[int]] = {}
"""A task doing some work -> the tasks waiting for that work now (the list is the
waiting side's own, updated in place)."""

WORKERS: set[int] = set()
"""The tasks doing such work now (a cache load): tasks may come to wait for them."""

WAKE: dict[int, Callable[[], None]] = {}
"""A worker waiting for a slot -> how to interrupt that wait: called when a task
comes to wait for it, so that the worker may run on that task's slot instead."""
