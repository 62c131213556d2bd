"""A lock or a slot whose acquire timed out in a Redis stall is free at once, also when
its give-back reaches Redis before the held acquire does (the give-back leaves a
tombstone that the late acquire honours)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aredis

from parallelkit.redis import RedisLimiter, RedisLock, RedisUnavailable

from .redis_helpers import client, eventually
from .redis_helpers.stall import StallProxy

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client cannot run under trio


async def give_back_first(proxy: StallProxy, acquire: Any) -> None:
    """Stall Redis while ``acquire()`` runs: its command is held, a first give-back is
    refused; then new connections get through (a give-back is answered: ``acquire``
    raises), and only then does Redis receive the held acquire, and run it."""
    proxy.stall()

    async def acquiring() -> None:
        with pytest.raises(RedisUnavailable):
            await acquire()

    async with anyio.create_task_group() as tg:
        tg.start_soon(acquiring)
        await eventually(lambda: proxy.refused >= 1, "a give-back during the stall")
        proxy.let_new_through()  # the next give-back overtakes the held acquire
    # the give-back was answered (``acquire`` raised): now the held acquire arrives
    replies = proxy.replies
    await proxy.resume()
    await eventually(lambda: proxy.replies > replies, "Redis ran the held acquire")


def stalled_lock(url: str, prefix: str) -> tuple[aredis.Redis, RedisLock]:
    stalled = client(url)
    lock = RedisLock(stalled, "raced", ttl=60, poll=0.01, prefix=prefix, command_timeout=0.2)
    return stalled, lock


async def test_a_lock_acquire_overtaken_by_its_give_back_takes_nothing(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    async with StallProxy(redis_url) as proxy:
        stalled, lock = stalled_lock(proxy.url, prefix)
        await stalled.ping()

        async def acquire() -> None:
            async with lock:
                pytest.fail("Redis did not answer: not acquired")

        await give_back_first(proxy, acquire)
        await stalled.aclose()
    await free_at_once(r, prefix)


async def free_at_once(r: aredis.Redis, prefix: str) -> None:
    """The late acquire of the lock "raced" took nothing, its give-back's tombstone
    is there (for at most the lock's ttl), and the lock is free at once."""
    key = f"{prefix}:lock:{{raced}}"
    assert await r.exists(key) == 0  # not held for 60 s
    assert await r.exists(f"{key}:fence") == 0  # nor given a fencing token
    voids = [k async for k in r.scan_iter(match=f"{key}:void:*")]
    assert len(voids) == 1
    assert 0 < await r.pttl(voids[0]) <= 60_000
    async with RedisLock(r, "raced", blocking=False, prefix=prefix):
        pass  # free for the next holder at once


async def test_a_cancelled_lock_acquire_overtaken_by_its_give_back_takes_nothing(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)
        await stalled.ping()
        lock = RedisLock(stalled, "raced", ttl=60, prefix=prefix, command_timeout=30)
        await cancel_in_a_stall(proxy, lock)
        await stalled.aclose()
    await free_at_once(r, prefix)


async def cancel_in_a_stall(proxy: StallProxy, holder: RedisLock | RedisLimiter) -> None:
    """Cancel an acquire whose command is held in a stall; its one give-back gets
    through first, then Redis receives the held acquire, and runs it."""
    proxy.stall()
    async with anyio.create_task_group() as tg:

        async def acquiring() -> None:
            async with holder:
                pytest.fail("Redis did not answer: not acquired")

        tg.start_soon(acquiring)
        await eventually(lambda: proxy.held >= 1, "the acquire held in the stall")
        proxy.let_new_through()
        tg.cancel_scope.cancel()  # its give-back (shielded) goes on a new connection
    replies = proxy.replies
    await proxy.resume()
    await eventually(lambda: proxy.replies > replies, "Redis ran the held acquire")


async def test_a_slot_acquire_overtaken_by_its_give_back_takes_nothing(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)
        await stalled.ping()
        limiter = RedisLimiter(
            stalled,
            "raced",
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

        await give_back_first(proxy, acquire)
        await stalled.aclose()
        assert limiter.statistics().held == 0
    assert await r.zcard(f"{prefix}:limiter:{{raced}}:holders") == 0  # not held for 60 s
    other = RedisLimiter(r, "raced", concurrency=1, fail="closed", prefix=prefix)
    with anyio.fail_after(30):  # a guard only: the slot is free at once
        async with other:
            pass


async def test_a_cancelled_slot_acquire_overtaken_by_its_give_back_takes_nothing(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)
        await stalled.ping()
        limiter = RedisLimiter(
            stalled, "raced", concurrency=1, lease=60, prefix=prefix, command_timeout=30
        )
        await cancel_in_a_stall(proxy, limiter)
        await stalled.aclose()
        assert limiter.statistics().held == 0
    holders = f"{prefix}:limiter:{{raced}}:holders"
    assert await r.zcard(holders) == 0  # not held for 60 s
    assert len([k async for k in r.scan_iter(match=f"{holders}:void:*")]) == 1


async def test_a_lock_acquire_sent_again_after_a_reset_finds_it_taken_by_itself(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    key = f"{prefix}:lock:{{resent}}"
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)  # redis-py sends a command again after a reset
        lock = RedisLock(stalled, "resent", ttl=60, blocking=False, prefix=prefix)
        async with lock:
            pass  # the scripts are loaded: the next reply is the acquire's
        proxy.reset_after_next_reply()
        async with lock:  # Redis ran the acquire; the one sent again finds our token
            assert proxy.resets == 1
            assert lock.token is not None
            assert await r.get(key) == lock.token.encode()
        await stalled.aclose()
    assert await r.exists(key) == 0  # released, not left for 60 s


async def test_a_slot_acquire_sent_again_after_a_reset_finds_it_taken_by_itself(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    holders = f"{prefix}:limiter:{{resent}}:holders"
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)  # redis-py sends a command again after a reset
        limiter = RedisLimiter(
            stalled, "resent", concurrency=1, lease=60, fail="closed", prefix=prefix
        )
        async with limiter:
            pass  # the scripts are loaded: the next reply is the acquire's
        proxy.reset_after_next_reply()
        with anyio.fail_after(30):  # a guard only: it never waits for its own slot
            async with limiter:
                assert proxy.resets == 1
                assert await r.zcard(holders) == 1
        await stalled.aclose()
    assert await r.zcard(holders) == 0  # given back, not left for 60 s
