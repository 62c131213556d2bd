"""RedisLimiter: a global concurrency bound and rate, leases, outage policies."""

from __future__ import annotations

import itertools
import time
from functools import partial

import anyio
import pytest
import redis.asyncio as aredis

import parallelkit as pk
from parallelkit._core.limiter import SupportsLimit
from parallelkit.redis import RedisLimiter, RedisUnavailable

from .redis_helpers import client, start_workers, stop_workers, wait_workers

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    # redis-py's asyncio client is built on asyncio streams and locks: it cannot run
    # under trio, so the Redis-backed primitives (and these tests) are asyncio-only.
    return "asyncio"


async def test_is_accepted_as_limit_and_bounds_concurrency(r: aredis.Redis, prefix: str) -> None:
    limiter = RedisLimiter(r, "api", concurrency=3, poll=0.01, prefix=prefix)
    assert isinstance(limiter, SupportsLimit)
    running = peak = 0

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1
        return i

    # two independent fan-outs share one global budget
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(pk.map, work, range(20), limit=limiter))
        tg.start_soon(partial(pk.map, work, range(20), limit=limiter))
    assert peak == 3
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
        await anyio.sleep(0.2)
        assert not entered_b.is_set()  # a holds the only global slot
        assert b.statistics().waiting == 1
        tg.cancel_scope.cancel()
    async with b:
        pass


async def test_a_dead_holders_lease_expires(r: aredis.Redis, prefix: str) -> None:
    limiter = RedisLimiter(r, "leased", concurrency=1, lease=0.3, poll=0.02, prefix=prefix)
    holders = f"{prefix}:limiter:{{leased}}:holders"
    # a holder in a process that died: its token is in the set, nobody renews it
    await limiter._acquire_script(keys=[holders], args=["ghost", 1, 300])
    started = anyio.current_time()
    async with limiter:
        waited = anyio.current_time() - started
    assert 0.15 <= waited < 2.0


async def test_leases_are_renewed_while_held(r: aredis.Redis, prefix: str) -> None:
    limiter = RedisLimiter(r, "long", concurrency=1, lease=0.3, prefix=prefix)
    other = RedisLimiter(r, "long", concurrency=1, lease=0.3, prefix=prefix)
    async with limiter:
        await anyio.sleep(1.0)  # > 3 leases
        with anyio.move_on_after(0.3) as scope:
            async with other:
                pytest.fail("the renewed lease must still hold the only slot")
        assert scope.cancelled_caught
    assert limiter.statistics().lost_leases == 0


async def test_lost_lease_is_counted_not_raised(r: aredis.Redis, prefix: str) -> None:
    limiter = RedisLimiter(r, "lost", concurrency=1, lease=0.2, prefix=prefix)
    async with limiter:
        await r.delete(f"{prefix}:limiter:{{lost}}:holders")
        await anyio.sleep(0.3)
    assert limiter.statistics().lost_leases == 1


async def test_rate_spaces_starts_globally(r: aredis.Redis, prefix: str) -> None:
    a = RedisLimiter(r, "rated", rate=20, prefix=prefix)
    b = RedisLimiter(r, "rated", rate=20, prefix=prefix)
    starts: list[float] = []

    async def work(i: int) -> None:
        starts.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(pk.map, work, range(10), limit=a))
        tg.start_soon(partial(pk.map, work, range(10), limit=b))
    starts.sort()
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert starts[-1] - starts[0] >= 19 / 20 - 0.05  # 20 starts at 20/s span >= 0.95 s
    assert min(gaps) > 0.02  # never two starts together (interval 0.05 s)


async def test_cancelled_waiter_gives_its_slot_back(r: aredis.Redis, prefix: str) -> None:
    limiter = RedisLimiter(r, "cx", concurrency=1, rate=5, prefix=prefix)
    async with limiter:
        pass  # uses the first rate slot: the next acquire must sleep ~0.2 s
    with anyio.move_on_after(0.05):
        async with limiter:
            pytest.fail("must still be waiting for the rate")
    assert await r.zcard(f"{prefix}:limiter:{{cx}}:holders") == 0
    assert limiter.statistics().held == 0


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
    running = peak = 0

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1
        return i

    assert await pk.map(work, range(10), limit=limiter) == list(range(10))
    assert peak == 2
    stats = limiter.statistics()
    assert stats.fallbacks == 10
    assert stats.redis_errors >= 1  # then the breaker skips Redis for retry_after
    assert stats.held == 0


async def test_fail_open_does_not_limit(dead: aredis.Redis) -> None:
    limiter = RedisLimiter(dead, "x", concurrency=1, fail="open")
    running = peak = 0

    async def work() -> None:
        nonlocal running, peak
        async with limiter:
            running += 1
            peak = max(peak, running)
            await anyio.sleep(0.02)
            running -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(work)
    assert peak == 5
    assert limiter.statistics().fallbacks == 5
    assert limiter.statistics().held == 0


async def test_fail_closed_raises(dead: aredis.Redis) -> None:
    limiter = RedisLimiter(dead, "x", concurrency=1, fail="closed")
    for _ in range(2):  # the first from Redis, the second from the open breaker
        with pytest.raises(RedisUnavailable, match="fail='closed'") as info:
            async with limiter:
                pytest.fail("must not run")
        assert info.value.__cause__ is not None


def test_arguments_are_validated(redis_url: str) -> None:
    conn = client(redis_url)
    with pytest.raises(ValueError, match="concurrency"):
        RedisLimiter(conn, "x", concurrency=0)
    with pytest.raises(ValueError, match="rate"):
        RedisLimiter(conn, "x", rate=-1)
    with pytest.raises(ValueError, match="burst"):
        RedisLimiter(conn, "x", burst=0)
    with pytest.raises(ValueError, match="lease"):
        RedisLimiter(conn, "x", lease=0)
    with pytest.raises(ValueError, match="fail"):
        RedisLimiter(conn, "x", fail="maybe")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name"):
        RedisLimiter(conn, 3)  # type: ignore[arg-type]
    limiter = RedisLimiter(conn, "api", concurrency=5, rate=10)
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
    rate = 20
    procs = start_workers("rate", redis_url, prefix, 4, "--rate", str(rate), "--callers", "8")
    try:
        wait_workers(procs)
    finally:
        stop_workers(procs)
    starts = sorted(float(s) for s in await r.lrange(f"{prefix}:starts", 0, -1))
    assert len(starts) == 32
    # any window slightly shorter than 1 s holds at most `rate` starts (the 0.1 s
    # margin absorbs sleep jitter, which can only delay a start, never advance it)
    window = 1.0 - 0.1
    for i, first in enumerate(starts):
        inside = sum(1 for s in starts[i:] if s < first + window)
        assert inside <= rate, f"{inside} starts within {window}s from {first}"
    assert starts[-1] - starts[0] >= (32 - 1) / rate - 0.1
