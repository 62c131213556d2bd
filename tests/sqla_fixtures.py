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
* ``make_engine``: makes engines on SQLite (a file: a real pool) and on PostgreSQL,
  parametrized, ``pool_timeout=POOL_TIMEOUT`` unless told, for the pool-deadlock tests;
  with them the ``asyncio_backend`` fixture (import it as ``anyio_backend``),
  :func:`pool_of`, :func:`hold`, :func:`hold_then`, :func:`never` and
  :func:`assert_given_back`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from examples.crm import Base, SeedSizes, seed, seed_sync
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from parallelkit.sqlalchemy import LimitedAsyncSession, PoolLimiter, pool_limiter

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


# -- the pool-deadlock tests ----------------------------------------------------------------------
#: what a deadlocked caller used to wait before the pool's own ``TimeoutError`` ("QueuePool
#: limit of size N overflow 0 reached", no "would deadlock"): never waited by a passing test
POOL_TIMEOUT = 10

T = TypeVar("T")
Make = Callable[..., AsyncEngine]
Sessions = async_sessionmaker[LimitedAsyncSession]


@pytest.fixture
def asyncio_backend() -> str:
    """A module of asyncio-only tests (SQLAlchemy's asyncio extension) imports this as its
    ``anyio_backend``: a plugin's own would lose to the root conftest's."""
    return "asyncio"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def make_engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    """Engines on SQLite (a file: a real pool) and on PostgreSQL, disposed afterwards.
    (Only ``SELECT``s: nothing to clean up on PostgreSQL.)"""
    made: list[AsyncEngine] = []
    url = (
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )

    def make(**kwargs: Any) -> AsyncEngine:
        kwargs.setdefault("pool_timeout", POOL_TIMEOUT)
        made.append(create_async_engine(url, **kwargs))
        return made[-1]

    yield make
    for engine in made:
        await engine.dispose()


def pool_of(make_engine: Make, size: int) -> tuple[AsyncEngine, Sessions]:
    """An engine whose pool gives ``size`` connections and no more (``max_overflow=0``),
    and its ``LimitedAsyncSession`` maker."""
    engine = make_engine(pool_size=size, max_overflow=0)
    return engine, async_sessionmaker(engine, class_=LimitedAsyncSession)


async def hold(session: LimitedAsyncSession | AsyncSession) -> None:
    """The session's transaction takes a connection (and a slot of the engine's limiter)."""
    assert (await session.execute(text("SELECT 1"))).scalar_one() == 1


async def hold_then(
    sessions: Sessions, mine: anyio.Event, other: anyio.Event, then: Callable[[], Awaitable[T]]
) -> T:
    """A request: its session holds a connection (``mine`` set), waits for ``other``, then
    ``then()`` in its transaction, then commits."""
    async with sessions() as session:
        await hold(session)
        mine.set()
        await other.wait()
        result = await then()
        await session.commit()
        return result


async def never(session: LimitedAsyncSession) -> int:
    msg = "a function ran: the fan-out should have been refused at the call"
    raise AssertionError(msg)


def assert_given_back(engine: AsyncEngine) -> PoolLimiter:
    """Every slot of the engine's limiter and every connection of its pool given back."""
    slots = pool_limiter(engine)
    stats = slots.statistics()
    assert (stats.running, stats.waiting) == (0, 0), slots
    assert not slots._held, slots._held
    assert not slots._borrowed, slots._borrowed
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    return slots
