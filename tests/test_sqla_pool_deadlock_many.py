"""Several requests deadlocked on one pool: each holds a connection in its transaction and
waits for its own fan-out, which needs one more (``max_overflow=0``).

The request whose fan-out completes the cycle (the last to ask) is refused at once with
``sqlalchemy.exc.TimeoutError``; the others go on once its transaction ends. Nobody is
refused while a holder of a connection can still give it back (a holder that does not
wait for a connection). Ordered with events, never with sleeps: an item sets its event
right before its first statement, which then waits in the pool before anything else runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.util import greenlet_spawn

import parallelkit as pk
from parallelkit.sqlalchemy import LimitedAsyncSession, parallel, pool_limiter

# a plugin too: imported here first, it must be rewritten as pytest_plugins would have it
pytest.register_assert_rewrite("tests.sqla_fixtures")

from tests.sqla_fixtures import (  # noqa: E402
    POOL_TIMEOUT,
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
    checkouts = getattr(assert_given_back(engine), "_checkouts", None)
    if checkouts is not None:  # nobody left registered as waiting for a connection
        assert not checkouts.connecting, checkouts.connecting


def _sets(event: anyio.Event) -> Callable[[], Awaitable[None]]:
    """A ``before`` for :func:`_item` that only sets ``event``."""

    async def before() -> None:
        event.set()

    return before


def _item(sessions: Sessions, before: Callable[[], Awaitable[None]]) -> Callable[[int], Any]:
    """An item that awaits ``before()``, then runs its first statement in a session of its own."""

    async def item(i: int) -> int:
        async with sessions() as session:
            await before()
            value = int((await session.execute(text(f"SELECT {i}"))).scalar_one())
            await session.commit()
            return value

    return item


async def _parallel_item(
    sessions: Sessions, before: Callable[[], Awaitable[None]], i: int
) -> list[int]:
    """``parallel()`` of one :func:`_item`."""
    return await parallel(sessions, lambda s: _item(sessions, before)(i))


def _assert_refused(outcome: pk.Outcome[Any]) -> None:
    assert not outcome.ok
    error = outcome.error
    assert isinstance(error, sa_exc.TimeoutError), repr(error)
    message = str(error)
    assert "would deadlock" in message, message
    assert "other" in message  # names the other requests' part in it
    assert "max_overflow" in message  # and the fixes
    assert "Commit" in message


async def test_the_last_request_to_fan_out_is_refused_at_the_call(make_engine: Make) -> None:
    # A and B each hold one of the pool's two connections; A's item waits in the pool for
    # one of them; B's parallel() would wait for one too: every holder waits. Before: B's
    # function (and A's) waited pool_timeout; now B is refused at the call and, its
    # transaction over, A's item gets B's connection
    engine, sessions = pool_of(make_engine, 2)
    held_a, held_b, a_waits = anyio.Event(), anyio.Event(), anyio.Event()
    mark_a = _sets(a_waits)  # its first statement next: into the pool's queue

    async def fan_out_b() -> list[int]:
        await a_waits.wait()
        return await parallel(sessions, never)

    with anyio.fail_after(30):
        a, b = await pk.gather(
            hold_then(sessions, held_a, held_b, lambda: _parallel_item(sessions, mark_a, 7)),
            hold_then(sessions, held_b, held_a, fan_out_b),
            settle=True,
        )
    assert a.unwrap() == [7]
    _assert_refused(b)
    _assert_all_back(engine)


@pytest.mark.parametrize("fanout", ["parallel", "gather", "map"])
async def test_the_item_completing_the_cycle_is_refused_at_its_first_statement(
    make_engine: Make, fanout: str
) -> None:
    # B fans out first (its item does not talk to the database yet), then A's item waits
    # in the pool; B's item's first statement completes the cycle: refused at once
    engine, sessions = pool_of(make_engine, 2)
    slots = pool_limiter(engine)
    held_a, held_b, b_fanned, a_waits = (anyio.Event() for _ in range(4))

    async def mark_b() -> None:
        b_fanned.set()
        await a_waits.wait()

    async def fan_out(item: Callable[[int], Awaitable[int]], i: int) -> list[int]:
        if fanout == "parallel":
            return await parallel(sessions, lambda s: item(i))
        if fanout == "gather":
            return await pk.gather(item(i), limit=slots)
        return await pk.map(item, [i], limit=slots)

    async def fan_out_a() -> list[int]:
        await b_fanned.wait()
        return await fan_out(_item(sessions, _sets(a_waits)), 1)

    with anyio.fail_after(30):
        a, b = await pk.gather(
            hold_then(sessions, held_a, held_b, fan_out_a),
            hold_then(sessions, held_b, held_a, lambda: fan_out(_item(sessions, mark_b), 2)),
            settle=True,
        )
    assert a.unwrap() == [1]
    _assert_refused(b)
    _assert_all_back(engine)


async def test_three_requests_one_refused_the_others_go_on(make_engine: Make) -> None:
    # three holders, three connections: A's and B's items wait in the pool, C's item
    # completes the cycle and is refused; C's connection goes to A's item, A's second item
    # then waits behind B's (which took the connection A's first gave back): a waiter
    # that got its connection no longer counts as waiting, so nobody else is refused
    engine, sessions = pool_of(make_engine, 3)
    holding = [anyio.Event() for _ in range(3)]
    waits = {name: anyio.Event() for name in "ABC"}

    def mark(name: str, after: str | None) -> Callable[[], Awaitable[None]]:
        async def before() -> None:
            if after is not None:
                await waits[after].wait()
            waits[name].set()

        return before

    async def request(index: int, name: str, after: str | None) -> list[int]:
        async with sessions() as session:
            await hold(session)
            holding[index].set()
            for event in holding:
                await event.wait()
            if after is not None:
                await waits[after].wait()
            item = _item(sessions, mark(name, None))
            result = await parallel(sessions, lambda s: item(10 * index), lambda s: item(11))
            await session.commit()
            return result

    with anyio.fail_after(30):
        a, b, c = await pk.gather(
            request(0, "A", None), request(1, "B", "A"), request(2, "C", "B"), settle=True
        )
    assert a.unwrap() == [0, 11]
    assert b.unwrap() == [10, 11]
    _assert_refused(c)
    _assert_all_back(engine)


@pytest.mark.parametrize("busy", ["transaction", "fan-out item"])
async def test_no_refusal_while_a_holder_can_still_give_its_connection_back(
    make_engine: Make, busy: str
) -> None:
    # A's item waits in the pool; B holds a connection but waits for no connection (an
    # API call in its transaction, or in its fan-out's item); C's item asks: B can still
    # give its connection back, so C's item waits (not refused), and all three complete
    engine, sessions = pool_of(make_engine, 3)
    holding = [anyio.Event() for _ in range(3)]
    a_waits, b_busy, c_waits, api_done = (anyio.Event() for _ in range(4))

    async def api_call() -> str:
        b_busy.set()
        await api_done.wait()  # no database meanwhile
        return "api"

    async def holder(index: int) -> None:
        holding[index].set()
        for event in holding:
            await event.wait()

    async def request_a() -> list[int]:
        async with sessions() as session:
            await hold(session)
            await holder(0)
            result = await _parallel_item(sessions, _sets(a_waits), 1)
            await session.commit()
            return result

    async def request_b() -> list[str]:
        async with sessions() as session:
            await hold(session)
            await holder(1)
            await a_waits.wait()
            if busy == "transaction":
                result = [await api_call()]
            else:
                result = await parallel(sessions, lambda s: api_call())
            await session.commit()
            return result

    async def request_c() -> list[int]:
        async with sessions() as session:
            await hold(session)
            await holder(2)
            await b_busy.wait()
            result = await _parallel_item(sessions, _sets(c_waits), 3)
            await session.commit()
            return result

    async def release_b() -> None:
        await c_waits.wait()  # C's item is in the pool's queue now, not refused
        api_done.set()

    with anyio.fail_after(30):
        a, b, c, _ = await pk.gather(
            request_a(), request_b(), request_c(), release_b(), settle=True
        )
    assert (a.unwrap(), b.unwrap(), c.unwrap()) == ([1], ["api"], [3])
    _assert_all_back(engine)


async def test_settled_items_of_the_refused_request_are_each_refused_at_once(
    make_engine: Make,
) -> None:
    # settle=True: each item of B that would wait for the cycle's connection is refused at
    # its first statement (its own Outcome); B then commits, and A's item goes on
    engine, sessions = pool_of(make_engine, 2)
    held_a, held_b, a_waits = anyio.Event(), anyio.Event(), anyio.Event()

    async def nothing() -> None:
        pass

    async def fan_out_b() -> list[pk.Outcome[int]]:
        await a_waits.wait()
        item = _item(sessions, nothing)
        return await pk.map(item, [2, 3], limit=pool_limiter(engine), settle=True)

    with anyio.fail_after(30):
        a, b = await pk.gather(
            hold_then(
                sessions, held_a, held_b, lambda: _parallel_item(sessions, _sets(a_waits), 1)
            ),
            hold_then(sessions, held_b, held_a, fan_out_b),
            settle=True,
        )
    assert a.unwrap() == [1]
    outcomes = b.unwrap()
    assert len(outcomes) == 2
    for outcome in outcomes:
        _assert_refused(outcome)
    _assert_all_back(engine)


async def test_a_connection_held_outside_a_limited_session_counts(make_engine: Make) -> None:
    # the task's LimitedAsyncSession holds one connection and a plain AsyncConnection the
    # other: its fan-out can only deadlock. Before, only LimitedAsyncSessions' connections
    # were counted: the function waited pool_timeout
    engine, sessions = pool_of(make_engine, 2)
    with anyio.fail_after(30):
        async with sessions() as session:
            await hold(session)
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
                with pytest.raises(sa_exc.TimeoutError, match="would deadlock"):
                    await parallel(sessions, never)
    _assert_all_back(engine)


async def test_connections_of_a_disposed_pool_are_not_counted(tmp_path: Path) -> None:
    # after engine.dispose(), a connection of the old pool held by A says nothing about
    # the new pool: A (one old, one new connection) and B (an API call, the other new
    # one) hold the new pool's two; A's item waits for B, not refused. (SQLite only:
    # asyncpg warns about the old pool's connection, which SQLAlchemy never closes.)
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'disposed.sqlite3'}",
        pool_size=2,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT,
    )
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)
    old_pool = engine.sync_engine.pool
    a_new, b_holds, a_waits = anyio.Event(), anyio.Event(), anyio.Event()

    async def request_a() -> list[int]:
        async with sessions() as old:
            await hold(old)
            await engine.dispose()
            async with sessions() as new:  # the same task's slot, a new pool's connection
                await hold(new)
                a_new.set()
                await b_holds.wait()
                return await _parallel_item(sessions, _sets(a_waits), 5)

    async def request_b() -> str:
        await a_new.wait()
        async with sessions() as session:
            await hold(session)
            b_holds.set()
            await a_waits.wait()  # A's item waits in the pool: not refused
            await session.commit()
            return "b"

    try:
        with anyio.fail_after(30):
            a, b = await pk.gather(request_a(), request_b(), settle=True)
        assert (a.unwrap(), b.unwrap()) == ([5], "b")
        _assert_all_back(engine)
    finally:
        await greenlet_spawn(old_pool.dispose)  # the old pool's connection, checked in since
        await engine.dispose()


async def test_the_refused_request_fanning_out_again_is_refused_again_at_once(
    make_engine: Make,
) -> None:
    # the refused request catches the error and fans out again in the same transaction:
    # nothing has changed, refused again at once; once it commits, the other goes on
    engine, sessions = pool_of(make_engine, 2)
    held_a, held_b, a_waits = anyio.Event(), anyio.Event(), anyio.Event()

    async def fan_out_b() -> int:
        await a_waits.wait()
        refusals = 0
        for _ in range(3):
            with pytest.raises(sa_exc.TimeoutError, match="would deadlock"):
                await parallel(sessions, never)
            refusals += 1
        return refusals

    with anyio.fail_after(30):
        a, b = await pk.gather(
            hold_then(
                sessions, held_a, held_b, lambda: _parallel_item(sessions, _sets(a_waits), 4)
            ),
            hold_then(sessions, held_b, held_a, fan_out_b),
            settle=True,
        )
    assert (a.unwrap(), b.unwrap()) == ([4], 3)
    _assert_all_back(engine)


async def test_a_waiting_item_cancelled_in_the_pools_queue_no_longer_counts(
    make_engine: Make,
) -> None:
    # A's item waits in the pool (counted as waiting); it is cancelled there: counted no
    # more, and nothing is left behind
    engine, sessions = pool_of(make_engine, 2)
    slots = pool_limiter(engine)
    held_a, held_b, a_waits, api_done = (anyio.Event() for _ in range(4))
    scopes: list[anyio.CancelScope] = []

    async def item(session: LimitedAsyncSession) -> str:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            a_waits.set()
            await session.execute(text("SELECT 1"))
            return "ran"
        return "cancelled"

    async def api_call() -> str:
        return "b"

    async def cancel_the_waiting_item() -> None:
        await a_waits.wait()
        checkouts = slots._checkouts
        assert checkouts is not None
        assert len(checkouts.connecting) == 1
        scopes[0].cancel()
        api_done.set()

    with anyio.fail_after(30):
        a, b, _ = await pk.gather(
            hold_then(sessions, held_a, held_b, lambda: parallel(sessions, item)),
            hold_then(sessions, held_b, api_done, api_call),  # B: an API call in its transaction
            cancel_the_waiting_item(),
            settle=True,
        )
    assert (a.unwrap(), b.unwrap()) == (["cancelled"], "b")
    _assert_all_back(engine)
