"""Fault injection for the ASGI integration: parallelkit.asgi and RequestGuard.

A real uvicorn server (in-process ``uvicorn.Server`` or a subprocess) and real HTTP
where it matters: clients that go away mid-request, concurrent requests counted
apart, streaming responses, errors after the response started, shutdown by signal.
Events and counters, never elapsed time; ``fail_after`` only bounds a hang.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.lowlevel
import httpx
import pytest
import uvicorn
from examples.crm import Base, Contact, Conversation, SeedSizes, seed
from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from starlette.applications import Starlette

import parallelkit as pk
from parallelkit.asgi import lifespan, running, running_from, service
from parallelkit.sqlalchemy import (
    LimitedAsyncSession,
    NotLoadedError,
    QueryCounter,
    RequestGuard,
    TooManyQueries,
    count_queries,
    eager,
    pool_limiter,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup  # type: ignore[import-not-found, unused-ignore]

pytest_plugins = ["tests.sqla_fixtures"]
pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn and SQLAlchemy's asyncio extension


# ---------------------------------------------------------------------------- helpers
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A small seeded CRM behind a pool of 3 connections (no overflow)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from tests.sqla_fixtures import drop_pg_schema, pg_schema_engine  # a plugin: import late

    schema = None
    if request.param == "sqlite":
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{tmp_path / 'crm.sqlite3'}", pool_size=3, max_overflow=0
        )
    else:
        pg_url: str = request.getfixturevalue("pg_url")
        engine, schema = await pg_schema_engine(pg_url, pool_size=3, max_overflow=0)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            await seed(session, SeedSizes(companies=2, contacts_per_company=4))
        yield engine
    finally:
        await engine.dispose()
        if schema is not None:
            await drop_pg_schema(request.getfixturevalue("pg_url"), schema)


class Served:
    """An in-process uvicorn on a free port; ``stop()`` as SIGTERM would."""

    def __init__(self, server: uvicorn.Server) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


async def _serve(app: Any, tg: Any, **config: Any) -> Served:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, **config)
    )
    tg.start_soon(server.serve)
    with anyio.fail_after(20):  # a bound for a hang, not a timing
        while not server.started:
            await anyio.sleep(0.01)
    return Served(server)


def _other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if not t.done()}


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def _touch_unloaded(engine: AsyncEngine) -> None:
    async with async_sessionmaker(engine)() as session:
        conversation = await session.get_one(Conversation, 1, options=eager(Conversation))
        _ = conversation.contact  # not asked for: NotLoadedError


# ---------------------------------------------------------------------------- the real error
class DomainError(Exception):
    """What an app raises on purpose, having handled a parallelkit error."""


async def test_an_error_the_app_raised_while_handling_ours_is_left_alone(
    db: AsyncEngine,
) -> None:
    """The guard digs out errors a framework buried, never one the app chose to raise."""
    app = FastAPI()

    @app.get("/translated")
    async def translated() -> int:
        try:
            await _touch_unloaded(db)
        except NotLoadedError as exc:
            raise DomainError("conversation view unavailable") from exc
        return 1

    @app.get("/while-handling")
    async def while_handling() -> int:
        try:
            await _touch_unloaded(db)
        except NotLoadedError:
            raise KeyError("fallback failed")  # noqa: B904 - the implicit context on purpose
        return 1

    app.add_middleware(RequestGuard, engine=db)
    async with client(app) as http:
        with pytest.raises(DomainError, match="conversation view unavailable") as info:
            await http.get("/translated")
        assert isinstance(info.value.__cause__, NotLoadedError)  # its own chain, untouched
        with pytest.raises(KeyError, match="fallback failed"):
            await http.get("/while-handling")


async def test_http_exceptions_pass_through_the_guard_untouched(db: AsyncEngine) -> None:
    app = FastAPI()

    @app.get("/handled")  # turned into a response inside the app: the guard never sees it
    async def handled() -> int:
        try:
            await _touch_unloaded(db)
        except NotLoadedError as exc:
            raise HTTPException(409, "not loaded") from exc
        return 1

    @app.get("/late")
    async def late() -> StreamingResponse:  # raised after the response started
        async def body() -> AsyncIterator[bytes]:
            yield b"partial"
            try:
                await _touch_unloaded(db)
            except NotLoadedError as exc:
                raise HTTPException(409, "too late") from exc

        return StreamingResponse(body())

    @app.get("/fine")
    async def fine() -> int:
        return 1

    @app.middleware("http")  # inside the guard: its HTTPException escapes the app
    async def gate(request: Request, call_next: Any) -> Any:
        if request.url.path == "/fine":
            try:
                await _touch_unloaded(db)
            except NotLoadedError as exc:
                raise HTTPException(403, "gate") from exc
        return await call_next(request)

    app.add_middleware(RequestGuard, engine=db)  # added last: outside `gate`
    async with client(app) as http:
        response = await http.get("/handled")
        assert (response.status_code, response.json()) == (409, {"detail": "not loaded"})
        with pytest.raises(RuntimeError, match="response already started") as late_info:
            await http.get("/late")
        assert isinstance(late_info.value.__cause__, HTTPException)
        with pytest.raises(HTTPException) as gate_info:
            await http.get("/fine")
        assert gate_info.value.status_code == 403


async def test_a_task_group_error_in_a_handler_comes_out_as_the_group(db: AsyncEngine) -> None:
    """A handler's own task group raises a group: the guard neither unwraps it nor
    re-raises it (the NotLoadedError inside is already the real error)."""
    app = FastAPI()

    @app.get("/group")
    async def group() -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_touch_unloaded, db)
            tg.start_soon(anyio.sleep_forever)  # cancelled by the failure
        return 1

    app.add_middleware(RequestGuard, engine=db)
    async with client(app) as http:
        with pytest.raises(ExceptionGroup) as info:
            await http.get("/group")
    assert info.group_contains(NotLoadedError)
    assert info.value.__cause__ is None  # raised as it was, not re-raised by the guard


# ---------------------------------------------------------------------------- real server
def guarded_app(engine: AsyncEngine, **guard: Any) -> tuple[FastAPI, list[tuple[str, int]]]:
    """A FastAPI app whose lifespan serves ``engine``, behind RequestGuard."""
    orch = pk.Orchestrator()

    @orch.service
    async def database() -> AsyncIterator[AsyncEngine]:
        yield engine

    counted: list[tuple[str, int]] = []

    def on_request(scope: Any, counter: QueryCounter) -> None:
        counted.append((scope["path"], counter.count))

    app = FastAPI(lifespan=lifespan(orch))
    app.add_middleware(RequestGuard, engine=engine, on_request=on_request, **guard)
    return app, counted


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_client_leaving_mid_map_leaves_no_task_connection_or_slot(
    db: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn lets a handler finish after its client left: the map's sessions are all
    given back, the request is counted once, and nothing is logged."""
    app, counted = guarded_app(db, max_queries=20, enforce=True)
    sessions = async_sessionmaker(db, class_=LimitedAsyncSession)
    holding: list[int] = []
    gate, done = anyio.Event(), anyio.Event()
    full = anyio.Event()

    @app.get("/emails")
    async def emails(engine: Annotated[AsyncEngine, service("database", AsyncEngine)]) -> int:
        async def item(contact_id: int) -> str:
            async with sessions() as session:
                first = await session.get_one(Contact, contact_id)
                holding.append(contact_id)
                if len(holding) == 3:  # every connection of the pool is held
                    full.set()
                await gate.wait()
                await session.execute(select(Contact.id).where(Contact.id == contact_id))
                return first.email

        try:
            return len(await pk.map(item, range(1, 7), limit=3))
        finally:
            done.set()

    limiter = pool_limiter(db)
    with caplog.at_level(logging.INFO):
        async with anyio.create_task_group() as tg:
            served = await _serve(app, tg)
            before = _other_tasks()
            with anyio.fail_after(30):  # bounds for a hang, not timings
                async with (
                    httpx.AsyncClient(base_url=served.url) as http,
                    anyio.create_task_group() as request,
                ):
                    request.start_soon(http.get, "/emails")
                    await full.wait()
                    assert db.pool.checkedout() == 3  # type: ignore[attr-defined]
                    assert limiter.statistics().running == 3
                    request.cancel_scope.cancel()  # the client goes away
                gate.set()
                await done.wait()
                while not counted:
                    await anyio.sleep(0.01)
                while _other_tasks() - before:  # the request's task ends too
                    await anyio.sleep(0.01)
            assert db.pool.checkedout() == 0  # type: ignore[attr-defined]
            stats = limiter.statistics()
            assert (stats.running, stats.waiting) == (0, 0)
            served.server.should_exit = True
    assert counted == [("/emails", 12)]  # 2 statements per item, counted once
    assert _errors(caplog) == []


