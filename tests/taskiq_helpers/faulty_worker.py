"""``taskiq worker tests.taskiq_helpers.faulty_worker:broker``: a test worker whose
Redis fails its first result write, as in a brief outage while a result is saved.

The result of a task with a completion channel is saved by one pipelined ``SET`` +
``PUBLISH`` (see ``parallelkit.taskiq._broker._ResultBackend.set_result``); the
first such pipeline raises redis-py's ``ConnectionError`` and counts the fault in
``{queue}:injected``, so the test knows the fault happened.
"""

from __future__ import annotations

import os
from typing import Any

import redis as redis_sync
import redis.exceptions
from redis.asyncio.client import Pipeline

from .tasks import from_environment

_execute = Pipeline.execute
_failed: list[bool] = []


async def _execute_failing_once(self: Pipeline, raise_on_error: bool = True) -> list[Any]:
    if not _failed:
        _failed.append(True)
        client = redis_sync.Redis.from_url(os.environ["PK_TASKIQ_URL"])
        try:
            client.incr(f"{os.environ['PK_TASKIQ_QUEUE']}:injected")
        finally:
            client.close()
        msg = "Redis is down (injected by the test worker)"
        raise redis.exceptions.ConnectionError(msg)
    return await _execute(self, raise_on_error)


Pipeline.execute = _execute_failing_once  # type: ignore[method-assign]
broker = from_environment().broker
