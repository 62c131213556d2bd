"""Fixtures for the CRM scenario tests: a seeded database on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from examples.crm.db import Database, open_database
from examples.crm.seed import SeedSizes
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

#: "sqlite" always; "postgres" with the marker (skips locally / fails in CI when down).
DATABASES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]

SIZES = SeedSizes(companies=50, contacts_per_company=4, conversations_per_contact=2)


def database_url(request: pytest.FixtureRequest, kind: str) -> tuple[str | None, str | None]:
    """``(url, schema)`` for ``kind``: a fresh PostgreSQL schema per test, or SQLite."""
    if kind == "postgres":
        url = request.getfixturevalue("pg_url")
        return url, f"pk_crm_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    return None, None


@asynccontextmanager
async def crm_database(
    request: pytest.FixtureRequest, kind: str, sizes: SeedSizes = SIZES
) -> AsyncIterator[Database]:
    url, schema = database_url(request, kind)
    async with open_database(url, seed_sizes=sizes, schema=schema) as db:
        yield db


class CountingSessions:
    """Wraps a session factory: counts sessions open at once (peak) and in total.

    ``fail_first=n`` makes the first ``n`` sessions fail on entry with an
    ``OperationalError`` (a transient "database is locked"), to exercise retries.
    """

    def __init__(self, factory: Any, *, fail_first: int = 0) -> None:
        self.factory = factory
        self.open = self.peak = self.total = 0
        self.fail_first = fail_first

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[Any]:
        self.total += 1
        if self.fail_first > 0:
            self.fail_first -= 1
            raise OperationalError("BEGIN", {}, Exception("database is locked"))
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            async with self.factory() as session:
                yield session
        finally:
            self.open -= 1


class EngineStatements:
    """Counts every statement an engine sends while entered, whichever task sends it.

    A plain SQLAlchemy event: it sees a cache's background refresh as well as the
    caller's own statements (``count_queries`` counts the current task's).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine.sync_engine
        self.count = 0

    def _sent(self, *_: Any) -> None:
        self.count += 1

    def __enter__(self) -> EngineStatements:
        event.listen(self.engine, "before_cursor_execute", self._sent)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._sent)
