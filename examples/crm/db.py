"""Engine and session factory for the CRM examples: SQLite by default, PostgreSQL by URL.

Every scenario takes an ``async_sessionmaker`` and opens **one session per task**
(a session is a single-task object: sharing one between concurrent tasks is the
bug that :func:`parallelkit.sqlalchemy.guard_sessions` turns into a clear
:class:`~parallelkit.sqlalchemy.SessionInUseError`).

* no URL: a SQLite file in a fresh temporary directory, through ``aiosqlite``,
  in WAL mode with a busy timeout, so several sessions can read while one writes
  (SQLite still runs one write at a time);
* ``postgresql://user@host/db``: PostgreSQL through ``asyncpg``
  (``postgresql://`` is rewritten to ``postgresql+asyncpg://``). ``schema=``
  puts the tables in their own schema (``search_path``), which the tests use to
  isolate runs.

A server is used only when its URL is passed (``python -m examples.crm --database
URL``); no environment variable is read, so nothing reaches a server by accident.

``latency=`` adds a simulated network round trip before every SQL statement
(inside SQLAlchemy's greenlet, so it is a real ``await``: other tasks run
meanwhile). On SQLite this models what a database across a network costs; the
benchmarks use it to reproduce the playbook's per-query timings, and say so.

Example:
    ```python
    async with open_database(seed_sizes=SeedSizes(companies=2)) as db:
        async with db.sessions() as session:
            company = await session.get(Company, db.summary.company_ids[0])
    ```
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.util import await_only

from .models import Base
from .payment import PaymentBase
from .seed import SeedSizes, SeedSummary, seed

__all__ = [
    "Database",
    "Latency",
    "add_latency",
    "create_schema",
    "database_url",
    "drop_schema",
    "make_engine",
    "open_database",
    "session_factory",
]

POOL_SIZE = 10


def database_url(url: str | None = None) -> str | None:
    """``url`` with an async driver, or ``None`` (a temporary SQLite) when not given.

    ``postgresql://`` and ``postgres://`` become ``postgresql+asyncpg://``;
    ``sqlite://`` becomes ``sqlite+aiosqlite://``.
    """
    if not url:
        return None
    for plain, driver in (
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


class Latency:
    """A simulated per-statement round trip; change ``seconds`` at any time."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"Latency({self.seconds * 1000:.1f} ms per statement)"


def add_latency(engine: AsyncEngine, seconds: float = 0.0) -> Latency:
    """Sleep before every SQL statement the engine sends (a simulated round trip).

    The sleep is awaited through SQLAlchemy's greenlet bridge, exactly where the
    driver itself would wait for the network, so concurrent sessions overlap
    their "round trips" as they would against a remote server. asyncio only (as
    is SQLAlchemy's asyncio extension).

    Returns:
        A :class:`Latency` whose ``seconds`` can be changed later (0 turns it off).
    """
    if seconds < 0:
        msg = f"latency must be >= 0 seconds, got {seconds!r}"
        raise ValueError(msg)
    latency = Latency(seconds)

    def round_trip(*_: Any) -> None:
        if latency.seconds > 0:
            await_only(anyio.sleep(latency.seconds))

    event.listen(engine.sync_engine, "before_cursor_execute", round_trip)
    return latency


def make_engine(
    url: str | None = None,
    *,
    latency: float = 0.0,
    pool_size: int = POOL_SIZE,
    schema: str | None = None,
    directory: str | None = None,
) -> AsyncEngine:
    """An ``AsyncEngine`` with a pool of ``pool_size`` connections (no overflow).

    On a server database (PostgreSQL) the pool tests each connection as it is
    checked out (``pool_pre_ping=True``): a connection the server closed (a
    restart, a fail-over, ``pg_terminate_backend``) is replaced, where without it
    the request that drew it would fail (a 500 in the service, possibly after the
    card was charged). It costs a round trip per checkout; SQLite files do not
    lose their connections, so they skip it.

    Args:
        url: a SQLAlchemy URL; default: a SQLite file in ``directory`` (a new
            temporary directory when ``None``).
        latency: simulated seconds per statement (see :func:`add_latency`).
        pool_size: connections the pool keeps; tasks beyond it wait for one.
        schema: PostgreSQL only: the ``search_path`` (create it with
            :func:`create_schema`).
        directory: where the default SQLite file goes.
    """
    resolved = database_url(url)
    if resolved is None:
        directory = directory or tempfile.mkdtemp(prefix="parallelkit-crm-")
        resolved = f"sqlite+aiosqlite:///{os.path.join(directory, 'crm.db')}"
    backend = make_url(resolved).get_backend_name()
    kwargs: dict[str, Any] = {"pool_size": pool_size, "max_overflow": 0, "pool_timeout": 120}
    if backend != "sqlite":  # a closed connection is replaced at checkout, not a failed request
        kwargs["pool_pre_ping"] = True
    if backend == "postgresql" and schema:
        kwargs["connect_args"] = {"server_settings": {"search_path": schema}}
    if backend == "sqlite":
        kwargs["connect_args"] = {"timeout": 60}
    engine = create_async_engine(resolved, **kwargs)
    if backend == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    if latency:
        add_latency(engine, latency)
    return engine


