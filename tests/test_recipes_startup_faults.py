"""The start-up, process, Redis and Taskiq recipes under the faults a service meets.

Found by pasting the pages' recipes (docs/recipes/server-startup.md,
docs/recipes/dev-workflow.md, docs/orchestrator.md, docs/redis.md,
docs/distributed.md) into a small real service and breaking what it talks to;
each test is the unit-level form of one such fault, on real parts (a private
``redis-server`` that is killed and restarted, real Taskiq brokers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_sync
from taskiq.acks import AckableMessage
from taskiq.message import BrokerMessage

import parallelkit.taskiq as pkt
from parallelkit.redis import RedisLock
from parallelkit.taskiq import _map

from .redis_helpers import RedisServer, client
from .taskiq_helpers.processes import Workers, new_queue
from .taskiq_helpers.tasks import Tasks, build

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


# ---------------------------------------------------------------- Taskiq producer, Redis blips
# A restart of the producer's Redis for a fraction of a second (a failover, a blip):
# the workers survive it (their read loop waits, a result write is tried again for
# ~3 s), and so must the call waiting for their results.
DOWN = 0.3  # seconds the Redis server is away


def running_tasks() -> set[asyncio.Task[Any]]:
    return {task for task in asyncio.all_tasks() if not task.done()}


def subscribed(url: str, queue: str) -> list[str]:
    """The completion channels of ``queue`` someone is subscribed to."""
    conn = redis_sync.Redis.from_url(url, decode_responses=True)
    try:
        return [str(channel) for channel in conn.pubsub_channels(f"{queue}:result:done:*")]
    finally:
        conn.close()


async def restart(server: RedisServer) -> None:
    """Kill the server, then start it again (empty) after ``DOWN`` seconds."""
    await anyio.to_thread.run_sync(server.kill)
    await anyio.sleep(DOWN)
    await anyio.to_thread.run_sync(server.start)


async def restart_when_taken(server: RedisServer, queue: str, count: int) -> None:
    """Restart Redis once the workers have taken ``count`` messages (so none is lost
    with the stream of a Redis that comes back empty)."""
    conn = client(server.url, retry=None)
    try:
        while (await conn.xpending(queue, "parallelkit"))["pending"] < count:
            await anyio.sleep(0.01)
    finally:
        await conn.aclose()
    await restart(server)


@pytest.fixture
async def taskiq_on_server(server: RedisServer, tmp_path: Path) -> AsyncIterator[Tasks]:
    """Two real Taskiq workers on the private server, and the producer's handles."""
    queue = new_queue()
    tasks = build(server.url, queue)
    await tasks.broker.startup()
    try:
        with Workers(server.url, queue, log_dir=tmp_path) as pool:
            pool.start("a", "b")
            yield tasks
    finally:
        await tasks.broker.shutdown()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_map_waits_out_a_redis_restart_while_it_reads_results(
    server: RedisServer, taskiq_on_server: Tasks
) -> None:
    """Every item in flight failed with redis-py's ``ConnectionError`` when Redis
    restarted while ``map`` polled their results, although the workers ran them and
    saved the results once it was back. A result read now waits for Redis (about
    3 s) like the worker's result write; nothing is left running."""
    tasks = taskiq_on_server
    items = [2.0, 2.1, 2.2, 2.3]
    before = running_tasks()
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(restart_when_taken, server, tasks.queue, len(items))
            values = await pkt.map(tasks.sleepy, items, limit=4, timeout=GUARD)
    assert values == items
    assert running_tasks() == before
    assert subscribed(server.url, tasks.queue) == []


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_an_item_kicked_while_redis_restarts_is_sent_when_it_is_back(
    server: RedisServer, taskiq_on_server: Tasks
) -> None:
    """An item pulled while Redis is away: its kick (``XADD``) failed at once with
    Taskiq's ``SendTaskError``, and with it the call. The kick now waits for Redis
    like a result read (same task id: at most one extra run of that item)."""
    tasks = taskiq_on_server
    restarted = anyio.Event()

    async def blip() -> None:
        await restart(server)
        restarted.set()

    async with anyio.create_task_group() as tg:

        async def items() -> AsyncIterator[int]:
            for item in range(6):
                if item == 3:  # items 0-2 are back (limit=1): Redis goes away now
                    await anyio.to_thread.run_sync(server.kill)
                    tg.start_soon(blip)
                yield item

        with anyio.fail_after(GUARD):
            values = await pkt.map(tasks.square, items(), limit=1, timeout=GUARD)
    assert restarted.is_set()
    assert values == [x * x for x in range(6)]
    assert subscribed(server.url, tasks.queue) == []


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_results_are_pushed_again_after_a_redis_restart(
    server: RedisServer, taskiq_on_server: Tasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call's subscription to finished tasks died with the connection: the
    rest of the call fell back to polling (up to 50 ms late per item, one GET per
    item every 50 ms). It now subscribes again once Redis is back; an item whose
    publication was sent while it was away polls once. Polling is off here: the
    results come only because they are pushed."""
    monkeypatch.setattr(_map, "_POLL_FIRST", 3600.0)  # results come only when pushed
    monkeypatch.setattr(_map, "_POLL_MAX", 3600.0)
    tasks = taskiq_on_server
    items = [2.0, 2.1, 2.2]
    before = running_tasks()
    with anyio.fail_after(GUARD):
        async with pkt.imap(tasks.sleepy, items, limit=3, ordered=True) as results:
            await restart_when_taken(server, tasks.queue, len(items))
            values = [value async for value in results]
    assert values == items
    assert running_tasks() == before
    assert subscribed(server.url, tasks.queue) == []
