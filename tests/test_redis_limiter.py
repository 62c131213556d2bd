"""RedisLimiter: a global concurrency bound and rate, leases, outage policies."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import anyio
import pytest
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError

import parallelkit as pk
from parallelkit._core.limiter import SupportsLimit
from parallelkit.redis import RedisLimiter, RedisUnavailable

from .redis_helpers import (
    FakeTimer,
    LostReply,
    Refused,
    bad_arguments,
    client,
    start_workers,
    stop_workers,
    wait_workers,
)

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    # redis-py's asyncio client is built on asyncio streams and locks: it cannot run
    # under trio, so the Redis-backed primitives (and these tests) are asyncio-only.
    return "asyncio"


class Peak:
    """Counts holders; the first ones wait until ``goal`` hold at once (so it is reached)."""

    def __init__(self, goal: int) -> None:
        self.goal = goal
        self.running = self.peak = 0
        self.reached = anyio.Event()

    async def hold(self) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        if self.running >= self.goal:
            self.reached.set()
        await self.reached.wait()
        self.running -= 1


async def test_is_accepted_as_limit_and_bounds_concurrency(r: aredis.Redis, prefix: str) -> None:
    limiter = RedisLimiter(r, "api", concurrency=3, poll=0.01, prefix=prefix)
    assert isinstance(limiter, SupportsLimit)
    holders = Peak(3)

    async def work(i: int) -> int:
        await holders.hold()
        return i

    # two independent fan-outs share one global budget
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(pk.map, work, range(20), limit=limiter))
        tg.start_soon(partial(pk.map, work, range(20), limit=limiter))
    assert holders.peak == 3  # reached, never exceeded
    assert await r.zcard(f"{prefix}:limiter:{{api}}:holders") == 0
    stats = limiter.statistics()
    assert (stats.held, stats.waiting, stats.fallbacks, stats.redis_errors) == (0, 0, 0, 0)


async def test_two_limiter_objects_with_one_name_share_the_bound(
    r: aredis.Redis, prefix: str
) -> None:
    a = RedisLimiter(r, "shared", concurrency=1, prefix=prefix)
    b = RedisLimiter(r, "shared", concurrency=1, prefix=prefix, poll=0.01)
    entered_b = anyio.Event()

    async def use_b() -> None:
        async with b:
            entered_b.set()

    async with a, anyio.create_task_group() as tg:
        tg.start_soon(use_b)
        with anyio.fail_after(30):
            while b.statistics().waiting != 1:
                await anyio.sleep(0.005)
        assert not entered_b.is_set()  # a holds the only global slot
        tg.cancel_scope.cancel()
    async with b:
        pass


async def test_a_dead_holders_lease_expires(r: aredis.Redis, prefix: str) -> None:
    clock = FakeTimer()
    limiter = RedisLimiter(
        r, "leased", concurrency=1, lease=0.3, poll=0.01, prefix=prefix, clock=clock
    )
    holders = f"{prefix}:limiter:{{leased}}:holders"
    # a holder in a process that died: its lease ends at now + 0.3 s, nobody renews it
    await r.zadd(holders, {"ghost": clock.now * 1000 + 300})
    entered = anyio.Event()

    async def use() -> None:
        async with limiter:
            entered.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(use)
        with anyio.fail_after(30):
            while limiter.statistics().waiting != 1:
                await anyio.sleep(0.005)
        assert not entered.is_set()  # the ghost's lease has not ended on the shared clock
        clock.now += 0.31  # ... now it has
        with anyio.fail_after(30):
            await entered.wait()
    assert await r.zscore(holders, "ghost") is None


async def bridge_three_leases(r: aredis.Redis, holders: str, clock: FakeTimer) -> None:
    """Move the shared clock three lease lengths on (0.2 s at a time, lease 0.3), each
    step waiting for the holder's renewal to show in Redis."""
    for _ in range(3):
        before = await r.zrange(holders, 0, -1, withscores=True)
        clock.now += 0.2
        with anyio.fail_after(30):  # a hang guard, not a timing assertion
            while await r.zrange(holders, 0, -1, withscores=True) == before:
                await anyio.sleep(0.01)


