"""parallelkit.taskiq: an item whose caller has left, further (round 9).

* A worker's retry backoff of an item whose caller left *during* the backoff was
  waited out to its end (the caller was checked once, before the wait), holding
  one of the worker's ``--max-async-tasks`` slots all that time; the producer's
  ``limit`` slot was not the one held (it is given back with the call). The
  backoff now checks the caller every ``poll`` while it waits, and ends at the
  first check that finds it gone.
* A worker taking over a dead worker's messages checked whether their callers had
  left once per batch it claimed, then ran them one by one as it had room: a
  caller that left meanwhile had its item run all the same. Each message is now
  claimed as the worker asks for it, the claim and the check one atomic script
  (``_stream.CLAIM``) against the retry key the caller's leave writes.

asyncio only, like the other Taskiq tests (Taskiq's client and redis-py are asyncio
libraries); each test runs on a queue of its own whose keys are deleted afterwards,
every worker process killed in teardown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from taskiq.kicker import AsyncKicker
from taskiq.message import TaskiqMessage

import parallelkit as pk
import parallelkit.taskiq as pkt
from parallelkit.taskiq import _stream

from .taskiq_helpers.processes import (
    Workers,
    drop_keys,
    new_queue,
    own_queue_tasks,  # noqa: F401 (the fixture `tasks`)
)
from .taskiq_helpers.processes import asyncio_backend as anyio_backend  # noqa: F401 (a fixture)
from .taskiq_helpers.processes import task_id_of as _task_id
from .taskiq_helpers.tasks import Tasks
from .taskiq_helpers.tasks9 import Tasks9, attempts_key, checked_key
from .taskiq_helpers.tasks9 import build as build9

pytestmark = [pytest.mark.redis]

GUARD = 30  # seconds: stops a hang, never reached by a passing test


# ------------------------------------------------------------------ a backoff, caller gone in it
def _checks(broker: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[list[bool], anyio.Event]:
    """Record each answer of the worker's "has the caller left?" check on ``broker``;
    the event is set after the first one."""
    answers: list[bool] = []
    first = anyio.Event()
    left = broker._pk_left

    async def spied(task_id: str, stream: str | None = None) -> bool:
        answers.append(await left(task_id, stream))
        first.set()
        return answers[-1]

    monkeypatch.setattr(broker, "_pk_left", spied)
    return answers, first


def _backing_off(tasks: Tasks, task_id: str, backoff: float) -> Any:
    """``on_send(...)`` of the workers' retry middleware for ``task_id``, ``backoff``
    seconds of wait, as Taskiq's ``on_error`` calls it."""
    middleware: Any = pkt.retry_middleware(
        pk.Retry(attempts=3, backoff=backoff, max_backoff=backoff)
    )
    middleware.set_broker(tasks.broker)
    message = TaskiqMessage(
        task_id=task_id, task_name="pk_tests.square", labels={}, args=[6], kwargs={}
    )
    kicker: AsyncKicker[Any, Any] = (
        AsyncKicker(task_name="pk_tests.square", broker=tasks.broker, labels={})
        .with_task_id(task_id)
        .with_labels(_retries=1)
    )
    return middleware.on_send(kicker, message, backoff)


