"""The start-up, process, Redis and Taskiq recipes under the faults a service meets.

Found by pasting the pages' recipes (docs/recipes/server-startup.md,
docs/recipes/dev-workflow.md, docs/orchestrator.md, docs/redis.md,
docs/distributed.md) into a small real service and breaking what it talks to;
each test is the unit-level form of one such fault, on real parts (a private
``redis-server`` that is killed and restarted, real Taskiq brokers).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import pytest
from taskiq.acks import AckableMessage
from taskiq.message import BrokerMessage

import parallelkit.taskiq as pkt
from parallelkit.redis import RedisLock

from .redis_helpers import RedisServer, client
from .taskiq_helpers.processes import new_queue

GUARD = 30  # seconds: stops a hang, never reached by a passing test

pytest_plugins = ["tests.redis_helpers.fixtures"]


# Taskiq's broker and redis-py are asyncio libraries: these tests do not run on trio.
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def message(task_id: str, queue: str) -> BrokerMessage:
    return BrokerMessage(task_id=task_id, task_name="t", message=task_id.encode(), labels={})


async def next_message(messages: AsyncGenerator[AckableMessage, None]) -> AckableMessage:
    with anyio.fail_after(GUARD):
        return await messages.__anext__()


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_worker_keeps_listening_across_a_redis_restart(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis restart (a failover, a blip of a fraction of a second) made the
    worker's read loop raise redis-py's ``ConnectionError``: Taskiq's worker process
    died with every task it was running, and those ran again only after
    ``idle_timeout`` (5 minutes by default). The loop now waits for Redis and goes
    on; a Redis that came back empty (no persistence) gets its consumer group back,
    so what was kicked after the restart is delivered, not skipped."""
    caplog.set_level(logging.INFO, "parallelkit.taskiq")
    broker = pkt.redis_broker(server.url, queue=new_queue(), poll=0.05)
    await broker.startup()
    messages: Any = broker.listen()
    try:
        await broker.kick(message("before", broker.queue_name))
        first = await next_message(messages)
        assert first.data == b"before"
        await first.ack()  # type: ignore[misc]

        server.kill()
        reading = anyio.Event()

        async def read() -> AckableMessage:
            reading.set()
            return await next_message(messages)

        async with anyio.create_task_group() as tg:
            got: list[AckableMessage] = []

            async def reader() -> None:
                got.append(await read())

            tg.start_soon(reader)
            await reading.wait()
            await anyio.sleep(0.2)  # the loop meets the dead server
            server.start()  # empty: the stream and its consumer group are gone
            await broker.kick(message("after", broker.queue_name))
        assert got[0].data == b"after"
        warnings = [r.getMessage() for r in caplog.records if r.name == "parallelkit.taskiq"]
        warnings = [w for w in warnings if "unreachable" in w or "consumer group" in w]
        assert len([w for w in warnings if "unreachable" in w]) == 1  # once per outage
        assert len(warnings) <= 2
    finally:
        await messages.aclose()
        await broker.shutdown()


@pytest.mark.redis
@pytest.mark.anyio
async def test_fencing_tokens_grow_across_a_redis_that_lost_its_data(server: RedisServer) -> None:
    """The scheduler recipe (docs/redis.md) passes the fencing token with its writes
    and the resource rejects tokens older than the newest it has seen. The counter
    lived only in Redis: after a restart without persistence (or a failover to a
    replica that missed the last ``INCR``) tokens started again at 1, so the new
    leader's writes were all rejected. Tokens now never go below the Redis
    server's clock (in milliseconds), so they keep growing."""
    redis = client(server.url, retry=None)
    try:
        async with RedisLock(redis, "cadence-scheduler", ttl=5, prefix="fence") as lock:
            before = lock.fencing_token
        async with RedisLock(redis, "cadence-scheduler", ttl=5, prefix="fence") as lock:
            assert lock.fencing_token is not None
            assert before is not None
            assert lock.fencing_token > before
            before = lock.fencing_token
    finally:
        await redis.aclose()
    server.kill()
    server.start()  # empty: the counter is gone
    redis = client(server.url, retry=None)
    try:
        async with RedisLock(redis, "cadence-scheduler", ttl=5, prefix="fence") as lock:
            assert lock.fencing_token is not None
            assert lock.fencing_token > before
    finally:
        await redis.aclose()
