"""Review of the pool deadlock check: no refusal when a connection can still come back.

The second-session check assumes the task that holds a connection waits for its new
session's statement. A statement created in one task but awaited in another
(``asyncio.gather(...)`` wraps each coroutine in a task of its own; so does
``asyncio.wait_for`` before Python 3.12) leaves the first task free to give its
connection back (a sibling commits the first session): it must wait, never be refused.
Ordered without timing: the refusal, when it comes, comes before the statement's first
await; the sibling commits at its first step.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from parallelkit.sqlalchemy import LimitedAsyncSession, pool_limiter

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore:unclosed database:ResourceWarning"),
]

Make = Callable[..., AsyncEngine]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def make_engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    """Engines on SQLite (a file: a real pool) and on PostgreSQL, disposed afterwards."""
    made: list[AsyncEngine] = []
    url = (
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )

    def make(**kwargs: Any) -> AsyncEngine:
        kwargs.setdefault("pool_timeout", 10)  # a hang guard only
        made.append(create_async_engine(url, **kwargs))
        return made[-1]

    yield make
    for engine in made:
        await engine.dispose()


def _assert_all_back(engine: AsyncEngine) -> None:
    slots = pool_limiter(engine)
    stats = slots.statistics()
    assert (stats.running, stats.waiting) == (0, 0), slots
    assert not slots._held, slots._held
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    checkouts = slots._checkouts
    assert checkouts is not None
    assert not checkouts._held, checkouts
    assert not checkouts.connecting, checkouts


@pytest.mark.parametrize("size", [1, 2])
async def test_a_second_session_awaited_by_gather_waits_for_a_sibling_commit(
    make_engine: Make, size: int
) -> None:
    # the task holds every connection (its first sessions), then gathers a sibling that
    # commits them with a second session's statement: the statement runs in a task of
    # gather's own, which holds nothing, and the commit gives it a connection. Before:
    # refused at once ("this task holds 1 connection(s), all the pool can give").
    engine = make_engine(pool_size=size, max_overflow=0)
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)
    with anyio.fail_after(30):
        firsts = [sessions() for _ in range(size)]
        for first in firsts:
            await first.execute(text("SELECT 1"))
        assert engine.sync_engine.pool.checkedout() == size  # type: ignore[attr-defined]

        async def finish() -> None:
            await asyncio.sleep(0)  # the second session's statement has started
            for first in firsts:
                await first.commit()

        async with sessions() as second:
            _, result = await asyncio.gather(finish(), second.execute(text("SELECT 2")))
            assert result.scalar_one() == 2
            await second.commit()
        for first in firsts:
            await first.close()
    _assert_all_back(engine)


async def test_a_second_session_awaited_in_the_holding_task_is_still_refused(
    make_engine: Make,
) -> None:
    # the promise kept: awaited in the task that holds the only connection, refused
    engine = make_engine(pool_size=1, max_overflow=0)
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)
    with anyio.fail_after(30):
        async with sessions() as first:
            await first.execute(text("SELECT 1"))
            async with sessions() as second:
                with pytest.raises(sa_exc.TimeoutError, match="would deadlock"):
                    await second.execute(text("SELECT 2"))
            assert (await first.execute(text("SELECT 3"))).scalar_one() == 3
            await first.commit()
    _assert_all_back(engine)


async def test_a_refused_statement_never_awaited_gives_its_slot_back_at_close(
    make_engine: Make,
) -> None:
    # the check runs when the statement is awaited: one created and dropped leaves the
    # session's (re-entrant) slot to its close, like any other statement
    engine = make_engine(pool_size=1, max_overflow=0)
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)
    with anyio.fail_after(30):
        async with sessions() as first:
            await first.execute(text("SELECT 1"))
            async with sessions() as second:
                pending = second.execute(text("SELECT 2"))
                pending.close()  # type: ignore[attr-defined]
            await first.commit()
    _assert_all_back(engine)


@pytest.mark.parametrize("dispose", [False, True])
async def test_limiters_of_passing_option_engines_add_no_listeners(
    make_engine: Make, dispose: bool
) -> None:
    # a per-request engine.execution_options(...) (a tenant's schema_translate_map) is
    # another Engine over the same pool; when it is the only one with a limiter, each
    # one collected and made again watched the pool once more: 3 listeners more per
    # request, every checkout calling all of them. One watch per pool now, also across
    # a dispose() of the engine.
    engine = make_engine(pool_size=2, max_overflow=0)
    pool = engine.sync_engine.pool
    for _ in range(5):
        passing = engine.execution_options(schema_translate_map={None: None})
        pool_limiter(passing)
        del passing
        gc.collect()
        if dispose:
            await engine.dispose()
    pool = engine.sync_engine.pool
    assert len(pool.dispatch.checkout) == 1
    assert len(pool.dispatch.checkin) == 1
    assert len(pool.dispatch.detach) == 1
    # and it still tells who holds what, for the engine made last
    passing = engine.execution_options(schema_translate_map={None: None})
    sessions = async_sessionmaker(passing, class_=LimitedAsyncSession, expire_on_commit=False)
    checkouts = pool_limiter(passing)._checkouts
    assert checkouts is not None
    with anyio.fail_after(30):
        async with sessions() as session:
            await session.execute(text("SELECT 1"))
            assert len(checkouts._held) == 1
            await session.commit()
    assert not checkouts._held
