"""parallelkit.taskiq: review of the round-9 take-over and backoff (messages that are not Taskiq's).

* A stream entry without a ``data`` field (another program's ``XADD`` on the queue's
  stream, a hand-written test message) raised ``KeyError`` out of the worker's read
  loop, read or taken over alike: the worker's ``listen`` ended, and the entry, left
  pending, did the same to each worker that took it over after ``idle_timeout``. It
  is now given to Taskiq with empty data: Taskiq's receiver cannot parse it, logs
  it once (WARNING) and acknowledges it unrun, and the loop goes on.

asyncio only, like the other Taskiq tests; each test runs on a queue of its own
whose keys are deleted afterwards.
"""

from __future__ import annotations

import contextlib

import anyio
import pytest
from taskiq.receiver import Receiver

from .taskiq_helpers.processes import asyncio_backend as anyio_backend  # noqa: F401 (a fixture)
from .taskiq_helpers.processes import own_queue_tasks  # noqa: F401 (the fixture `tasks`)
from .taskiq_helpers.processes import task_id_of as _task_id
from .taskiq_helpers.tasks import Tasks

pytestmark = [pytest.mark.redis]

GUARD = 30  # seconds: stops a hang, never reached by a passing test


@pytest.mark.anyio
@pytest.mark.parametrize("taken_over", [False, True], ids=["read", "taken-over"])
async def test_an_entry_without_data_is_acknowledged_and_the_loop_goes_on(
    tasks: Tasks, taken_over: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry with no ``data`` field ahead of a task's message: the worker's read
    loop raised ``KeyError`` at it. Taskiq's receiver now gets it (empty data),
    logs it and acknowledges it unrun, and the task's message comes next, read
    from the stream or taken over from a dead worker alike."""
    broker, queue = tasks.broker, tasks.queue
    client = broker._client()
    receiver = Receiver(broker, run_startup=False)
    caplog.set_level("WARNING")
    with anyio.fail_after(GUARD):
        await client.xadd(queue, {"note": "not a Taskiq message"})
        handle = await tasks.square.kicker().kiq(5)
        if taken_over:
            await client.xreadgroup("parallelkit", "dead", {queue: ">"}, count=2)  # dies
            broker.idle_timeout = 1  # ms: take the dead worker's messages over at once
        async with contextlib.aclosing(broker.listen()) as messages:
            stray = await messages.__anext__()
            await receiver.callback(stray)  # as a worker does: not run, acknowledged
            message = await messages.__anext__()
            await message.ack()
        assert _task_id(message.data) == handle.task_id
        pending = await client.xpending_range(queue, "parallelkit", min="-", max="+", count=10)
        assert pending == []  # the stray entry acknowledged, the task's message too
    assert ["Cannot parse" in r.getMessage() for r in caplog.records].count(True) == 1
