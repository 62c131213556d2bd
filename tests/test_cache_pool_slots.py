"""A cached function called while holding a database pool slot never waits for ever.

``SWRCache`` loads a miss in another task than its callers (the cache's task
group when it is entered, else the first caller's task). With
``pool_limiter(engine)``, a caller holding a slot (an open transaction of a
``LimitedAsyncSession``, ``async with db.slots``) that waits for a load which
itself needs a slot deadlocked once every slot was held that way. The load now
runs on a waiting caller's slot (``parallelkit._core.waits``), as a fan-out's
workers run on their caller's. Virtual time (trio's ``MockClock``): a hang fails
at once, and nothing here asserts on real elapsed time.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import QueuePool
from trio.testing import MockClock

import parallelkit as pk
from parallelkit._core import waits
from parallelkit.sqlalchemy import PoolLimiter, pool_limiter

pytestmark = [pytest.mark.anyio]

BACKENDS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mockclock"),
]


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = create_engine("sqlite://", poolclass=QueuePool, pool_size=2, max_overflow=0)
    try:
        yield engine
    finally:
        engine.dispose()


def at_rest(slots: PoolLimiter) -> None:
    stats = slots.statistics()
    assert (stats.running, stats.waiting) == (0, 0), slots
    assert slots._held == {}
    assert slots._borrowed == {}
    assert not slots._lending
    assert not waits.BLOCKED
    assert not waits.WORKERS
    assert not waits.WAKE


@pytest.mark.parametrize("anyio_backend", BACKENDS)
@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
async def test_callers_holding_every_slot_get_the_load_they_wait_for(
    anyio_backend: object, engine: Engine, entered: bool
) -> None:
    slots = pool_limiter(engine)
    assert slots.concurrency == 2
    cache = pk.SWRCache(fresh=30, stale=300)
    loads = 0

    @cache.cached
    async def lookup(key: int) -> int:
        nonlocal loads
        async with slots:  # the loader talks to the database
            loads += 1
            await anyio.sleep(1)
            return key * 10

    async def request(key: int) -> None:
        async with slots:  # an open transaction: a slot held while the cached call waits
            assert await lookup(key) == key * 10

    async def requests() -> None:
        with anyio.fail_after(60):  # virtual time on trio: a hang fails at once
            async with anyio.create_task_group() as tg:
                for _ in range(4):  # more callers than slots, one key
                    tg.start_soon(request, 1)
                tg.start_soon(request, 2)  # and another key's load behind them

    if entered:
        async with cache:
            await requests()
    else:
        await requests()
    assert loads == 2
    at_rest(slots)


@pytest.mark.parametrize("anyio_backend", BACKENDS)
@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
async def test_a_load_already_waiting_for_a_slot_is_woken_by_callers_that_hold_them(
    anyio_backend: object, engine: Engine, entered: bool
) -> None:
    # the load asks for a slot while both are held for other work; then their holders
    # call the cached function and wait for that load: it must run on one of theirs
    slots = pool_limiter(engine)
    cache = pk.SWRCache(fresh=30, stale=300)
    held = anyio.Event()
    asking = anyio.Event()

    @cache.cached
    async def lookup(key: int) -> int:
        asking.set()
        async with slots:
            return key + 1

    async def holder() -> None:
        async with slots:
            await held.wait()
            await asking.wait()  # the load waits for a slot now
            await anyio.sleep(1)
            assert await lookup(7) == 8

    async def requests() -> None:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(holder)
                tg.start_soon(holder)
                while slots.statistics().running < 2:
                    await anyio.sleep(0.01)
                held.set()
                # this caller holds no slot (not entered: it runs the load itself)
                assert await lookup(7) == 8

    if entered:
        async with cache:
            await requests()
    else:
        await requests()
    at_rest(slots)


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_a_lender_cancelled_while_the_load_runs_on_its_slot_leaves_the_counts_right(
    anyio_backend: object, engine: Engine
) -> None:
    slots = pool_limiter(engine)
    cache = pk.SWRCache(fresh=30, stale=300)
    release = anyio.Event()
    running = anyio.Event()

    @cache.cached
    async def lookup(key: int) -> int:
        async with slots:
            running.set()
            await release.wait()
            return key

    async def request(scope_out: list[anyio.CancelScope]) -> None:
        with anyio.CancelScope() as scope:
            scope_out.append(scope)
            async with slots:
                await lookup(1)

    async with cache:
        with anyio.fail_after(60):
            scopes: list[anyio.CancelScope] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(request, scopes)
                tg.start_soon(request, scopes)
                await running.wait()  # the load runs on a waiting caller's slot
                assert slots.statistics().running == 2
                scopes[0].cancel()  # one caller leaves: the other still waits for the load
                await anyio.sleep(1)
                release.set()
            assert await lookup(1) == 1  # stored for the caller that stayed
    at_rest(slots)


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_a_load_that_loads_another_key_first_still_runs_on_a_waiting_callers_slot(
    anyio_backend: object, engine: Engine
) -> None:
    # not entered: the leader's task runs the outer load, and inside it the inner one
    slots = pool_limiter(engine)
    cache = pk.SWRCache(fresh=30, stale=300)
    outer_started = anyio.Event()
    holders_waiting = anyio.Event()

    @cache.cached
    async def inner(key: int) -> int:
        return key + 1

    @cache.cached
    async def outer(key: int) -> int:
        outer_started.set()
        await holders_waiting.wait()
        base = await inner(key)  # a load of its own, in this same task
        async with slots:  # every slot is held by callers waiting for this load
            return base * 10

    async def holder() -> None:
        async with slots:
            await outer_started.wait()
            assert await outer(1) == 20

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            tg.start_soon(holder)
            while slots.statistics().running < 2:
                await anyio.sleep(0.01)

            async def leader() -> None:
                assert await outer(1) == 20  # this task holds no slot

            tg.start_soon(leader)
            await outer_started.wait()
            await anyio.sleep(1)  # the holders are waiting for the outer load now
            holders_waiting.set()
    at_rest(slots)
