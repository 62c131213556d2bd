"""PoolLimiter: the slots of one engine, re-entrant per task, lent and borrowed.

:func:`~parallelkit.sqlalchemy.pool_limiter` (:mod:`parallelkit.sqlalchemy._pool`)
returns the one :class:`PoolLimiter` of an engine;
:class:`~parallelkit.sqlalchemy.LimitedAsyncSession`
(:mod:`parallelkit.sqlalchemy._pool_session`) takes its slots.

Slots are re-entrant per task: a task that already holds one (a second session
in the same task, or ``pk.map(..., limit=pool_limiter(engine))`` around an item
that opens a limited session) does not wait for a second, so nesting cannot
deadlock the limiter (the pool still bounds the real connections). A task
that holds a slot and waits for a fan-out on this limiter
(:func:`~parallelkit.sqlalchemy.parallel`, or ``pk.gather`` / ``pk.map`` /
``pk.imap`` / ``Flow.run`` with ``limit=pool_limiter(engine)``) lends it to its
workers, one at a time (:class:`LentSlot`, :meth:`PoolLimiter.for_fanout`): its
workers never wait for slots that their waiting callers hold. Likewise a cache load
that callers holding every slot wait for (an ``SWRCache`` miss, loaded in another
task) runs on one of their slots (:meth:`PoolLimiter._borrow`,
:mod:`parallelkit._core.waits`).
"""

from __future__ import annotations

import sys
from inspect import CO_ASYNC_GENERATOR
from types import FrameType, TracebackType

import anyio
from typing_extensions import final

from .._core.backend import task_id
from .._core.limiter import Limiter, LimiterStatistics
from .._core.waits import BLOCKED, WAKE, WORKERS
from ._pool_checkouts import Checkouts

__all__ = ["LentSlot", "PoolLimiter"]


