"""RedisLimiter's rate keeps every turn a caller gives up; a lock or a slot whose acquire
timed out in a Redis stall is given back as soon as Redis answers again."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aredis

from parallelkit.redis import RedisLimiter, RedisLock, RedisUnavailable

from .redis_helpers import FakeTimer, client, eventually
from .redis_helpers.stall import StallProxy

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client cannot run under trio


def record_delays(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Each caller's reservation: the task's name -> its wait (s) on the frozen clock."""
    delays: dict[str, float] = {}
    reserve = RedisLimiter._reserve

    async def recording(self: RedisLimiter) -> Any:
        turn = await reserve(self)
        delays[anyio.get_current_task().name] = round(turn.delay, 6)
        return turn

    monkeypatch.setattr(RedisLimiter, "_reserve", recording)
    return delays


async def start(limiter: RedisLimiter) -> None:
    async with limiter:
        pass


def gives_up(limiter: RedisLimiter, scope: anyio.CancelScope) -> Any:
    async def waiter() -> None:
        with scope:
            async with limiter:
                pytest.fail("cancelled before its start")

    return waiter


async def test_a_turn_given_up_in_the_middle_of_the_line_goes_to_the_next(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeTimer()  # frozen: starts are 250 ms apart on the shared clock
    limiter = RedisLimiter(r, "middle", rate=4, prefix=prefix, clock=clock)
    delays = record_delays(monkeypatch)
    await start(limiter)  # the first start: the next one is 250 ms away
    middle = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(start, limiter, name="second")
        await eventually(lambda: "second" in delays, "the second caller's reservation")
        tg.start_soon(gives_up(limiter, middle), name="third")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(start, limiter, name="fourth")
        await anyio.wait_all_tasks_blocked()
        middle.cancel()  # the third leaves while it waits (the second may have started)
    # the fourth took the third's turn: none lost (it is not 750 ms away), and none
    # closer than 250 ms to the one before
    assert (delays["second"], delays["fourth"]) == (0.25, 0.5)
    rate_key = f"{prefix}:limiter:{{middle}}:rate"
    assert await r.get(rate_key) == f"{clock.now * 1000 + 750:.3f}".encode()  # three starts


async def test_a_turn_given_back_before_another_processs_goes_to_the_next_reservation(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeTimer()  # frozen: starts are 5 s apart on the shared clock (none comes)
    here = RedisLimiter(r, "hole", rate=0.2, prefix=prefix, clock=clock)
    there = RedisLimiter(r, "hole", rate=0.2, prefix=prefix, clock=clock)  # another process
    delays = record_delays(monkeypatch)
    await start(here)  # the first start: the next one is 5 s away
    first = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(gives_up(here, first), name="first-here")
        await eventually(lambda: "first-here" in delays, "a reservation here")
        tg.start_soon(start, there, name="there")
        await eventually(lambda: "there" in delays, "a reservation there, after it")
        tg.start_soon(start, here, name="next-here")
        await anyio.wait_all_tasks_blocked()
        first.cancel()  # gives back a start with a later one (there's) standing
        await eventually(lambda: "next-here" in delays, "the next reservation here")
        tg.cancel_scope.cancel()  # every start given back: none lost, no hole left
    assert (delays["first-here"], delays["there"]) == (5.0, 10.0)
    assert delays["next-here"] == 5.0  # the turn given back, not the one after there's
    rate_key = f"{prefix}:limiter:{{hole}}:rate"
    assert await r.get(rate_key) == f"{clock.now * 1000 + 5000:.3f}".encode()  # one start
    assert await r.exists(f"{rate_key}:holes") == 0


async def stall_through_an_acquire(
    proxy: StallProxy, acquire: Any, what: type[BaseException] = RedisUnavailable
) -> None:
    """Stall Redis while ``acquire()`` runs: its command times out, and so does a first
    give-back; resume once a give-back was refused, and wait for ``acquire`` to raise."""
    replies = proxy.replies
    proxy.stall()

    async def acquiring() -> None:
        with pytest.raises(what):
            await acquire()

    async with anyio.create_task_group() as tg:
        tg.start_soon(acquiring)
        await eventually(lambda: proxy.refused >= 1, "a give-back during the stall")
        await proxy.resume()
    # Redis ran the acquire held during the stall (its reply went nowhere)
    await eventually(lambda: proxy.replies > replies, "Redis ran what was held")


async def test_a_lock_acquired_in_a_stall_is_given_back_when_redis_answers(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)
        await stalled.ping()
        lock = RedisLock(stalled, "stalled", ttl=60, poll=0.01, prefix=prefix, command_timeout=0.2)

        async def acquire() -> None:
            async with lock:
                pytest.fail("Redis did not answer: not acquired")

        await stall_through_an_acquire(proxy, acquire)
        await stalled.aclose()
    key = f"{prefix}:lock:{{stalled}}"
    assert await r.exists(f"{key}:fence") == 1  # the acquire ran in Redis, late
    assert await r.exists(key) == 0  # ... and its lock was given back: not held for 60 s
    async with RedisLock(r, "stalled", blocking=False, prefix=prefix):
        pass  # free for the next holder at once


async def test_a_slot_acquired_in_a_stall_is_given_back_when_redis_answers(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)
        await stalled.ping()
        limiter = RedisLimiter(
            stalled,
            "stalled",
            concurrency=1,
            lease=60,
            fail="closed",
            poll=0.01,
            prefix=prefix,
            command_timeout=0.2,
        )

        async def acquire() -> None:
            async with limiter:
                pytest.fail("Redis did not answer: no slot")

        await stall_through_an_acquire(proxy, acquire)
        await stalled.aclose()
        assert limiter.statistics().held == 0
    assert await r.zcard(f"{prefix}:limiter:{{stalled}}:holders") == 0  # not held for 60 s
