"""parallelkit.taskiq: an item whose caller has left, further (round 8).

* A message a dead worker had taken, of an item whose caller has left since (its
  retry key marked gone by the take-back), was still taken over by another worker
  and run for nobody. The worker taking it over now reads the task id from the
  message, finds the retry key gone, and acknowledges the message unrun.
* A worker's retry of such an item waited out its whole backoff (holding a worker
  slot) before its kick was refused. The retry key is now checked first.
* The producer looking for a worker's retry of its message scanned the stream from
  its end, 100 messages a round trip. It now reads the retry's id from the retry
  key (one round trip), and scans only when the key does not know.

asyncio only, like the other Taskiq tests (Taskiq's client and redis-py are asyncio
libraries); each test runs on a queue of its own whose keys are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from taskiq.kicker import AsyncKicker
from taskiq.message import BrokerMessage, TaskiqMessage
from taskiq.result import TaskiqResult

import parallelkit as pk
import parallelkit.taskiq as pkt
from parallelkit.taskiq import _stream

from .taskiq_helpers.processes import (
    Workers,
    own_queue_tasks,  # noqa: F401 (the fixture `tasks`)
)
from .taskiq_helpers.processes import asyncio_backend as anyio_backend  # noqa: F401 (a fixture)
from .taskiq_helpers.processes import task_id_of as _task_id
from .taskiq_helpers.tasks import Tasks

pytestmark = [pytest.mark.redis]

GUARD = 60  # seconds: stops a hang, never reached by a passing test


def _retry(task_id: str, retries: int) -> BrokerMessage:
    """A worker's retry of ``task_id`` as Taskiq's retry middleware kicks it."""
    data = json.dumps({"task_id": task_id, "labels": {"_retries": retries}}).encode()
    return BrokerMessage(
        task_id=task_id, task_name="pk_tests.square", message=data, labels={"_retries": retries}
    )


# ------------------------------------------------------------------ taken over, caller gone
@pytest.mark.anyio
async def test_a_message_taken_over_after_its_caller_left_is_not_run(tasks: Tasks) -> None:
    """A dead worker holds two items' messages; the caller of the first leaves (its
    take-back finds the message taken: the retry key says gone). The worker that
    takes them over ran both; it acknowledges the first unrun now. A message whose
    task id cannot be read is run, as before (the receiver reports it)."""
    broker, queue = tasks.broker, tasks.queue
    client = broker._client()
    with anyio.fail_after(GUARD):
        gone = await tasks.square.kicker().kiq(3)
        kept = await tasks.square.kicker().kiq(4)
        await client.xadd(queue, {b"data": b"not a taskiq message"})
        first, _, _ = [entry_id for entry_id, _ in await client.xrange(queue)]
        await client.xreadgroup("parallelkit", "dead", {queue: ">"}, count=3)  # then dies
        assert not await broker._pk_recall(queue, first, gone.task_id)  # taken: marked gone
        assert await client.get(_stream.retry_key(queue, gone.task_id)) == b"gone"

        broker.idle_timeout = 1  # ms: take the dead worker's messages over at once
        run = []
        async with contextlib.aclosing(broker.listen()) as messages:
            async for message in messages:
                run.append(message.data)
                await message.ack()  # (run: else idle 1 ms, it is taken over again)
                if len(run) == 2:
                    break
        assert [_task_id(run[0]), run[1]] == [kept.task_id, b"not a taskiq message"]
        pending = await client.xpending_range(queue, "parallelkit", min="-", max="+", count=10)
        assert pending == []  # the first one acknowledged, unrun
        assert await client.xrange(queue, first, first)  # (acknowledged, not deleted)


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_worker_does_not_run_a_dead_workers_item_whose_caller_left(
    tasks: Tasks, redis_url: str, tmp_path: Path
) -> None:
    """End to end: the item's message is taken by a worker that dies (here the test
    takes it and never acknowledges it), then its caller is cancelled. A worker
    process took it over after ``idle_timeout`` and ran it for nobody (its result
    stored); it acknowledges it unrun now."""
    broker, queue = tasks.broker, tasks.queue
    client = broker._client()
    with anyio.fail_after(GUARD):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def die_with_it() -> None:
                    while not await client.xreadgroup("parallelkit", "dead", {queue: ">"}):
                        await anyio.sleep(0.01)
                    scope.cancel()

                tg.start_soon(die_with_it)
                await pkt.map(tasks.square, [12])
        assert scope.cancelled_caught
        [(_, fields)] = await client.xrange(queue)
        task_id = _task_id(fields[b"data"])
        assert await client.get(_stream.retry_key(queue, task_id)) == b"gone"
        with Workers(redis_url, queue, log_dir=tmp_path) as pool:
            pool.start("w1")
            while (await client.xpending(queue, "parallelkit"))["pending"]:
                await anyio.sleep(0.05)  # taken over after idle_timeout, then acknowledged
        assert not await client.exists(f"{queue}:result:{task_id}")


@pytest.mark.anyio
async def test_a_message_taken_over_whose_caller_waits_is_run(tasks: Tasks) -> None:
    """The check costs the worker nothing it needs: a dead worker's message whose
    caller still waits is taken over and run, with no retry key written."""
    broker, queue = tasks.broker, tasks.queue
    client = broker._client()
    with anyio.fail_after(GUARD):
        handle = await tasks.square.kicker().kiq(5)
        await client.xreadgroup("parallelkit", "dead", {queue: ">"}, count=1)
        broker.idle_timeout = 1
        async with contextlib.aclosing(broker.listen()) as messages:
            message = await messages.__anext__()
        assert _task_id(message.data) == handle.task_id
        assert [k async for k in client.scan_iter(match=f"{queue}:retry:*")] == []


# ------------------------------------------------------------------ the retry's backoff
def _sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the retry middleware's waits instead of waiting (no real time)."""
    from parallelkit.taskiq import _middlewares

    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)

    monkeypatch.setattr(_middlewares.anyio, "sleep", sleep)
    return waits