@final
class PoolLimiter:
    """The process-wide limiter of one engine: at most ``concurrency`` slots held at once.

    Get it with :func:`pool_limiter`. It is a ``limit=`` for
    :func:`parallelkit.map` / :func:`~parallelkit.gather` (then an item holds a
    slot for its whole run: right for items that only talk to the database) and
    what :class:`LimitedAsyncSession` and :func:`parallel` acquire. A task holding
    a slot may acquire again without waiting (re-entrant per task). An
    ``async with`` block in an async generator (a streaming body, a yield
    dependency) gives back the slot of the task that entered it, also when
    another task closes the generator (asyncio's finalizer after an
    ``async for ... break``). Work running on a waiting task's slot (a fan-out's
    item, a cache load) keeps it if that task leaves first. A task you start
    yourself gets no slot lent: it takes one of its own.
    """

    __slots__ = ("_borrowed", "_checkouts", "_generators", "_held", "_lending", "_limiter")

    def __init__(self, concurrency: int | None) -> None:
        self._limiter = Limiter(concurrency=concurrency)
        # who holds the pool's connections (pool_limiter() sets it for a bounded QueuePool)
        self._checkouts: Checkouts | None = None
        self._held: dict[int, int] = {}  # task id -> depth
        # task id -> the slot it runs on (lent by a fan-out's caller, or a blocked task's)
        self._borrowed: dict[int, LentSlot | _OnLender] = {}
        # a task whose slot blocked-on work runs on -> the tasks running on it
        self._lending: dict[int, list[int]] = {}
        # an async generator's frame -> the tasks that entered ``async with`` there
        self._generators: dict[FrameType, list[int]] = {}

    @property
    def concurrency(self) -> int | None:
        """How many slots: the pool size (``None``: no bound, for ``NullPool``)."""
        return self._limiter.concurrency

    def statistics(self) -> LimiterStatistics:
        """Slots held right now (``running``) and tasks waiting for one."""
        return self._limiter.statistics()

    async def acquire(self) -> int:
        """Take a slot for the current task (at once if it holds one); returns the holder."""
        task = task_id()
        if self._reenter(task) is None:
            if WORKERS and task in WORKERS:
                await self._take_for_work(task)
            else:
                await self._limiter.acquire_slot()  # no rate: the slot only
                self._held[task] = 1
        return task

    async def _take_for_work(self, task: int) -> None:
        """A slot for a task that others may come to wait for (a cache load): a free
        slot, else the slot of a task blocked on its work (:meth:`_borrow`); a task that
        comes to wait for it meanwhile interrupts its wait for a free one."""
        while not self._borrow(task):
            got = False
            with anyio.CancelScope() as scope:
                WAKE[task] = scope.cancel
                try:
                    await self._limiter.acquire_slot()
                    got = True
                finally:
                    del WAKE[task]
            if got:
                self._held[task] = 1
                return

    def _borrow(self, task: int) -> bool:
        """Run ``task`` on the slot of a task blocked on its work, if one holds a slot and
        none is free: a cache load that callers holding every slot wait for
        (:mod:`parallelkit._core.waits`). They do no database work meanwhile."""
        limit = self._limiter.concurrency
        if limit is None:
            return False
        stats = self._limiter.statistics()
        if stats.running < limit and not stats.waiting:
            return False  # a slot is free at once: take it
        for lender in BLOCKED.get(task, ()):
            if lender in self._held:
                self._lend(_OnLender(self), lender, task)
                return True
        return False

    def reenter(self) -> int | None:
        """Take a slot without waiting if the current task holds one (re-entrant): the
        holder, as :meth:`acquire` returns it; ``None`` if the task holds none."""
        return self._reenter(task_id())

    def _reenter(self, task: int) -> int | None:
        depth = self._held.get(task)
        if not depth:
            return None
        self._held[task] = depth + 1
        return task

    def release(self, holder: int) -> None:
        """Give back a slot taken by :meth:`acquire` (``holder`` is what it returned)."""
        depth = self._held.pop(holder) - 1
        if depth:
            self._held[holder] = depth
        elif self._lending and holder in self._lending:
            self._bequeath(holder)
        elif self._borrowed and holder in self._borrowed:
            self._borrowed.pop(holder).give_back()
        else:
            self._limiter.release()

    def _lend(self, on: LentSlot | _OnLender, lender: int, borrower: int) -> None:
        """``borrower`` now runs on ``lender``'s slot, through ``on``."""
        self._held[borrower] = 1
        self._borrowed[borrower] = on
        on._lender, on._borrower = lender, borrower
        self._lending.setdefault(lender, []).append(borrower)

    def _unlend(self, on: LentSlot | _OnLender) -> None:
        """``on``'s borrower is done with its lender's slot."""
        borrowers = self._lending[on._lender]
        borrowers.remove(on._borrower)
        if not borrowers:
            del self._lending[on._lender]

    def _bequeath(self, lender: int) -> None:
        """``lender`` is done with its slot (it was cancelled) while work it waited for
        still runs on it (a cache load; a fan-out's worker is done before its caller):
        that work keeps the slot, as if it had taken it, so the engine's bound holds
        until it ends; the others running on it now run on the heir's."""
        borrowers = self._lending.pop(lender)
        heir = borrowers.pop(0)
        on = self._borrowed.pop(heir)  # a slot of the heir's own now ...
        if isinstance(on, LentSlot):  # its fan-out's caller gave up its slot mid-fan-out
            on._orphan()
        source = self._borrowed.pop(lender, None)
        if source is not None:  # ... unless the lender's was lent or borrowed itself
            self._borrowed[heir] = source
            source._borrower = heir
            siblings = self._lending[source._lender]
            siblings[siblings.index(lender)] = heir
        if borrowers:
            self._lending.setdefault(heir, []).extend(borrowers)
            for borrower in borrowers:
                self._borrowed[borrower]._lender = heir

    def for_fanout(self) -> PoolLimiter | LentSlot:
        """The limit for a fan-out from the current task that waits for its workers.

        ``gather``, ``map``, ``imap``, ``Flow.run`` and :func:`parallel` call it
        when they are given this limiter (``limit=pool_limiter(engine)``).

        A task holding a slot (a :class:`LimitedAsyncSession` in a transaction)
        that fans out and waits would deadlock with every slot held that way: its
        workers wait for slots, the holders wait for their workers. Itself blocked,
        it lends its slot to its workers, one at a time (:class:`LentSlot`); a task
        holding no slot gets this limiter itself.
        """
        if self.concurrency is None or task_id() not in self._held:
            return self
        return LentSlot(self)

    async def __aenter__(self) -> PoolLimiter:
        # acquire()'s body: no frame of its own resumed when the slot is handed over
        task = task_id()
        if self._reenter(task) is None:
            if WORKERS and task in WORKERS:
                await self._take_for_work(task)
            else:
                await self._limiter.acquire_slot()
                self._held[task] = 1
        caller = sys._getframe(1)
        if caller.f_code.co_flags & CO_ASYNC_GENERATOR:
            # another task may close the generator (asyncio's finalizer after an
            # ``async for ... break``, a server after its client left): the block's
            # end then gives back the slot of the task that entered it
            self._generators.setdefault(caller, []).append(task)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        holder = task_id()
        if self._generators:  # a block in an async generator is open
            caller = sys._getframe(1)
            entered = self._generators.get(caller)
            if entered:
                holder = entered.pop()
                if not entered:
                    del self._generators[caller]
        self.release(holder)

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"PoolLimiter(concurrency={self.concurrency!r}, running={stats.running}, "
            f"waiting={stats.waiting})"
        )