async def test_leases_are_renewed_while_held(r: aredis.Redis, prefix: str) -> None:
    clock = FakeTimer()
    limiter = RedisLimiter(r, "long", concurrency=1, lease=0.3, prefix=prefix, clock=clock)
    other = RedisLimiter(r, "long", concurrency=1, lease=0.3, prefix=prefix, clock=clock)
    holders = f"{prefix}:limiter:{{long}}:holders"
    async with limiter:
        await bridge_three_leases(r, holders, clock)
        with anyio.move_on_after(0.1) as scope:
            async with other:
                pytest.fail("the renewed lease must still hold the only slot")
        assert scope.cancelled_caught
    assert limiter.statistics().lost_leases == 0


async def test_a_slot_is_renewed_while_its_holder_waits_for_the_rate(
    r: aredis.Redis, prefix: str
) -> None:
    clock = FakeTimer()  # frozen: the second start is 100 s away, only renewals see it move
    limiter = RedisLimiter(
        r, "both", concurrency=1, rate=0.01, lease=0.3, poll=0.01, prefix=prefix, clock=clock
    )
    other = RedisLimiter(r, "both", concurrency=1, lease=0.3, poll=0.01, prefix=prefix, clock=clock)
    holders = f"{prefix}:limiter:{{both}}:holders"
    async with limiter:
        pass  # the first start; the next one is 100 s away
    entered = anyio.Event()

    async def use() -> None:
        async with limiter:  # takes the only slot, then waits for its start
            entered.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(use)
        with anyio.fail_after(30):
            while await r.zcard(holders) != 1:
                await anyio.sleep(0.005)
        await bridge_three_leases(r, holders, clock)
        with anyio.move_on_after(0.1) as scope:
            async with other:
                pytest.fail("the waiting holder's renewed lease must still hold the only slot")
        assert scope.cancelled_caught
        assert not entered.is_set()
        tg.cancel_scope.cancel()
    assert await r.zcard(holders) == 0  # the cancelled waiter gave its slot back
    stats = limiter.statistics()
    assert (stats.held, stats.lost_leases) == (0, 0)


async def test_lost_lease_is_counted_not_raised(r: aredis.Redis, prefix: str) -> None:
    limiter = RedisLimiter(r, "lost", concurrency=1, lease=0.2, prefix=prefix)
    async with limiter:
        await r.delete(f"{prefix}:limiter:{{lost}}:holders")
        with anyio.fail_after(30):
            while limiter.statistics().lost_leases == 0:  # the next renewal finds it gone
                await anyio.sleep(0.01)
    assert limiter.statistics().lost_leases == 1


async def test_rate_spaces_starts_globally(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeTimer()  # frozen: every reservation sees the same "now"
    a = RedisLimiter(r, "rated", rate=100, prefix=prefix, clock=clock)
    b = RedisLimiter(r, "rated", rate=100, prefix=prefix, clock=clock)
    delays: list[float] = []
    reserve = RedisLimiter._reserve

    async def recording(self: RedisLimiter) -> Any:
        turn = await reserve(self)
        delays.append(turn.delay)
        return turn

    monkeypatch.setattr(RedisLimiter, "_reserve", recording)
    starts = 0

    async def work(i: int) -> None:
        nonlocal starts
        starts += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(pk.map, work, range(10), limit=a))
        tg.start_soon(partial(pk.map, work, range(10), limit=b))
    assert starts == 20
    # one global schedule: the 20 starts got the 20 consecutive slots 10 ms apart
    assert sorted(round(d, 6) for d in delays) == [round(k * 0.01, 6) for k in range(20)]


