"""Tasks for ``tests/test_taskiq_faults7.py``, on the broker of :func:`tasks.build`
(its workers retry a ``ConnectionError`` three times, 10 ms apart).

Workers import ``tests.taskiq_helpers.worker7:broker``; the test calls :func:`build`
with the same queue for producer-side handles.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from . import tasks


def attempts_key(queue: str, x: int) -> str:
    """The Redis counter of the attempts ``held(x)`` started."""
    return f"{queue}:attempts:{x}"


def go_key(queue: str, x: int) -> str:
    """The Redis key that lets the attempts of ``held(x)`` fail."""
    return f"{queue}:go:{x}"


@dataclass(frozen=True)
class Tasks7:
    base: tasks.Tasks
    held: Any


def build(url: str, queue: str, *, consumer: str | None = None) -> Tasks7:
    base = tasks.build(url, queue, consumer=consumer)
    clients: dict[str, Redis] = {}

    def redis() -> Redis:
        if "c" not in clients:
            clients["c"] = Redis.from_url(url)
        return clients["c"]

    @base.broker.task(task_name="pk_tests7.held")
    async def held(x: int) -> int:
        """Count the attempt, wait until the test says go, then fail with a
        ConnectionError, which the workers retry."""
        await redis().incr(attempts_key(queue, x))
        while not await redis().exists(go_key(queue, x)):
            await asyncio.sleep(0.01)
        msg = f"attempt for item {x} failed"
        raise ConnectionError(msg)

    return Tasks7(base, held)


def from_environment() -> Tasks7:
    return build(
        os.environ["PK_TASKIQ_URL"],
        os.environ["PK_TASKIQ_QUEUE"],
        consumer=os.environ.get("PK_TASKIQ_CONSUMER"),
    )
