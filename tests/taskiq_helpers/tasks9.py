"""Tasks for ``tests/test_taskiq_leave_faults9.py``: a broker whose workers retry a
``ConnectionError`` after an hour's backoff (and never take a live worker's message
over), and which counts in Redis each check a worker makes of whether an item's
caller has left (``{queue}:checked``), so the test knows a backoff has begun.

Workers import ``tests.taskiq_helpers.worker9:broker``; the test calls :func:`build`
with the same queue for producer-side handles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from taskiq import TaskiqEvents, TaskiqState

import parallelkit as pk
from parallelkit.taskiq import RedeliveringStreamBroker, redis_broker

#: an hour between attempts: a test never sees a backoff end by itself
BACKOFF = 3600.0


def attempts_key(queue: str) -> str:
    """The Redis counter of the attempts ``fails`` started."""
    return f"{queue}:attempts"


def checked_key(queue: str) -> str:
    """The Redis counter of the workers' "has the caller left?" checks."""
    return f"{queue}:checked"


@dataclass(frozen=True)
class Tasks9:
    broker: RedeliveringStreamBroker
    queue: str
    fails: Any
    square: Any


def build(url: str, queue: str, *, consumer: str | None = None) -> Tasks9:
    retry = pk.Retry(attempts=3, backoff=BACKOFF, max_backoff=BACKOFF, on=(ConnectionError,))
    broker = redis_broker(url, queue=queue, consumer=consumer, idle_timeout=BACKOFF, poll=0.2,
                          retry=retry)  # fmt: skip
    me = consumer or "producer"
    clients: dict[str, Redis] = {}

    def redis() -> Redis:
        if "c" not in clients:
            clients["c"] = Redis.from_url(url)
        return clients["c"]

    left = broker._pk_left

    async def counted(task_id: str, stream: str | None = None) -> bool:
        answer = await left(task_id, stream)
        await redis().incr(checked_key(queue))
        return answer

    broker._pk_left = counted  # type: ignore[method-assign]

    @broker.on_event(TaskiqEvents.WORKER_STARTUP)
    async def announce(state: TaskiqState) -> None:
        await redis().set(f"{queue}:ready:{me}", os.getpid(), ex=600)

    @broker.task(task_name="pk_tests9.fails")
    async def fails(x: int) -> int:
        """Count the attempt, then fail with a ConnectionError, which is retried."""
        await redis().incr(attempts_key(queue))
        msg = f"attempt for item {x} failed"
        raise ConnectionError(msg)

    @broker.task(task_name="pk_tests9.square")
    async def square(x: int) -> int:
        return x * x

    return Tasks9(broker, queue, fails, square)


def from_environment() -> Tasks9:
    return build(
        os.environ["PK_TASKIQ_URL"],
        os.environ["PK_TASKIQ_QUEUE"],
        consumer=os.environ.get("PK_TASKIQ_CONSUMER"),
    )
