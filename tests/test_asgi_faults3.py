"""Fault review (3) of the FastAPI integration and per-request query counting.

Used as a FastAPI service author would (docs/recipes/fastapi-service.md): typed
dependencies, ``RequestGuard``, ``count_queries`` / ``max_queries`` in handlers,
dependencies and streaming bodies. In-process over ``httpx.ASGITransport`` (with the
lifespan run as a server runs it) where no server is needed. Events and counters,
never elapsed time; ``fail_after`` only bounds a hang.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import BackgroundTasks, Depends, FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import parallelkit as pk
from parallelkit.asgi import lifespan, service
from parallelkit.sqlalchemy import (
    LimitedAsyncSession,
    QueryCounter,
    RequestGuard,
    TooManyQueries,
    count_queries,
    max_queries,
    pool_limiter,
)

pytest_plugins = ["tests.sqla_fixtures"]
# real uvicorn servers (in-process and a subprocess) for the shutdown and disconnect cases
pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A sync engine: its statements are sent from the threads FastAPI runs ``def`` code in."""
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    yield engine
    engine.dispose()


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def select_three(engine: Engine) -> None:
    with engine.connect() as conn:
        for i in range(3):
            conn.execute(text(f"SELECT {i}"))


# ------------------------------------------------------------- a counter across a thread hop
async def test_a_budget_in_a_def_dependency_with_yield_fails_loudly(engine: Engine) -> None:
    """FastAPI runs each half of a ``def`` dependency with ``yield`` in a worker thread,
    each with a *copy* of the request's context: the counter entered there saw none of
    the handler's statements and the budget passed silently with a count of 0."""
    app = FastAPI()

    def budget() -> Iterator[QueryCounter]:
        with max_queries(engine, 1) as counter:
            yield counter

    @app.get("/")
    def handler(counter: QueryCounter = Depends(budget)) -> int:  # noqa: B008 - local
        select_three(engine)  # 3 statements: over the budget of 1
        return counter.count

    async with client(app) as http:
        with pytest.raises(RuntimeError, match="left in another context") as info:
            await http.get("/")
    assert "async def" in str(info.value)  # says what to do instead


async def test_a_counter_in_a_sync_streaming_body_fails_loudly(engine: Engine) -> None:
    """Starlette iterates a sync body in worker threads, one context copy per chunk."""
    app = FastAPI()
    counters: list[QueryCounter] = []

    @app.get("/stream")
    def stream() -> StreamingResponse:
        def body() -> Iterator[bytes]:
            with count_queries(engine) as counter:
                counters.append(counter)
                for i in range(3):
                    yield b"row\n"
                    with engine.connect() as conn:
                        conn.execute(text(f"SELECT {i}"))

        return StreamingResponse(body())

    async with client(app) as http:
        with pytest.raises(RuntimeError, match="left in another context"):
            await http.get("/stream")
    assert not counters[0]._listening  # the listener is gone all the same


async def test_an_error_leaving_a_counter_in_another_context_is_not_masked(
    engine: Engine,
) -> None:
    app = FastAPI()

    def budget() -> Iterator[QueryCounter]:
        with max_queries(engine, 1) as counter:
            yield counter

    @app.get("/")
    def handler(counter: QueryCounter = Depends(budget)) -> int:  # noqa: B008 - local
        raise LookupError("the handler's own error")

    async with client(app) as http:
        with pytest.raises(LookupError, match="the handler's own error"):
            await http.get("/")


async def test_counters_in_async_dependencies_and_def_handlers_still_count(
    engine: Engine,
) -> None:
    """What the error points to: an ``async def`` dependency runs in the request's
    context, and a ``def`` handler's thread gets a copy of it (counted)."""
    app = FastAPI()

    async def budget() -> AsyncIterator[QueryCounter]:
        async with max_queries(engine, 6) as counter:
            yield counter

    @app.get("/")
    def handler(counter: QueryCounter = Depends(budget)) -> int:  # noqa: B008 - local
        select_three(engine)
        with count_queries(engine) as inner:  # nested, in the thread
            select_three(engine)
        return counter.count * 10 + inner.count

    async with client(app) as http:
        assert (await http.get("/")).json() == 63


# ------------------------------------------------------------- typed dependencies, not served
def test_a_test_client_used_without_with_is_told_to_use_with() -> None:
    """``TestClient(app).get(...)`` (the common way) runs no lifespan: the error said
    to use starlette's TestClient, which the user was already doing."""
    import warnings

    with warnings.catch_warnings():  # starlette warns about httpx (vs httpx2) on import
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    orch = pk.Orchestrator()

    @orch.service
    async def db() -> str:
        return "db"  # pragma: no cover

    app = FastAPI(lifespan=lifespan(orch))

    @app.get("/")
    async def read(value: str = service("db", str)) -> str:
        return value  # pragma: no cover

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(RuntimeError, match="lifespan has not run") as info:
            TestClient(app).get("/")
    assert "with TestClient(app)" in str(info.value)


