"""serve() and the CLI: SIGTERM, ordered stop, exit code, no orphans, errors as themselves.

The subprocess tests send real signals to a served app; the in-process tests (anyio
plugin, both backends) send them to this process from inside ``serve()``, so that a
handler is always installed when a signal arrives.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk
from parallelkit.__main__ import UsageError, load, main
from parallelkit._orchestrator import orchestrator as orchestrator_module
from parallelkit._orchestrator import services as services_module

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

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
        "@orch.service(stop_timeout=60)\n"
        "async def db():\n"
        "    yield 0\n"
        "    print('db down', flush=True)\n"
        "    await anyio.sleep(60)\n"
        "    print('db waited', flush=True)\n"
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
    # cut short, then the rest in order, each at once: db's stop, which begins after the
    # second signal, does not get its 60 s either
    assert out.splitlines() == ["forced", "db down"]
    assert "received again: forcing the stop" in err
    assert proc.returncode == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_startup_failure_exits_non_zero(tmp_path: Path, backend: str) -> None:
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
        [sys.executable, "-m", "parallelkit", "run", "bad:make", "--backend", backend],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "ConnectionError: db is down" in result.stderr
    assert "ExceptionGroup" not in result.stderr  # the StartupError itself, not in a group
    last = result.stderr.rstrip().splitlines()[-1]
    assert last == (
        "parallelkit.StartupError: service 'db' failed to start: ConnectionError: db is down"
    )


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "no_colon"])
    assert info.value.code == 2
    assert "module:attribute" in capsys.readouterr().err
    with pytest.raises(UsageError, match=r"not a parallelkit\.Orchestrator"):
        load("os:sep")


CLI_APP = """
import parallelkit as pk

orch = pk.Orchestrator()


def factory_raises():
    raise ValueError("factory internal bug")
"""


@pytest.fixture
def cli_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``cli_app`` (an orchestrator, a factory that fails) and ``cli_needs`` (a module that
    imports a package that is not installed), importable from the working directory."""
    (tmp_path / "cli_app.py").write_text(CLI_APP)
    (tmp_path / "cli_needs.py").write_text("import not_installed_anywhere_pk\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("cli_app", "cli_needs"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["run", "cli_missing:orch"], "no module named 'cli_missing'"),
        (["run", "cli_app:nope"], "module 'cli_app' has no 'nope'"),
        (["run", "cli_app:orch", "--log-level", "bogus"], "unknown level 'bogus'"),
    ],
    ids=["no module", "no attribute", "log level"],
)
def test_cli_a_target_or_option_that_does_not_exist_is_a_usage_error(
    cli_modules: Path, capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert said in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("target", "raised"),
    [
        ("cli_app:factory_raises", "ValueError: factory internal bug"),
        ("cli_needs:orch", "No module named 'not_installed_anywhere_pk'"),
    ],
    ids=["factory raises", "module's own import fails"],
)
def test_cli_an_error_in_the_targets_own_code_is_shown_with_its_traceback(
    cli_modules: Path, capsys: pytest.CaptureFixture[str], target: str, raised: str
) -> None:
    assert main(["run", target]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert raised in err


# -- serve() in this process: errors come out as start() raises them ---------------------------
def sigterm_self() -> None:
    """What ``kill <pid>`` would do; only called while serve()'s handler is installed."""
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.anyio
async def test_serve_raises_the_startup_error_itself() -> None:
    orch, downs = pk.Orchestrator(), []
    unreachable = ConnectionError("payment provider unreachable")

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        downs.append("db")

    @orch.service
    async def payments(db: str) -> str:
        raise unreachable

    with pytest.raises(pk.StartupError) as info:  # not an ExceptionGroup around it
        await orch.serve(signals=(signal.SIGTERM,))
    assert info.value.service == "payments"
    assert info.value.__cause__ is unreachable
    assert downs == ["db"]  # rolled back first


@pytest.mark.anyio
async def test_serve_raises_the_startup_error_when_the_caller_is_cancelled_in_rollback() -> None:
    # trio: the watcher's task group met the caller's cancellation on its way out, and the
    # StartupError in hand was dropped: serve() returned as if nothing had happened
    orch, downs = pk.Orchestrator(), []
    unreachable = ConnectionError("payment provider unreachable")
    caller = anyio.CancelScope()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        caller.cancel()  # the caller's deadline passes while the rollback runs
        await anyio.lowlevel.checkpoint()
        downs.append("db")

    @orch.service
    async def payments(db: str) -> str:
        raise unreachable

    with anyio.fail_after(20), pytest.raises(pk.StartupError) as info, caller:
        await orch.serve(signals=(signal.SIGTERM,))
    assert info.value.__cause__ is unreachable
    assert downs == ["db"]


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["service", "on_ready"])
async def test_serve_raises_a_crash_as_itself(where: str) -> None:
    orch, downs = pk.Orchestrator(), []
    died = KeyError("worker died")
    crash = anyio.Event()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        downs.append("db")

    @orch.service
    async def worker(db: str) -> AsyncIterator[str]:
        async def die() -> None:
            await crash.wait()
            raise died

        async with anyio.create_task_group() as tg:
            tg.start_soon(die)
            yield "worker"
            tg.cancel_scope.cancel()
        downs.append("worker")

    async def on_ready(running: pk.Running) -> None:
        if where == "on_ready":
            raise died
        crash.set()
        await anyio.sleep_forever()  # cancelled by the crash

    with anyio.fail_after(20), pytest.raises(KeyError) as info:  # a hang guard
        await orch.serve(signals=(signal.SIGTERM,), on_ready=on_ready)
    assert info.value is died  # the same object, not a group holding it
    # everything stopped, dependencies last (a crashed worker got its error, not a stop)
    assert downs == (["worker", "db"] if where == "on_ready" else ["db"])


