"""The server's database: its schema, created and seeded (or joined), and its engine."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from examples.crm.db import create_schema, drop_schema, make_engine, session_factory
from examples.crm.db import open_database as open_crm_database
from examples.crm.seed import seed

from .settings import Settings
from .stats import StatementCounter

__all__ = ["PRIVATE", "SEEDED", "SchemaInUse", "ServiceDatabase", "open_database"]


#: The comment a shared schema gets once it is seeded: a replica joins a schema that has
#: it, and makes again one that has none (its creator died while seeding).
SEEDED = "parallelkit example service: seeded"
#: The comment of a private server's schema (no ``--shared``): a replica never joins nor
#: drops it (its server may be running), and a private server never drops a ``SEEDED`` one.
PRIVATE = "parallelkit example service: private"
#: The lock both take, in the transaction that reads the comment and acts on it.
_LOCK = "SELECT pg_advisory_xact_lock(hashtext(:s))"
_MARK = "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = :s"


class SchemaInUse(RuntimeError):
    """The schema ``svc_<name>`` belongs to servers of the other kind (``--shared`` or
    not): this server refuses to start rather than drop it under them."""


@dataclass(frozen=True, slots=True)
class ServiceDatabase:
    """The server's engine and session factory.

    ``created``: this server created (and seeded) the schema: always for a private
    schema; for a shared one (``Settings.shared``), only the replica that found none.
    That replica also starts the Redis namespace empty (entries of an earlier schema of
    that name would be stale); the others join it as it is.
    """

    engine: AsyncEngine
    #: a session per call (a variant may give a subclass: ``LimitedAsyncSession``)
    sessions: Callable[[], AsyncSession]
    pool_size: int
    created: bool


@asynccontextmanager
async def open_database(
    settings: Settings, counter: StatementCounter | None = None
) -> AsyncIterator[ServiceDatabase]:
    """Open this server's schema, count its statements, clean up on exit.

    Private (the default): the server gets rows of its own (a PostgreSQL schema
    ``svc_<name>`` or a SQLite file of its own), created and seeded at start and
    dropped at exit, so writes in one server never change another's answers.

    Shared (``settings.shared``): the schema ``svc_<name>`` belongs to the service,
    not to this replica: created and seeded if absent (or left half-made by a creator
    that died), joined as it is otherwise, and never dropped. Replicas starting at the
    same time take a PostgreSQL advisory lock in turn, so one seeds and the others
    wait and join.

    Neither kind drops a schema of the other (:class:`SchemaInUse`): a private server
    finding the replicas' seeded schema, or a replica finding a private server's, refuses
    to start, naming the schema.
    """
    if settings.shared:
        async with _join(settings, counter) as joined:
            yield joined
        return
    schema = settings.schema if settings.database else None
    with tempfile.TemporaryDirectory(prefix="parallelkit-svc-") as directory:
        # an explicit SQLite URL: None would follow $DATABASE_URL
        url = settings.database or f"sqlite+aiosqlite:///{os.path.join(directory, 'crm.db')}"
        if schema:  # a server killed earlier may have left its schema behind
            await _claim_private(url, schema)
        sizes, pool = settings.seed_sizes, settings.pool_size
        async with open_crm_database(url, seed_sizes=sizes, pool_size=pool, schema=schema) as db:
            if counter is not None:
                counter.attach(db.engine)
            yield ServiceDatabase(db.engine, db.sessions, pool, created=True)


@asynccontextmanager
async def _join(
    settings: Settings, counter: StatementCounter | None
) -> AsyncIterator[ServiceDatabase]:
    """The shared schema: created if absent, joined otherwise; only the engine closed."""
    assert settings.database is not None  # Settings: shared needs a PostgreSQL URL
    schema, pool = settings.schema, settings.pool_size
    engine = make_engine(settings.database, pool_size=pool, schema=schema)
    try:
        created = await _create_if_absent(engine, settings)
        if counter is not None:  # after seeding: the statements counted are the requests'
            counter.attach(engine)
        yield ServiceDatabase(engine, session_factory(engine), pool, created)
    finally:
        await engine.dispose()  # the schema stays: the other replicas serve from it


async def _create_if_absent(engine: AsyncEngine, settings: Settings) -> bool:
    """Create and seed ``schema`` unless it is seeded already; ``True`` if this call did.

    The lock is a transaction-scoped advisory lock on a connection of its own (the pool
    may have a single connection, which seeding needs): it is let go when that
    transaction ends, also when this process dies.
    """
    assert settings.database is not None
    schema = settings.schema
    guard = make_engine(settings.database, pool_size=1)
    try:
        async with guard.begin() as lock:
            await lock.execute(text(_LOCK), {"s": schema})
            marked = await lock.scalar(text(_MARK), {"s": schema})
            if marked == SEEDED:
                return False
            if marked == PRIVATE:
                msg = (
                    f"schema {schema!r} is a server's started without --shared under the name"
                    f" {settings.server!r} (running, or killed and left it): stop it, or drop"
                    f" the schema (DROP SCHEMA {schema} CASCADE), or use another --name"
                )
                raise SchemaInUse(msg)
            await drop_schema(engine, schema=schema)  # half-made: its creator died seeding
            await create_schema(engine, schema=schema)
            async with session_factory(engine)() as session:
                await seed(session, settings.seed_sizes)
            async with engine.begin() as conn:
                await conn.execute(text(f"COMMENT ON SCHEMA \"{schema}\" IS '{SEEDED}'"))
            return True
    finally:
        await guard.dispose()


async def _claim_private(url: str, schema: str) -> None:
    """Drop a leftover private ``schema`` and make it anew, marked :data:`PRIVATE`.

    Under the replicas' advisory lock, in one transaction: a replica seeding meanwhile
    is waited for, and one starting afterwards sees the mark and leaves the schema alone.

    Raises:
        SchemaInUse: ``schema`` is the replicas' (``SEEDED``).
    """
    guard = make_engine(url, pool_size=1, schema=schema)
    try:
        if guard.dialect.name != "postgresql":  # SQLite: a file of this server's, no schema
            await drop_schema(guard, schema=schema)
            return
        async with guard.begin() as conn:
            await conn.execute(text(_LOCK), {"s": schema})
            if await conn.scalar(text(_MARK), {"s": schema}) == SEEDED:
                msg = (
                    f"schema {schema!r} is shared by the replicas of this --name (started with"
                    " --shared): start this server with --shared to join them, or use another"
                    " --name"
                )
                raise SchemaInUse(msg)
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            await conn.execute(text(f"COMMENT ON SCHEMA \"{schema}\" IS '{PRIVATE}'"))
    finally:
        await guard.dispose()
