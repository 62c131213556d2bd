"""A second session of a task that holds a connection, with none the pool can give.

A task whose first session is in a transaction (it holds a connection) opens a second
``LimitedAsyncSession`` (the limiter lets it through: slots are re-entrant per task).
Its first statement needs one more connection; when every connection the pool can give
(``max_overflow=0``) is held by this task, or by tasks that can only wait for one, it is
refused at once with ``sqlalchemy.exc.TimeoutError`` instead of waiting ``pool_timeout``.
A task that could still give a connection back is waited for, never refused. Ordered with
events: a task sets its event right before a statement that then waits in the pool
before anything else runs.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

import parallelkit as pk
from parallelkit.sqlalchemy import LimitedAsyncSession, parallel, pool_limiter

# a plugin too: imported here first, it must be rewritten as pytest_plugins would have it
pytest.register_assert_rewrite("tests.sqla_fixtures")

from tests.sqla_fixtures import (  # noqa: E402
    Make,
    Sessions,
    assert_given_back,
    hold,
    hold_then,
    never,
    pool_of,
)
from tests.sqla_fixtures import asyncio_backend as anyio_backend  # noqa: E402, F401 (a fixture)

pytest_plugins = ["tests.sqla_fixtures"]  # make_engine

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore:unclosed database:ResourceWarning"),
]


def _assert_all_back(engine: AsyncEngine) -> None:
    checkouts = assert_given_back(engine)._checkouts
    assert checkouts is not None
    assert not checkouts.connecting, checkouts.connecting
    assert not checkouts._held, checkouts._held  # every checkout seen checked in


async def _second_session(sessions: Sessions, waits: anyio.Event, i: int) -> int:
    """A second session of the task: ``waits`` set right before its first statement."""
    async with sessions() as second:
        waits.set()  # its first statement next: into the pool's queue
        return int((await second.execute(text(f"SELECT {i}"))).scalar_one())


async def _second_statement(sessions: Sessions, waits: anyio.Event, i: int) -> Any:
    """Once ``waits`` is set, a second session of the task runs ``SELECT i``."""
    await waits.wait()
    async with sessions() as second:
        return await second.execute(text(f"SELECT {i}"))


def _assert_second_refused(error: BaseException | None, *, others: bool = False) -> None:
    assert isinstance(error, sa_exc.TimeoutError), repr(error)
    message = str(error)
    assert "would deadlock" in message, message  # not the pool's own, after pool_timeout
    assert "second session" in message, message
    assert "first session" in message  # the fixes
    assert "max_overflow" in message
    if others:
        assert "other task(s) already waiting" in message, message


async def _first_statement(session: LimitedAsyncSession, how: str) -> None:
    if how == "execute":
        await session.execute(text("SELECT 2"))
    elif how == "scalar":
        await session.scalar(text("SELECT 2"))
    else:
        await session.connection()


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("slot", ["session", "async with slots"])
@pytest.mark.parametrize("how", ["execute", "scalar", "connection"])
async def test_a_second_session_is_refused_when_the_task_holds_every_connection(
    make_engine: Make, size: int, slot: str, how: str
) -> None:
    # the task's first session(s) hold all `size` connections; one more session of the
    # task can only wait for them: before, pool_timeout then the pool's TimeoutError;
    # now refused at its first statement, and the first sessions go on
    engine, sessions = pool_of(make_engine, size)
    with anyio.fail_after(30):
        async with AsyncExitStack() as stack:
            if slot == "async with slots":
                await stack.enter_async_context(pool_limiter(engine))
            firsts = [await stack.enter_async_context(sessions()) for _ in range(size)]
            for first in firsts:
                await hold(first)  # with size=2, the second one is let through: one free
            async with sessions() as extra:
                with pytest.raises(sa_exc.TimeoutError) as info:
                    await _first_statement(extra, how)
            _assert_second_refused(info.value)
            assert (await firsts[0].execute(text("SELECT 3"))).scalar_one() == 3
            for first in firsts:
                await first.commit()
    _assert_all_back(engine)


async def test_the_first_connection_may_come_from_a_plain_connection(
    make_engine: Make,
) -> None:
    # the connection is held by the task whatever took it (engine.connect()); the
    # LimitedAsyncSession then takes a free slot of its own and would wait in the pool
    engine, sessions = pool_of(make_engine, 1)
    pool_limiter(engine)  # the checkouts are watched from here on
    with anyio.fail_after(30):
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar_one() == 1
            async with sessions() as session:
                with pytest.raises(sa_exc.TimeoutError) as info:
                    await session.execute(text("SELECT 2"))
            _assert_second_refused(info.value)
            assert (await connection.execute(text("SELECT 3"))).scalar_one() == 3
    _assert_all_back(engine)


async def test_no_refusal_while_another_task_can_give_its_connection_back(
    make_engine: Make,
) -> None:
    # A holds one connection and opens a second session; B holds the other, in an API
    # call inside its transaction (it waits for no connection): A's second session waits
    # in the pool (counted as waiting), B commits, A's second session gets its connection
    engine, sessions = pool_of(make_engine, 2)
    slots = pool_limiter(engine)
    held_a, held_b, a_waits = anyio.Event(), anyio.Event(), anyio.Event()
    waiting: list[bool] = []

    async def api_call() -> str:
        await a_waits.wait()  # the API call ends once A's second session waits
        checkouts = slots._checkouts
        assert checkouts is not None
        waiting.append(bool(checkouts.connecting))
        return "api"

    with anyio.fail_after(30):
        a, b = await pk.gather(
            hold_then(sessions, held_a, held_b, lambda: _second_session(sessions, a_waits, 5)),
            hold_then(sessions, held_b, held_a, api_call),
            settle=True,
        )
    assert (a.unwrap(), b.unwrap()) == (5, "api")
    assert waiting == [True]  # A's second session was registered as waiting
    _assert_all_back(engine)


@pytest.mark.parametrize("b_asks", ["second session", "parallel"])
async def test_a_waiting_second_session_counts_for_the_other_requests(
    make_engine: Make, b_asks: str
) -> None:
    # A and B each hold one of the two connections; A's second session waits in the pool
    # for B's; B then asks for one more (a second session, or a fan-out): every holder
    # waits, B closes the circle and is refused; its transaction ends, A goes on
    engine, sessions = pool_of(make_engine, 2)
    held_a, held_b, a_waits = anyio.Event(), anyio.Event(), anyio.Event()

    async def b_asks_for_one_more() -> Any:
        if b_asks == "parallel":
            await a_waits.wait()
            return await parallel(sessions, never)
        return await _second_statement(sessions, a_waits, 8)

    with anyio.fail_after(30):
        a, b = await pk.gather(
            hold_then(sessions, held_a, held_b, lambda: _second_session(sessions, a_waits, 7)),
            hold_then(sessions, held_b, held_a, b_asks_for_one_more),
            settle=True,
        )
    assert a.unwrap() == 7
    assert isinstance(b.error, sa_exc.TimeoutError), repr(b.error)
    if b_asks == "parallel":
        assert "parallel() would deadlock" in str(b.error)
        assert "other task(s) already waiting" in str(b.error)
    else:
        _assert_second_refused(b.error, others=True)
    _assert_all_back(engine)


async def test_a_second_session_closing_the_circle_of_a_fan_out_is_refused(
    make_engine: Make,
) -> None:
    # A holds a connection and fans out; its item waits in the pool. B holds the other
    # connection and opens a second session: it closes the circle, refused; A goes on
    engine, sessions = pool_of(make_engine, 2)
    held_a, held_b, a_waits = anyio.Event(), anyio.Event(), anyio.Event()

    async def item(session: LimitedAsyncSession) -> int:
        a_waits.set()
        return int((await session.execute(text("SELECT 9"))).scalar_one())

    with anyio.fail_after(30):
        a, b = await pk.gather(
            hold_then(sessions, held_a, held_b, lambda: parallel(sessions, item)),
            hold_then(sessions, held_b, held_a, lambda: _second_statement(sessions, a_waits, 10)),
            settle=True,
        )
    assert a.unwrap() == [9]
    _assert_second_refused(b.error, others=True)
    _assert_all_back(engine)


async def test_a_plain_second_session_is_left_to_the_pools_timeout(make_engine: Make) -> None:
    # documented: a plain AsyncSession (not Limited) runs none of parallelkit's code
    # before the pool's wait; it ends in the pool's own TimeoutError after pool_timeout
    engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=0.2)
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)
    plain = async_sessionmaker(engine)
    with anyio.fail_after(30):
        async with sessions() as first:
            await hold(first)
            async with plain() as second:
                with pytest.raises(sa_exc.TimeoutError) as info:
                    await second.execute(text("SELECT 2"))
            assert "would deadlock" not in str(info.value)
            await first.commit()
    _assert_all_back(engine)


@pytest.mark.parametrize("slot", ["session", "async with slots"])
async def test_a_task_holding_no_connection_waits_for_a_full_pool_as_before(
    make_engine: Make, slot: str
) -> None:
    # the pool is full (B holds its only connection, in an API call): A's session is
    # looked at (the pool may be out of connections) but A holds none: it waits, is not
    # refused, and gets B's connection once B commits
    engine, sessions = pool_of(make_engine, 1)
    slots = pool_limiter(engine)
    held_b, a_waits = anyio.Event(), anyio.Event()

    async def request_a() -> int:
        await held_b.wait()
        async with AsyncExitStack() as stack:
            if slot == "async with slots":
                await stack.enter_async_context(slots)
            session = await stack.enter_async_context(sessions())
            a_waits.set()
            return int((await session.execute(text("SELECT 4"))).scalar_one())

    async def request_b() -> str:
        # a plain session: A's LimitedAsyncSession then takes the free slot and reaches
        # the pool (B holding a slot would keep A in the limiter's queue instead)
        async with async_sessionmaker(engine)() as session:
            await hold(session)
            held_b.set()
            await a_waits.wait()
            await session.commit()
            return "api"

    with anyio.fail_after(30):
        a, b = await pk.gather(request_a(), request_b(), settle=True)
    assert (a.unwrap(), b.unwrap()) == (4, "api")
    _assert_all_back(engine)
