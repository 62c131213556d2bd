"""A RedisLimiter start whose reservation timed out or was cancelled in a Redis stall
takes nothing, also when its give-back reaches Redis before the held reservation does
(the give-back leaves a tombstone that the reservation honours); a reservation that
redis-py sends again after a reset takes one start, not two. With a rate alone, and
with a rate and a concurrency bound. A start whose reply never came is given back also
after another process reserved the next one (it finds its own record, not the last)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aredis

from parallelkit.redis import RedisLimiter, RedisUnavailable

from .redis_helpers import FakeTimer, LostReply, client, eventually
from .redis_helpers.stall import StallProxy

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

#: With a rate alone, and with a concurrency bound too (the slot is taken first).
BOUNDS = pytest.mark.parametrize("concurrency", [None, 1], ids=["rate", "rate+concurrency"])

INTERVAL = 10.0  # rate=0.1: starts 10 s apart on the frozen clock (no test waits for one)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client cannot run under trio


def limiter_on(
    conn: aredis.Redis, clock: FakeTimer, prefix: str, concurrency: int | None, **options: Any
) -> RedisLimiter:
    options.setdefault("fail", "closed")
    return RedisLimiter(
        conn,
        "raced",
        concurrency=concurrency,
        rate=1 / INTERVAL,
        lease=60,
        poll=0.01,
        prefix=prefix,
        clock=clock,
        **options,
    )


def starts_from(clock: FakeTimer, count: int) -> bytes:
    """The rate key's value once ``count`` starts were reserved on the frozen clock."""
    return f"{(clock.now + count * INTERVAL) * 1000:.3f}".encode()


async def next_delays(
    r: aredis.Redis, clock: FakeTimer, prefix: str, count: int, burst: int = 1
) -> list[float]:
    """The waits of the next ``count`` reservations (another process's, none started)."""
    other = limiter_on(r, clock, prefix, None, burst=burst)
    return [round((await other._reserve()).delay, 6) for _ in range(count)]


async def nothing_taken(r: aredis.Redis, clock: FakeTimer, prefix: str) -> None:
    """Only the first start stands: the late reservation took none (and no slot), and
    the next reservations of any process are spaced one interval apart, never closer."""
    rate_key = f"{prefix}:limiter:{{raced}}:rate"
    assert await r.get(rate_key) == starts_from(clock, 1)  # not two starts
    assert await r.exists(f"{rate_key}:holes") == 0
    assert await r.zcard(f"{prefix}:limiter:{{raced}}:holders") == 0
    # the next caller waits one interval, not two; each one after it one more
    assert await next_delays(r, clock, prefix, 3) == [INTERVAL, 2 * INTERVAL, 3 * INTERVAL]


def reserve_sha(limiter: RedisLimiter) -> bytes:
    sha: str = limiter._reserve_script.sha
    return sha.encode()


@BOUNDS
async def test_a_timed_out_reservation_overtaken_by_its_give_back_takes_no_start(
    r: aredis.Redis, redis_url: str, prefix: str, concurrency: int | None
) -> None:
    clock = FakeTimer()  # frozen: the reservations are 10 s apart on the shared clock
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)
        limiter = limiter_on(stalled, clock, prefix, concurrency, command_timeout=0.2)
        async with limiter:
            pass  # the first start (the scripts are loaded): the next one is 10 s away
        proxy.stall_at(reserve_sha(limiter))  # the slot is taken, the reservation held

        async def acquiring() -> None:
            with pytest.raises(RedisUnavailable):
                async with limiter:
                    pytest.fail("Redis did not answer: no start")

        async with anyio.create_task_group() as tg:
            tg.start_soon(acquiring)
            await eventually(lambda: proxy.refused >= 1, "a give-back during the stall")
            proxy.let_new_through()  # the next give-back overtakes the held reservation
        # the give-back was answered (the caller raised): now the reservation arrives
        replies = proxy.replies
        await proxy.resume()
        await eventually(lambda: proxy.replies > replies, "Redis ran the held reservation")
        await stalled.aclose()
        assert limiter.statistics().held == 0
    await nothing_taken(r, clock, prefix)


@BOUNDS
async def test_a_cancelled_reservation_overtaken_by_its_give_back_takes_no_start(
    r: aredis.Redis, redis_url: str, prefix: str, concurrency: int | None
) -> None:
    clock = FakeTimer()
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)
        limiter = limiter_on(stalled, clock, prefix, concurrency, command_timeout=30)
        async with limiter:
            pass  # the first start (the scripts are loaded): the next one is 10 s away
        proxy.stall_at(reserve_sha(limiter))
        async with anyio.create_task_group() as tg:

            async def acquiring() -> None:
                async with limiter:
                    pytest.fail("Redis did not answer: no start")

            tg.start_soon(acquiring)
            await eventually(lambda: proxy.held >= 1, "the reservation held in the stall")
            proxy.let_new_through()
            tg.cancel_scope.cancel()  # its give-back (shielded) goes on a new connection
        replies = proxy.replies
        await proxy.resume()
        await eventually(lambda: proxy.replies > replies, "Redis ran the held reservation")
        await stalled.aclose()
        assert limiter.statistics().held == 0
    await nothing_taken(r, clock, prefix)


@BOUNDS
async def test_a_reservation_sent_again_after_a_reset_takes_one_start(
    r: aredis.Redis, redis_url: str, prefix: str, concurrency: int | None
) -> None:
    clock = FakeTimer()  # frozen: with burst=3, three starts at once, then 10 s apart
    rate_key = f"{prefix}:limiter:{{raced}}:rate"
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)  # redis-py sends a command again after a reset
        limiter = limiter_on(stalled, clock, prefix, concurrency, burst=3)
        async with limiter:
            pass  # the first start (the scripts are loaded)
        proxy.reset_after_reply_to(reserve_sha(limiter))
        with anyio.fail_after(30):  # a guard only: the second start is at once
            async with limiter:  # Redis ran the reservation; the one sent again finds it
                assert proxy.resets == 1
                assert await r.get(rate_key) == starts_from(clock, 2)  # not three
        await stalled.aclose()
        assert limiter.statistics().held == 0
    assert await r.zcard(f"{prefix}:limiter:{{raced}}:holders") == 0
    # one start of the burst is left, then one every interval: none taken for nobody
    assert await next_delays(r, clock, prefix, 3, burst=3) == [0.0, INTERVAL, 2 * INTERVAL]


async def test_a_lost_reply_is_given_back_after_another_processs_later_reservation(
    r: aredis.Redis, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeTimer()
    here = client(redis_url)
    limiter = limiter_on(here, clock, prefix, None)
    async with limiter:
        pass  # the first start: the next one is 10 s away
    lost = LostReply(here, monkeypatch)

    async def acquire() -> None:
        async with limiter:
            pytest.fail("the reply never came: no start")

    async with anyio.create_task_group() as tg:
        tg.start_soon(acquire)
        await lost.ran.wait()  # Redis reserved it the start 10 s away
        assert await next_delays(r, clock, prefix, 1) == [2 * INTERVAL]  # another's, after it
        tg.cancel_scope.cancel()
    await here.aclose()
    # its start was given back (a hole: a later one stands), and the next reservation
    # of any process takes it: 10 s away, not 30 s
    assert await next_delays(r, clock, prefix, 2) == [INTERVAL, 3 * INTERVAL]