async def test_one_guard_in_a_def_dependency_fails_every_request_it_could_not_count(
    engine: Engine,
) -> None:
    """A module-level guard in a ``def`` dependency, two requests at once: the first
    exit stopped the other request's counter, whose own exit then passed silently."""
    import threading

    guard = max_queries(engine, 1)
    both_in = threading.Barrier(2, timeout=30)  # a bound for a hang
    app = FastAPI()

    def budget() -> Iterator[QueryCounter]:
        with guard as counter:
            yield counter

    @app.get("/{n}")
    def handler(n: int, counter: QueryCounter = Depends(budget)) -> int:  # noqa: B008 - local
        both_in.wait()  # both dependencies entered, neither left
        select_three(engine)
        return counter.count

    results: dict[int, object] = {}

    async def get(http: httpx.AsyncClient, n: int) -> None:
        try:
            results[n] = (await http.get(f"/{n}")).status_code
        except RuntimeError as exc:
            results[n] = exc

    async with client(app) as http, anyio.create_task_group() as tg:
        for n in (1, 2):
            tg.start_soon(get, http, n)
    assert all(
        isinstance(r, RuntimeError) and "left in another context" in str(r)
        for r in results.values()
    ), results


# ------------------------------------------------------------- one guard, concurrent requests
async def test_one_module_level_guard_serves_concurrent_requests(engine: Engine) -> None:
    """``GUARD = max_queries(engine, 3)`` and ``with GUARD:`` in a handler: the second
    request in flight failed with "this counter is already active", and the first
    block's counter was replaced under it. Each block now has its own counter (per
    context), the budget applies to each request alone."""
    guard = max_queries(engine, 3)
    app = FastAPI()
    inside: list[int] = []
    both_in = anyio.Event()

    @app.get("/{n}")
    async def handler(n: int) -> int:
        inside.append(n)
        if len(inside) == 2:
            both_in.set()
        with guard as counter:
            await both_in.wait()  # both blocks active at once
            for i in range(n):
                await anyio.to_thread.run_sync(select_one, engine, i)
        return counter.count

    results: dict[int, httpx.Response | BaseException] = {}

    async def get(http: httpx.AsyncClient, n: int) -> None:
        try:
            results[n] = await http.get(f"/{n}")
        except Exception as exc:  # the test looks at it
            results[n] = exc

    with anyio.fail_after(30):  # a bound for a hang
        async with client(app) as http, anyio.create_task_group() as tg:
            tg.start_soon(get, http, 2)
            tg.start_soon(get, http, 4)
    ok = results[2]
    assert isinstance(ok, httpx.Response), ok
    assert ok.json() == 2
    over = results[4]
    assert isinstance(over, TooManyQueries), over  # its own 4 statements, not 6
    assert over.count == 4
    with guard:  # and once both ended, it is free again, with a fresh budget
        select_one(engine, 0)
    assert guard.counter.count == 1


def test_one_guard_nested_in_itself_is_still_refused(engine: Engine) -> None:
    guard = max_queries(engine, 3)
    with guard, pytest.raises(RuntimeError, match="already active"), guard:
        pass  # pragma: no cover


def select_one(engine: Engine, i: int) -> None:
    with engine.connect() as conn:
        conn.execute(text(f"SELECT {i}"))


# ------------------------------------------------------------- RequestGuard's on_request
async def _async_metrics(scope: Any, counter: QueryCounter) -> None:
    """An ``async def`` on_request: called, never awaited, its metrics never recorded."""


def _one_argument(counter: QueryCounter) -> None:
    """Takes the counter only: every request failed with a TypeError after the fact."""


@pytest.mark.parametrize(
    ("on_request", "match"),
    [
        (_async_metrics, "got the async function"),
        (_one_argument, "cannot be called with 2 arguments"),
    ],
)
def test_request_guard_refuses_an_on_request_it_cannot_call(
    engine: Engine, on_request: Any, match: str
) -> None:
    with pytest.raises(TypeError, match=f"on_request must be .*{match}"):
        RequestGuard(FastAPI(), engine=engine, on_request=on_request)


