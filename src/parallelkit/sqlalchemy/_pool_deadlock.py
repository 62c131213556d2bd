"""Fan-outs that can only deadlock on the pool, refused at once instead of timing out.

A task holding a connection (a :class:`~parallelkit.sqlalchemy.LimitedAsyncSession`
in a transaction) that fans out and waits keeps that connection until its functions
end. When the connections such waiting tasks hold are every connection the pool can
give (``pool_size + max_overflow``), a function's session waits in the pool for a
connection that can only come back after it ends: SQLAlchemy's ``TimeoutError``
after ``pool_timeout`` (30 s by default), in every request of that shape.

Who waits for whom is known for a task's chain of lent slots
(:class:`~parallelkit.sqlalchemy._pool_slots.LentSlot`): a worker runs on its
caller's slot while the caller waits for it. And who waits for a connection is known
for the workers this check let through to the pool's queue
(:attr:`Checkouts.connecting <parallelkit.sqlalchemy._pool_checkouts.Checkouts>`):
each, with the callers waiting for it, can only wait. So the checks count the
connections held by the current task and the callers it runs for, and by every
such waiting worker and its callers (several requests, each waiting for its own
fan-out: a deadlock none of them sees alone). When they hold every connection the
pool can give, nobody holding one can give it back: the check raises the same
``sqlalchemy.exc.TimeoutError`` the wait would end in, at once, with the fix in its
message:

* :func:`refuse_fanout`, when :func:`~parallelkit.sqlalchemy.parallel` is called;
* :func:`refused_checkout`, when a session of a fan-out's worker running on a lent
  slot starts its first statement (``pk.gather`` / ``pk.map`` / ``Flow.run`` with
  ``limit=pool_limiter(engine)``), and when a second session of a task that holds a
  connection already (its first session in a transaction) starts its first: that
  task waits for it, so its connections count as held by a task that can only wait.

The one refused is the one whose wait would close the circle (the last to ask),
like a database's deadlock detector: its request's transaction ends with the
error, its connection goes to a worker already waiting, and the other requests go
on. A connection held by a task that does not wait for one (a statement running,
an API call inside a transaction) can come back: no refusal then.

Both cost a dict lookup when the task holds no slot (or runs on no lent slot; for
a second session, a ``len`` while the pool surely has a connection left, see
:mod:`parallelkit.sqlalchemy._pool_checkouts`); the connection count
(:meth:`~parallelkit.sqlalchemy._pool_checkouts.Checkouts.held_by`, over the pool's
checked-out connections) runs only when the pool has no connection left.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import async_sessionmaker

from .._core.backend import task_id
from ._compat import pool_capacity
from ._pool_checkouts import Checkouts
from ._pool_slots import PoolLimiter

__all__ = ["refuse_fanout", "refused_checkout"]

_FIX = (
    "Commit (or roll back) before fanning out, or give the pool overflow: max_overflow "
    ">= 1 per request that fans out from inside a transaction (per level of nesting)."
)


_FIX_SECOND = (
    "Run it in the task's first session (or commit that one before opening another), "
    "or give the pool overflow: max_overflow >= 1 per task that opens a second session "
    "inside a transaction."
)


def _waiting(slots: PoolLimiter, task: int, blocked: set[int]) -> None:
    """Add ``task`` and the callers waiting for it (the lenders of the slots it runs on)."""
    blocked.add(task)
    on = slots._borrowed.get(task)
    while on is not None and on._lender not in blocked:
        blocked.add(on._lender)
        on = slots._borrowed.get(on._lender)


def _stuck(engine: Engine, slots: PoolLimiter, task: int) -> tuple[bool, str | None]:
    """Whether the pool has no connection left for ``task``, and why none can ever come
    (``None``: a holder may still give one back)."""
    pool, checkouts = engine.pool, slots._checkouts
    capacity = pool_capacity(pool)
    if capacity is None or checkouts is None:
        return False, None
    if pool.checkedout() < capacity:  # type: ignore[attr-defined]
        return False, None
    own: set[int] = set()
    _waiting(slots, task, own)
    blocked = set(own)
    for other in tuple(checkouts.connecting):
        if other not in blocked:
            _waiting(slots, other, blocked)
    held = checkouts.held_by(pool, blocked)
    if held < capacity:
        return True, None
    whose = "this task holds" if len(own) == 1 else "this task and the callers waiting for it hold"
    mine = checkouts.held_by(pool, own)
    if mine == held:
        return True, (
            f"{whose} {held} connection(s), all the pool can give (pool_size + "
            f"max_overflow = {capacity}), and they are given back only once the new "
            "session is done with one more (the pool's TimeoutError after pool_timeout). "
        )
    waiters = len(checkouts.connecting - own)
    return True, (
        f"{whose} {mine} connection(s), and {waiters} other task(s) already waiting "
        "for a connection (the fan-out workers of other requests) and the callers waiting "
        f"for them hold the other {held - mine}: all the pool can give (pool_size + "
        f"max_overflow = {capacity}). Each holder waits for a connection that only "
        "another one can give back (the pool's TimeoutError after pool_timeout, for "
        "each); this one is refused, so that the others go on once its transaction ends. "
    )


def refuse_fanout(
    engine: Engine, slots: PoolLimiter, session_factory: object, limit: object
) -> None:
    """Raise ``sqlalchemy.exc.TimeoutError`` if ``parallel(session_factory, ...,
    limit=limit)`` from the current task can only deadlock:

    * the connections this task holds (and the callers waiting for it: a function of an
      outer ``parallel``), with those of the workers already waiting for a connection
      (other requests' fan-outs) and their callers, are every connection the pool can
      give: a function's session would wait ``pool_timeout``;
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
    _, why = _stuck(engine, slots, task)
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


def refused_checkout(
    engine: Engine, slots: PoolLimiter, task: int, *, lent: bool
) -> sa_exc.TimeoutError | Checkouts | None:
    """For a session of ``task`` about to take a connection, when ``task`` runs on a lent
    slot (``lent``: a fan-out's worker) or holds a connection already (a second session:
    looked at only when the pool has none left): the error if it can never come; else
    the pool's :class:`Checkouts` if it has to wait for one (the session awaits its
    statement through :meth:`Checkouts.waiting`: others then count it as waiting);
    ``None`` if one is free, or if ``task`` neither runs on a lent slot nor holds one."""
    if not lent:
        pool, checkouts = engine.pool, slots._checkouts
        capacity = pool_capacity(pool)
        if capacity is None or checkouts is None:
            return None
        if pool.checkedout() < capacity:  # type: ignore[attr-defined]
            return None
        if not checkouts.held_by(pool, {task}):  # its wait depends on no one's: no check
            return None
    exhausted, why = _stuck(engine, slots, task)
    if why is not None:
        if lent:
            msg = (
                "A session of a fan-out's worker would deadlock waiting for a connection: "
                f"{why}{_FIX}"
            )
        else:
            msg = (
                "A second session of a task holding a connection would deadlock waiting "
                f"for one: {why}{_FIX_SECOND}"
            )
        return sa_exc.TimeoutError(msg)
    return slots._checkouts if exhausted else None