async def test_a_client_leaving_a_stream_cancels_its_fanout_and_gives_everything_back(
    db: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    app, counted = guarded_app(db, max_queries=20, enforce=True)
    sessions = async_sessionmaker(db, class_=LimitedAsyncSession)
    holding: list[int] = []
    full, never = anyio.Event(), anyio.Event()
    ended: list[str] = []

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def item(contact_id: int) -> int:
            try:
                async with sessions() as session:
                    await session.get_one(Contact, contact_id)
                    holding.append(contact_id)
                    if len(holding) == 3:
                        full.set()
                    await never.wait()
                    return contact_id
            except anyio.get_cancelled_exc_class():
                ended.append("cancelled")
                raise

        async def body() -> AsyncIterator[bytes]:
            yield b"first\n"
            flow = pk.Flow()

            @flow.step
            async def contacts() -> list[int]:
                return await pk.map(item, range(1, 7), limit=3)

            @flow.step
            async def total(contacts: list[int]) -> int:
                return sum(contacts)

            yield str((await flow.run())["total"]).encode()

        return StreamingResponse(body())

    limiter = pool_limiter(db)
    with caplog.at_level(logging.INFO):
        async with anyio.create_task_group() as tg:
            served = await _serve(app, tg)
            with anyio.fail_after(30):
                async with (
                    httpx.AsyncClient(base_url=served.url) as http,
                    http.stream("GET", "/stream") as response,
                ):
                    assert response.headers["x-query-count"] == "0"
                    chunks = response.aiter_raw()  # kept: an abandoned one closes the stream
                    assert await chunks.__anext__() == b"first\n"
                    await full.wait()  # three items hold the pool's three connections
                    assert db.pool.checkedout() == 3  # type: ignore[attr-defined]
                # the client closed the connection: Starlette cancels the body
                while not counted:
                    await anyio.sleep(0.01)
            assert ended == ["cancelled"] * 3
            assert db.pool.checkedout() == 0  # type: ignore[attr-defined]
            stats = limiter.statistics()
            assert (stats.running, stats.waiting) == (0, 0)
            served.server.should_exit = True
    assert counted == [("/stream", 3)]
    assert _errors(caplog) == []  # a client leaving is no error


async def test_concurrent_requests_count_only_their_own_statements_under_uvicorn(
    db: AsyncEngine,
) -> None:
    """Three requests overlap, each fanning out over its own child tasks: every
    header and every on_request count is that request's alone."""
    app, counted = guarded_app(db)
    sessions = async_sessionmaker(db, expire_on_commit=False)
    inside: list[int] = []
    all_in = anyio.Event()

    @app.get("/fan/{n}")
    async def fan(n: int) -> int:
        async with sessions() as session:
            await session.execute(select(Contact.id).limit(1))
        inside.append(n)
        if len(inside) == 3:
            all_in.set()
        await all_in.wait()  # every request has its counter active from here on

        async def one(contact_id: int) -> None:
            async with sessions() as own:
                await own.get(Contact, contact_id)

        await pk.map(one, range(1, n + 1), limit=2)
        return n

    async with anyio.create_task_group() as tg:
        served = await _serve(app, tg, log_level="warning")
        with anyio.fail_after(30):
            async with httpx.AsyncClient(base_url=served.url) as http:
                responses = await asyncio.gather(*(http.get(f"/fan/{n}") for n in (1, 3, 6)))
        served.server.should_exit = True
    assert [r.headers["x-query-count"] for r in responses] == ["2", "4", "7"]
    assert sorted(counted) == [("/fan/1", 2), ("/fan/3", 4), ("/fan/6", 7)]


@pytest.mark.parametrize("enforce", [True, False])
async def test_a_stream_over_its_budget_is_reported_once_after_its_body(
    db: AsyncEngine, caplog: pytest.LogCaptureFixture, enforce: bool
) -> None:
    app, counted = guarded_app(db, max_queries=2, enforce=enforce)
    sessions = async_sessionmaker(db)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async with sessions() as session:
            await session.get(Contact, 1)

        async def body() -> AsyncIterator[bytes]:
            async with sessions() as session:
                for cid in (2, 3, 4):
                    yield (await session.get_one(Contact, cid)).email.encode()

        return StreamingResponse(body())

    with caplog.at_level(logging.INFO):
        async with anyio.create_task_group() as tg:
            served = await _serve(app, tg)
            with anyio.fail_after(30):
                async with httpx.AsyncClient(base_url=served.url) as http:
                    response = await http.get("/stream")
                    while not counted:
                        await anyio.sleep(0.01)
            served.server.should_exit = True
    assert response.status_code == 200
    assert response.headers["x-query-count"] == "1"  # what was sent when it started
    assert len(response.content) > 0  # the whole body reached the client
    assert counted == [("/stream", 4)]
    (record,) = _errors(caplog)  # reported once: by uvicorn (enforced) or by the guard
    if enforce:
        assert record.name == "uvicorn.error"
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], TooManyQueries)
    else:
        assert record.name == "parallelkit.sqlalchemy"
        assert record.getMessage().startswith("GET /stream: expected at most 2 queries, 4 were")


