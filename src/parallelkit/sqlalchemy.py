"""parallelkit.sqlalchemy: eager loading, query-count guards and parallel sessions.

An optional integration (``pip install parallelkit[sqlalchemy]``); the package
root never imports it. SQLAlchemy 2.x, sync and asyncio.

* :func:`eager` - loader options that load exactly the relationships you name,
  picking ``joinedload`` or ``selectinload`` per relationship, and raise
  :class:`NotLoadedError` (naming the path to add) on everything else.
* :func:`count_queries` / :func:`max_queries` - count the statements a block
  sends; fail with :class:`TooManyQueries` (N+1 suspects marked) over a budget.
  The pytest plugin adds the ``query_counter`` and ``max_queries`` fixtures.
* :func:`parallel` - run functions concurrently, each in its own ``AsyncSession``.
  Sharing one session between tasks at once raises a clear
  :class:`SessionInUseError` that points here: importing this module turns on
  :func:`guard_sessions` (three ``Session`` event listeners, process-wide;
  ``guard_sessions(False)`` turns them off); :class:`GuardedAsyncSession`
  checks every session method.
* :func:`loader_by_id` - a :class:`parallelkit.BatchLoader` that loads rows by
  primary key with one ``IN`` query per batch.

SQLAlchemy's asyncio extension (``AsyncSession``, ``AsyncEngine``) runs on
asyncio only; the sync helpers (:func:`eager`, :func:`count_queries`,
:func:`max_queries`) need no event loop at all.
"""

from __future__ import annotations

import contextlib

from ._sqla_eager import EagerPath as EagerPath
from ._sqla_eager import NotLoadedError as NotLoadedError
from ._sqla_eager import Strategy as Strategy
from ._sqla_eager import eager as eager
from ._sqla_loader import loader_by_id as loader_by_id
from ._sqla_queries import CapturedQuery as CapturedQuery
from ._sqla_queries import QueryCounter as QueryCounter
from ._sqla_queries import TooManyQueries as TooManyQueries
from ._sqla_queries import count_queries as count_queries
from ._sqla_queries import max_queries as max_queries
from ._sqla_sessions import GuardedAsyncSession as GuardedAsyncSession
from ._sqla_sessions import SessionInUseError as SessionInUseError
from ._sqla_sessions import default_limit as default_limit
from ._sqla_sessions import guard_sessions as guard_sessions
from ._sqla_sessions import parallel as parallel

__all__ = [
    "CapturedQuery",
    "EagerPath",
    "GuardedAsyncSession",
    "NotLoadedError",
    "QueryCounter",
    "SessionInUseError",
    "Strategy",
    "TooManyQueries",
    "count_queries",
    "default_limit",
    "eager",
    "guard_sessions",
    "loader_by_id",
    "max_queries",
    "parallel",
]


def _set_public_module() -> None:
    """Show public names as ``parallelkit.sqlalchemy.X`` in reprs, tracebacks and docs."""
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("parallelkit._"):
            with contextlib.suppress(AttributeError, TypeError):  # aliases, builtins
                obj.__module__ = __name__


_set_public_module()
guard_sessions()
