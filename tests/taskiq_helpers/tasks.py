"""The tasks the tests kick: one ``build()`` for the workers and the producer.

Workers import ``tests.taskiq_helpers.worker:broker``, which calls :func:`build` with the
queue name the test passes in the environment; the test calls :func:`build` with
the same name to get producer-side handles on the same tasks.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from taskiq import TaskiqEvents, TaskiqState

import parallelkit as pk
from parallelkit.taskiq import RedeliveringStreamBroker, redis_broker

#: the retry policy of every test broker: the `flaky` task needs 3 attempts
RETRY = pk.Retry(attempts=3, backoff=0.01, on=(ConnectionError,))


@dataclass(frozen=True)
class Tasks:
    broker: RedeliveringStreamBroker
    queue: str
    square: Any
    logged: Any
    fail_some: Any
    sleepy: Any
    flaky: Any
    opaque: Any


def build(url: str, queue: str, *, consumer: str | None = None) -> Tasks:
    """A broker on ``queue`` with the test tasks registered on it."""
    broker = redis_broker(
        url, queue=queue, consumer=consumer, idle_timeout=1.5, poll=0.2, retry=RETRY
    )
    me = consumer or "producer"
    clients: dict[str, Redis] = {}

    def redis() -> Redis:
        if "c" not in clients:
            clients["c"] = Redis.from_url(url)
        return clients["c"]

    @broker.on_event(TaskiqEvents.WORKER_STARTUP)
    async def announce(state: TaskiqState) -> None:
        """Tell the test this worker is up (see processes.Workers.wait_ready)."""
        await redis().set(f"{queue}:ready:{me}", os.getpid(), ex=600)

    @broker.task(task_name="pk_tests.square")
    async def square(x: int) -> int:
        await asyncio.sleep(random.random() * 0.004)  # completion order != input order
        return x * x

    @broker.task(task_name="pk_tests.logged")
    async def logged(x: int) -> int:
        """Record every execution (item and worker) in a Redis list."""
        await asyncio.sleep(0.03)
        await redis().rpush(f"{queue}:log", f"{x}:{me}")
        return 2 * x

    @broker.task(task_name="pk_tests.fail_some")
    async def fail_some(x: int) -> int:
        await asyncio.sleep(0.002)
        if x == 13:
            from .errors import CompanyNotFound

            raise CompanyNotFound(x)
        if x % 10 == 7:
            msg = f"bad item {x}"
            raise ValueError(msg)
        return x

    @broker.task(task_name="pk_tests.sleepy")
    async def sleepy(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @broker.task(task_name="pk_tests.flaky")
    async def flaky(x: int) -> int:
        """Fail with ConnectionError on the first two attempts; return the attempt."""
        attempt = int(await redis().incr(f"{queue}:flaky:{x}"))
        if attempt < 3:
            msg = f"attempt {attempt} of item {x} failed"
            raise ConnectionError(msg)
        return attempt

    @broker.task(task_name="pk_tests.opaque")
    async def opaque(x: int) -> Any:
        """Return a value the JSON result cannot hold."""
        return Opaque(x)

    return Tasks(broker, queue, square, logged, fail_some, sleepy, flaky, opaque)


class Opaque:
    """Not JSON-serializable (no pydantic schema either)."""

    def __init__(self, x: int) -> None:
        self.x = x


def from_environment() -> Tasks:
    """What a worker process builds: the queue and its name come from the test."""
    return build(
        os.environ["PK_TASKIQ_URL"],
        os.environ["PK_TASKIQ_QUEUE"],
        consumer=os.environ.get("PK_TASKIQ_CONSUMER"),
    )
