"""Replicas of the reference service (examples/service): one schema, one Redis namespace.

``--shared`` servers of one ``--name`` join the same PostgreSQL schema and Redis
namespace: the first creates and seeds them, none drops or clears them on stop. The
``slow`` tests serve two replicas under uvicorn, as ``python -m examples.service``
does, on the real PostgreSQL and Redis; the others check the options and the update
endpoint in-process.
"""

from __future__ import annotations

import dataclasses
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import anyio
import httpx
from examples.crm.seed import SeedSizes
from examples.service import VARIANTS, Settings, create_app
from examples.service.shared import open_database
from examples.service.testing import client

from tests.service_helpers import (
    ServiceProcess,
    conversation_count,
    drop,
    module_command,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension, uvicorn, redis.asyncio


# -- the options ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("database", "message"),
    [
        (None, "shared=True needs a PostgreSQL database"),
        ("sqlite+aiosqlite:///crm.db", "shared=True needs a PostgreSQL database"),
    ],
)
def test_shared_needs_a_postgresql_database(database: str | None, message: str) -> None:
    """Replicas share rows: a private SQLite file would give each its own."""
    with pytest.raises(ValueError, match=message):
        Settings(shared=True, database=database)
    with pytest.raises(TypeError, match="shared must be a bool"):
        Settings(shared=1, database="postgresql://postgres@127.0.0.1/test")  # type: ignore[arg-type]


def test_cli_shared_without_a_database_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from examples.service import __main__ as service_main

    monkeypatch.delenv("DATABASE_URL", raising=False)
    ran: list[Any] = []
    monkeypatch.setattr(service_main.uvicorn, "run", lambda *a, **k: ran.append(a))
    with pytest.raises(SystemExit) as exited:
        service_main.main(["--shared"])
    assert exited.value.code == 2
    assert "--shared" in capsys.readouterr().err
    assert ran == []