# ---------------------------------------------------------------------------- lifespan
BOTH = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
DbDep = Annotated[str, service("db", str)]  # module level: FastAPI reads it by name


def with_state(app: Any, state: dict[str, Any]) -> Any:
    """What an ASGI server does with the lifespan state: a copy in each scope."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    return wrapped


@BOTH
async def test_a_failed_start_raises_the_real_error_once_and_rolls_back_in_reverse() -> None:
    events: list[str] = []
    orch = pk.Orchestrator()

    @orch.service
    async def a() -> AsyncIterator[str]:
        yield "a"
        events.append("a down")

    @orch.service
    async def b(a: str) -> AsyncIterator[str]:
        yield "b"
        events.append("b down")

    @orch.service
    async def c(b: str) -> str:
        raise ConnectionError("c unreachable")

    app = Starlette(lifespan=lifespan(orch))
    with pytest.raises(pk.StartupError, match="service 'c' failed to start") as info:
        async with app.router.lifespan_context(app):
            pytest.fail("the app must not serve")  # pragma: no cover
    assert isinstance(info.value.__cause__, ConnectionError)  # the real error, not a group
    assert events == ["b down", "a down"]


@BOTH
async def test_service_dependencies_on_every_fastapi_path() -> None:
    """Annotated and default markers, a sub-dependency, a sync ``def`` handler, a
    websocket; an unknown, a failed and a skipped service each say which."""
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "the-db"

    @orch.service(critical=False)
    async def cache() -> str:
        raise ConnectionError("cache down")

    @orch.service
    async def search(cache: str) -> str:
        return "never"

    app = FastAPI(lifespan=lifespan(orch))

    async def repository(db: DbDep) -> str:  # a sub-dependency asking for a service
        return f"repo on {db}"

    @app.get("/paths")
    def paths(  # a sync handler: run in a thread, its dependencies on the loop
        annotated: DbDep,
        state: Annotated[pk.Running, running()],
        repo: str = Depends(repository),  # a local function: not in Annotated
        default: str = service("db", str),
    ) -> list[object]:
        return [annotated, repo, default, list(state)]

    @app.get("/missing")
    async def missing(value: Annotated[str, service("nosuch")]) -> str:
        return value  # pragma: no cover

    @app.get("/failed")
    async def failed(value: Annotated[str, service("cache")]) -> str:
        return value  # pragma: no cover

    @app.get("/skipped")
    async def skipped(value: Annotated[str, service("search")]) -> str:
        return value  # pragma: no cover

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, value: DbDep) -> None:
        await websocket.accept()
        await websocket.send_text(f"{value} {running_from(websocket).get('db', str)}")
        await websocket.close()

    async with app.router.lifespan_context(app) as state:
        assert state is not None
        served = with_state(app, dict(state))
        async with client(served) as http:
            assert (await http.get("/paths")).json() == [
                "the-db",
                "repo on the-db",
                "the-db",
                ["db"],
            ]
            with pytest.raises(KeyError, match=r"no service named 'nosuch'; services: \['db'\]"):
                await http.get("/missing")
            with pytest.raises(KeyError, match=r"service 'cache' failed to start: ConnectionError"):
                await http.get("/failed")
            with pytest.raises(KeyError, match="service 'search' was not started"):
                await http.get("/skipped")
        assert await _websocket_text(served, "/ws") == "the-db the-db"


async def _websocket_text(app: Any, path: str) -> str:
    """Drive one websocket connection over raw ASGI; the first text it sends."""
    incoming = [{"type": "websocket.connect"}]
    sent: list[dict[str, Any]] = []
    closed = anyio.Event()

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await closed.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "websocket.close":
            closed.set()

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "scheme": "ws",
        "server": ("test", 80),
        "subprotocols": [],
    }
    await app(scope, receive, send)
    (text_message,) = [m for m in sent if m["type"] == "websocket.send"]
    return str(text_message["text"])


# ---------------------------------------------------------------------------- SIGTERM
APP = """
import pathlib
import anyio
import parallelkit as pk
from parallelkit.asgi import lifespan
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

