"""A RedisStore load whose lease-taking script (``LOAD_START``) went unanswered in a
Redis stall leaves the key's lease free at once, also when its give-back reaches
Redis before the held script does: the give-back leaves a tombstone that the late
script honours, so it takes nothing (and no process waits out a lease held for
nobody)."""

from __future__ import annotations

import hashlib

import anyio
import pytest
import redis.asyncio as aredis

import parallelkit as pk
from parallelkit.redis import RedisStore
from parallelkit.redis._scripts import LOAD_START

from .redis_helpers import client, eventually
from .redis_helpers.stall import StallProxy

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

LOAD_START_SHA = hashlib.sha1(LOAD_START.encode()).hexdigest().encode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client cannot run under trio


async def load(key: str) -> str:
    return f"value of {key}"


async def lease_free_at_once(r: aredis.Redis, store: RedisStore, prefix: str) -> None:
    """The late ``LOAD_START`` of "k" took nothing: its give-back's tombstone is there
    (for at most the lease), and another process takes the lease at once."""
    lease = store._lease_prefix + store._name("k")
    assert await r.exists(lease) == 0  # not held by nobody for 60 s
    voids = [key async for key in r.scan_iter(match=f"{lease}:void:*")]
    assert len(voids) == 1
    assert 0 < await r.pttl(voids[0]) <= 60_000
    other = RedisStore(r, prefix=prefix, lease=60, near_maxsize=None)
    async with other:
        with anyio.fail_after(30):  # a guard only: the lease is free at once
            async with other.load_lock("k") as start:
                assert start is not None  # taken in Redis, not degraded
                assert await r.exists(lease) == 1


async def test_a_load_lease_overtaken_by_its_give_back_takes_nothing(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)
        store = RedisStore(stalled, prefix=prefix, lease=60, near_maxsize=None, command_timeout=0.2)
        async with store, pk.SWRCache(fresh=60, stale=60, store=store) as cache:
            assert await cache.get("warm", load) == "value of warm"  # scripts loaded
            proxy.stall_at(LOAD_START_SHA)  # the next LOAD_START is held
            async with anyio.create_task_group() as tg:

                async def loading() -> None:
                    # unanswered: the load runs without the lease (degraded)
                    assert await cache.get("k", load) == "value of k"

                tg.start_soon(loading)
                await eventually(lambda: proxy.held >= 1, "LOAD_START held in the stall")
                proxy.let_new_through()  # its give-back overtakes the held script
            # the give-back was answered (the load is done): now the held script arrives
            replies = proxy.replies
            await proxy.resume()
            await eventually(lambda: proxy.replies > replies, "Redis ran the held LOAD_START")
        await stalled.aclose()
    await lease_free_at_once(r, store, prefix)


async def test_a_cancelled_load_lease_overtaken_by_its_give_back_takes_nothing(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)
        store = RedisStore(stalled, prefix=prefix, lease=60, near_maxsize=None, command_timeout=30)
        async with store:
            async with store.load_lock("warm"):
                pass  # the scripts are loaded
            proxy.stall_at(LOAD_START_SHA)
            async with anyio.create_task_group() as tg:

                async def loading() -> None:
                    async with store.load_lock("k"):
                        pytest.fail("Redis did not answer: no lease")

                tg.start_soon(loading)
                await eventually(lambda: proxy.held >= 1, "LOAD_START held in the stall")
                proxy.let_new_through()
                tg.cancel_scope.cancel()  # its give-back (shielded) goes on a new connection
            replies = proxy.replies
            await proxy.resume()
            await eventually(lambda: proxy.replies > replies, "Redis ran the held LOAD_START")
        await stalled.aclose()
    await lease_free_at_once(r, store, prefix)


async def test_a_load_lease_give_back_refused_in_the_stall_is_tried_again(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)
        store = RedisStore(stalled, prefix=prefix, lease=60, near_maxsize=None, command_timeout=2)
        async with store:
            async with store.load_lock("warm"):
                pass  # the scripts are loaded
            proxy.stall_at(LOAD_START_SHA)
            async with anyio.create_task_group() as tg:

                async def loading() -> None:
                    async with store.load_lock("k") as start:
                        assert start is None  # unanswered: degraded, no lease

                tg.start_soon(loading)
                await eventually(lambda: proxy.held >= 1, "LOAD_START held in the stall")
                # its first give-back (the circuit open: sent anyway) is refused
                await eventually(lambda: proxy.refused >= 1, "a give-back during the stall")
                proxy.let_new_through()  # the next one overtakes the held script
            replies = proxy.replies
            await proxy.resume()
            await eventually(lambda: proxy.replies > replies, "Redis ran the held LOAD_START")
        await stalled.aclose()
    await lease_free_at_once(r, store, prefix)
