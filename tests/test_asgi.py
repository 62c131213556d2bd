"""parallelkit.asgi.lifespan with a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import parallelkit as pk
from parallelkit.asgi import lifespan, running, service

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    """uvicorn runs on asyncio only, so these tests pin the backend."""
    return "asyncio"


def make_app(orch: pk.Orchestrator) -> Starlette:
    async def hello(request: Request) -> JSONResponse:
        return JSONResponse(
            {"db": request.state.db, "api": request.state.api, "n": len(request.state.running)}
        )

    return Starlette(routes=[Route("/", hello)], lifespan=lifespan(orch))


async def test_lifespan_with_uvicorn() -> None:
    events: list[str] = []
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        events.append("db up")
        yield "sqlite"
        events.append("db down")

    @orch.service
    async def api(db: str) -> AsyncIterator[str]:
        yield f"api on {db}"
        events.append("api down")

    server = uvicorn.Server(
        uvicorn.Config(make_app(orch), host="127.0.0.1", port=0, log_level="warning")
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        assert events == ["db up"]  # services started before the first request
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/")
        assert response.json() == {"db": "sqlite", "api": "api on sqlite", "n": 2}
        server.should_exit = True
    assert events == ["db up", "api down", "db down"]


async def test_startup_failure_is_reported_and_server_does_not_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> str:
        raise ConnectionError("database unreachable")

    server = uvicorn.Server(  # log_config=None: uvicorn's records reach caplog
        uvicorn.Config(make_app(orch), host="127.0.0.1", port=0, log_config=None)
    )
    with caplog.at_level(logging.ERROR), anyio.fail_after(10):
        try:
            await server.serve()
        except SystemExit as exc:  # recent uvicorn versions exit with code 3 here
            assert exc.code == 3  # noqa: PT017
    assert not server.started
    # reported once, by the server; parallelkit does not log what it raises
    assert caplog.text.splitlines().count("ConnectionError: database unreachable") == 1
    assert "StartupError: service 'db' failed to start" in caplog.text
    assert [r for r in caplog.records if r.name.startswith("parallelkit")] == []


def test_startup_failure_exits_non_zero_with_traceback(tmp_path: Path) -> None:
    (tmp_path / "failapp.py").write_text(
        "import parallelkit as pk\n"
        "from parallelkit.asgi import lifespan\n"
        "from starlette.applications import Starlette\n"
        "orch = pk.Orchestrator()\n"
        "@orch.service\n"
        "async def db():\n"
        "    raise ConnectionError('database unreachable')\n"
        "app = Starlette(lifespan=lifespan(orch))\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "failapp:app", "--host", "127.0.0.1", "--port", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    # one report (the server's), with the cause chained: not once per layer
    assert lines.count("ConnectionError: database unreachable") == 1
    assert result.stderr.count("The above exception was the direct cause") == 1
    assert "StartupError: service 'db' failed to start" in result.stderr


def test_lifespan_rejects_non_orchestrator() -> None:
    with pytest.raises(TypeError, match="Orchestrator"):
        lifespan(object())  # type: ignore[arg-type]


# -- typed dependencies -------------------------------------------------------------------------
class Engine:
    def __init__(self, url: str) -> None:
        self.url = url
        self.disposed = False


async def greeting(db: Engine) -> str:
    return f"hello from {db.url}"


# module level: FastAPI reads the handlers' (string) annotations in this module's globals
EngineDep = Annotated[Engine, service("db", Engine)]
GreetingDep = Annotated[str, service(greeting)]  # by the service's function
RunningDep = Annotated[pk.Running, running()]
WrongDep = Annotated[str, service("db", str)]
StrDbDep = Annotated[str, service("db")]


def fastapi_app(events: list[str]) -> Any:
    from fastapi import FastAPI

    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[Engine]:
        engine = Engine("sqlite://")
        yield engine
        engine.disposed = True
        events.append("db disposed")

    orch.service(greeting)
    app = FastAPI(lifespan=lifespan(orch))

    @app.get("/")
    async def index(engine: EngineDep, text: GreetingDep, state: RunningDep) -> dict[str, object]:
        return {"url": engine.url, "text": text, "services": list(state)}

    @app.get("/wrong")
    async def wrong(engine: WrongDep) -> str:
        return engine

    return app


def with_state(app: Any, state: dict[str, Any]) -> Any:
    """What an ASGI server does with the lifespan state: a copy in each request's scope."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    return wrapped