RELEASE = None  # the test writes the path of its release file here
orch = pk.Orchestrator()

def say(text):
    print(text, flush=True)

@orch.service
async def a():
    yield "a"
    say("a down")

@orch.service
async def b(a):
    yield "b"
    if BROKEN:
        raise RuntimeError("b could not stop")
    say("b down")

@orch.service
async def c(b):
    yield "c"
    say("c down")

async def slow(request):
    say("slow in")
    while not RELEASE.exists():  # the test creates it once the server got SIGTERM
        await anyio.sleep(0.01)
    say("slow out")
    return PlainTextResponse("done")

async def ready(request):
    return PlainTextResponse("ok")

app = Starlette(routes=[Route("/slow", slow), Route("/", ready)], lifespan=lifespan(orch))
"""


@pytest.fixture
def free_socket() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.set_inheritable(True)
    yield sock
    sock.close()


@pytest.mark.parametrize("broken", [False, True], ids=["clean", "teardown-fails"])
def test_sigterm_lets_a_request_finish_then_stops_services_in_reverse_order(
    tmp_path: Path, free_socket: socket.socket, broken: bool
) -> None:
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release = tmp_path / "release"
    (tmp_path / "sigapp.py").write_text(
        APP.replace("RELEASE = None", f"RELEASE = pathlib.Path({str(release)!r})")
        + f"BROKEN = {broken}\n"
    )
    port = free_socket.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "sigapp:app", "--fd", str(free_socket.fileno())],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        pass_fds=[free_socket.fileno()],
        env={"PYTHONPATH": f"{ROOT / 'src'}:{tmp_path}", "PATH": "/usr/bin:/bin"},
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))

    def wait_for(text: str) -> None:
        while text not in output:
            output.append(lines.get(timeout=30))  # a bound for a hang

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for("INFO:     Application startup complete.")
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.get, f"http://127.0.0.1:{port}/slow", timeout=30)
            wait_for("slow in")
            process.send_signal(signal.SIGTERM)
            wait_for("INFO:     Shutting down")
            release.touch()  # the request in flight may finish now
            response = slow.result(timeout=30)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:  # pragma: no cover - only when the test already failed
            process.kill()
            process.wait()
        reader.join(timeout=30)  # it ends with the process's output
        assert process.stdout is not None
        process.stdout.close()
    while not lines.empty():
        output.append(lines.get_nowait())
    assert response.status_code == 200
    assert response.text == "done"
    # uvicorn re-raises the signal after a graceful shutdown (0 on older versions)
    assert process.returncode in (0, -signal.SIGTERM)
    stops = [line for line in output if line in {"slow out", "a down", "b down", "c down"}]
    if broken:
        assert stops == ["slow out", "c down", "a down"]  # b's failure stops nothing else
        text = "\n".join(output)
        assert text.count("RuntimeError: b could not stop") == 1  # reported once
        assert "Application shutdown failed" in text
    else:
        assert stops == ["slow out", "c down", "b down", "a down"]
        assert "INFO:     Application shutdown complete." in output


async def test_under_uvicorn_the_real_error_is_a_500_logged_once(
    db: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Over the budget (enforced) and a NotLoadedError behind pydantic: the client gets
    a 500, the server log has the real error once, parallelkit logs nothing."""
    from pydantic import BaseModel, ConfigDict

    class ContactOut(BaseModel):
        model_config = ConfigDict(from_attributes=True)
        email: str

    class ConversationOut(BaseModel):
        model_config = ConfigDict(from_attributes=True)
        id: int
        contact: ContactOut

    app, counted = guarded_app(db, max_queries=2, enforce=True)
    sessions = async_sessionmaker(db, expire_on_commit=False)

    @app.get("/n1")
    async def n1() -> list[str]:
        async with sessions() as session:
            ids = list(await session.scalars(select(Contact.id).limit(3)))
            return [(await session.get_one(Contact, i)).email for i in ids]  # 1 + 3

    @app.get("/view", response_model=ConversationOut)
    async def view() -> Any:
        async with sessions() as session:
            return await session.get(Conversation, 1, options=eager(Conversation))

    with caplog.at_level(logging.INFO):
        async with anyio.create_task_group() as tg:
            served = await _serve(app, tg)
            with anyio.fail_after(30):
                async with httpx.AsyncClient(base_url=served.url) as http:
                    over = await http.get("/n1")
                    unloaded = await http.get("/view")
            served.server.should_exit = True
    assert (over.status_code, unloaded.status_code) == (500, 500)
    assert counted == [("/n1", 4), ("/view", 1)]
    errors = _errors(caplog)
    assert [r.name for r in errors] == ["uvicorn.error", "uvicorn.error"]
    raised = [r.exc_info[1] for r in errors if r.exc_info]
    assert [type(e) for e in raised] == [TooManyQueries, NotLoadedError]
    assert "N+1?" in str(raised[0])


