"""Review of the reference service's bad-input, body-limit, update and replica changes.

* a private server (no ``--shared``) next to replicas of its ``--name`` must not drop
  their schema, and a replica must not drop a private server's schema as "half made";
* an update racing a read must not leave the old row cached (ordinary and expert
  variants: the parallelkit variant's ``SWRCache`` guarantees it already);
* a 413 leaves the HTTP/1.1 connection usable under uvicorn (both HTTP parsers).
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import anyio
from examples.crm.models import Conversation
from examples.crm.seed import SeedSizes
from examples.service import Settings, create_app
from examples.service.errors import MAX_BODY
from examples.service.shared import ServiceDatabase, open_database
from examples.service.testing import client
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.service_helpers import ROOT, conversation_count, drop, free_port

pytestmark = pytest.mark.anyio

SMALL = SeedSizes(companies=2, contacts_per_company=2, conversations_per_contact=2)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension, uvicorn


# -- a private server and replicas of one --name ---------------------------------------------------
def settings_of(pg_url: str, name: str, *, shared: bool) -> Settings:
    settings = Settings(name=name, database=pg_url, shared=shared)
    return dataclasses.replace(settings, seed_sizes=SMALL)


def shared_and_private(pg_url: str) -> tuple[Settings, Settings]:
    """A ``--shared`` and a private server's settings, of one new ``--name``."""
    name = f"rv9_{uuid.uuid4().hex[:10]}"
    return settings_of(pg_url, name, shared=True), settings_of(pg_url, name, shared=False)


async def refused_next_to(running: Settings, refused: Settings, *, match: str) -> None:
    """While ``running``'s database is open, ``refused``'s fails to open (``RuntimeError``
    matching ``match``), and ``running``'s rows stay."""
    async with open_database(running) as db:
        with pytest.raises(RuntimeError, match=match):
            async with open_database(refused):
                pass
        assert await conversation_count(db) == SMALL.companies * 4


@pytest.mark.postgres
async def test_a_private_server_does_not_drop_the_replicas_schema(pg_url: str) -> None:
    """A server started without ``--shared`` under the replicas' ``--name`` used to drop
    their schema as its "leftover" (and drop it again when it stopped): it refuses to
    start instead, saying why, and the replicas' rows stay."""
    shared, private = shared_and_private(pg_url)
    try:
        with anyio.fail_after(60):  # hang guard
            await refused_next_to(shared, private, match=f"{shared.schema}.*--shared")
            async with open_database(shared) as replica:  # still seeded: joined, not made
                assert replica.created is False
    finally:
        await drop(shared)


@pytest.mark.postgres
async def test_a_replica_does_not_drop_a_private_servers_schema(pg_url: str) -> None:
    """A private server's schema has no seeded mark: a ``--shared`` replica took it for one
    left half made and dropped it under the running server. It refuses instead."""
    shared, private = shared_and_private(pg_url)
    try:
        with anyio.fail_after(60):  # hang guard
            await refused_next_to(private, shared, match=f"{shared.schema}.*without --shared")
    finally:
        await drop(shared)


@pytest.mark.postgres
async def test_a_private_servers_leftover_is_still_dropped(pg_url: str) -> None:
    """A private server killed before its clean-up leaves its schema as it was: the next
    private server of that name drops it and makes it again, as before."""
    from examples.crm.db import make_engine
    from sqlalchemy import text

    private = settings_of(pg_url, f"rv9_{uuid.uuid4().hex[:10]}", shared=False)
    comment = "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = :s"
    engine = make_engine(pg_url)
    try:
        with anyio.fail_after(60):  # hang guard
            async with open_database(private), engine.connect() as conn:
                mark = await conn.scalar(text(comment), {"s": private.schema})
            async with engine.begin() as conn:  # what a SIGKILL leaves: the schema as it was
                await conn.execute(text(f'CREATE SCHEMA "{private.schema}"'))
                await conn.execute(text(f'CREATE TABLE "{private.schema}".junk (x int)'))
                if mark is not None:
                    quoted = mark.replace("'", "''")
                    await conn.execute(
                        text(f"COMMENT ON SCHEMA \"{private.schema}\" IS '{quoted}'")
                    )
            async with open_database(private) as again:
                assert again.created is True
                assert await conversation_count(again) == SMALL.companies * 4
                async with engine.connect() as conn:
                    junk = await conn.scalar(
                        text(
                            "SELECT count(*) FROM information_schema.tables"
                            " WHERE table_schema = :s AND table_name = 'junk'"
                        ),
                        {"s": private.schema},
                    )
                assert junk == 0
    finally:
        await engine.dispose()
        await drop(private)


# -- an update racing a read -----------------------------------------------------------------------
class GatedSession(AsyncSession):
    """A session whose first ``get(Conversation)`` (after reading the row) waits for ``go``."""

    armed: list[tuple[anyio.Event, anyio.Event]] = []
    committed: anyio.Event | None = None

    async def get(self, entity: Any, ident: Any, **kwargs: Any) -> Any:
        row = await super().get(entity, ident, **kwargs)
        if entity is Conversation and GatedSession.armed:
            read, go = GatedSession.armed.pop()
            read.set()
            await go.wait()
        return row

    async def commit(self) -> None:
        await super().commit()
        if GatedSession.committed is not None:
            GatedSession.committed.set()


