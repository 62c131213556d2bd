"""Helpers of the orchestrator tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio

import parallelkit as pk


def finished(memory: Any) -> dict[str, Any]:
    """The finished spans by name."""
    return {s.name: s for s in memory.get_finished_spans()}


def exception_types(span: Any) -> list[str]:
    """The type names of the exceptions recorded on ``span`` (without their module)."""
    return [
        str((e.attributes or {}).get("exception.type")).rsplit(".", 1)[-1]
        for e in span.events
        if e.name == "exception"
    ]


def crashing(orch: pk.Orchestrator, crash: anyio.Event) -> None:
    """Services on ``orch``: db crashes on ``crash``, its tear-down takes 3 s; api (on
    db) takes 10 s to stop."""

    @orch.service(stop_timeout=30)
    async def db() -> AsyncIterator[str]:
        try:
            async with anyio.create_task_group() as tg:

                async def die() -> None:
                    await crash.wait()
                    raise ConnectionError("db connection lost")

                tg.start_soon(die)
                yield "db"
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(3)

    @orch.service(stop_timeout=30)
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        await anyio.sleep(10)