@BOTH
async def test_request_guard_counts_per_request_on_both_backends(tmp_path: Path) -> None:
    """A Starlette app on a sync engine: sync endpoints run in worker threads,
    async ones hop to threads themselves; two overlapping requests, two counts."""
    from sqlalchemy import create_engine, text
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    engine = create_engine(f"sqlite:///{tmp_path / 'sync.sqlite3'}")
    both_in = anyio.Event()
    inside: list[str] = []

    def query(n: int) -> None:
        with engine.connect() as conn:
            for i in range(n):
                conn.execute(text(f"SELECT {i}"))

    async def fan(request: Request) -> JSONResponse:
        n = int(request.path_params["n"])
        inside.append(request.url.path)
        if len(inside) == 2:
            both_in.set()
        await both_in.wait()  # both requests are counting from here on
        async with anyio.create_task_group() as tg:  # child tasks, each in a thread
            for _ in range(n):
                tg.start_soon(anyio.to_thread.run_sync, query, 1)
        return JSONResponse(n)

    def blocking(request: Request) -> JSONResponse:  # Starlette runs it in a thread
        query(3)
        return JSONResponse(3)

    counted: list[tuple[str, int]] = []
    app = Starlette(routes=[Route("/fan/{n}", fan), Route("/sync", blocking)])
    app.add_middleware(
        RequestGuard,
        engine=engine,
        on_request=lambda scope, counter: counted.append((scope["path"], counter.count)),
    )
    try:
        async with client(app) as http:
            responses: dict[str, httpx.Response] = {}

            async def get(path: str) -> None:
                responses[path] = await http.get(path)

            async with anyio.create_task_group() as tg:
                tg.start_soon(get, "/fan/2")
                tg.start_soon(get, "/fan/5")
            responses["/sync"] = await http.get("/sync")
    finally:
        engine.dispose()
    assert {p: r.headers["x-query-count"] for p, r in responses.items()} == {
        "/fan/2": "2",
        "/fan/5": "5",
        "/sync": "3",
    }
    assert sorted(counted) == [("/fan/2", 2), ("/fan/5", 5), ("/sync", 3)]


