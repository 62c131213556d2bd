"""Fixtures for the parallelkit.sqlalchemy tests: the seeded CRM on SQLite and PostgreSQL.

* ``crm_sqlite_path``: a SQLite file seeded once per session with the webhook graph
  (10 companies x 10 contacts x 5 conversations = 500 conversations). Read-only:
  tests that write make their own database.
* ``sync_engine``: a sync ``Engine`` on that file (no event loop needed).
* ``small_pool``: an empty database behind a pool of 2 connections (+10
  overflow), on SQLite and PostgreSQL, for the pool-limiter tests.
* ``crm_engine``: an ``AsyncEngine`` on SQLite (aiosqlite) and on PostgreSQL
  (asyncpg), parametrized; the PostgreSQL one lives in a fresh schema per test
  (``search_path``), seeded the same way and dropped afterwards, so parallel runs
  never collide.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from examples.crm import Base, SeedSizes, seed, seed_sync
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

SIZES = SeedSizes(companies=10, contacts_per_company=10, conversations_per_contact=5)


@pytest.fixture(scope="session")
def crm_sqlite_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("crm") / "crm.sqlite3"
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        seed_sync(session, SIZES)
    engine.dispose()
    return path


@pytest.fixture
def sync_engine(crm_sqlite_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{crm_sqlite_path}")
    yield engine
    engine.dispose()


async def pg_schema_engine(pg_url: str, **kwargs: object) -> tuple[AsyncEngine, str]:
    """An AsyncEngine whose connections use a brand-new schema (``search_path``)."""
    schema = f"pk_test_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(pg_url)
    async with admin.begin() as conn:
        await conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    await admin.dispose()
    engine = create_async_engine(
        pg_url, connect_args={"server_settings": {"search_path": schema}}, **kwargs
    )
    return engine, schema


async def drop_pg_schema(pg_url: str, schema: str) -> None:
    admin = create_async_engine(pg_url)
    async with admin.begin() as conn:
        await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await admin.dispose()


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def crm_engine(
    request: pytest.FixtureRequest, crm_sqlite_path: Path
) -> AsyncIterator[AsyncEngine]:
    """The seeded CRM (500 conversations) on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        engine = create_async_engine(f"sqlite+aiosqlite:///{crm_sqlite_path}")
        yield engine
        await engine.dispose()
        return
    pg_url: str = request.getfixturevalue("pg_url")
    engine, schema = await pg_schema_engine(pg_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with async_sessionmaker(engine)() as session:
            await seed(session, SIZES)
        yield engine
    finally:
        await engine.dispose()
        await drop_pg_schema(pg_url, schema)


@pytest.fixture
async def pg_engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    """An empty schema of its own on PostgreSQL; a pool of 5 connections."""
    engine, schema = await pg_schema_engine(pg_url, pool_size=5)
    try:
        yield engine
    finally:
        await engine.dispose()
        await drop_pg_schema(pg_url, schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def any_engine(request: pytest.FixtureRequest) -> AsyncIterator[AsyncEngine]:
    """An empty database: in-memory SQLite (one shared connection) or a PostgreSQL schema."""
    if request.param == "sqlite":
        engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
        yield engine
        await engine.dispose()
        return
    pg_url: str = request.getfixturevalue("pg_url")
    engine, schema = await pg_schema_engine(pg_url)
    try:
        yield engine
    finally:
        await engine.dispose()
        await drop_pg_schema(pg_url, schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def small_pool(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A pool of 2 connections with room for 10 more in overflow: the pool alone allows 12."""
    if request.param == "sqlite":
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{tmp_path / 'pool.sqlite3'}", pool_size=2, max_overflow=10
        )
        yield engine
        await engine.dispose()
        return
    pg_url: str = request.getfixturevalue("pg_url")
    engine, schema = await pg_schema_engine(pg_url, pool_size=2, max_overflow=10)
    try:
        yield engine
    finally:
        await engine.dispose()
        await drop_pg_schema(pg_url, schema)