@final
class LentSlot:
    """A fan-out's limit when its caller holds a slot of ``slots`` and waits for it.

    One worker at a time runs on the caller's slot (the caller does no database
    work meanwhile), re-entrant for that worker like a slot of its own; the
    others take a slot of ``slots`` when one is free at once, and otherwise wait
    for the lent one, never in the engine's queue: its slots may all be held by
    callers waiting for their own workers. So the fan-out always makes progress.
    The caller's connection stays checked out meanwhile: one more than the pool
    size per waiting caller at most, which the pool's overflow absorbs.
    """

    __slots__ = ("_borrower", "_lender", "_lent", "_orphaned", "_slots")

    def __init__(self, slots: PoolLimiter) -> None:
        self._slots = slots
        self._lent = Limiter(concurrency=1)  # the caller's slot: first come, first served
        self._lender = task_id()  # the caller, made in its task (PoolLimiter.for_fanout)
        self._borrower = 0  # the worker on the lent slot now
        self._orphaned = False  # the caller's slot went to a worker: no slot to lend

    @property
    def concurrency(self) -> int | None:
        """The workers worth starting: the engine's slots."""
        return self._slots.concurrency

    def give_back(self) -> None:
        """The worker running on the lent slot is done with it: the next waiter's turn."""
        self._slots._unlend(self)
        self._lent.release()

    def _orphan(self) -> None:
        """The caller gave up its slot while a worker ran on it (a worker ended the
        caller's transaction): that worker keeps it, the others take the engine's."""
        self._orphaned = True
        self._lent.release()

    async def __aenter__(self) -> LentSlot:
        slots, task = self._slots, task_id()
        if task in slots._held:  # re-entrant: this worker holds a slot already
            await slots.acquire()
            return self
        lent, engine, limit = self._lent.statistics(), slots.statistics(), slots.concurrency
        if (lent.running or lent.waiting) and (
            limit is None or (engine.running < limit and not engine.waiting)
        ):
            await slots.acquire()  # the lent slot is taken, an engine slot free at once
            return self
        await self._lent.acquire()  # never in the engine's queue (see the class docs)
        if self._orphaned:  # no slot behind it any more: as a caller holding none
            self._lent.release()
            await slots.acquire()
            return self
        slots._lend(self, self._lender, task)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._slots.release(task_id())

    def __repr__(self) -> str:
        return f"LentSlot(lent={self._lent!r}, of={self._slots!r})"


@final
class _OnLender:
    """A slot borrowed from a task blocked on the borrower's work (:meth:`PoolLimiter._borrow`):
    the lender keeps it; nothing to give back when the borrower is done. (A lender done
    first leaves it to the borrower: :meth:`PoolLimiter._bequeath`.)"""

    __slots__ = ("_borrower", "_lender", "_slots")

    def __init__(self, slots: PoolLimiter) -> None:
        self._slots = slots
        self._lender = self._borrower = 0  # set by PoolLimiter._lend

    def give_back(self) -> None:
        self._slots._unlend(self)
