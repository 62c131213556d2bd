"""Process services: prefixed output, restart policy, stop escalation, no orphans."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk
from parallelkit._orchestrator.process import OutputSink

pytestmark = pytest.mark.anyio

PY = sys.executable
HELPERS = Path(__file__).resolve().parent / "orch_helpers"
ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_for(predicate: object, timeout: float = 20.0) -> None:
    """Poll ``predicate`` (a hang guard, not a timing assertion)."""
    with anyio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await anyio.sleep(0.01)


async def test_output_is_prefixed_and_aligned(capsys: pytest.CaptureFixture[str]) -> None:
    orch = pk.Orchestrator()
    script = "import sys; print('hello'); print('oops', file=sys.stderr); sys.stdout.write('tail')"
    orch.process("web", [PY, "-c", script])
    orch.process("longer_name", [PY, "-c", "import time; time.sleep(30)"])
    out = ""

    def printed(text: str) -> bool:
        nonlocal out
        out += capsys.readouterr().out
        return text in out

    async with orch.start() as running:
        proc = running["web"]
        assert isinstance(proc, pk.ManagedProcess)
        await wait_for(lambda: printed("web         | tail\n"))
        await wait_for(lambda: proc.returncode is not None)
    out += capsys.readouterr().out
    assert "web         | hello\n" in out
    assert "web         | oops\n" in out
    assert "web         | tail\n" in out
    assert "\x1b[" not in out  # not a terminal: no colour
    assert proc.returncode == 0


def test_sink_colour_and_logging(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    lines: list[str] = []

    class Out:
        def write(self, s: str) -> None:
            lines.append(s)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Out())
    OutputSink("stdout", width=4).write("db", "stdout", "x")
    assert lines == ["\x1b[36mdb   | \x1b[0mx\n"]
    with caplog.at_level("INFO"):
        OutputSink("logging").write("db", "stderr", "boom")
    assert caplog.records[-1].name == "parallelkit.process.db"
    assert caplog.records[-1].levelname == "WARNING"
    got: list[tuple[str, str, str]] = []
    OutputSink(lambda *a: got.append(a)).write("db", "stdout", "y")
    assert got == [("db", "stdout", "y")]
    with pytest.raises(ValueError, match="output"):
        OutputSink("file")  # type: ignore[arg-type]


async def test_restart_on_failure_then_fail_the_orchestrator(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    lines: list[tuple[str, str, str]] = []
    orch = pk.Orchestrator(output=lambda *a: lines.append(a))
    orch.process(
        "flaky",
        [PY, str(HELPERS / "flaky.py"), "3", str(counter)],
        restart="on-failure",
        max_restarts=2,
    )
    with anyio.fail_after(20), pytest.raises(subprocess.CalledProcessError) as info:
        async with orch.start() as running:
            await anyio.sleep(30)
    assert info.value.returncode == 3
    assert counter.read_text() == "3"  # first run + 2 restarts
    assert running["flaky"].restarts == 2
    assert ("flaky", "stdout", "run 3 out") in lines
    assert ("flaky", "stderr", "run 2 err") in lines


async def test_restart_always_and_no(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    orch = pk.Orchestrator(output=lambda *a: None)
    orch.process(
        "job",
        [PY, str(HELPERS / "flaky.py"), "0", str(counter)],
        restart="always",
        max_restarts=None,
    )
    async with orch.start() as running:
        await wait_for(lambda: counter.exists() and int(counter.read_text() or 0) >= 3)
        assert running["job"].restarts >= 2
    # restart="no" and exit 0: the service just ends, the orchestrator keeps running
    once = tmp_path / "once"
    orch2 = pk.Orchestrator(output=lambda *a: None)
    orch2.process("once", [PY, str(HELPERS / "flaky.py"), "0", str(once)])
    async with orch2.start() as running:
        await wait_for(lambda: running["once"].returncode is not None)
        assert running["once"].returncode == 0
        assert (await running.health()).status == "failing"
    assert once.read_text() == "1"


async def test_stop_kills_the_group_sigkill_after_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "log"
    log.touch()
    orch = pk.Orchestrator(output=lambda *a: None)
    orch.process(
        "worker",
        [PY, "-m", "tests.orch_helpers.worker", "--ignore-term"],
        env={"PK_TEST_LOG": str(log)},
        cwd=ROOT,
        ready=pk.probes.call(lambda: "worker pids" in log.read_text()),
        timeout=20,
        stop_timeout=0.3,
    )
    with caplog.at_level("WARNING"):
        async with orch.start() as running:
            pids = [int(p) for p in log.read_text().split("worker pids ")[1].split()]
            assert running["worker"].pid == pids[0]
            assert all(alive(p) for p in pids)
    # SIGTERM ignored: SIGKILL after stop_timeout (said once, and the exit code shows it)
    assert caplog.text.count("did not exit within stop_timeout=0.3s after SIGTERM") == 1
    await wait_for(lambda: not any(alive(p) for p in pids))
    assert running["worker"].returncode == -9


async def test_startup_failure_kills_started_processes(tmp_path: Path) -> None:
    orch = pk.Orchestrator(output=lambda *a: None)
    orch.process("sleeper", [PY, "-c", "import time; time.sleep(60)"])

    @orch.service
    async def broken() -> str:
        await anyio.sleep(0.2)
        raise RuntimeError("no")

    with pytest.raises(pk.StartupError):
        async with orch.start():
            pass


async def test_process_validation_and_env(tmp_path: Path) -> None:
    orch = pk.Orchestrator(output=lambda *a: None)
    with pytest.raises(ValueError, match="restart"):
        orch.process("a", "true", restart="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_restarts"):
        orch.process("a", "true", max_restarts=-1)
    with pytest.raises(ValueError, match="cmd"):  # a bad value (was TypeError)
        orch.process("a", [])
    with pytest.raises(ValueError, match="cmd"):
        orch.process("a", " ")
    with pytest.raises(TypeError, match="depends_on"):
        orch.process("a", "true", depends_on="db")
    with pytest.raises(pk.DefinitionError, match="identifier"):
        orch.process("my-app", "true")
    out = tmp_path / "env"
    orch.process(
        "shell", f'echo "$GREETING" > {out}; sleep 30', env={"GREETING": "hi"}, cwd=tmp_path
    )
    async with orch.start():
        await wait_for(lambda: out.exists() and out.read_text() == "hi\n")
    assert os.environ.get("GREETING") is None


async def test_exit_0_before_ready_fails_the_start_at_once() -> None:
    # the probe can never pass once the process is gone: without a timeout, the start hung
    orch = pk.Orchestrator(output=lambda *a: None)
    orch.process(
        "web",
        [PY, "-c", "print('nothing to serve')"],
        ready=pk.probes.call(lambda: False, name="never"),
    )
    with anyio.fail_after(20), pytest.raises(pk.StartupError) as info:  # a hang guard
        async with orch.start():
            pass
    error = info.value.__cause__
    assert isinstance(error, pk.ProcessError)
    assert error.returncode == 0
    assert error.tail == ("nothing to serve",)


async def test_one_shot_process_that_did_its_job_before_exit_0_is_ready(tmp_path: Path) -> None:
    # the probe gets one last look after the exit: a one-shot job (a migration) is ready
    done = tmp_path / "done"
    checks = 0

    def job_done() -> bool:
        # the first check (at the spawn) says no whatever the file: on a busy machine
        # it may run after the job wrote it, and the start would not need the exit
        nonlocal checks
        checks += 1
        return checks > 1 and done.exists()

    orch = pk.Orchestrator(output=lambda *a: None)
    orch.process(
        "migrate",
        [PY, "-c", f"open({str(done)!r}, 'w').close()"],
        ready=pk.probes.call(job_done, max_interval=60.0, initial=60.0),
    )
    with anyio.fail_after(20):  # a hang guard: the probe's next poll would be a minute away
        async with orch.start() as running:
            assert running["migrate"].returncode == 0
    assert checks == 2  # the one at the spawn, and the last look after the exit


async def test_a_restart_spawned_while_stopping_is_stopped_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the stop terminated the process it knew of while a restart was being spawned
    # (trio spawns in a thread that a cancellation does not interrupt): the new one
    # was left running, outside the orchestrator, in a session of its own
    real_open_process = anyio.open_process
    calls = 0
    hosts: dict[str, Any] = {}

    async def open_process(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # the restart: it completes only once the stop has begun
            with anyio.CancelScope(shield=True):
                while hosts["w"].state != "stopping":
                    await anyio.sleep(0.01)
                for _ in range(20):
                    await anyio.lowlevel.checkpoint()
        return await real_open_process(*args, **kwargs)

    monkeypatch.setattr(anyio, "open_process", open_process)
    runs = tmp_path / "runs"
    script = (
        "import pathlib, sys, time\n"
        f"p = pathlib.Path({str(runs)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "if n == 1: sys.exit(1)\n"
        "time.sleep(60)\n"
    )
    orch = pk.Orchestrator(output=lambda *a: None)
    orch.process("w", [PY, "-c", script], restart="on-failure", stop_timeout=5)
    with anyio.fail_after(20):  # a hang guard
        async with orch.start() as running:
            hosts.update(running._session.hosts)
            await wait_for(lambda: calls == 2)  # the first run failed; the restart spawns
        process = running["w"]
        assert process.restarts == 1
        assert process.pid is not None
        await wait_for(lambda: not alive(process.pid))  # stopped, not orphaned