class Clock:
    """A cache clock the test moves by hand."""

    now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_cache_work_counts_against_the_request_that_started_it_only(
    db: AsyncEngine,
) -> None:
    """As docs/sqlalchemy.md says: a shared miss load counts against the request that
    started it (not the one that only waited), and a refresh whose statement is sent
    after its request ended counts against no request."""

    clock = Clock()
    sessions = async_sessionmaker(db)
    loads: list[int] = []
    finished: list[int] = []
    release = [anyio.Event()]
    cache = pk.SWRCache(fresh=10, stale=100, clock=clock)

    @cache.cached
    async def email(contact_id: int) -> str:
        loads.append(contact_id)
        await release[-1].wait()
        async with sessions() as session:
            found = (await session.get_one(Contact, contact_id)).email
        finished.append(contact_id)
        return found

    orch = pk.Orchestrator()

    @orch.service
    async def emails() -> AsyncIterator[Any]:
        async with cache:  # the cache's task group: owned by the lifespan
            yield email

    counted: list[tuple[bytes, int]] = []
    app = FastAPI(lifespan=lifespan(orch))
    app.add_middleware(
        RequestGuard,
        engine=db,
        on_request=lambda scope, counter: counted.append((scope["query_string"], counter.count)),
    )

    @app.get("/email/{contact_id}")
    async def read(contact_id: int, lookup: Annotated[Any, service("emails")]) -> str:
        return str(await lookup(contact_id))

    async with app.router.lifespan_context(app) as state:
        assert state is not None
        async with client(with_state(app, dict(state))) as http:
            responses: dict[str, httpx.Response] = {}

            async def get(who: str) -> None:
                responses[who] = await http.get("/email/1", params={"who": who})

            with anyio.fail_after(30):  # a bound for a hang
                async with anyio.create_task_group() as tg:
                    tg.start_soon(get, "starter")
                    while loads != [1]:  # the starter's miss started the load
                        await anyio.sleep(0.01)
                    tg.start_soon(get, "waiter")
                    while cache.statistics().misses < 2:  # the waiter joined the load
                        await anyio.sleep(0.01)
                    release[-1].set()
                clock.now = 50.0  # stale: the next hit answers at once and refreshes
                release.append(anyio.Event())
                stale = await http.get("/email/1", params={"who": "stale"})
                while loads != [1, 1]:  # the refresh starts, then waits for `release`
                    await anyio.sleep(0.01)
                release[-1].set()  # its statement: sent after its request ended
                while finished != [1, 1]:
                    await anyio.sleep(0.01)
    assert responses["starter"].headers["x-query-count"] == "1"
    assert responses["waiter"].headers["x-query-count"] == "0"
    assert stale.headers["x-query-count"] == "0"
    assert sorted(counted) == [(b"who=stale", 0), (b"who=starter", 1), (b"who=waiter", 0)]


async def test_a_refresh_started_by_a_hit_never_counts_against_its_caller(
    db: AsyncEngine,
) -> None:
    """A background refresh is the cache's work: its statement, sent while the request
    whose stale hit started it is still counting, is not that request's."""

    clock = Clock()
    sessions = async_sessionmaker(db)
    sent = anyio.Event()
    cache = pk.SWRCache(fresh=10, stale=100, clock=clock)

    @cache.cached
    async def email(contact_id: int) -> str:
        async with sessions() as session:
            found = (await session.get_one(Contact, contact_id)).email
        if clock.now:
            sent.set()
        return found

    async with cache:
        with count_queries(db) as miss:
            first = await email(1)
        clock.now = 50.0  # stale: the next hit answers at once and refreshes
        with count_queries(db) as hit:
            assert await email(1) == first
            with anyio.fail_after(30):  # a bound for a hang
                await sent.wait()  # the refresh's statement: sent inside this block
    assert (miss.count, hit.count) == (1, 0)
    assert cache.statistics().refreshes == 1