@pytest.mark.anyio
@pytest.mark.parametrize("left", [True, False], ids=["caller-left", "caller-waits"])
async def test_a_retry_whose_caller_left_does_not_wait_out_its_backoff(
    tasks: Tasks, monkeypatch: pytest.MonkeyPatch, left: bool
) -> None:
    """The worker's retry of an item whose caller has left waited its backoff (an
    hour here), holding a worker slot, and only then was refused. It returns at
    once now, sending nothing; a retry whose caller waits still waits, then is sent."""
    broker, queue = tasks.broker, tasks.queue
    client = broker._client()
    middleware: Any = pkt.retry_middleware(pk.Retry(attempts=3, backoff=3600.0, max_backoff=3600.0))
    middleware.set_broker(broker)
    with anyio.fail_after(GUARD):
        handle = await tasks.square.kicker().kiq(6)
        [(first, _)] = await client.xrange(queue)
        await client.xreadgroup("parallelkit", "w", {queue: ">"}, count=1)  # running
        if left:
            await broker._pk_recall(queue, first, handle.task_id)
        message = TaskiqMessage(
            task_id=handle.task_id, task_name="pk_tests.square", labels={}, args=[6], kwargs={}
        )
        kicker: AsyncKicker[Any, Any] = (
            AsyncKicker(task_name="pk_tests.square", broker=broker, labels={})
            .with_task_id(handle.task_id)
            .with_labels(_retries=1)
        )
        waits = _sleeps(monkeypatch)
        await middleware.on_send(kicker, message, 3600.0)
        assert waits == ([] if left else [3600.0])
        assert len(await client.xrange(queue)) == (1 if left else 2)


