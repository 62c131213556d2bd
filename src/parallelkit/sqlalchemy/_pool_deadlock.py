"""Fan-outs that can only deadlock on the pool, refused at once instead of timing out.

A task holding a connection (a :class:`~parallelkit.sqlalchemy.LimitedAsyncSession`
in a transaction) that fans out and waits keeps that connection until its functions
end. When the connections such waiting tasks hold are every connection the pool can
give (``pool_size + max_overflow``), a function's session waits in the pool for a
connection that can only come back after it ends: SQLAlchemy's ``TimeoutError``
after ``pool_timeout`` (30 s by default), in every request of that shape.

Who waits for whom is known for a task's chain of lent slots
(:class:`~parallelkit.sqlalchemy._pool_slots.LentSlot`): a worker runs on its
caller's slot while the caller waits for it. So the checks count the connections of
the current task and of the callers it runs for, and raise the same
``sqlalchemy.exc.TimeoutError`` the wait would end in, at once, with the fix in its
message:

* :func:`refuse_fanout`, when :func:`~parallelkit.sqlalchemy.parallel` is called;
* :func:`refused_checkout`, when a session of a fan-out's worker running on a lent
  slot starts its first statement (``pk.gather`` / ``pk.map`` / ``Flow.run`` with
  ``limit=pool_limiter(engine)``).

Both cost a dict lookup when the task holds no slot (or runs on no lent slot); the
connection count (a scan of the live sessions, :func:`connections_held`) runs only
when the pool has no connection left.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .._core.backend import task_id
from ._compat import connections_held, pool_capacity
from ._pool_slots import PoolLimiter

__all__ = ["refuse_fanout", "refused_checkout"]

_FIX = (
    "Commit (or roll back) before fanning out, or give the pool overflow: max_overflow "
    ">= 1 per request that fans out from inside a transaction (per level of nesting)."
)


def _waiting(slots: PoolLimiter, task: int) -> set[int]:
    """``task`` and the callers waiting for it: the lenders of the slots it runs on."""
    blocked = {task}
    on = slots._borrowed.get(task)
    while on is not None and on._lender not in blocked:
        blocked.add(on._lender)
        on = slots._borrowed.get(on._lender)
    return blocked


def _stuck(engine: Engine, slots: PoolLimiter, task: int) -> str | None:
    """Why a new connection for ``task`` can never come, or ``None`` if it may."""
    pool = engine.pool
    capacity = pool_capacity(pool)
    if capacity is None or pool.checkedout() < capacity:  # type: ignore[attr-defined]
        return None
    blocked = _waiting(slots, task)

    def waiting(session: AsyncSession) -> bool:
        return getattr(session, "_pk_holder", None) in blocked

    held = connections_held(pool, waiting)
    if held < capacity:
        return None
    whose = (
        "this task's sessions hold"
        if len(blocked) == 1
        else "the sessions of this task and of the callers waiting for it hold"
    )
    return (
        f"{whose} {held} connection(s), all the pool can give (pool_size + max_overflow "
        f"= {capacity}), and they are given back only once the new session is done with "
        "one more (the pool's TimeoutError after pool_timeout). "
    )


def refuse_fanout(
    engine: Engine, slots: PoolLimiter, session_factory: object, limit: object
) -> None:
    """Raise ``sqlalchemy.exc.TimeoutError`` if ``parallel(session_factory, ...,
    limit=limit)`` from the current task can only deadlock:

    * the connections of this task's :class:`LimitedAsyncSession` transactions (and of
      the callers waiting for it: a function of an outer ``parallel``) are every
      connection the pool can give: a function's session would wait ``pool_timeout``;
    * it holds the limiter's only slot and the functions' ``LimitedAsyncSession``
      objects take slots of their own (a ``limit`` that does not lend): forever.

    ``slots`` is ``engine``'s :func:`pool_limiter`.
    """
    held = slots._held
    if not held:  # no task holds a slot
        return
    task = task_id()
    if task not in held:
        return
    why = _stuck(engine, slots, task)
    if why is not None:
        msg = f"parallel() would deadlock: {why}{_FIX}"
        raise sa_exc.TimeoutError(msg)
    lends = limit is None or limit is slots
    made = getattr(session_factory, "class_", None)
    if (
        not lends
        and slots.concurrency == 1
        and isinstance(session_factory, async_sessionmaker)
        and isinstance(made, type)
        and hasattr(made, "_pk_take")  # a LimitedAsyncSession
    ):
        msg = (
            "parallel() would deadlock: this task holds the only slot of the engine's "
            "pool_limiter (a LimitedAsyncSession in a transaction) and its functions' "
            f"LimitedAsyncSessions would each wait for a slot of their own (limit={limit!r} "
            "does not lend the caller's slot). Commit (or roll back) before parallel(), "
            "or leave out limit= (or pass limit=pool_limiter(engine)): the caller's slot "
            "is then lent to the functions."
        )
        raise sa_exc.TimeoutError(msg)


def refused_checkout(engine: Engine, slots: PoolLimiter, task: int) -> sa_exc.TimeoutError | None:
    """The error for a session of ``task``, a worker on a lent slot, about to take a
    connection that can never come (``None``: it may come)."""
    why = _stuck(engine, slots, task)
    if why is None:
        return None
    msg = f"A session of a fan-out's worker would deadlock waiting for a connection: {why}{_FIX}"
    return sa_exc.TimeoutError(msg)
