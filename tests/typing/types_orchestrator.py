"""Checked by `mypy --strict tests/typing` (not run): the Orchestrator's typed accessor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from typing_extensions import assert_type

import parallelkit as pk

orch = pk.Orchestrator()


class Engine: ...


@orch.service
async def db() -> AsyncIterator[Engine]:
    yield Engine()


@orch.service
@asynccontextmanager
async def cache() -> AsyncIterator[dict[str, int]]:
    yield {}


@orch.service
async def port(db: Engine) -> int:
    return 8080


async def check() -> None:
    async with orch.start() as running:
        assert_type(running.get(db), Engine)
        assert_type(running.get(cache), dict[str, int])
        assert_type(running.get(port), int)
        health = await running.health()
        assert_type(health, pk.Health)
        assert_type(running.health(), pk.Health)


async def by_name() -> None:
    async with orch.start() as running:
        assert_type(running.get("db", Engine), Engine)
        assert_type(running.get("db"), Any)


def handler_types() -> None:
    from typing import Annotated

    from parallelkit.asgi import running_from, service

    def handler(engine: Annotated[Engine, service("db", Engine)], request: object) -> None:
        assert_type(engine, Engine)  # Annotated metadata: the parameter is an Engine
        assert_type(running_from(request), pk.Running)
        assert_type(running_from(request).get("db", Engine), Engine)