# ------------------------------------------------------------- RequestGuard and BackgroundTasks
@pytest.mark.parametrize("enforce", [True, False])
async def test_background_tasks_count_for_their_request_and_its_budget(
    engine: Engine, enforce: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """FastAPI runs ``BackgroundTasks`` after the response, inside the request: their
    statements are that request's (not in the header, sent before them), and over the
    budget the request fails after its response (enforced) or is reported once."""
    app = FastAPI()
    counted: list[int] = []

    @app.get("/")
    async def handler(tasks: BackgroundTasks) -> int:
        select_one(engine, 0)
        tasks.add_task(select_three, engine)  # a def task: run in a worker thread
        return 1

    app.add_middleware(
        RequestGuard,
        engine=engine,
        max_queries=2,
        enforce=enforce,
        on_request=lambda scope, counter: counted.append(counter.count),
    )
    with caplog.at_level(logging.WARNING):
        async with client(app) as http:
            if enforce:
                with pytest.raises(TooManyQueries, match="expected at most 2 queries, 4 were"):
                    await http.get("/")
            else:
                response = await http.get("/")
                assert response.headers["x-query-count"] == "1"
    assert counted == [4]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == (0 if enforce else 1)


def test_service_without_fastapi_says_what_to_use_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Starlette-only app (no FastAPI installed) got ``No module named 'fastapi'``."""
    import sys

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"running_from\(request\)") as info:
        service("a_service_no_other_test_asks_for")
    assert info.value.name == "fastapi"
    assert "pip install fastapi" in str(info.value)


# ------------------------------------------------------------- a real server, a real client
async def _serve(app: Any, tg: Any) -> tuple[uvicorn.Server, str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None))
    tg.start_soon(server.serve)
    with anyio.fail_after(20):  # a bound for a hang, not a timing
        while not server.started:
            await anyio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


@pytest.mark.postgres
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # SQLAlchemy's asyncio extension
async def test_a_client_leaving_mid_query_gives_back_session_slot_and_connection(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The client closes a stream while its body waits on PostgreSQL (``pg_sleep``):
    Starlette cancels the body mid-query. The request is counted with the statements
    it sent (also the cancelled one), its session, pool slot and connection are given
    back, and nobody logs an error. (PostgreSQL itself may go on running the orphaned
    statement until it ends: bound it with ``statement_timeout``.)"""
    engine = create_async_engine(pg_url, pool_size=2, max_overflow=0)
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)
    limiter = pool_limiter(engine)
    counted: list[int] = []
    in_query = anyio.Event()
    ended: list[str] = []
    app = FastAPI()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first\n"
            try:
                async with sessions() as session:
                    await session.execute(text("SELECT 1"))
                    in_query.set()
                    await session.execute(text("SELECT pg_sleep(20)"))
            except anyio.get_cancelled_exc_class():
                ended.append("cancelled")
                raise
            yield b"never\n"  # pragma: no cover

        return StreamingResponse(body())

    app.add_middleware(
        RequestGuard, engine=engine, on_request=lambda scope, c: counted.append(c.count)
    )

    try:
        with caplog.at_level(logging.INFO):
            async with anyio.create_task_group() as tg:
                server, url = await _serve(app, tg)
                with anyio.fail_after(30):  # bounds for a hang, not timings
                    async with (
                        httpx.AsyncClient(base_url=url) as http,
                        http.stream("GET", "/stream") as response,
                    ):
                        chunks = response.aiter_raw()
                        assert await chunks.__anext__() == b"first\n"
                        await in_query.wait()
                        assert limiter.statistics().running == 1
                    while not counted:  # the client left: Starlette cancels the body
                        await anyio.sleep(0.01)
                    assert ended == ["cancelled"]
                    assert counted == [2]  # SELECT 1 and the cancelled pg_sleep
                    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
                    stats = limiter.statistics()
                    assert (stats.running, stats.waiting) == (0, 0)
                server.should_exit = True
    finally:
        await engine.dispose()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# ------------------------------------------------------------- two apps in one process
DbName = Annotated[str, service("db", str)]  # module level: one marker shared by both apps


def with_state(app: Any, state: dict[str, Any]) -> Any:
    """What an ASGI server does with the lifespan state: a copy in each scope."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    return wrapped


def _orchestrator(name: str, crash: anyio.Event) -> pk.Orchestrator:
    orch = pk.Orchestrator(name=name)

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield f"db of {name}"

    @orch.service
    async def worker(db: str) -> AsyncIterator[str]:
        async def die() -> None:
            await crash.wait()
            raise RuntimeError(f"{name}'s worker died")

        async with anyio.create_task_group() as tg:
            tg.start_soon(die)
            yield "worker"
            tg.cancel_scope.cancel()  # stopped: the watch ends

    return orch


async def test_two_apps_in_one_process_each_get_their_own_services() -> None:
    """Two apps, two orchestrators with a service of the same name, one shared
    ``service("db")`` marker: each request gets its own app's value, and one app's
    torn-down service answers 503 there only."""
    apps: dict[str, FastAPI] = {}
    stop = {name: anyio.Event() for name in ("a", "b")}
    for name in ("a", "b"):
        app = apps[name] = FastAPI(lifespan=lifespan(_orchestrator(name, stop[name])))

        @app.get("/")
        async def read(db: DbName) -> str:
            return db

    async with (
        apps["a"].router.lifespan_context(apps["a"]) as state_a,
        client(with_state(apps["a"], dict(state_a or {}))) as http_a,
    ):
        with pytest.raises(RuntimeError, match="b's worker died"):
            async with (
                apps["b"].router.lifespan_context(apps["b"]) as state_b,
                client(with_state(apps["b"], dict(state_b or {}))) as http_b,
            ):
                assert (await http_a.get("/")).json() == "db of a"
                assert (await http_b.get("/")).json() == "db of b"
                stop["b"].set()
                with anyio.fail_after(30):  # a bound for a hang
                    await anyio.sleep_forever()  # b's crash ends this block
        assert (await http_a.get("/")).json() == "db of a"
        response = await with_b_state(apps["b"], state_b)
        assert response.status_code == 503
        assert response.json() == {"detail": "service 'db' is not available"}


async def with_b_state(app: FastAPI, state: Any) -> httpx.Response:
    async with client(with_state(app, dict(state or {}))) as http:
        return await http.get("/")


# ------------------------------------------------------------- start-up failure under uvicorn
FAILING_APP = """
from collections.abc import AsyncIterator

