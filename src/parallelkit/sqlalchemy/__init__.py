"""parallelkit.sqlalchemy: eager loading, query-count guards and parallel sessions.

An optional integration (``pip install parallelkit[sqlalchemy]``); the package
root never imports it. SQLAlchemy 2.x, sync and asyncio.

* :func:`eager` - loader options that load exactly the relationships you name,
  picking ``joinedload`` or ``selectinload`` per relationship, and raise
  :class:`NotLoadedError` (naming the path to add) on everything else;
  :func:`eager_get` - one row by primary key with its graph in one statement,
  also when the row is already in the session.
* :func:`count_queries` / :func:`max_queries` - count the statements one
  request (this context) sends; fail with :class:`TooManyQueries` (N+1 suspects
  marked) over a budget. :class:`RequestGuard` does it for every request of an
  ASGI app. The pytest plugin adds the ``query_counter`` and ``max_queries``
  fixtures.
* :func:`parallel` - run functions concurrently, each in its own ``AsyncSession``.
  :func:`pool_limiter` - the engine's process-wide bound for database work;
  :class:`LimitedAsyncSession` holds a slot of it only while it holds a
  connection.
* :func:`guard_sessions` (opt-in; on during tests through the pytest plugin) and
  :class:`GuardedAsyncSession` - sharing one session between tasks at once
  raises a clear :class:`SessionInUseError` that points at :func:`parallel`.
* :func:`loader_by_id` - a :class:`parallelkit.BatchLoader` that loads rows by
  primary key with one ``IN`` query per batch.

Importing this package changes no global state of SQLAlchemy: no event
listener, no loader strategy (see ``_compat`` for the one registration
:func:`eager` makes on first use).

SQLAlchemy's asyncio extension (``AsyncSession``, ``AsyncEngine``) runs on
asyncio only; the sync helpers (:func:`eager`, :func:`count_queries`,
:func:`max_queries`) need no event loop at all.
"""

from __future__ import annotations

from .._core.public import export
from . import _require as _require  # first: a clear ImportError without SQLAlchemy
from ._asgi import RequestGuard as RequestGuard
from ._eager import EagerPath as EagerPath
from ._eager import NotLoadedError as NotLoadedError
from ._eager import Strategy as Strategy
from ._eager import eager as eager
from ._get import eager_get as eager_get
from ._loader import loader_by_id as loader_by_id
from ._peers import RelationshipPathError as RelationshipPathError
from ._peers import fetch_peers as fetch_peers
from ._peers import load as load
from ._pool import pool_limiter as pool_limiter
from ._pool_session import LimitedAsyncSession as LimitedAsyncSession
from ._pool_slots import PoolLimiter as PoolLimiter
from ._queries import CapturedQuery as CapturedQuery
from ._queries import QueryCounter as QueryCounter
from ._queries import TooManyQueries as TooManyQueries
from ._queries import count_queries as count_queries
from ._queries import max_queries as max_queries
from ._sessions import GuardedAsyncSession as GuardedAsyncSession
from ._sessions import SessionInUseError as SessionInUseError
from ._sessions import default_limit as default_limit
from ._sessions import guard_sessions as guard_sessions
from ._sessions import parallel as parallel

__all__ = [
    "CapturedQuery",
    "EagerPath",
    "GuardedAsyncSession",
    "LimitedAsyncSession",
    "NotLoadedError",
    "PoolLimiter",
    "QueryCounter",
    "RelationshipPathError",
    "RequestGuard",
    "SessionInUseError",
    "Strategy",
    "TooManyQueries",
    "count_queries",
    "default_limit",
    "eager",
    "eager_get",
    "fetch_peers",
    "guard_sessions",
    "load",
    "loader_by_id",
    "max_queries",
    "parallel",
    "pool_limiter",
]


export(globals())
