"""pool_limiter(): one process-wide bound per engine, sized from its pool.

The bound that matters for database fan-out is the engine's connection pool,
and it is shared by every request of the process. A per-call ``limit=`` bounds
one request only: 64 requests x 10 workers still queue 640 tasks at a pool of
10 connections (inside SQLAlchemy, with its 30 s pool timeout). So the bound
lives with the engine:

* :func:`pool_limiter` returns **the** limiter of an engine (the same object for
  every call in the process), sized to its pool;
* :class:`LimitedAsyncSession` takes a slot of it only while it holds a
  connection: from its first statement (or flush) to the end of the transaction
  (``commit``, ``rollback``, ``close``). An item's other awaits (an HTTP call
  before or after its session) hold no slot;
* :func:`~parallelkit.sqlalchemy.parallel` uses it when no ``limit`` is given.

This module finds an engine's limiter; the limiter's slots (re-entrant per task,
lent to a fan-out, borrowed by a cache load) are in
:mod:`parallelkit.sqlalchemy._pool_slots`, the session in
:mod:`parallelkit.sqlalchemy._pool_session`.
"""

from __future__ import annotations

import weakref

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from sqlalchemy.pool import NullPool, QueuePool

from ._compat import pool_capacity
from ._pool_checkouts import Checkouts
from ._pool_slots import LentSlot as LentSlot
from ._pool_slots import PoolLimiter as PoolLimiter

__all__ = ["LentSlot", "PoolLimiter", "engine_of", "pool_limiter"]


_limiters: weakref.WeakKeyDictionary[Engine, PoolLimiter] = weakref.WeakKeyDictionary()


def engine_of(target: object) -> Engine | None:
    """The sync ``Engine`` behind an engine, connection, session or session factory
    (a ``scoped_session`` / ``async_scoped_session`` too: its ``session_factory``)."""
    if isinstance(target, Engine):
        return target
    if isinstance(target, AsyncEngine):
        return target.sync_engine
    if isinstance(target, (Connection, AsyncConnection)):
        return engine_of(target.engine)
    if isinstance(target, (async_sessionmaker, sessionmaker)):
        return engine_of(target.kw.get("bind"))
    if isinstance(target, (AsyncSession, Session)):
        return engine_of(target.bind)
    if isinstance(target, (async_scoped_session, scoped_session)):
        return engine_of(target.session_factory)  # the factory its sessions come from
    return None


def _size(engine: Engine) -> int | None:
    pool = engine.pool
    if isinstance(pool, QueuePool):
        return max(pool.size(), 1)
    if isinstance(pool, NullPool):
        return None
    return 1  # StaticPool, SingletonThreadPool, AssertionPool: one connection


def pool_limiter(target: object, /) -> PoolLimiter:
    """The process-wide limiter for database work on ``target``'s engine.

    One call, one object per engine for the whole process: every request, every
    ``parallel`` call and every :class:`LimitedAsyncSession` on that engine
    shares it, so together they never ask the pool for more connections than it
    keeps. Its size is the pool's: ``pool_size`` for a ``QueuePool`` (5 by
    default; overflow connections are left as the pool's own burst buffer), 1
    for a single-connection pool (``StaticPool``), no bound for ``NullPool``.

    Args:
        target: an ``AsyncEngine`` / ``Engine``, a connection, a session, a
            session factory or a scoped session bound to one engine.

    Returns:
        The engine's :class:`PoolLimiter`.

    Raises:
        TypeError: no single engine can be found behind ``target``.

    Example:
        ```python
        sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)
        slots = pool_limiter(engine)      # what those sessions share
        ```
    """
    engine = engine_of(target)
    if engine is None:
        msg = (
            "pool_limiter() needs an engine, connection, session or session factory bound "
            f"to one engine, got {type(target).__name__} {target!r}"
        )
        raise TypeError(msg)
    limiter = _limiters.get(engine)
    if limiter is None:
        limiter = _sharing(engine)
        if limiter is None:
            limiter = PoolLimiter(_size(engine))
            capacity = pool_capacity(engine.pool)
            if capacity is not None:  # what the deadlock check reads
                limiter._checkouts = Checkouts.watch(engine, capacity)
        limiter = _limiters.setdefault(engine, limiter)
    return limiter


def _sharing(engine: Engine) -> PoolLimiter | None:
    """The limiter of an engine with the same pool: ``engine.execution_options(...)``
    is another ``Engine`` object over its parent's pool (now and after a ``dispose()``),
    so it gets the parent's limiter, never a second bound over the same connections."""
    pool = engine.pool
    return next((lim for other, lim in list(_limiters.items()) if other.pool is pool), None)
