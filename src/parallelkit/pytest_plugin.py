"""pytest plugin registered by parallelkit (entry point ``pytest11``).

Importing it imports no optional dependency and changes nothing. During a test
session it does two things, when SQLAlchemy is installed (then it imports it at
the start of the session, so a ``conftest.py`` that imports SQLAlchemy only
inside a fixture is guarded too):

* turns on :func:`parallelkit.sqlalchemy.guard_sessions` (sharing one
  ``AsyncSession`` between tasks raises ``SessionInUseError``) for the whole
  session, and puts it back as it was afterwards;
* makes :class:`parallelkit.sqlalchemy.RequestGuard` with ``enforce=None``
  enforce its per-request query budget.

Turn both off with the ini option ``parallelkit_guard_sessions = false``.

Fixtures:
    query_counter: ``query_counter(engine_or_session)`` ->
        :func:`parallelkit.sqlalchemy.count_queries` (``with`` / ``async with``).
    max_queries: ``max_queries(engine_or_session, n)`` ->
        :func:`parallelkit.sqlalchemy.max_queries`, the N+1 guard for a test body.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    from . import sqlalchemy as pk_sqla

_INI = "parallelkit_guard_sessions"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        _INI,
        type="bool",
        default=True,
        help="parallelkit: guard AsyncSessions against sharing between tasks during tests "
        "(and enforce RequestGuard budgets); default true",
    )


def pytest_configure(config: pytest.Config) -> None:
    """A bad ini value is one usage error naming the option, not an error per test."""
    try:
        config.getini(_INI)
    except (ValueError, pytest.UsageError) as exc:
        msg = f"ini option {_INI} must be true or false ({exc})"
        raise pytest.UsageError(msg) from None


@pytest.fixture(scope="session", autouse=True)
def _parallelkit_guard_sessions(request: pytest.FixtureRequest) -> Iterator[None]:
    """On for the test session when SQLAlchemy is installed and the ini option allows.

    Decided when the session starts, before any fixture of the user's runs: whether
    SQLAlchemy is *installed*, not whether it was imported yet (a fixture that
    imports it runs later, and would otherwise leave the guard silently off)."""
    if not request.config.getini(_INI) or (
        "sqlalchemy" not in sys.modules and importlib.util.find_spec("sqlalchemy") is None
    ):
        yield
        return
    try:
        from .sqlalchemy import _testing, guard_sessions
    except ImportError:  # SQLAlchemy without what parallelkit.sqlalchemy needs: not in use
        yield
        return

    was_on = guard_sessions(True)
    was_active, _testing.active = _testing.active, True
    try:
        yield
    finally:
        _testing.active = was_active
        guard_sessions(was_on)


@pytest.fixture
def query_counter() -> Callable[[object], pk_sqla.QueryCounter]:
    """Count SQL statements in a block: ``with query_counter(engine) as q: ...; q.count``.

    Counts what the test's own context sends (and the tasks it starts): an app
    called in the same task through ``httpx.ASGITransport`` is counted; one run
    in another thread (Starlette's ``TestClient``) is not: read the
    ``x-query-count`` header that :class:`~parallelkit.sqlalchemy.RequestGuard`
    sets instead.

    Example:
        ```python
        async def test_list_page(client, engine, query_counter):
            async with query_counter(engine) as q:
                await client.get("/conversations")
            assert q.count <= 2, q.statements
        ```
    """
    from .sqlalchemy import count_queries

    return count_queries


@pytest.fixture
def max_queries() -> type[pk_sqla.max_queries]:
    """Fail the test when a block sends more than ``n`` statements (N+1 guard).

    Example:
        ```python
        def test_webhook_is_two_queries(engine, max_queries):
            with max_queries(engine, 2):
                handle_webhook(conversation_id=1)
        ```
    """
    from .sqlalchemy import max_queries as guard

    return guard