import parallelkit as pk
from fastapi import FastAPI
from parallelkit.asgi import lifespan
from parallelkit.sqlalchemy import RequestGuard

orch = pk.Orchestrator(name="crm", output="logging")   # as the FastAPI recipe has it


@orch.service
async def db() -> AsyncIterator[str]:
    print("db up", flush=True)
    yield "db"
    print("db down", flush=True)


@orch.service
async def cache(db: str) -> AsyncIterator[str]:
    yield "cache"
    raise RuntimeError("cache could not stop")


@orch.service
async def clients(cache: str) -> str:
    raise ConnectionError("clients unreachable")


app = FastAPI(lifespan=lifespan(orch))
app.add_middleware(RequestGuard)
"""


def test_a_failed_start_under_uvicorn_is_one_report_and_a_rollback(tmp_path: Path) -> None:
    """The recipe's shape (``output="logging"``, RequestGuard) with a service that
    fails to start and a rollback that fails too: uvicorn exits non-zero, with one
    report (the StartupError, its cause chained, the rollback failure named in it),
    and every started service is stopped in reverse order."""
    import subprocess
    import sys

    (tmp_path / "failing.py").write_text(FAILING_APP)
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "failing:app", "--host", "127.0.0.1", "--port", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": f"{ROOT / 'src'}:{tmp_path}", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 3  # uvicorn's "startup failed"
    assert result.stdout.splitlines() == ["db up", "db down"]  # rolled back
    err = result.stderr
    assert err.splitlines().count("ConnectionError: clients unreachable") == 1
    assert err.count("Traceback (most recent call last)") == 2  # the cause, then ours
    assert err.count("The above exception was the direct cause") == 1
    assert (
        "StartupError: service 'clients' failed to start: ConnectionError: clients "
        "unreachable (and rollback failed for cache: RuntimeError('cache could not stop'))"
    ) in err
    assert err.count("Application startup failed. Exiting.") == 1


# ------------------------------------------------------------- bad input
def test_a_session_factory_without_a_bind_is_named_as_such() -> None:
    """``RequestGuard(app, engine=async_sessionmaker())`` (bound later, or per
    session) said "got NoneType None": not what the user passed."""
    from sqlalchemy.orm import sessionmaker

    for factory in (async_sessionmaker(), sessionmaker()):
        with pytest.raises(TypeError, match=r"has no bind.*pass the engine") as info:
            count_queries(factory)
        assert "NoneType" not in str(info.value)
        with pytest.raises(TypeError, match="has no bind"):
            RequestGuard(FastAPI(), engine=factory)


# ------------------------------------------------------------- tasks a handler starts
async def test_tasks_a_handler_starts_count_for_it_while_its_block_runs(engine: Engine) -> None:
    """The count follows the request's context into the task group a handler opens
    (and into their worker threads); a task that outlives the block (started in a
    group the handler does not own) stops counting for it when the block ends."""
    outlived = anyio.Event()
    block_over = anyio.Event()

    async def late(engine: Engine) -> None:
        await anyio.to_thread.run_sync(select_one, engine, 0)  # inside the block
        await block_over.wait()
        await anyio.to_thread.run_sync(select_one, engine, 1)  # after it: not counted
        outlived.set()

    async with anyio.create_task_group() as owner:  # e.g. a service's task group
        with count_queries(engine) as counter:
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(anyio.to_thread.run_sync, select_three, engine)
            owner.start_soon(late, engine)
            with anyio.fail_after(30):  # a bound for a hang
                while counter.count < 10:  # late's first statement is in
                    await anyio.sleep(0.001)
        block_over.set()
        with anyio.fail_after(30):  # a bound for a hang
            await outlived.wait()
    assert counter.count == 10