# ------------------------------------------------------------------ the producer finds the retry
def _counted(client: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Count the stream reads of ``moved``'s scan on ``client``."""
    calls: list[Any] = []
    xrevrange = client.xrevrange

    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return await xrevrange(*args, **kwargs)

    monkeypatch.setattr(client, "xrevrange", counting)
    return calls


async def _fill(client: Any, queue: str, n: int) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(queue, {b"data": json.dumps({"task_id": uuid.uuid4().hex, "i": i})})
        await pipe.execute()


@pytest.mark.anyio
async def test_the_retry_is_found_from_its_key_without_scanning(
    tasks: Tasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two retries sent, then 250 other messages: the scan read the stream three
    times (100 a round trip) to find the newest retry; the retry key answers it."""
    broker, queue = tasks.broker, tasks.queue
    client = broker._client()
    with anyio.fail_after(GUARD):
        handle = await tasks.square.kicker().kiq(7)
        await client.xreadgroup("parallelkit", "w", {queue: ">"}, count=1)
        await broker.kick(_retry(handle.task_id, 1))
        await broker.kick(_retry(handle.task_id, 2))
        first, _, newest = [entry_id for entry_id, _ in await client.xrange(queue)]
        await _fill(client, queue, 250)
        calls = _counted(client, monkeypatch)
        assert await broker._pk_moved(queue, first, handle.task_id) == newest
        assert calls == []
        # following the newest retry: nothing after it (the key cannot tell: a scan)
        assert await broker._pk_moved(queue, newest, handle.task_id) is None


@pytest.mark.anyio
@pytest.mark.parametrize("key", ["absent", "gone", "not-in-stream"])
async def test_the_retry_is_found_by_a_scan_when_its_key_does_not_know(
    tasks: Tasks, key: str
) -> None:
    """A retry appended unchecked (scripts refused, a worker of an older version:
    no key), a key that says gone, or one naming a message no longer in the stream:
    the stream is scanned, as before, and the retry found."""
    broker, queue = tasks.broker, tasks.queue
    client = broker._client()
    with anyio.fail_after(GUARD):
        handle = await tasks.square.kicker().kiq(8)
        await client.xreadgroup("parallelkit", "w", {queue: ">"}, count=1)
        data: Any = {b"data": _retry(handle.task_id, 1).message}
        retry = await client.xadd(queue, data)  # unchecked: no key
        [(first, _), _] = await client.xrange(queue)
        await _fill(client, queue, 150)
        name = _stream.retry_key(queue, handle.task_id)
        if key == "gone":
            await client.set(name, "gone")
        elif key == "not-in-stream":
            await client.set(name, "99999999999999-0")
        assert await broker._pk_moved(queue, first, handle.task_id) == retry


@pytest.mark.anyio
async def test_the_retry_is_found_by_a_scan_where_scripts_are_refused(
    tasks: Tasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where Redis refuses scripts (an ACL, a proxy: here a script Redis fails),
    the producer still finds the retry, by a scan."""
    failing = "return redis.call('NO_SUCH_COMMAND')"
    monkeypatch.setattr(_stream, "MOVED", failing, raising=False)
    broker, queue = tasks.broker, tasks.queue
    client = broker._client()
    with anyio.fail_after(GUARD):
        handle = await tasks.square.kicker().kiq(9)
        await client.xreadgroup("parallelkit", "w", {queue: ">"}, count=1)
        await broker.kick(_retry(handle.task_id, 1))
        first, retry = [entry_id for entry_id, _ in await client.xrange(queue)]
        assert await broker._pk_moved(queue, first, handle.task_id) == retry


@pytest.mark.anyio
async def test_the_producer_follows_the_retry_from_its_key(
    tasks: Tasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end, the test as the worker: the item's first attempt fails and is
    retried (the retry kicked, then the attempt acknowledged without a result),
    200 other messages follow; ``map`` finds the retry (it sends nothing again)
    and gets the retry's result."""
    broker, queue = tasks.broker, tasks.queue
    client = broker._client()
    found: list[Any] = []
    looked_up = anyio.Event()
    moved = broker._pk_moved

    async def spied(stream: str, msg_id: Any, task_id: str) -> Any:
        found.append(await moved(stream, msg_id, task_id))
        looked_up.set()
        return found[-1]

    monkeypatch.setattr(broker, "_pk_moved", spied)
    results: list[Any] = []
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                results.append(await pkt.map(tasks.square, [11]))

            tg.start_soon(call)
            taken: Any = []
            while not taken:
                taken = await client.xreadgroup("parallelkit", "w", {queue: ">"}, count=1)
                await anyio.sleep(0.01)
            [(_, [(first, fields)])] = taken
            task_id = _task_id(fields[b"data"])
            await broker.kick(_retry(task_id, 1))
            [(_, [(retry, _)])] = await client.xreadgroup("parallelkit", "w", {queue: ">"}, count=1)
            await _fill(client, queue, 200)
            await client.xack(queue, "parallelkit", first)  # passed without a result
            await looked_up.wait()
            result = TaskiqResult[Any](is_err=False, return_value=121, execution_time=0.0)
            await broker.result_backend.set_result(task_id, result)
    assert results == [[121]]
    assert found == [retry]
    carrying = [e for e, f in await client.xrange(queue) if task_id.encode() in f[b"data"]]
    assert carrying == [first, retry]  # nothing sent again
