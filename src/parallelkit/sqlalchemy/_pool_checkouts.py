"""Which task holds which of a pool's connections, from the pool's public events.

The deadlock check (:mod:`parallelkit.sqlalchemy._pool_deadlock`) asks how many of
the connections checked out of a pool are held by tasks that can only wait. It
learns who holds what from SQLAlchemy's public pool events, installed once per
watched pool when the engine's :func:`~parallelkit.sqlalchemy.pool_limiter` is made
(only for a ``QueuePool`` with a bound: the only kind the check applies to):

* ``checkout`` notes the task that took the connection (a weak reference: a task
  that ends holding one is neither kept alive nor counted), and the pool it came
  from (the engine's pool at that moment: after ``engine.dispose()`` the old
  pool's connections say nothing about the new one's);
* ``checkin`` and ``detach`` forget it.

How many it knows of (``len(checkouts._held) >= checkouts.capacity``, read inline)
is what a session's first statement looks at to skip the check while the pool
surely has a connection free: ``False`` is sure; ``True`` is to be checked
(connections of a pool before a ``dispose()`` count too; one checked out before the
watch, or in a thread, does not, and the check then misses what it never knew of).

It also keeps the tasks the deadlock check let through to wait for a connection of
the pool (:meth:`Checkouts.waiting`): until their checkout, or the end of their call.

What it costs: one listener call per checkout (the task's weak reference, a dict
entry) and one per checkin (a dict ``pop``), on an engine whose pool limiter exists;
nothing per statement. A connection checked out before the limiter existed, outside
a task (a thread) or by a task that has ended is counted as held by no one who waits:
the check only refuses what it knows.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, Pool
from typing_extensions import final

from ._compat import checkout_listeners

__all__ = ["Checkouts"]

T = TypeVar("T")


@final
class Checkouts:
    """The connections checked out of an engine's pool, by task; see the module docs."""

    __slots__ = ("_engine", "_held", "capacity", "connecting")

    def __init__(self, engine: Engine, capacity: int) -> None:
        self._engine = weakref.ref(engine)
        #: the most connections the pool can give (``pool_size + max_overflow``; the
        #: pool ``dispose()`` makes has the same)
        self.capacity = capacity
        self._held: dict[ConnectionPoolEntry, tuple[weakref.ref[asyncio.Task[Any]], Pool]] = {}
        #: the tasks let through to wait for a connection of the pool (ids, as task_id())
        self.connecting: set[int] = set()

    @classmethod
    def watch(cls, engine: Engine, capacity: int) -> Checkouts:
        """Start watching ``engine``'s pool (and the pools ``dispose()`` makes after it),
        which can give ``capacity`` connections at most.

        One watch per pool: an engine made again over a watched pool (a passing
        ``engine.execution_options(...)``, collected with its limiter, then another one)
        takes over the watch already there instead of adding listeners for good."""
        for listener in checkout_listeners(engine.pool):
            watching = getattr(listener, "__self__", None)
            if (
                isinstance(watching, cls)
                and watching.capacity == capacity
                and watching._engine() is None  # the engine it was made for is gone
            ):
                watching._engine = weakref.ref(engine)
                return watching
        checkouts = cls(engine, capacity)
        event.listen(engine, "checkout", checkouts._out)
        event.listen(engine, "checkin", checkouts._in)
        event.listen(engine, "detach", checkouts._in)
        return checkouts

    def _out(self, dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        engine = self._engine()
        try:
            task = asyncio.current_task()
        except RuntimeError:  # a thread with no running loop: no task of ours
            task = None
        if engine is None or task is None:
            self._held.pop(record, None)
            return
        self._held[record] = (weakref.ref(task), engine.pool)
        if self.connecting:
            self.connecting.discard(id(task))  # its wait is over

    def _in(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        self._held.pop(record, None)

    def held_by(self, pool: Pool, tasks: set[int]) -> int:
        """How many of ``pool``'s connections are checked out by the (live) ``tasks``."""
        while True:  # a copy: a collected connection's checkin may run meanwhile (the
            try:  # garbage collector, another thread) and change the dict's size
                entries = tuple(self._held.values())
                break
            except RuntimeError:  # pragma: no cover - that rare moment: read it again
                continue
        count = 0
        for ref, source in entries:
            if source is pool:
                task = ref()
                if task is not None and id(task) in tasks:
                    count += 1
        return count

    async def waiting(self, task: int, call: Awaitable[T]) -> T:
        """Await ``call``, a statement of ``task`` that will wait for a connection of the
        pool, with ``task`` in :attr:`connecting` until its checkout or the call's end."""
        self.connecting.add(task)
        try:
            return await call
        finally:
            self.connecting.discard(task)

    def __repr__(self) -> str:
        return f"Checkouts(held={len(self._held)}, connecting={len(self.connecting)})"
