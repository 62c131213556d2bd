"""LimitedAsyncSession: an AsyncSession holding a slot of its engine's limiter while it
holds a connection.

It takes a slot of :func:`~parallelkit.sqlalchemy.pool_limiter` (see
:mod:`parallelkit.sqlalchemy._pool`) from its first statement (or flush) to the
end of the transaction (``commit``, ``rollback``, ``close``): every method that
talks to the database goes through :func:`_limited` (``wrap_methods``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from .._core.backend import task_id
from ._methods import RELEASING, wrap_methods
from ._pool import pool_limiter
from ._pool_checkouts import Checkouts
from ._pool_deadlock import refused_checkout
from ._pool_slots import PoolLimiter

__all__ = ["LimitedAsyncSession"]


class LimitedAsyncSession(AsyncSession):
    """An ``AsyncSession`` that holds a slot of its engine's :func:`pool_limiter` while it
    holds a connection.

    Use it as the factory's ``class_`` and every session of the process shares
    one bound, the pool size, taken from the first statement (or flush) of a
    transaction to its end (``commit``, ``rollback``, ``close``)::

        sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)

    So fan-out over many items, from many requests at once, waits in the
    limiter (no pool timeout, first come first served) and only while an item
    really talks to the database: its other awaits hold no slot. A session
    bound to several engines (``binds=``) is not limited.

    Limits: the slot follows the session's own methods; a transaction ended by
    ``async with session.begin():`` keeps its slot until the session's next
    call or ``close()``, and so does a call made in a task that already holds a
    slot (``async with pool_limiter(engine):`` around the session: the call
    takes it re-entrantly, without waiting) that began no transaction. A
    session holds one slot whichever task calls it (calls of several tasks at
    once wait for one). A session that is never closed gives its slot back when
    it is garbage-collected (even after its event loop closed), as SQLAlchemy
    does with its connection. A second session of a task in a transaction
    (re-entrant) and a lent slot take a connection beyond the slots: from the
    pool's overflow. When the tasks waiting for a fan-out already hold every
    connection the pool can give (``max_overflow=0``), the fan-out cannot run:
    :func:`~parallelkit.sqlalchemy.parallel` raises ``sqlalchemy.exc.TimeoutError``
    at the call, and a session of a worker on a lent slot at its first statement,
    instead of after the pool's ``pool_timeout``. So does a second session of a task
    that holds a connection (its first session, or a connection it took itself) at
    its first statement, when that task and the tasks that can only wait hold every
    connection. So does the fan-out (or second session) that would close the circle
    when several requests, each holding connections, wait for connections: that one
    request fails, the others go on once its transaction ends.
    """

    # no __slots__: it composes with GuardedAsyncSession (two slotted bases cannot)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pk_holder: int | None = None
        self._pk_slots: PoolLimiter | None = None
        self._pk_loop: asyncio.AbstractEventLoop | None = None
        self._pk_taking = False  # a call is waiting for the session's slot
        self._pk_taken: asyncio.Future[None] | None = None  # what other calls wait on then

    def _pk_limiter(self) -> PoolLimiter | None:
        """The engine's limiter (``None``: no single engine bound, not limited)."""
        slots = self._pk_slots
        if slots is None and self.bind is not None:
            slots = self._pk_slots = pool_limiter(self.bind)
        return slots

    async def _pk_take(self) -> None:
        # one slot per session, whichever task's call takes it: a call made while
        # another task's call waits for it (gather over one session, the classic
        # mistake) waits for that slot, not for a second one that the session would
        # then hold until closed (a deadlock when that was the last slot)
        while self._pk_holder is None:
            if self._pk_taking:
                taken = self._pk_taken
                if taken is None:
                    taken = self._pk_taken = asyncio.get_running_loop().create_future()
                await asyncio.shield(taken)  # set however the wait for the slot ends
                continue
            slots = self._pk_limiter()
            if slots is None:
                return
            self._pk_taking = True
            try:
                holder = await slots.acquire()
            finally:
                self._pk_taking = False
                taken, self._pk_taken = self._pk_taken, None
                if taken is not None:
                    taken.set_result(None)
            self._pk_keep(slots, holder)

    def _pk_keep(self, slots: PoolLimiter, holder: int) -> None:
        if self._pk_holder is None:
            self._pk_holder, self._pk_loop = holder, asyncio.get_running_loop()
        else:  # a call in a slot-holding task gave the session its slot meanwhile
            slots.release(holder)

    def __del__(self) -> None:
        # never closed in a transaction: the pool takes its connection back when the
        # garbage collector finds it; give the slot back too (on the loop: the
        # collector may run in any thread), or every later session would wait forever
        state = self.__dict__
        holder, slots, loop = state.get("_pk_holder"), state.get("_pk_slots"), state.get("_pk_loop")
        if holder is not None and slots is not None and loop is not None:
            try:
                loop.call_soon_threadsafe(slots.release, holder)
            except RuntimeError:  # its loop is closed; the engine may serve another
                _release_later(slots, holder)

    def _pk_give(self, *, always: bool = False) -> None:
        holder = self._pk_holder
        if (
            holder is not None
            and self._pk_slots is not None
            and (always or not self.in_transaction())
        ):
            self._pk_holder = None
            self._pk_slots.release(holder)


