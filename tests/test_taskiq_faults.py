"""parallelkit.taskiq under faults, on real ``taskiq worker`` processes and a real Redis.

Cancellation of the caller (a fail-fast failure, the caller's own timeout, leaving an
``imap`` early) must leave nothing behind: no task, no Pub/Sub subscription, and the
next call works. A result that never comes (its worker died) fails its own item
with ``TimeoutError``, in its own position. Stray publications (ids of another call,
ids nobody waits for, bytes that are no id) wake nobody and break nothing, and a
Redis error while reading a result that lasts longer than the read waits for it
fails that item with that error, nothing else; a lost subscription is taken again.
Bad input is refused with a clear error before anything is kicked.

Like ``test_taskiq.py``: asyncio only (Taskiq's client and redis-py are asyncio
libraries), every run on its own queue whose keys are deleted afterwards, every
worker process killed in teardown.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_sync
import redis.exceptions
from taskiq.message import BrokerMessage

import parallelkit.taskiq as pkt
from parallelkit.taskiq import _map, _outage
from parallelkit.taskiq._broker import _ResultBackend
from parallelkit.taskiq._completions import Completions

from .taskiq_helpers.processes import Workers, drop_keys, new_queue
from .taskiq_helpers.tasks import Tasks, build

GUARD = 60  # seconds: stops a hang, never reached by a passing test


pytest_plugins = ["tests.taskiq_helpers.fixtures"]


# Taskiq's producer side (kick, result backend) and redis-py are asyncio libraries:
# parallelkit.taskiq runs on asyncio only, so these tests do not run on trio.
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def subscribed(url: str, queue: str) -> list[str]:
    """The completion channels of ``queue`` that someone is subscribed to in Redis."""
    client = redis_sync.Redis.from_url(url, decode_responses=True)
    try:
        return [str(channel) for channel in client.pubsub_channels(f"{queue}:result:done:*")]
    finally:
        client.close()


def running_tasks() -> set[asyncio.Task[Any]]:
    return {task for task in asyncio.all_tasks() if not task.done()}


class Kicked:
    """Record which item each task id carries (patched onto the broker's ``kick``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.items: dict[str, Any] = {}
        kick = pkt.RedeliveringStreamBroker.kick

        async def recording_kick(broker: pkt.RedeliveringStreamBroker, msg: BrokerMessage) -> None:
            self.items[msg.task_id] = json.loads(msg.message)["args"][0]
            await kick(broker, msg)

        monkeypatch.setattr(pkt.RedeliveringStreamBroker, "kick", recording_kick)


def pushed_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch polling off (first poll after an hour): results come only when pushed."""
    monkeypatch.setattr(_map, "_POLL_FIRST", 3600.0)
    monkeypatch.setattr(_map, "_POLL_MAX", 3600.0)


# ------------------------------------------------------------------ bad input
@pytest.mark.redis
@pytest.mark.anyio
class TestBadInput:
    """Refused with a clear error; nothing reaches the stream."""

    async def test_a_task_without_a_result_backend_is_refused(self, redis_url: str) -> None:
        """Its broker stores no result: map used to return ``None`` for every item
        at once (Taskiq's dummy backend says every result is ready), whether or not
        a worker ever ran it."""
        from taskiq_redis import RedisStreamBroker

        queue = new_queue()
        broker = RedisStreamBroker(redis_url, queue_name=queue)

        @broker.task(task_name="pk_tests.no_backend")
        async def no_backend(x: int) -> int:
            return x

        await broker.startup()
        client = redis_sync.Redis.from_url(redis_url)
        try:
            with pytest.raises(TypeError, match=r"result backend") as caught:
                await pkt.map(no_backend, [1, 2, 3])
            assert "pk_tests.no_backend" in str(caught.value)
            with pytest.raises(TypeError, match=r"result backend"):
                pkt.imap(no_backend, [1, 2, 3])
            assert client.xlen(queue) == 0  # nothing kicked
        finally:
            client.close()
            await broker.shutdown()
            drop_keys(redis_url, queue)

    async def test_an_item_the_serializer_cannot_send(self, redis_url: str) -> None:
        """A TypeError naming the item and the task (it was Taskiq's SendTaskError
        "Cannot send task to the queue", the message of a broker that is down);
        the item is not sent, and with settle=True the others still run."""
        queue = new_queue()
        tasks = build(redis_url, queue)
        await tasks.broker.startup()
        client = redis_sync.Redis.from_url(redis_url)
        bad = object()
        try:
            with pytest.raises(TypeError, match=r"cannot be sent") as caught:
                await pkt.map(tasks.square, [bad])
            message = str(caught.value)
            assert repr(bad) in message
            assert "pk_tests.square" in message
            assert caught.value.__cause__ is not None  # the serializer's own error
            assert client.xlen(queue) == 0
        finally:
            client.close()
            await tasks.broker.shutdown()
            drop_keys(redis_url, queue)

    async def test_limit_below_one_kicks_nothing(self, redis_url: str) -> None:
        queue = new_queue()
        tasks = build(redis_url, queue)
        await tasks.broker.startup()
        client = redis_sync.Redis.from_url(redis_url)
        try:
            for limit in (0, -1):
                with pytest.raises(ValueError, match=r"^limit must be >= 1"):
                    await pkt.map(tasks.square, [1, 2], limit=limit)
                with pytest.raises(ValueError, match=r"^limit must be >= 1"):
                    pkt.imap(tasks.square, [1, 2], limit=limit)
            assert client.xlen(queue) == 0
            assert subscribed(redis_url, queue) == []
        finally:
            client.close()
            await tasks.broker.shutdown()
            drop_keys(redis_url, queue)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_an_unsendable_item_fails_alone_with_settle(tasks: Tasks) -> None:
    with anyio.fail_after(GUARD):
        outcomes = await pkt.map(tasks.square, [1, object(), 3], settle=True)
    assert [o.value for o in outcomes if o.ok] == [1, 9]
    assert isinstance(outcomes[1].error, TypeError)
    assert "cannot be sent" in str(outcomes[1].error)


# ------------------------------------------------------------------ cancellation
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
class TestCancellation:
    """However the call ends, it leaves no task and no subscription behind."""

    async def test_fail_fast(self, tasks: Tasks, redis_url: str) -> None:
        before = running_tasks()
        with anyio.fail_after(GUARD), pytest.raises(ValueError, match="bad item 7"):
            await pkt.map(tasks.fail_some, range(200), limit=8)
        assert running_tasks() == before
        assert subscribed(redis_url, tasks.queue) == []
        with anyio.fail_after(GUARD):  # the next call is not affected
            assert await pkt.map(tasks.square, range(20), limit=4) == [x * x for x in range(20)]

    async def test_the_callers_timeout(self, tasks: Tasks, redis_url: str) -> None:
        before = running_tasks()
        with anyio.fail_after(GUARD):
            with anyio.move_on_after(GUARD / 2) as scope:
                async with anyio.create_task_group() as tg:

                    async def cancel_when_waiting() -> None:
                        while subscribed(redis_url, tasks.queue) == []:
                            await anyio.sleep(0.01)
                        await anyio.sleep(0.2)  # the first items are kicked and waiting
                        scope.cancel()

                    tg.start_soon(cancel_when_waiting)
                    await pkt.map(tasks.sleepy, [1.0] * 6, limit=4)
            assert scope.cancelled_caught
        assert running_tasks() == before
        assert subscribed(redis_url, tasks.queue) == []
        with anyio.fail_after(GUARD):  # the next call is not affected
            assert await pkt.map(tasks.square, range(10), limit=4) == [x * x for x in range(10)]

    async def test_leaving_imap_early(self, tasks: Tasks, redis_url: str) -> None:
        before = running_tasks()
        with anyio.fail_after(GUARD):
            async with pkt.imap(tasks.sleepy, [0.0, 1.0, 1.0], limit=3) as results:
                first = await anext(aiter(results))
        assert first == 0.0
        assert running_tasks() == before
        assert subscribed(redis_url, tasks.queue) == []

    async def test_imap_fail_fast(self, tasks: Tasks, redis_url: str) -> None:
        before = running_tasks()
        with anyio.fail_after(GUARD), pytest.raises(ValueError, match="bad item 7"):
            async with pkt.imap(tasks.fail_some, range(200), limit=8) as results:
                async for _ in results:
                    pass
        assert running_tasks() == before
        assert subscribed(redis_url, tasks.queue) == []


# ------------------------------------------------------------------ lost results
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_the_items_of_a_dead_worker_time_out_in_place(redis_url: str, tmp_path: Path) -> None:
    """The only worker is SIGKILLed holding two items: no result will ever come.
    Each of them fails with TimeoutError in its own position; the items that came
    back before keep their values."""
    queue = new_queue()
    tasks = build(redis_url, queue)
    await tasks.broker.startup()
    items = [0.0, 3600.0, 0.0, 3600.0]
    try:
        with Workers(redis_url, queue, log_dir=tmp_path) as pool:
            pool.start("a")
            two_back = anyio.Event()

            def progress(done: int, total: int | None) -> None:
                if done == 2:
                    two_back.set()

            async def kill_a() -> None:
                await two_back.wait()
                pool.kill("a")

            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(kill_a)
                    outcomes = await pkt.map(
                        tasks.sleepy, items, limit=4, timeout=8, settle=True, progress=progress
                    )
            assert [o.value for o in outcomes if o.ok] == [0.0, 0.0]
            assert [o.ok for o in outcomes] == [True, False, True, False]
            for index in (1, 3):
                error = outcomes[index].error
                assert type(error) is TimeoutError
                assert "pk_tests.sleepy gave no result for 3600.0 within timeout=8" in str(error)
            assert subscribed(redis_url, queue) == []
    finally:
        await tasks.broker.shutdown()
        drop_keys(redis_url, queue)


# ------------------------------------------------------------------ stray results
async def _channel(url: str, queue: str) -> str:
    """The completion channel of the one call running on ``queue``."""
    while not (channels := subscribed(url, queue)):
        await anyio.sleep(0.01)
    [channel] = channels
    return channel


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
class TestStrayResults:
    async def test_publications_nobody_waits_for_break_nothing(
        self, tasks: Tasks, monkeypatch: pytest.MonkeyPatch, redis_url: str
    ) -> None:
        """Ids of no item, and bytes that are no id (not even UTF-8), published on the
        call's channel: ignored, and the results that follow are still pushed (the
        listener used to die on the undecodable one, leaving polling only)."""
        pushed_only(monkeypatch)
        client = redis_sync.Redis.from_url(redis_url)
        try:
            with anyio.fail_after(GUARD):
                async with pkt.imap(tasks.sleepy, [0.5, 0.6, 0.7], limit=3) as results:
                    channel = await _channel(redis_url, tasks.queue)
                    for data in (b"\xff\xfe", uuid.uuid4().hex, b"", b"\x00" * 64):
                        client.publish(channel, data)
                    values = sorted([r async for r in results])
        finally:
            client.close()
        assert values == [0.5, 0.6, 0.7]

    async def test_two_calls_at_once_get_their_own_results(
        self, tasks: Tasks, monkeypatch: pytest.MonkeyPatch, redis_url: str
    ) -> None:
        """Two calls on the same task and queue: each item gets its own result, and
        the ids one call publishes never wake the other's items."""
        kicked = Kicked(monkeypatch)
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                got: dict[str, list[int]] = {}

                async def run(name: str, items: range) -> None:
                    got[name] = await pkt.map(tasks.square, items, limit=8)

                tg.start_soon(run, "low", range(60))
                tg.start_soon(run, "high", range(1000, 1060))
        assert got["low"] == [x * x for x in range(60)]
        assert got["high"] == [x * x for x in range(1000, 1060)]
        assert len(kicked.items) == 120  # one kick per item, no more

    async def test_an_id_of_another_call_wakes_nobody(
        self, tasks: Tasks, monkeypatch: pytest.MonkeyPatch, redis_url: str
    ) -> None:
        """Another call's finished ids published on this call's channel: the items
        that are woken read their own (absent) result and go on waiting."""
        pushed_only(monkeypatch)
        kicked = Kicked(monkeypatch)
        with anyio.fail_after(GUARD):
            other = await pkt.map(tasks.square, range(5))  # its ids are finished
        assert other == [x * x for x in range(5)]
        finished = list(kicked.items)
        client = redis_sync.Redis.from_url(redis_url)
        try:
            with anyio.fail_after(GUARD):
                async with pkt.imap(tasks.sleepy, [0.5, 0.6], limit=2, ordered=True) as results:
                    channel = await _channel(redis_url, tasks.queue)
                    for task_id in finished:
                        client.publish(channel, task_id)
                    values = [r async for r in results]
        finally:
            client.close()
        assert values == [0.5, 0.6]


# ------------------------------------------------------------------ backend errors
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
class TestBackendErrors:
    async def test_a_failed_result_read_fails_that_item(
        self, tasks: Tasks, monkeypatch: pytest.MonkeyPatch, redis_url: str
    ) -> None:
        """Redis fails one item's result read for longer than the read waits for it
        (shortened here): that item's outcome holds that very error, after one try
        per wait and a last one; every other item has its own value."""
        monkeypatch.setattr(_outage, "WAITS", (0.01, 0.02))
        kicked = Kicked(monkeypatch)
        down = redis.exceptions.ConnectionError("Redis is down (injected)")
        fetch = _ResultBackend.fetch
        tries = [0]

        async def failing_fetch(backend: Any, task_id: str) -> Any:
            if kicked.items.get(task_id) == 7:
                tries[0] += 1
                raise down
            return await fetch(backend, task_id)

        monkeypatch.setattr(_ResultBackend, "fetch", failing_fetch)
        with anyio.fail_after(GUARD):
            outcomes = await pkt.map(tasks.square, range(12), limit=4, settle=True)
        assert outcomes[7].error is down
        assert tries == [3]
        assert [o.value for i, o in enumerate(outcomes) if i != 7] == [
            x * x for x in range(12) if x != 7
        ]
        with anyio.fail_after(GUARD), pytest.raises(redis.exceptions.ConnectionError) as caught:
            await pkt.map(tasks.square, range(12), limit=4)
        assert caught.value is down
        assert subscribed(redis_url, tasks.queue) == []

    async def test_a_lost_subscription_is_taken_again(
        self, tasks: Tasks, monkeypatch: pytest.MonkeyPatch, redis_url: str
    ) -> None:
        """Redis drops the call's Pub/Sub connection mid-call: the call subscribes
        again, and with polling off every item still gets its result (the ones
        published while it was away by polling once); nothing is lost or mixed up."""
        pushed_only(monkeypatch)
        entered: list[Completions] = []
        enter = Completions.__aenter__

        async def recording_enter(self: Completions) -> Completions:
            entered.append(self)
            return await enter(self)

        monkeypatch.setattr(Completions, "__aenter__", recording_enter)
        client = redis_sync.Redis.from_url(redis_url)
        items = [0.3 + i / 100 for i in range(8)]
        try:
            with anyio.fail_after(GUARD):
                async with pkt.imap(tasks.sleepy, items, limit=8, ordered=True) as results:
                    channel = await _channel(redis_url, tasks.queue)
                    [completions] = entered
                    connection: Any = completions._pubsub.connection
                    host, port = connection._writer.get_extra_info("sockname")[:2]
                    assert client.client_kill_filter(_type="pubsub", addr=f"{host}:{port}") == 1
                    values = [r async for r in results]
                    assert completions.listening
                    assert await _channel(redis_url, tasks.queue) == channel  # taken again
        finally:
            client.close()
        assert values == items

    async def test_a_subscription_that_cannot_be_taken_again_falls_back_to_polling(
        self, tasks: Tasks, monkeypatch: pytest.MonkeyPatch, redis_url: str
    ) -> None:
        """The Pub/Sub connection is lost and subscribing again keeps failing (for
        longer than the waits, shortened here): the items still waiting get their
        results by polling; nothing is lost or mixed up."""
        monkeypatch.setattr(_outage, "WAITS", (0.01, 0.02))
        refused = [0]

        async def refused_connect() -> None:
            refused[0] += 1
            msg = "Redis is down (injected)"
            raise redis.exceptions.ConnectionError(msg)

        entered: list[Completions] = []
        enter = Completions.__aenter__

        async def recording_enter(self: Completions) -> Completions:
            entered.append(self)
            await enter(self)
            monkeypatch.setattr(self._pubsub, "connect", refused_connect)  # once subscribed
            return self

        monkeypatch.setattr(Completions, "__aenter__", recording_enter)
        client = redis_sync.Redis.from_url(redis_url)
        items = [0.3 + i / 100 for i in range(8)]
        try:
            with anyio.fail_after(GUARD):
                async with pkt.imap(tasks.sleepy, items, limit=8, ordered=True) as results:
                    await _channel(redis_url, tasks.queue)
                    [completions] = entered
                    connection: Any = completions._pubsub.connection
                    host, port = connection._writer.get_extra_info("sockname")[:2]
                    assert client.client_kill_filter(_type="pubsub", addr=f"{host}:{port}") == 1
                    values = [r async for r in results]
                    assert not completions.listening  # the listener gave up
        finally:
            client.close()
        assert values == items
        assert refused[0] >= 2  # each wait's try (and redis-py's own, on its reconnect)


# ------------------------------------------------------------------ many calls at once
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_as_many_calls_at_once_as_the_pool_has_connections(
    tasks: Tasks, redis_url: str
) -> None:
    """Each call's subscription held a connection of the result backend's bounded
    pool for the whole call: with as many calls as the pool has connections, every
    result read waited 20 s for a free one, then failed ("No connection available").
    The subscriptions have connections of their own now."""
    backend: Any = tasks.broker.result_backend
    size = backend.redis_pool.max_connections
    results: list[Any] = [None] * size

    async def one(index: int) -> None:
        results[index] = await pkt.map(tasks.square, [index])

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            for index in range(size):
                tg.start_soon(one, index)
    assert results == [[index * index] for index in range(size)]
    assert subscribed(redis_url, tasks.queue) == []


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_a_result_write_that_fails_briefly_is_retried(redis_url: str, tmp_path: Path) -> None:
    """The worker's Redis fails the result write once. Taskiq's worker logs the
    failed save and acknowledges the message anyway, so the result was lost for good
    and the item waited until its timeout (forever without one). The write is
    retried now and the item gets its result."""
    queue = new_queue()
    tasks = build(redis_url, queue)
    await tasks.broker.startup()
    client = redis_sync.Redis.from_url(redis_url)
    try:
        with Workers(
            redis_url, queue, module="tests.taskiq_helpers.faulty_worker:broker", log_dir=tmp_path
        ) as pool:
            pool.start("a")
            with anyio.fail_after(GUARD):
                outcomes = await pkt.map(tasks.square, [3, 4], limit=1, timeout=10, settle=True)
        assert client.get(f"{queue}:injected") == b"1"  # the fault did happen
        assert [o.value if o.ok else o.error for o in outcomes] == [9, 16]
    finally:
        client.close()
        await tasks.broker.shutdown()
        drop_keys(redis_url, queue)
