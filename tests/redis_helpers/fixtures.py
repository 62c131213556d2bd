"""Fixtures shared by the Redis test modules (loaded with ``pytest_plugins``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aredis

from ..conftest import need_service
from . import RedisServer, cleaned, client, free_port, new_prefix


@pytest.fixture
def prefix() -> str:
    return new_prefix()


@pytest.fixture
async def r(redis_url: str, prefix: str) -> AsyncIterator[aredis.Redis]:
    """A client on the test Redis; the test's keys are deleted afterwards."""
    async with cleaned(redis_url, prefix) as conn:
        yield conn


@pytest.fixture
async def dead() -> AsyncIterator[aredis.Redis]:
    """A client for a port where nothing listens: every call is an outage."""
    conn = client(f"redis://127.0.0.1:{free_port()}/0", retry=None)
    yield conn
    await conn.aclose()


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private ``redis-server`` of this test: to restart, pause (SIGSTOP) or kill."""
    srv = RedisServer()
    if srv.binary is None:
        need_service("redis-server (the binary, for outage and hang tests)", "not on PATH")
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()
