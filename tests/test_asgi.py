"""parallelkit.asgi.lifespan with a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import parallelkit as pk
from parallelkit.asgi import lifespan

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

    server = uvicorn.Server(
        uvicorn.Config(make_app(orch), host="127.0.0.1", port=0, log_level="warning")
    )
    with caplog.at_level(logging.ERROR), anyio.fail_after(10):
        try:
            await server.serve()
        except SystemExit as exc:  # recent uvicorn versions exit with code 3 here
            assert exc.code == 3  # noqa: PT017
    assert not server.started
    assert "application start-up failed" in caplog.text
    assert "ConnectionError: database unreachable" in caplog.text


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
    assert "Traceback" in result.stderr
    assert "ConnectionError: database unreachable" in result.stderr
    assert "StartupError: service 'db' failed to start" in result.stderr


def test_lifespan_rejects_non_orchestrator() -> None:
    with pytest.raises(TypeError, match="Orchestrator"):
        lifespan(object())  # type: ignore[arg-type]