@pytest.mark.anyio
async def test_serve_teardown_errors_are_the_one_group_not_nested() -> None:
    orch = pk.Orchestrator()
    flush_failed = OSError("flush failed")

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        raise flush_failed

    with anyio.fail_after(20), pytest.raises(ExceptionGroup) as info:
        await orch.serve(signals=(signal.SIGTERM,), on_ready=lambda _running: sigterm_self())
    assert str(info.value).startswith("services failed to stop: 'db'")
    assert list(info.value.exceptions) == [flush_failed]


# -- a signal while an async on_ready runs -----------------------------------------------------
@contextmanager
def logged(text: str) -> Iterator[anyio.Event]:
    """An event set when the orchestrator logs ``text`` (serve() logs each signal it handles)."""
    event = anyio.Event()

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                event.set()

    handler, logger = Handler(logging.WARNING), logging.getLogger("parallelkit.orchestrator")
    logger.addHandler(handler)
    try:
        yield event
    finally:
        logger.removeHandler(handler)


def warm_up(handled: anyio.Event, lines: list[str]) -> Callable[[pk.Running], Awaitable[None]]:
    """An async on_ready during which a SIGTERM arrives; it records how it ended."""

    async def on_ready(running: pk.Running) -> None:
        try:
            sigterm_self()
            await handled.wait()  # serve() has handled the signal ...
            await anyio.lowlevel.checkpoint()  # ... so a cancellation is delivered by now
            lines.append("warm-up finished")  # the signal waited for it (the bug)
        except anyio.get_cancelled_exc_class():
            lines.append("warm-up cancelled")
            raise

    return on_ready


@pytest.mark.anyio
async def test_signal_cancels_an_async_on_ready_then_stops_in_order() -> None:
    orch, lines = pk.Orchestrator(), []

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        lines.append("db down")

    @orch.service
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        lines.append("api down")

    with anyio.fail_after(20), logged("SIGTERM received: stopping") as handled:  # a hang guard
        await orch.serve(signals=(signal.SIGTERM,), on_ready=warm_up(handled, lines))
    assert lines == ["warm-up cancelled", "api down", "db down"]  # each once, in order


@pytest.mark.anyio
async def test_second_signal_after_a_cancelled_on_ready_still_forces() -> None:
    orch, lines = pk.Orchestrator(), []

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        lines.append("db down")

    @orch.service(stop_timeout=60)
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        sigterm_self()  # the second signal, while api's tear-down is stuck
        try:
            await anyio.sleep_forever()
        finally:
            lines.append("api cut short")

    with anyio.fail_after(20), logged("SIGTERM received: stopping") as handled:
        await orch.serve(signals=(signal.SIGTERM,), on_ready=warm_up(handled, lines))
    assert lines == ["warm-up cancelled", "api cut short", "db down"]


# -- the log says what cut a tear-down short ---------------------------------------------------
@pytest.mark.anyio
async def test_forced_stop_is_logged_as_forced_not_as_a_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    orch, lines = pk.Orchestrator(), []
    hosts: dict[str, Any] = {}

    @orch.service(stop_timeout=60)
    async def api() -> AsyncIterator[str]:
        yield "api"
        sigterm_self()  # the second signal
        try:
            await anyio.sleep_forever()
        finally:
            lines.append("api cut short")

    def ready(running: pk.Running) -> None:
        hosts.update(running._session.hosts)
        sigterm_self()

    with anyio.fail_after(20), caplog.at_level(logging.WARNING, logger="parallelkit"):
        await orch.serve(signals=(signal.SIGTERM,), on_ready=ready)
    assert lines == ["api cut short"]
    assert "service 'api': the stop was forced (a second signal)" in caplog.text
    assert "did not stop within" not in caplog.text
    assert hosts["api"].forced
    assert not hosts["api"].timed_out  # forced, not timed out


@pytest.mark.anyio
async def test_process_stop_timeout_is_the_one_the_user_set(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    @asynccontextmanager
    async def stuck_process(name: str, *args: object, **kwargs: object) -> AsyncIterator[str]:
        yield name
        await anyio.sleep_forever()  # a tear-down that does not end: only the host's bound does

    monkeypatch.setattr(orchestrator_module, "process_lifetime", stuck_process)
    monkeypatch.setattr(services_module, "PROCESS_KILL_GRACE", 0.01)
    orch = pk.Orchestrator()
    orch.process("web", "true", stop_timeout=0.05)
    assert orch.services["web"].stop_timeout == 0.05  # as given, the kill grace not added
    with anyio.fail_after(20), caplog.at_level(logging.WARNING, logger="parallelkit"):
        async with orch.start():
            pass
    assert "process 'web' did not stop within stop_timeout=0.05s (+0.01s to kill it)" in (
        caplog.text
    )