async def create_schema(engine: AsyncEngine, *, schema: str | None = None) -> None:
    """Create the CRM tables (and the payments table); on PostgreSQL, in ``schema``."""
    async with engine.begin() as conn:
        if schema and engine.dialect.name == "postgresql":
            await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        await conn.run_sync(Base.metadata.create_all)
        await conn.run_sync(PaymentBase.metadata.create_all)


async def drop_schema(engine: AsyncEngine, *, schema: str | None = None) -> None:
    """Drop what :func:`create_schema` made (the whole schema on PostgreSQL)."""
    async with engine.begin() as conn:
        if schema and engine.dialect.name == "postgresql":
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        else:
            await conn.run_sync(PaymentBase.metadata.drop_all)
            await conn.run_sync(Base.metadata.drop_all)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit (``expire_on_commit=False``)."""
    return async_sessionmaker(engine, expire_on_commit=False)


@dataclass(frozen=True, slots=True)
class Database:
    """An open example database: the engine, its session factory and what was seeded."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    summary: SeedSummary | None
    url: str
    latency: Latency


@asynccontextmanager
async def open_database(
    url: str | None = None,
    *,
    seed_sizes: SeedSizes | None = None,
    latency: float = 0.0,
    pool_size: int = POOL_SIZE,
    schema: str | None = None,
) -> AsyncIterator[Database]:
    """Create the schema, seed it (without latency), yield a :class:`Database`, clean up.

    The latency is switched on only after seeding, so seeding stays fast. A
    temporary SQLite directory is deleted on exit; a PostgreSQL ``schema`` is
    dropped. That clean-up runs to its end even if the task is cancelled meanwhile
    (a Ctrl-C as the demo closes): the cancellation is raised once it is done.
    """
    directory = None if database_url(url) else tempfile.mkdtemp(prefix="parallelkit-crm-")
    engine = make_engine(url, pool_size=pool_size, schema=schema, directory=directory)
    try:
        await create_schema(engine, schema=schema)
        summary = None
        if seed_sizes is not None:
            async with session_factory(engine)() as session:
                summary = await seed(session, seed_sizes)
        handle = add_latency(engine, latency)
        yield Database(engine, session_factory(engine), summary, str(engine.url), handle)
    finally:
        await _to_the_end(_close(engine, schema=schema, directory=directory))


async def _close(engine: AsyncEngine, *, schema: str | None, directory: str | None) -> None:
    """:func:`open_database`'s clean-up: the schema dropped, every connection closed,
    the temporary SQLite directory removed."""
    try:
        if schema:
            await drop_schema(engine, schema=schema)
    finally:
        await engine.dispose()
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


async def _to_the_end(cleanup: Coroutine[Any, Any, None]) -> None:
    """Await ``cleanup`` to its end even if this task is cancelled meanwhile; then let
    the cancellation go on.

    The demo's Ctrl-C is one ``Task.cancel()`` (``python -m examples.crm``), and it
    can land anywhere, in this clean-up too: inside ``engine.dispose()``, it cut short
    the close of a pooled aiosqlite connection (SQLAlchemy logged "Exception closing
    connection" with a traceback) and the rest was skipped (the temporary directory
    was left behind). A shielded anyio scope does not stop a native ``Task.cancel()``,
    so the clean-up runs in a task of its own, which this one waits for (and owns);
    a cancellation received meanwhile is raised once it has finished. The shielded
    scope keeps an enclosing cancelled anyio scope from interrupting the wait.
    """
    task = asyncio.ensure_future(cleanup)
    cancelled: asyncio.CancelledError | None = None
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as exc:  # noqa: PERF203 - the clean-up goes on
                cancelled = exc
    task.result()  # the clean-up's own error, if any
    if cancelled is not None:
        raise cancelled