def _release_later(slots: PoolLimiter, holder: int) -> None:
    """Give back the slot of a session collected after its loop closed: on the loop
    running in this thread, if any (never in the middle of the limiter's own code,
    which the collector may have interrupted), else at once (no loop: nothing runs)."""
    try:
        asyncio.get_running_loop().call_soon(slots.release, holder)
    except RuntimeError:
        slots.release(holder)


# the calls that may end the session's transaction (or give its connection back)
_ENDING = RELEASING | {"commit", "rollback", "run_sync"}


def _limited(
    self: LimitedAsyncSession,
    name: str,
    call: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Awaitable[Any]:
    if name not in _ENDING:  # a call that cannot end the transaction
        if self._pk_holder is not None:
            if self.in_transaction():
                # the slot is held: nothing to take, nothing to give back; the
                # method's own coroutine, no frame of ours resumed at its awaits
                return call(*args, **kwargs)
        else:
            slots = self._pk_limiter()
            if slots is None:  # not limited
                return call(*args, **kwargs)
            try:
                holder = slots.reenter()
            except RuntimeError:  # called outside a running loop, to be awaited on one
                return _taking(self, name, call, args, kwargs)
            if holder is not None:  # the task holds a slot (``async with slots``)
                lent = holder in slots._borrowed if slots._borrowed else False
                checkouts = slots._checkouts
                # given back at commit, rollback or close
                self._pk_holder, self._pk_loop = holder, asyncio.get_running_loop()
                # a lent one, or the pool may be out of connections (a second session
                # of a task holding one would wait for itself)
                if lent or (checkouts is not None and len(checkouts._held) >= checkouts.capacity):
                    return _checked(self, name, slots, holder, lent, call, args, kwargs)
                return call(*args, **kwargs)
    return _taking(self, name, call, args, kwargs)


# the calls that surely take a connection (``get``: unless the identity map has the row)
_CHECKOUT = frozenset(("connection", "execute", "refresh", "scalar", "scalars", "stream"))
_CHECKOUT |= {"stream_scalars", "get", "get_one"}


def _refused(
    self: LimitedAsyncSession, name: str, slots: PoolLimiter, holder: int, *, lent: bool
) -> sa_exc.TimeoutError | Checkouts | None:
    """For this session's first statement in a fan-out's worker (on a lent slot), or in a
    task holding a connection already (a second session: ``holder`` waits for it): the
    error when the connection it needs can never come, the pool's :class:`Checkouts` to
    wait through when it must wait for one, ``None`` when one is free
    (:func:`._pool_deadlock.refused_checkout`)."""
    bind = self.bind
    if name not in _CHECKOUT or not isinstance(bind, AsyncEngine):  # maybe no checkout
        return None
    if name.startswith("get") and len(self.identity_map):
        return None  # the object may be there: no statement
    return refused_checkout(bind.sync_engine, slots, holder, lent=lent)


async def _checked(
    self: LimitedAsyncSession,
    name: str,
    slots: PoolLimiter,
    holder: int,
    lent: bool,
    call: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """The first statement of a session on ``holder``'s slot, checked (:func:`_refused`)
    when awaited, and only when awaited by ``holder`` itself: then ``holder`` surely
    waits for it. Awaited in another task (``asyncio.gather`` wraps each coroutine in a
    task; so does ``asyncio.wait_for`` before Python 3.12), ``holder`` may meanwhile give
    its connections back (a sibling commits its first session): it waits as usual."""
    if task_id() == holder:
        verdict = _refused(self, name, slots, holder, lent=lent)
        if isinstance(verdict, BaseException):
            if self._pk_holder == holder:  # not given back meanwhile (a close)
                self._pk_holder = None
                slots.release(holder)
            raise verdict
        if verdict is not None:  # it waits for a connection: others count it
            return await verdict.waiting(holder, call(*args, **kwargs))
    return await call(*args, **kwargs)


async def _taking(
    self: LimitedAsyncSession,
    name: str,
    call: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """A call that may need a slot first, or may end the transaction (give it back)."""
    if name in RELEASING:
        try:
            return await call(*args, **kwargs)
        finally:
            self._pk_give(always=True)
    first = self._pk_holder is None  # this call takes the session's slot
    await self._pk_take()
    try:
        slots = self._pk_slots
        checkouts = None if slots is None else slots._checkouts
        if (
            first
            and slots is not None
            and checkouts is not None
            and len(checkouts._held) >= checkouts.capacity  # the pool may be out of them
        ):
            # the task may hold a connection taken without a slot (a plain session or
            # connection of its own): this one would wait for it
            task = task_id()
            verdict = _refused(self, name, slots, task, lent=False)
            if isinstance(verdict, BaseException):
                raise verdict
            if verdict is not None:  # it waits for a connection: others count it
                return await verdict.waiting(task, call(*args, **kwargs))
        return await call(*args, **kwargs)
    finally:
        self._pk_give()


wrap_methods(LimitedAsyncSession, _limited)
