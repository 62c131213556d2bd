"""The reference service when PostgreSQL closes its connections (a restart, a fail-over).

Every connection of the server's pool is ended by the server (``pg_terminate_backend``)
between two bursts of requests; the pool must replace them as they are drawn
(``pool_pre_ping``, set by :func:`examples.crm.db.make_engine` for server databases),
so no request fails. Without it, each request that drew a dead connection was a 500,
the payment's after the card was charged.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("fastapi")

import anyio
from examples.service import VARIANTS, Settings, create_app
from examples.service.testing import client
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from tests.test_service_faults import recorded, sessions_of

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

POOL = 3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension: asyncio only


async def backends_of(sessions: Any) -> set[int]:
    """The server pids of every connection of the pool (all checked out at once)."""
    pids: set[int] = set()
    ready = anyio.Event()
    held = 0

    async def hold() -> None:
        nonlocal held
        async with sessions() as session:
            pids.add(await session.scalar(text("SELECT pg_backend_pid()")))
            held += 1
            if held == POOL:
                ready.set()
            await ready.wait()

    with anyio.fail_after(30):  # hang guard
        async with anyio.create_task_group() as tg:
            for _ in range(POOL):
                tg.start_soon(hold)
    return pids


async def terminate(pg_url: str, pids: set[int]) -> None:
    admin = create_async_engine(pg_url, poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            for pid in pids:
                assert await conn.scalar(text(f"SELECT pg_terminate_backend({int(pid)})"))
    finally:
        await admin.dispose()


@pytest.mark.parametrize("variant", VARIANTS)
async def test_requests_after_the_server_closed_every_connection_all_succeed(
    variant: str, pg_url: str
) -> None:
    settings = Settings(
        variant=variant, name=f"t_pg_kill_{variant}", database=pg_url, pool_size=POOL
    )
    state: dict[str, Any] = {}
    app = create_app(settings)
    async with client(app, state=state) as http:
        sessions = sessions_of(app, state)
        pids = await backends_of(sessions)
        assert len(pids) == POOL
        await terminate(pg_url, pids)

        async def ask(i: int) -> list[int]:
            statuses = []
            events = [{"conversation_id": c} for c in (i + 1, i + 7, i + 40)]
            r = await http.post("/webhooks/batch", json={"events": events})
            statuses.append(r.status_code)
            r = await http.post("/payments", json={"payment_id": f"kill-{i}", "amount": 5})
            statuses.append(r.status_code)
            r = await http.post("/companies/1/enrollments", json={"inactive_days": 21})
            statuses.append(r.status_code)
            return statuses

        answers: list[int] = []

        async def run(i: int) -> None:
            answers.extend(await ask(i))

        with anyio.fail_after(60):  # hang guard
            async with anyio.create_task_group() as tg:
                for i in range(2 * POOL):
                    tg.start_soon(run, i)
        assert answers == [200] * (3 * 2 * POOL)
        paid = {p for p, _ in await recorded(sessions)}
        assert paid >= {f"kill-{i}" for i in range(2 * POOL)}
        # the pool really was renewed: none of the ended connections serves any more
        assert not (await backends_of(sessions)) & pids
        stats = (await http.get("/debug/stats")).json()
    assert stats["checked_out"] == 0
