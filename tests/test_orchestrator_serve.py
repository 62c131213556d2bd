"""serve() and the CLI in a real subprocess: SIGTERM, ordered stop, exit code, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallelkit.__main__ import load, main

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["asyncio", "trio"]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate: object, timeout: float = 20.0) -> None:
    """Poll ``predicate`` (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting")
        time.sleep(0.02)


def run_app(args: list[str], log: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PK_TEST_LOG": str(log), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def check_sigterm_stop(proc: subprocess.Popen[str], log: Path, ready_line: str | None) -> str:
    seen = ""
    if ready_line is None:  # the CLI: wait for its "ready" line on stderr
        assert proc.stderr is not None
        while "services ready in" not in seen:
            line = proc.stderr.readline()
            assert line, "the CLI exited before it was ready"
            seen += line
    else:
        wait_until(lambda: ready_line in log.read_text())
    pids = [int(p) for p in log.read_text().split("worker pids ")[1].split()[:2]]
    assert all(alive(p) for p in pids)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = log.read_text().splitlines()
    stops = [line for line in lines if line.startswith("stop ")]
    assert stops[0] == "stop api"  # dependents first ...
    assert sorted(stops[1:]) == ["stop cache", "stop db"]  # ... then their dependencies
    assert len(stops) == 3  # each exactly once
    wait_until(lambda: not any(alive(p) for p in pids), timeout=5)  # no orphans
    return out + seen + err


@pytest.mark.parametrize("backend", BACKENDS)
def test_serve_stops_in_order_on_sigterm(tmp_path: Path, backend: str) -> None:
    log = tmp_path / "log"
    log.touch()
    proc = run_app(["-m", "tests.orch_helpers.app", backend], log)
    check_sigterm_stop(proc, log, "ready")
    assert log.read_text().splitlines()[-1] == "exited cleanly"


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_runs_and_prints_timeline(tmp_path: Path, backend: str) -> None:
    log = tmp_path / "log"
    log.touch()
    proc = run_app(
        [
            "-m",
            "parallelkit",
            "run",
            "tests.orch_helpers.app:orch",
            "--timeline",
            "--backend",
            backend,
        ],
        log,
    )
    output = check_sigterm_stop(proc, log, None)
    assert "parallelkit: 4 services ready in" in output
    assert "critical path: " in output
    assert "worker | worker " in output  # the prefixed process output
    assert "parallelkit: stopped" in output


def test_second_signal_forces(tmp_path: Path) -> None:
    app = tmp_path / "slowstop.py"
    app.write_text(
        "import anyio, parallelkit as pk\n"
        "orch = pk.Orchestrator()\n"
        "@orch.service\n"
        "async def db():\n"
        "    yield 0\n"
        "    await anyio.sleep(0)\n"
        "    print('db down', flush=True)\n"
        "@orch.service(stop_timeout=60)\n"
        "async def stubborn(db):\n"
        "    print('up', flush=True)\n"
        "    yield 1\n"
        "    print('stopping', flush=True)\n"
        "    try:\n"
        "        await anyio.sleep(60)\n"
        "    finally:\n"
        "        print('forced', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "parallelkit", "run", "slowstop:orch"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "up\n"  # the signal handlers are installed before start
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline() == "stopping\n"  # tearing down, gracefully (for 60 s)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)  # far less than the 60 s a graceful stop takes
    assert out.splitlines() == ["forced", "db down"]  # cut short, then the rest, in order
    assert "received again: forcing the stop" in err
    assert proc.returncode == 0


def test_cli_startup_failure_exits_non_zero(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(
        "import parallelkit as pk\n"
        "def make():\n"
        "    orch = pk.Orchestrator()\n"
        "    @orch.service\n"
        "    async def db():\n"
        "        raise ConnectionError('db is down')\n"
        "    return orch\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "parallelkit", "run", "bad:make"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "ConnectionError: db is down" in result.stderr
    assert "StartupError: service 'db' failed to start" in result.stderr


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "no_colon"])
    assert info.value.code == 2
    assert "module:attribute" in capsys.readouterr().err
    with pytest.raises(TypeError, match=r"not a parallelkit\.Orchestrator"):
        load("os:sep")