async def test_waiters_cancelled_before_their_start_give_it_back(
    r: aredis.Redis, prefix: str
) -> None:
    clock = FakeTimer()  # frozen: the reservations are 1 s apart on the shared clock
    limiter = RedisLimiter(r, "turns", rate=1, prefix=prefix, clock=clock)
    rate_key = f"{prefix}:limiter:{{turns}}:rate"
    async with limiter:
        pass  # the first start: the next one is 1 s away
    one_start = f"{(clock.now + 1) * 1000:.3f}".encode()
    assert await r.get(rate_key) == one_start

    async def wait_for_a_start() -> None:
        async with limiter:
            pytest.fail("cancelled before its start")

    async with anyio.create_task_group() as tg:  # as a fail-fast map cancels its items
        for _ in range(10):
            tg.start_soon(wait_for_a_start)
        # only the head of the line holds a reservation (the next start, 2 s from the
        # first); the nine others wait in line behind it, holding nothing in Redis
        two_starts = f"{(clock.now + 2) * 1000:.3f}".encode()
        with anyio.fail_after(30):
            while await r.get(rate_key) != two_starts or len(limiter._line) < 9:
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()  # in any order: the later ones may go first
    # none of the ten started: the next caller of any process waits 1 s, not 11 s
    assert await r.get(rate_key) == one_start
    assert await r.exists(f"{rate_key}:holes") == 0


async def test_cancelled_waiter_gives_its_slot_back(r: aredis.Redis, prefix: str) -> None:
    limiter = RedisLimiter(r, "cx", concurrency=1, rate=5, prefix=prefix, clock=FakeTimer())
    async with limiter:
        pass  # uses the first rate slot: on the frozen clock the next one is 0.2 s away
    with anyio.move_on_after(0.05):
        async with limiter:
            pytest.fail("must still be waiting for the rate")
    assert await r.zcard(f"{prefix}:limiter:{{cx}}:holders") == 0
    assert limiter.statistics().held == 0


