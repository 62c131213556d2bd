"""pytest plugin registered by parallelkit (entry point ``pytest11``).

Integrations add their fixtures here lazily, so that the plugin costs nothing
and imports no optional dependency unless a fixture is used.

Fixtures:
    query_counter: ``query_counter(engine_or_session)`` ->
        :func:`parallelkit.sqlalchemy.count_queries` (``with`` / ``async with``).
    max_queries: ``max_queries(engine_or_session, n)`` ->
        :func:`parallelkit.sqlalchemy.max_queries`, the N+1 guard for a test body.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    from . import sqlalchemy as pk_sqla


@pytest.fixture
def query_counter() -> Callable[[object], pk_sqla.QueryCounter]:
    """Count SQL statements in a block: ``with query_counter(engine) as q: ...; q.count``.

    Example:
        ```python
        def test_list_page(client, engine, query_counter):
            with query_counter(engine) as q:
                client.get("/conversations")
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
