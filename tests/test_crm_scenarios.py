"""End-to-end tests of the CRM scenarios that need no database: files, dev workflow, start-up.

Files and the dev workflow run on asyncio and trio. The start-up with a real
uvicorn server is asyncio-only (uvicorn runs on asyncio); its simulated form runs
on both.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import httpx
import pytest
from examples.crm import devflow, files, startup
from trio.testing import MockClock

pytestmark = pytest.mark.anyio


# -- 1 files ----------------------------------------------------------------------------------
async def test_read_many_files_with_a_bound(tmp_path: Path) -> None:
    paths = files.make_files(tmp_path, 2_000)
    report = await files.read_files(paths, limit=32)
    assert report.files == 2_000
    assert report.bytes == 2_000 * 64
    assert 1 <= report.peak_open <= 32


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_10000_files_under_a_low_fd_limit(tmp_path: Path, backend: str) -> None:
    """With ``ulimit -n 512``: pk.map(limit=64) reads 10,000 files; the seed's
    unbounded form runs out of file descriptors."""
    script = textwrap.dedent(
        f"""
        import errno, resource, sys, anyio
        from pathlib import Path
        from examples.crm import files
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))
        paths = files.make_files(Path(sys.argv[1]), 10_000)
        report = anyio.run(lambda: files.read_files(paths, limit=64), backend={backend!r})
        assert report.files == 10_000 and report.peak_open <= 64, report
        try:
            anyio.run(lambda: files.read_files_unbounded(paths), backend={backend!r})
        except BaseException as exc:
            errors = getattr(exc, "exceptions", [exc])  # an ExceptionGroup, or the error
            assert any(getattr(e, "errno", None) == errno.EMFILE for e in errors), exc
            print("unbounded: EMFILE")
        else:
            print("unbounded: no error")
        """
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=100,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "unbounded: EMFILE" in out.stdout


# -- 2 dev workflow -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_devflow_starts_probes_prefixes_and_stops(tmp_path: Path) -> None:
    port = _free_port()
    lines: list[tuple[str, str]] = []
    orch = devflow.build_devflow(
        port, directory=str(tmp_path), output=lambda name, _stream, line: lines.append((name, line))
    )
    (tmp_path / "index.html").write_text("hello from the dev server")
    with anyio.fail_after(60):
        async with orch.start() as running:
            async with httpx.AsyncClient() as client:  # ready means the port answers
                response = await client.get(f"http://127.0.0.1:{port}/index.html")
            assert response.text == "hello from the dev server"
            names = {"dev_server", *(w[0] for w in devflow.WATCHERS)}
            while {n for n, _ in lines} != names:
                await anyio.sleep(0.05)
            pids = [running[name].pid for name in names]
            assert all(_alive(pid) for pid in pids)
            tl = running.timeline
            for watcher, _, _ in devflow.WATCHERS:  # watchers wait for the dev server
                assert tl[watcher].start >= tl["dev_server"].end
    assert not any(_alive(pid) for pid in pids)  # nothing outlives the workflow
    assert any(n == "test_runner" and "12 passed" in line for n, line in lines)


# -- 7 start-up -------------------------------------------------------------------------------
#: trio's virtual clock: time advances only when every task waits, so the timeline of
#: simulated services is exact (no assertion depends on how busy the machine is)
VIRTUAL_TIME = pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-virtual-clock")],
)


@VIRTUAL_TIME
async def test_the_playbooks_700ms_is_the_critical_path_the_orchestrator_reaches() -> None:
    """Sequential start-up takes the sum of the playbook's log; the Orchestrator, its
    critical path: 2,000 ms and 700 ms, measured on the virtual clock."""
    start = anyio.current_time()
    await startup.start_sequential(1.0)
    sequential = anyio.current_time() - start
    orch = startup.build_orchestrator(1.0, port=0)
    async with orch.start() as running:
        orchestrated = running.timeline.total
    assert sequential == pytest.approx(sum(startup.SEED_DURATIONS.values()))
    assert sequential == pytest.approx(2.0)  # the playbook's "before"
    assert orchestrated == pytest.approx(startup.critical_path(1.0))
    assert orchestrated == pytest.approx(0.7)  # the playbook's "after": the critical path


@VIRTUAL_TIME
async def test_startup_simulated_follows_the_critical_path() -> None:
    scale = 0.2
    orch = startup.build_orchestrator(scale, port=0)
    async with orch.start() as running:
        tl = running.timeline
        assert tl["socket_io"].waited_for == ("http",)
        assert tl["socket_io"].start >= tl["http"].end
        for name in ("nextjs", "baileys", "scheduler", "campaign_queue"):
            assert tl[name].waited_for == ()
            assert tl[name].start == pytest.approx(tl.origin)  # not queued behind a phase
        assert [s.name for s in tl.critical_path()] == ["scheduler"]
        assert tl.total == pytest.approx(startup.critical_path(scale))
    assert {running.state(n) for n in startup.SEED_DURATIONS} == {"stopped"}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_startup_real_uvicorn_health_endpoint(anyio_backend: str) -> None:
    """uvicorn runs on asyncio only, hence the backend pin."""
    state: dict[str, object] = {}
    orch = startup.build_orchestrator(0.05, state=state)
    with anyio.fail_after(30):
        async with orch.start() as running:
            state["running"] = running
            url = running["http"]
            assert url.startswith("http://127.0.0.1:")
            async with httpx.AsyncClient() as client:
                response = await client.get(f"{url}/health")
            assert response.status_code == 200
            body = response.json()
            assert body["status"] == "ok"
            assert set(body["services"]) == set(startup.SEED_DURATIONS)
            assert all(s["ok"] for s in body["services"].values())
    with pytest.raises(httpx.ConnectError):  # the server stopped with the orchestrator
        async with httpx.AsyncClient() as client:
            await client.get(f"{url}/health")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asgi_lifespan_runs_the_orchestrator(anyio_backend: str) -> None:
    """FastAPI-style: uvicorn serves the app, the app's lifespan starts the services."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(startup.build_app(scale=0.01), lifespan="on", log_level="warning")
    )
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            while not server.started:
                await anyio.sleep(0.01)
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{port}/health")
            server.should_exit = True
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert set(response.json()["services"]) == set(startup.SEED_DURATIONS)