def test_cli_shared_sets_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from examples.service import __main__ as service_main

    seen: list[Settings] = []
    monkeypatch.setattr(service_main, "create_app", seen.append)
    monkeypatch.setattr(service_main.uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setattr(service_main, "COLLECTOR", SimpleNamespace(start=lambda: None))
    url = "postgresql://postgres@127.0.0.1/test"
    service_main.main(["--shared", "--database", url, "--name", "r1"])
    assert seen == [Settings(name="r1", database=url, shared=True)]


# -- the update endpoint: the same answers from every variant --------------------------------------
async def test_every_variant_updates_a_conversation_and_reads_it_back_the_same() -> None:
    """``PATCH /conversations/{id}`` answers the new view, and the cached read sees it."""
    answers: dict[str, list[Any]] = {}
    for variant in VARIANTS:
        async with client(create_app(Settings(variant=variant))) as http:
            before = await http.get("/conversations/42")  # cached now
            patched = await http.patch("/conversations/42", json={"subject": "Renamed"})
            after = await http.get("/conversations/42")
            missing = await http.patch("/conversations/99999", json={"subject": "x"})
            empty = await http.patch("/conversations/42", json={"subject": ""})
        assert before.status_code == patched.status_code == after.status_code == 200
        assert patched.json() == after.json() == {**before.json(), "subject": "Renamed"}
        assert missing.status_code == 404
        assert empty.status_code == 422
        answers[variant] = [patched.json(), after.json(), missing.json()]
    assert answers["ordinary"] == answers["expert"] == answers["parallelkit"]


# -- the shared schema, in-process --------------------------------------------------------------
SMALL = SeedSizes(companies=2, contacts_per_company=2, conversations_per_contact=2)


@pytest.mark.postgres
async def test_replicas_starting_together_seed_once_and_stopping_drops_nothing(
    pg_url: str,
) -> None:
    """Three replicas open the shared schema at once: one creates and seeds it (under the
    advisory lock), the others join; after all have closed, the rows are still there."""
    settings = Settings(name=f"rep_{uuid.uuid4().hex[:10]}", database=pg_url, shared=True)
    settings = dataclasses.replace(settings, seed_sizes=SMALL)
    created: list[bool] = []
    counts: list[int] = []

    async def replica() -> None:
        async with open_database(settings) as db:
            created.append(db.created)
            counts.append(await conversation_count(db))

    try:
        with anyio.fail_after(60):  # hang guard
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(replica)
            assert sorted(created) == [False, False, True]
            assert counts == [SMALL.companies * 4] * 3
            async with open_database(settings) as db:  # all closed: the rows stayed
                assert db.created is False
                assert await conversation_count(db) == SMALL.companies * 4
    finally:
        await drop(settings)


@pytest.mark.postgres
async def test_a_schema_left_half_made_is_made_again(pg_url: str) -> None:
    """A creator that died while seeding left a schema with no seeded mark: the next
    replica drops it and seeds it again, instead of serving half the rows."""
    from examples.crm.db import create_schema, make_engine

    settings = Settings(name=f"rep_{uuid.uuid4().hex[:10]}", database=pg_url, shared=True)
    settings = dataclasses.replace(settings, seed_sizes=SMALL)
    engine = make_engine(pg_url, schema=settings.schema)
    try:
        await create_schema(engine, schema=settings.schema)  # tables, no rows, no mark
        await engine.dispose()
        with anyio.fail_after(60):  # hang guard
            async with open_database(settings) as db:
                assert db.created is True
                assert await conversation_count(db) == SMALL.companies * 4
    finally:
        await engine.dispose()
        await drop(settings)


# -- two replicas under uvicorn ------------------------------------------------------------------
class Replica(ServiceProcess):
    """``python -m examples.service --shared ...`` in a subprocess (its output in ``log``)."""

    start_guard = 90

    def __init__(self, log: Path, args: list[str]) -> None:
        super().__init__(log, lambda port: module_command(port, args))


class Deployment:
    """Replicas of one service: one ``--name``, one database, one Redis, ``--shared``."""

    def __init__(self, tmp_path: Path, pg_url: str, redis_url: str) -> None:
        self.name = f"rep_{uuid.uuid4().hex[:10]}"
        self.pg_url, self.redis_url = pg_url, redis_url
        self.tmp_path = tmp_path
        self.replicas: list[Replica] = []

    def start(self) -> Replica:
        args = ["--variant", "parallelkit", "--name", self.name, "--shared"]
        args += ["--database", self.pg_url, "--redis", self.redis_url, "--store", "redis"]
        replica = Replica(self.tmp_path / f"replica{len(self.replicas)}.log", args)
        self.replicas.append(replica)
        return replica

    async def remove(self) -> None:
        """What an operator does to remove the service: drop the schema, clear the keys."""
        from examples.crm.db import drop_schema, make_engine
        from redis.asyncio import Redis

        from parallelkit.redis import RedisStore

        for replica in self.replicas:
            replica.kill()
        settings = Settings(name=self.name, database=self.pg_url, shared=True)
        schema = settings.schema
        engine = make_engine(self.pg_url, schema=schema)
        try:
            await drop_schema(engine, schema=schema)
        finally:
            await engine.dispose()
        redis = Redis.from_url(self.redis_url)
        try:
            await RedisStore(redis, namespace=settings.namespace).clear()
        finally:
            await redis.aclose()


@pytest.fixture
async def deployment(tmp_path: Path, pg_url: str, redis_url: str) -> AsyncIterator[Deployment]:
    pytest.importorskip("redis")
    deployed = Deployment(tmp_path, pg_url, redis_url)
    try:
        yield deployed
    finally:
        await deployed.remove()


async def started_together(deployment: Deployment, count: int) -> list[Replica]:
    """``count`` replicas started at the same time (they race to create the schema)."""
    replicas = [deployment.start() for _ in range(count)]
    async with anyio.create_task_group() as tg:
        for replica in replicas:
            tg.start_soon(replica.started)
    return replicas


async def store_stats(http: httpx.AsyncClient) -> dict[str, Any]:
    stats: dict[str, Any] = (await http.get("/debug/stats")).json()["store"]
    return stats


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_an_update_through_one_replica_is_not_served_stale_by_the_other(
    deployment: Deployment,
) -> None:
    """Replica B serves a conversation from its near cache; it is updated through A.
    Once B has the invalidation (pub/sub: within milliseconds, at worst ``near_ttl``),
    B's next read is the new row, loaded from the schema both replicas share."""
    a, b = await started_together(deployment, 2)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30) as at_a,
        httpx.AsyncClient(base_url=b.url, timeout=30) as at_b,
    ):
        original = (await at_b.get("/conversations/42")).json()
        with anyio.fail_after(30):  # hang guard: until B answers it from process memory
            while (await store_stats(at_b))["near_hits"] == 0:
                assert (await at_b.get("/conversations/42")).json() == original
                await anyio.sleep(0.01)
        assert (await at_a.get("/conversations/42")).json() == original  # one shared row
        heard = (await store_stats(at_b))["near_invalidations"]

        patched = await at_a.patch("/conversations/42", json={"subject": "Renamed by A"})
        assert patched.status_code == 200, patched.text
        assert patched.json() == {**original, "subject": "Renamed by A"}
        assert (await at_a.get("/conversations/42")).json() == patched.json()

        # B may answer the old row until the message reaches it (normally within ms;
        # near_ttl at worst), never after: each answer is the old row or the new one,
        # and once it is the new one it stays
        with anyio.fail_after(30):  # hang guard
            while (seen := (await at_b.get("/conversations/42")).json()) != patched.json():
                assert seen == original
                await anyio.sleep(0.01)
        assert (await store_stats(at_b))["near_invalidations"] > heard  # by pub/sub
        for _ in range(20):
            assert (await at_b.get("/conversations/42")).json() == patched.json()

        # and the other way round, on a row B has not cached: A never sees the old one
        moved = await at_b.patch("/conversations/43", json={"subject": "Renamed by B"})
        assert moved.status_code == 200, moved.text
        assert (await at_a.get("/conversations/43")).json()["subject"] == "Renamed by B"
    for replica in (a, b):
        assert "Traceback" not in replica.output()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_stopping_one_replica_keeps_the_data_the_other_serves(
    deployment: Deployment,
) -> None:
    """SIGTERM to replica A: B goes on serving every row, the update made through A
    included; a replica started afterwards joins the same rows (nothing reseeded)."""
    a, b = await started_together(deployment, 2)
    async with httpx.AsyncClient(base_url=a.url, timeout=30) as at_a:
        patched = await at_a.patch("/conversations/7", json={"subject": "Kept"})
        assert patched.status_code == 200, patched.text
    assert await a.terminate() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal

    batch = {"events": [{"conversation_id": 1}, {"conversation_id": 2000}]}
    async with httpx.AsyncClient(base_url=b.url, timeout=30) as at_b:
        assert (await at_b.get("/conversations/7")).json() == patched.json()
        assert (await at_b.get("/conversations/1999")).status_code == 200  # not cached
        webhook = await at_b.post("/webhooks/batch", json=batch)  # never cached
        assert webhook.status_code == 200, webhook.text
        enrolled = await at_b.post("/companies/3/enrollments", json={"inactive_days": 21})
        assert enrolled.status_code == 200, enrolled.text

    c = deployment.start()
    await c.started()
    async with httpx.AsyncClient(base_url=c.url, timeout=30) as at_c:
        assert (await at_c.get("/conversations/7")).json() == patched.json()
    assert await b.terminate() in (0, -signal.SIGTERM)
    assert await c.terminate() in (0, -signal.SIGTERM)
    for replica in (a, b, c):
        assert "Traceback" not in replica.output()
