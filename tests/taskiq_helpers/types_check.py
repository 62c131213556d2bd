"""Checked by ``mypy --strict tests/taskiq_helpers/types_check.py`` (not run): the
inferred types of parallelkit.taskiq's public API."""

from __future__ import annotations

from taskiq import TaskiqMiddleware
from typing_extensions import assert_type

import parallelkit as pk
import parallelkit.taskiq as pkt

broker = pkt.redis_broker("redis://127.0.0.1:6379/0", queue="types")


@broker.task(task_name="types.describe")
async def describe(x: int) -> str:
    return str(x)


async def check() -> None:
    assert_type(await pkt.map(describe, [1, 2], limit=2), list[str])
    assert_type(await pkt.map(describe, range(3), settle=True), list[pk.Outcome[str]])
    async with pkt.imap(describe, range(3), limit=2) as results:
        async for item in results:
            assert_type(item, str)
    async with pkt.imap(describe, range(3), settle=True) as outcomes:
        async for outcome in outcomes:
            assert_type(outcome, pk.Outcome[str])
    assert_type(pkt.retry_middleware(pk.Retry(attempts=2)), TaskiqMiddleware)