@pytest.mark.anyio
async def test_a_retry_backoff_ends_when_its_caller_leaves_during_it(
    tasks: Tasks, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller is there when the backoff (an hour) begins, and leaves during it.
    The worker waited the hour out, then had its retry refused. The wait ends at
    the first check after the leave now (every ``poll``), sending nothing."""
    broker, queue = tasks.broker, tasks.queue
    client = broker._client()
    answers, first_check = _checks(broker, monkeypatch)
    caplog.set_level("INFO", logger="parallelkit.taskiq")
    with anyio.fail_after(GUARD):
        handle = await tasks.square.kicker().kiq(6)
        [(first, _)] = await client.xrange(queue)
        await client.xreadgroup("parallelkit", "w", {queue: ">"}, count=1)  # running
        async with anyio.create_task_group() as tg:
            tg.start_soon(_backing_off, tasks, handle.task_id, 3600.0)
            await first_check.wait()  # the caller is there: the backoff begins
            await broker._pk_recall(queue, first, handle.task_id)  # the caller leaves
    assert answers[0] is False
    assert answers[-1] is True  # the check that ended the wait
    assert [entry_id for entry_id, _ in await client.xrange(queue)] == [first]  # no retry
    assert "not retried: its caller has left" in caplog.text


@pytest.mark.anyio
async def test_a_retry_backoff_whose_caller_waits_runs_to_its_end(
    tasks: Tasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks during the wait cost the retry nothing: a caller that waits gets
    its retry sent once the backoff is over (a short one here, a few checks)."""
    broker, queue = tasks.broker, tasks.queue
    client = broker._client()
    answers, _ = _checks(broker, monkeypatch)
    with anyio.fail_after(GUARD):
        handle = await tasks.square.kicker().kiq(6)
        await client.xreadgroup("parallelkit", "w", {queue: ">"}, count=1)
        await _backing_off(tasks, handle.task_id, 0.5)
    assert answers
    assert not any(answers)
    assert len(await client.xrange(queue)) == 2  # the retry sent


@pytest.fixture
async def backoffs(redis_url: str, tmp_path: Path) -> AsyncIterator[Tasks9]:
    """One worker process with one task slot whose retries wait an hour."""
    queue = new_queue()
    tasks9 = build9(redis_url, queue)
    await tasks9.broker.startup()
    try:
        with Workers(
            redis_url,
            queue,
            module="tests.taskiq_helpers.worker9:broker",
            max_async_tasks=1,
            log_dir=tmp_path,
        ) as pool:
            pool.start("w9")
            yield tasks9
    finally:
        await tasks9.broker.shutdown()
        drop_keys(redis_url, queue)


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_worker_slot_held_by_a_backoff_is_freed_when_its_caller_leaves(
    backoffs: Tasks9,
) -> None:
    """End to end, one worker with one task slot: the item's attempt fails and its
    retry waits an hour; the caller is cancelled during the wait. The producer's
    ``limit`` slot comes back with the call; the worker's slot was held the whole
    hour, so a next call's item never ran. It runs now, and no retry is sent."""
    queue = backoffs.queue
    client = backoffs.broker._client()
    limiter = pk.Limiter(concurrency=1)
    with anyio.fail_after(GUARD):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def leave_once_backing_off() -> None:
                    while not int(await client.get(checked_key(queue)) or 0):
                        await anyio.sleep(0.01)  # the worker checked its caller: waiting
                    scope.cancel()

                tg.start_soon(leave_once_backing_off)
                await pkt.map(backoffs.fails, [1], limit=limiter)
        assert scope.cancelled_caught
        assert limiter.statistics().running == 0  # the producer's slot: back with the call
        assert await pkt.map(backoffs.square, [3], limit=limiter) == [9]
    assert int(await client.get(attempts_key(queue)) or 0) == 1
    assert len(await client.xrange(queue)) == 2  # the two kicks: no retry


# ------------------------------------------------------------------ taken over, caller gone since
@pytest.mark.anyio
async def test_a_message_taken_over_is_checked_when_the_worker_takes_it(tasks: Tasks) -> None:
    """A dead worker holds three items' messages; the worker taking them over
    claims a batch of three. The caller of the second leaves while the worker runs
    the first: the batch had been checked at once when claimed, and the second ran
    for nobody. It is claimed and checked (one step) when the worker asks for it
    now: acknowledged unrun, and the third comes next."""
    broker, queue = tasks.broker, tasks.queue
    client = broker._client()
    with anyio.fail_after(GUARD):
        handles = [await tasks.square.kicker().kiq(x) for x in (1, 2, 3)]
        _, second, _ = [entry_id for entry_id, _ in await client.xrange(queue)]
        await client.xreadgroup("parallelkit", "dead", {queue: ">"}, count=3)  # then dies
        broker.idle_timeout = 1  # ms: take the dead worker's messages over at once
        broker.unacknowledged_batch_size = 3
        run = []
        async with contextlib.aclosing(broker.listen()) as messages:
            async for message in messages:
                run.append(_task_id(message.data))
                await message.ack()  # (run: else idle 1 ms, it is taken over again)
                if len(run) == 1:  # the second item's caller leaves now
                    assert not await broker._pk_recall(queue, second, handles[1].task_id)
                if len(run) == 2:
                    break
        assert run == [handles[0].task_id, handles[2].task_id]
        pending = await client.xpending_range(queue, "parallelkit", min="-", max="+", count=10)
        assert pending == []  # the second acknowledged, unrun
        assert await client.xrange(queue, second, second)  # (acknowledged, not deleted)


@pytest.mark.anyio
async def test_a_take_over_where_scripts_are_refused_still_checks_the_caller(
    tasks: Tasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where Redis refuses scripts (an ACL, a proxy: here a script Redis fails), the
    message is claimed, then checked, as before the claim script: the item whose
    caller left is acknowledged unrun, the other one run."""
    monkeypatch.setattr(_stream, "CLAIM", "return redis.call('NO_SUCH_COMMAND')", raising=False)
    broker, queue = tasks.broker, tasks.queue
    client = broker._client()
    with anyio.fail_after(GUARD):
        gone = await tasks.square.kicker().kiq(3)
        kept = await tasks.square.kicker().kiq(4)
        first, _ = [entry_id for entry_id, _ in await client.xrange(queue)]
        await client.xreadgroup("parallelkit", "dead", {queue: ">"}, count=2)
        assert not await broker._pk_recall(queue, first, gone.task_id)
        broker.idle_timeout = 1
        async with contextlib.aclosing(broker.listen()) as messages:
            message = await messages.__anext__()
            await message.ack()
        assert _task_id(message.data) == kept.task_id
        pending = await client.xpending_range(queue, "parallelkit", min="-", max="+", count=10)
        assert pending == []