@pytest.mark.parametrize("variant", ["ordinary", "expert"])
async def test_a_read_racing_an_update_does_not_cache_the_old_row(variant: str) -> None:
    """A read that loaded the row before an update committed stored it after the update
    had dropped the cache entry: every read after the update answered the old subject
    for ``fresh`` (30 s), and the expert's update answered it too (its read waited for
    that load). Now a load overlapping an update is answered, not cached."""
    app = create_app(Settings(variant=variant))
    async with client(app) as http:
        holder = app.state.s if variant == "expert" else app.state
        db: ServiceDatabase = holder.db
        gated = async_sessionmaker(db.engine, class_=GatedSession, expire_on_commit=False)
        holder.db = dataclasses.replace(db, sessions=gated)
        read, go = anyio.Event(), anyio.Event()
        GatedSession.armed.append((read, go))
        GatedSession.committed = committed = anyio.Event()
        answers, after = await race(http, read, go, committed)
        assert answers["patched"]["subject"] == "Renamed"
        assert after["subject"] == "Renamed"
        assert answers["racing"]["subject"] != "Renamed"  # it started first: the old row


async def patch(http: Any, answers: dict[str, Any]) -> None:
    response = await http.patch("/conversations/7", json={"subject": "Renamed"})
    answers["patched"] = response.json()


async def race(
    http: Any, read: anyio.Event, go: anyio.Event, committed: anyio.Event | None = None
) -> tuple[dict[str, Any], Any]:
    """A read of conversation 7 holds its loaded row (``read`` set, waiting for ``go``)
    while a PATCH renames it; ``go`` once the update committed (when ``committed`` is
    given) and a moment more. The answers (``racing``, ``patched``), and a read after."""
    answers: dict[str, Any] = {}

    async def get() -> None:
        answers["racing"] = (await http.get("/conversations/7")).json()

    with anyio.fail_after(30):  # hang guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(get)
            await read.wait()  # the read has the old row
            tg.start_soon(lambda: patch(http, answers))
            if committed is not None:
                await committed.wait()  # the update is in the database
            await anyio.sleep(0.05)  # and its invalidation done (or waiting for the read)
            go.set()
        after = (await http.get("/conversations/7")).json()
    return answers, after


# -- keep-alive after a 413 under uvicorn ----------------------------------------------------------
def exchange(port: int, data: bytes, responses: int) -> list[int]:
    """Send ``data`` on one connection; the status codes of ``responses`` answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(data)
        received = b""
        while received.count(b"HTTP/1.1 ") < responses or not received.endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += chunk
    return [int(part[:3]) for part in received.split(b"HTTP/1.1 ")[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_413_leaves_the_connection_usable(parser: str, tmp_path: Path) -> None:
    """Declared and chunked bodies over the limit, then a GET on the same connection."""
    port = free_port()
    code = (
        "import uvicorn\nfrom examples.service import Settings, create_app\n"
        f"uvicorn.run(create_app(Settings(variant='expert')), port={port},"
        f" log_level='warning', http={parser!r})\n"
    )
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=log)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail((tmp_path / "server.log").read_text())
                anyio.run(anyio.sleep, 0.1)
        big = b'{"subject":"' + b"x" * MAX_BODY + b'"}'
        head = b"PATCH /conversations/1 HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        get = b"GET /conversations/1 HTTP/1.1\r\nHost: t\r\n\r\n"
        declared = head + b"Content-Length: %d\r\n\r\n" % len(big) + big
        chunked = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(big) + big
        assert exchange(port, declared + get, 2) == [413, 200]
        assert exchange(port, chunked + b"\r\n0\r\n\r\n" + get, 2) == [413, 200]
    finally:
        server.terminate()
        server.wait(30)
        log.close()


async def test_the_parallelkit_update_is_not_answered_from_a_load_that_began_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parallelkit variant: a read's load holding the old row while an update commits
    and invalidates; the update's answer, and every read after it, are the new row."""
    from examples.service import with_parallelkit

    real = with_parallelkit.eager_get
    armed: list[tuple[anyio.Event, anyio.Event]] = [(anyio.Event(), anyio.Event())]
    read, go = armed[0]

    async def gated(*args: Any, **kwargs: Any) -> Any:
        row = await real(*args, **kwargs)
        if armed:
            armed.pop()
            read.set()
            await go.wait()
        return row

    monkeypatch.setattr(with_parallelkit, "eager_get", gated)
    async with client(create_app(Settings(variant="parallelkit"))) as http:
        answers, after = await race(http, read, go)
    assert answers["patched"]["subject"] == "Renamed"
    assert after["subject"] == "Renamed"


# -- a --name longer than PostgreSQL's identifiers ------------------------------------------------
@pytest.mark.postgres
async def test_a_long_name_is_refused_not_truncated(pg_url: str) -> None:
    """PostgreSQL identifiers are at most 63 bytes: a replica of a longer ``--name`` failed
    to start with ``identifier too long`` from the driver (a traceback, after argument
    parsing had accepted it). A name whose schema does not fit is refused up front,
    naming the limit, and the longest that fits works."""
    name = f"rv9_{uuid.uuid4().hex[:10]}_" + "x" * 60
    with pytest.raises(ValueError, match="63"):
        Settings(name=name, database=pg_url, shared=True)
    longest = name[: 63 - len("svc_")]
    settings = settings_of(pg_url, longest, shared=True)  # the longest that fits
    try:
        with anyio.fail_after(60):  # hang guard
            async with open_database(settings) as first:
                assert first.created is True
            async with open_database(settings) as second:
                assert second.created is False
    finally:
        await drop(settings)


def test_cli_refuses_a_long_name(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from examples.service import __main__ as service_main

    ran: list[Any] = []
    monkeypatch.setattr(service_main.uvicorn, "run", lambda *a, **k: ran.append(a))
    with pytest.raises(SystemExit) as exited:
        service_main.main(["--name", "x" * 60])
    assert exited.value.code == 2
    assert "--name" in capsys.readouterr().err
    assert ran == []
