"""Tasks for ``tests/test_taskiq_faults3.py``, on the broker of :func:`tasks.build`.

Workers import ``tests.taskiq_helpers.worker3:broker``. Its result backend loses
the first result of every task labelled ``pk_lose_first`` (the key evicted or
deleted right after the write, before the producer read it): the worker
acknowledges the message all the same, so the message stays in the stream,
acknowledged, and no result will ever come for that run. The producer calls
:func:`build` with ``worker=False``: it also gets a task no worker registers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from taskiq.result import TaskiqResult

from parallelkit.taskiq._broker import _ResultBackend

from . import tasks

LOSE_FIRST = "pk_lose_first"


class LosingBackend(_ResultBackend):
    """Drops the first result of a task labelled :data:`LOSE_FIRST` (counted in Redis)."""

    queue = ""

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        if result.labels.get(LOSE_FIRST):
            saves = await self._client().incr(f"{self.queue}:saves:{task_id}")
            if saves == 1:
                return  # stored, then evicted before anyone read it
        await super().set_result(task_id, result)


@dataclass(frozen=True)
class Tasks3:
    base: tasks.Tasks
    lose_first: Any
    gate: Any
    retried_gate: Any
    unknown: Any


def build(
    url: str,
    queue: str,
    *,
    consumer: str | None = None,
    worker: bool = False,
    trim_after: int | None = None,
) -> Tasks3:
    """The tasks; ``trim_after`` (ms) stands for a shorter ``result_ttl`` of the
    stream's trimming only (the results themselves keep the default TTL)."""
    base = tasks.build(url, queue, consumer=consumer)
    broker = base.broker
    if trim_after is not None:
        broker._pk_trim_after = trim_after
    if worker:
        old: Any = broker.result_backend
        backend = LosingBackend(url, result_px_time=old.result_px_time, prefix_str=old.prefix_str)
        backend.queue = queue
        broker.result_backend = backend

    clients: dict[str, Redis] = {}

    @broker.task(task_name="pk_tests3.lose_first", **{LOSE_FIRST: True})
    async def lose_first(x: int) -> int:
        """Record every run (item and worker) in the Redis list ``{queue}:log``."""
        if "c" not in clients:
            clients["c"] = Redis.from_url(url)
        await clients["c"].rpush(f"{queue}:log", f"{x}:{consumer or 'producer'}")
        return 3 * x

    @broker.task(task_name="pk_tests3.gate")
    async def gate(x: int) -> int:
        """Return ``x`` once the test pushes to ``{queue}:gate:{x}``."""
        if "g" not in clients:  # a client of its own: BLPOP holds a connection
            clients["g"] = Redis.from_url(url)
        await clients["g"].blpop([f"{queue}:gate:{x}"], timeout=0)
        return x

    @broker.task(task_name="pk_tests3.retried_gate")
    async def retried_gate(x: int) -> int:
        """Fail the first attempt (retried by the worker), then wait for the gate."""
        if "c" not in clients:
            clients["c"] = Redis.from_url(url)
        attempt = int(await clients["c"].incr(f"{queue}:attempts:{x}"))
        if attempt == 1:
            msg = f"attempt 1 of item {x} failed"
            raise ConnectionError(msg)
        await gate(x)
        return attempt

    unknown: Any = None
    if not worker:  # a task name no worker has registered (a typo, an older worker)

        @broker.task(task_name="pk_tests3.nobody_knows_me")
        async def nobody(x: int) -> int:  # pragma: no cover - never run
            return x

        unknown = nobody
    return Tasks3(base, lose_first, gate, retried_gate, unknown)


def from_environment() -> Tasks3:
    return build(
        os.environ["PK_TASKIQ_URL"],
        os.environ["PK_TASKIQ_QUEUE"],
        consumer=os.environ.get("PK_TASKIQ_CONSUMER"),
        worker=True,
        trim_after=int(os.environ["PK_TASKIQ_TRIM_AFTER"])
        if "PK_TASKIQ_TRIM_AFTER" in os.environ
        else None,
    )
