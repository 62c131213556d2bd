"""parallelkit.sqlalchemy as a FastAPI service meets it: faults found by a review under load.

* ``async with pool_limiter(engine):`` in an async generator (a streaming
  body, a yield dependency, an ``@asynccontextmanager``) that another task
  closes: asyncio's finalizer after an ``async for ... break``, a server after a
  client disconnect. The slot must come back, and the task that entered must
  not be left marked as holding one.
* ``eager_get`` given the primary key as a dict (as ``session.get`` takes it):
  the row, or a ``ValueError`` naming ``ident`` and the keys it needs, not
  ``unhashable type: 'dict'``.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from examples.crm import Conversation
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import QueuePool
from trio.testing import MockClock

import parallelkit as pk
from parallelkit.sqlalchemy import LimitedAsyncSession, PoolLimiter, eager_get, pool_limiter

pytest_plugins = ["tests.sqla_fixtures"]

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore:unclosed database:ResourceWarning"),
]


def _at_rest(slots: PoolLimiter) -> None:
    stats = slots.statistics()
    assert (stats.running, stats.waiting) == (0, 0), slots
    assert slots._held == {}
    assert slots._borrowed == {}


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_slot_entered_in_a_generator_and_closed_by_another_task_comes_back(
    anyio_backend: str,
) -> None:
    engine = create_engine("sqlite://")  # one connection: one slot
    slots = pool_limiter(engine)

    async def rows() -> AsyncGenerator[int, None]:
        async with slots:
            async with slots:  # nested in the same generator
                yield 1
            yield 2

    for _ in range(2):
        gen = rows()
        assert await gen.__anext__() == 1  # entered by this task
        async with anyio.create_task_group() as tg:
            tg.start_soon(gen.aclose)  # closed by another (a finalizer, a server)
        _at_rest(slots)
    async with slots:  # this task does not hold one behind the limiter's back
        assert slots.statistics().running == 1
    _at_rest(slots)
    engine.dispose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # SQLAlchemy's asyncio extension
async def test_a_streamed_body_left_after_a_break_gives_its_slot_and_connection_back(
    anyio_backend: str, tmp_path: Path
) -> None:
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'stream.sqlite3'}", pool_size=1, max_overflow=0
    )
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)
    slots = pool_limiter(engine)
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)

    async def body() -> AsyncIterator[int]:  # the recipe's block, in a streaming body
        async with slots, sessions() as session:
            for i in range(10):
                yield (await session.execute(text(f"select {i}"))).scalar_one()

    async def handler() -> None:
        async for _ in body():
            break  # left suspended: asyncio's finalizer closes it, in a task of its own

    for _ in range(3):
        await handler()
        gc.collect()
        # the finalizer's task runs, its close hands the connection back: aiosqlite's
        # thread answers when it is scheduled (late with every core busy), so this polls
        # on the loop's own time with a generous bound, not a count of checkpoints
        with anyio.fail_after(60):
            while slots.statistics().running or pool.checkedout():
                await anyio.sleep(0.005)
        _at_rest(slots)
        assert pool.checkedout() == 0, pool.status()
    async with slots, sessions() as session:  # the pool is usable, within its bound
        assert (await session.execute(text("select 1"))).scalar_one() == 1
    _at_rest(slots)
    await engine.dispose()


# -- eager_get: the primary key as session.get takes it -------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # SQLAlchemy's asyncio extension
async def test_eager_get_takes_a_dict_ident_as_session_get_does(
    anyio_backend: str, crm_engine: AsyncEngine
) -> None:
    sessions = async_sessionmaker(crm_engine, expire_on_commit=False)
    async with sessions() as session:
        by_dict = await eager_get(session, Conversation, {"id": 7}, "contact.company")
        assert by_dict is not None
        assert by_dict.id == 7
        assert by_dict.contact.company.name
        assert await eager_get(session, Conversation, {"id": 7}, "contact") is by_dict
        assert await session.get(Conversation, {"id": 7}) is by_dict
        for bad in ({"pk": 7}, {"id": 7, "subject": "x"}, {}):
            with pytest.raises(ValueError, match=r"ident .*Conversation.*'id'") as info:
                await eager_get(session, Conversation, bad, "contact")
            assert repr(bad) in str(info.value)


# -- a slot held while waiting for a cache load (the load runs on a waiter's slot) ----------


@pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mockclock")],
)
async def test_a_cached_load_awaited_while_holding_every_slot_finishes(
    anyio_backend: object,
) -> None:
    engine = create_engine("sqlite://")  # one connection: one slot
    slots = pool_limiter(engine)
    cache = pk.SWRCache(fresh=30, stale=300)

    @cache.cached
    async def get_contact(contact_id: int) -> int:
        async with slots:  # the loader talks to the database
            return contact_id

    async with cache:  # entered, as in the FastAPI recipe: misses load in its task group
        with anyio.fail_after(60):  # virtual time: a hang fails at once
            async with slots:  # the request holds the (only) slot
                assert await get_contact(1) == 1
    _at_rest(slots)
    engine.dispose()
