"""A RedisStore load whose lease-taking script redis-py sends again after a reset
(Redis had run the first) goes on with the lease it holds, instead of waiting out its
own lease as if another process held it."""

from __future__ import annotations

import hashlib

import anyio
import pytest
import redis.asyncio as aredis

import parallelkit as pk
from parallelkit.redis import RedisStore
from parallelkit.redis._scripts import LOAD_START

from .redis_helpers import client
from .redis_helpers.stall import StallProxy

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client cannot run under trio


async def test_a_load_lease_sent_again_after_a_reset_is_its_own(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    loads = 0

    async def load(key: str) -> str:
        nonlocal loads
        loads += 1
        return f"value of {key}"

    async with StallProxy(redis_url) as proxy:
        stalled = client(proxy.url)  # redis-py sends a command again after a reset
        store = RedisStore(stalled, prefix=prefix, lease=60, near_maxsize=None)
        cache = pk.SWRCache(fresh=60, stale=60, store=store)
        async with store, cache:
            assert await cache.get("warm", load) == "value of warm"  # scripts loaded
            # the reply to the lease-taking script (by its sha) goes nowhere
            proxy.reset_after_reply_to(hashlib.sha1(LOAD_START.encode()).hexdigest().encode())
            with anyio.fail_after(30):  # a guard only: it never waits for its own lease
                assert await cache.get("k", load) == "value of k"
            assert proxy.resets == 1
            assert loads == 2
        await stalled.aclose()
    lease_keys = f"{store._lease_prefix}*"  # (a lease key: {prefix}:{namespace}:l:{key})
    leases = [k async for k in r.scan_iter(match=lease_keys) if b":void:" not in k]
    assert leases == []  # given back by the write, not left for 60 s