async def test_an_acquire_cancelled_with_its_reply_on_the_way_gives_the_slot_back(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RedisLimiter(r, "lost", concurrency=1, prefix=prefix)
    holders = f"{prefix}:limiter:{{lost}}:holders"
    lost = LostReply(r, monkeypatch)

    async def acquire() -> None:
        async with limiter:
            pytest.fail("the reply never came: not acquired")

    async with anyio.create_task_group() as tg:
        tg.start_soon(acquire)
        await lost.ran.wait()
        assert await r.zcard(holders) == 1  # Redis gave it the slot
        tg.cancel_scope.cancel()
    assert await r.zcard(holders) == 0  # not held for a lease by nobody
    assert limiter.statistics().held == 0


async def test_a_start_reserved_with_its_reply_on_the_way_is_given_back(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeTimer()  # frozen: the reservations are 1 s apart on the shared clock
    limiter = RedisLimiter(r, "lost-turn", rate=1, prefix=prefix, clock=clock)
    rate_key = f"{prefix}:limiter:{{lost-turn}}:rate"
    async with limiter:
        pass  # the first start: the next one is 1 s away
    one_start = f"{(clock.now + 1) * 1000:.3f}".encode()
    lost = LostReply(r, monkeypatch)

    async def acquire() -> None:
        async with limiter:
            pytest.fail("the reply never came: no start")

    async with anyio.create_task_group() as tg:
        tg.start_soon(acquire)
        await lost.ran.wait()
        assert await r.get(rate_key) != one_start  # Redis reserved it a start
        tg.cancel_scope.cancel()
    # the caller gave up: the next caller of any process waits 1 s, not 2 s
    assert await r.get(rate_key) == one_start


async def test_a_renewal_redis_refuses_is_logged_and_the_holder_finishes(
    r: aredis.Redis,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = RedisLimiter(r, "ro", concurrency=1, lease=0.06, prefix=prefix)
    refused = Refused(r, monkeypatch, limiter._renew_script.sha)
    async with limiter:
        with anyio.fail_after(10):
            # refused twice (tried again), or once and then given up at the lease's end
            # (a loop slowed by a busy machine may reach the end before a second try)
            while refused.refused < 2 and not limiter.statistics().lost_leases:
                await anyio.sleep(0.01)
        finished = True  # not cancelled by the renewal's error
    assert finished
    assert "ReadOnlyError" in caplog.text
    assert limiter.statistics().held == 0


async def test_a_slot_is_given_back_while_another_callers_outage_opened_the_circuit(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # concurrency=2: the nested hold is one more holder of this process (with 1 it
    # would wait for ever, on Redis or on the fallback, which counts the outer hold)
    limiter = RedisLimiter(r, "blip", concurrency=2, lease=30, retry_after=60, prefix=prefix)
    holders = f"{prefix}:limiter:{{blip}}:holders"
    send = r.execute_command
    blip = False

    async def resetting(*args: Any, **options: Any) -> Any:
        nonlocal blip
        if blip and args[0] == "EVALSHA":
            blip = False
            msg = "Connection reset by peer"
            raise RedisConnectionError(msg)
        return await send(*args, **options)

    monkeypatch.setattr(r, "execute_command", resetting)
    async with limiter:
        assert await r.zcard(holders) == 1
        blip = True  # one reset connection: this acquire is served by the fallback,
        async with limiter:  # and the circuit stays open for retry_after
            assert limiter.statistics().fallbacks == 1
    # the slot Redis gave the outer hold is back in Redis, not held by nobody for 30 s
    assert await r.zcard(holders) == 0
    with anyio.fail_after(5):
        async with RedisLimiter(r, "blip", concurrency=1, poll=0.01, prefix=prefix):
            pass


async def test_body_errors_pass_through_and_release(r: aredis.Redis, prefix: str) -> None:
    limiter = RedisLimiter(r, "errs", concurrency=1, prefix=prefix)
    boom = KeyError("k")
    with pytest.raises(KeyError) as info:
        async with limiter:
            raise boom
    assert info.value is boom
    assert await r.zcard(f"{prefix}:limiter:{{errs}}:holders") == 0


async def test_nested_holds_in_one_task(r: aredis.Redis, prefix: str) -> None:
    limiter = RedisLimiter(r, "nest", concurrency=2, prefix=prefix)
    async with limiter, limiter:
        assert limiter.statistics().held == 2
        assert await r.zcard(f"{prefix}:limiter:{{nest}}:holders") == 2
    assert limiter.statistics().held == 0


# ------------------------------------------------------------------ outages
async def test_fail_local_falls_back_to_an_in_process_limiter(dead: aredis.Redis) -> None:
    limiter = RedisLimiter(dead, "x", concurrency=2, retry_after=60)
    holders = Peak(2)

    async def work(i: int) -> int:
        await holders.hold()
        return i

    assert await pk.map(work, range(10), limit=limiter) == list(range(10))
    assert holders.peak == 2
    stats = limiter.statistics()
    assert stats.fallbacks == 10
    assert stats.redis_errors >= 1  # then the breaker skips Redis for retry_after
    assert stats.held == 0


async def test_fail_open_does_not_limit(dead: aredis.Redis) -> None:
    limiter = RedisLimiter(dead, "x", concurrency=1, fail="open")
    holders = Peak(5)

    async def work() -> None:
        async with limiter:
            await holders.hold()

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(work)
    assert holders.peak == 5
    assert limiter.statistics().fallbacks == 5
    assert limiter.statistics().held == 0


async def test_fail_closed_raises(dead: aredis.Redis) -> None:
    limiter = RedisLimiter(dead, "x", concurrency=1, fail="closed")
    for _ in range(2):  # the first from Redis, the second from the open breaker
        with pytest.raises(RedisUnavailable, match="fail='closed'") as info:
            async with limiter:
                pytest.fail("must not run")
        assert info.value.__cause__ is not None


BAD_ARGUMENTS = [
    ({"concurrency": 0}, ValueError, r"^concurrency must be >= 1, got 0$"),
    ({"concurrency": 2.5}, TypeError, r"^concurrency must be an int, or None, got 2.5$"),
    ({"concurrency": True}, TypeError, r"^concurrency must be an int"),
    ({"rate": -1}, ValueError, r"^rate must be > 0 \(starts per second\), got -1$"),
    ({"rate": math.inf}, ValueError, r"^rate must be finite"),
    ({"rate": 1e-300}, ValueError, r"^rate must be >= 1e-09 \(starts per second\), got 1e-300$"),
    ({"rate": "10"}, TypeError, r"^rate must be a number"),
    ({"burst": 0}, ValueError, r"^burst must be >= 1, got 0$"),
    ({"burst": 1.5}, TypeError, r"^burst must be an int, got 1.5$"),
    ({"lease": 0}, ValueError, r"^lease must be > 0 \(seconds\), got 0$"),
    ({"lease": 0.001}, ValueError, r"^lease must be >= 0.01 \(seconds\), got 0.001$"),
    ({"lease": math.nan}, ValueError, r"^lease must be > 0"),
    ({"fail": "maybe"}, ValueError, r"^fail must be one of 'local', 'open', 'closed', got 'mayb"),
    ({"fail": None}, TypeError, r"^fail must be one of 'local', 'open', 'closed', got None$"),
    ({"poll": 0}, ValueError, r"^poll must be > 0 \(seconds\), got 0$"),
    ({"retry_after": -1}, ValueError, r"^retry_after must be > 0"),
    ({"retry_after": True}, TypeError, r"^retry_after must be a number"),
    ({"prefix": ""}, ValueError, r"^prefix must not be empty"),
    ({"command_timeout": 0}, ValueError, r"^command_timeout must be > 0"),
    ({"command_timeout": math.inf}, ValueError, r"^command_timeout must be finite"),
    ({"clock": 3}, TypeError, r"^clock must be a callable, got int 3$"),
]


@bad_arguments(BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument(
    redis_url: str, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        RedisLimiter(client(redis_url), "x", **kwargs)


def test_arguments_are_validated(redis_url: str) -> None:
    conn = client(redis_url)
    with pytest.raises(TypeError, match=r"^name must be a str, got 3$"):
        RedisLimiter(conn, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^name must not be empty"):
        RedisLimiter(conn, "")
    with pytest.raises(TypeError, match=r"redis must be a redis\.asyncio\.Redis client"):
        RedisLimiter(object(), "x")  # type: ignore[arg-type]
    limiter = RedisLimiter(conn, "api", concurrency=5, rate=10, command_timeout=None)
    assert limiter.concurrency == 5
    assert limiter.rate == 10.0
    assert repr(limiter) == (
        "RedisLimiter('api', concurrency=5, rate=10.0, burst=1, fail='local', held=0, waiting=0)"
    )


# ------------------------------------------------------------------ processes
@pytest.mark.slow
async def test_concurrency_bound_holds_across_four_processes(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    procs = start_workers("limiter", redis_url, prefix, 4, "--concurrency", "5", "--callers", "60")
    try:
        wait_workers(procs)
    finally:
        stop_workers(procs)
    peak = int(await r.get(f"{prefix}:max") or 0)
    assert peak == 5  # reached, never exceeded
    assert await r.scard(f"{prefix}:holders") == 0


@pytest.mark.slow
async def test_rate_holds_across_four_processes(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    rate = 50
    procs = start_workers("rate", redis_url, prefix, 4, "--rate", str(rate), "--callers", "8")
    try:
        wait_workers(procs)
    finally:
        stop_workers(procs)
    assert int(await r.get(f"{prefix}:starts") or 0) == 32
    delays = sorted(round(float(d), 6) for d in await r.lrange(f"{prefix}:delays", 0, -1))
    # one schedule for all four processes: the 32 starts took the 32 consecutive
    # slots 1/rate apart (every process's limiter sees the same frozen clock)
    assert delays == [round(k / rate, 6) for k in range(32)]