async def test_fastapi_typed_service_dependencies() -> None:
    events: list[str] = []
    app = fastapi_app(events)
    async with app.router.lifespan_context(app) as state:
        transport = httpx.ASGITransport(app=with_state(app, state), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.get("/")
            assert response.status_code == 200
            assert response.json() == {
                "url": "sqlite://",
                "text": "hello from sqlite://",
                "services": ["db", "greeting"],
            }
            wrong = await client.get("/wrong")  # service 'db' is Engine, not str
            assert wrong.status_code == 500
        assert events == []
    assert events == ["db disposed"]


def test_typed_dependencies_run_on_the_event_loop() -> None:
    """A plain ``def`` dependency would cost a thread-pool hop per request."""
    import inspect

    for marker in (service("db", Engine), service(greeting), running()):
        assert inspect.iscoroutinefunction(marker.dependency), marker


def test_service_markers_are_checked_when_made_and_shared_for_overrides() -> None:
    from typing import Protocol

    class NotRuntime(Protocol):
        def ping(self) -> None: ...

    with pytest.raises(ValueError, match="an identifier"):
        service("")
    with pytest.raises(ValueError, match="an identifier"):
        service("has space")
    with pytest.raises(TypeError, match="expected cannot be checked"):
        service("db", NotRuntime)
    # one dependency per (service, expected): app.dependency_overrides applies everywhere
    assert service("db").dependency is service("db").dependency
    assert service("db", Engine).dependency is EngineDep.__metadata__[0].dependency
    assert service("db").dependency is not service("db", Engine).dependency
    assert running().dependency is RunningDep.__metadata__[0].dependency
    assert service("running").dependency is not running().dependency  # a service's name


async def test_dependency_overrides_replace_a_service_in_every_handler() -> None:
    from fastapi import FastAPI

    orch = pk.Orchestrator()

    @orch.service
    async def db() -> str:
        return "real-db"

    app = FastAPI(lifespan=lifespan(orch))

    @app.get("/a")
    async def a(value: str = service("db")) -> str:
        return value

    @app.get("/b")
    async def b(value: StrDbDep) -> str:
        return value

    async def fake() -> str:
        return "fake-db"

    app.dependency_overrides[service("db").dependency] = fake
    async with app.router.lifespan_context(app) as state:
        transport = httpx.ASGITransport(app=with_state(app, state))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            assert [(await client.get(p)).json() for p in ("/a", "/b")] == ["fake-db"] * 2


@pytest.mark.parametrize("connection", [None, "x", Starlette()], ids=["None", "str", "app"])
def test_running_from_needs_a_request(connection: object) -> None:
    from parallelkit.asgi import running_from

    with pytest.raises(TypeError, match="connection must be a request or websocket"):
        running_from(connection)


async def test_running_from_a_starlette_request() -> None:
    from parallelkit.asgi import running_from

    orch = pk.Orchestrator()

    @orch.service
    async def db() -> str:
        return "sqlite"

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"db": running_from(request).get("db", str)})

    app = Starlette(routes=[Route("/", hello)], lifespan=lifespan(orch))
    async with lifespan(orch)(app) as state:  # what the server does at start-up
        scope = {"type": "http", "state": dict(state)}
        assert running_from(Request(scope)).get("db", str) == "sqlite"
    with pytest.raises(RuntimeError, match=r"lifespan=parallelkit\.asgi\.lifespan\(orch\)"):
        running_from(Request({"type": "http", "state": {}}))


async def test_a_service_torn_down_after_a_crash_answers_503_never_its_value() -> None:
    """A critical service crashing while uvicorn serves tears every service down; the
    server goes on accepting requests, which must not get the disposed values."""
    from fastapi import FastAPI

    orch = pk.Orchestrator()
    crash = anyio.Event()

    @orch.service
    async def db() -> AsyncIterator[Engine]:
        engine = Engine("sqlite://")
        yield engine
        engine.disposed = True

    @orch.service
    async def worker(db: Engine) -> AsyncIterator[str]:
        async def die() -> None:
            await crash.wait()
            raise RuntimeError("worker died")

        async with anyio.create_task_group() as tg:
            tg.start_soon(die)
            yield "worker"

    app = FastAPI(lifespan=lifespan(orch))

    @app.get("/db")
    async def get_db(engine: EngineDep) -> dict[str, object]:
        return {"url": engine.url, "disposed": engine.disposed}

    @app.get("/health")
    async def health(state: RunningDep) -> dict[str, object]:
        return {"status": state.health().status, "db": state.state("db")}

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(20):  # failure-safes, not timing assertions
            while not server.started:
                await anyio.sleep(0.01)
            port = server.servers[0].sockets[0].getsockname()[1]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert (await client.get("/db")).json() == {"url": "sqlite://", "disposed": False}
                crash.set()
                while (await client.get("/health")).json()["db"] != "stopped":
                    await anyio.sleep(0.01)
                gone = await client.get("/db")
                assert gone.status_code == 503
                assert gone.json() == {"detail": "service 'db' is not available"}
                after = (await client.get("/health")).json()
                assert after == {"status": "failing", "db": "stopped"}
        server.should_exit = True
