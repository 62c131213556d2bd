"""Process services under faults: a command that cannot run, endless lines, reused pids."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import parallelkit as pk

from .test_process import alive, wait_for

pytestmark = pytest.mark.anyio

PY = sys.executable
NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


@pytest.mark.parametrize("case", ["no-such-command", "no-such-cwd", "not-executable"])
async def test_a_command_that_cannot_be_spawned_is_the_cause_itself(
    case: str, tmp_path: Path
) -> None:
    # the OSError came out inside the process's task group's ExceptionGroup: the
    # StartupError said "ExceptionGroup: unhandled errors in a TaskGroup", no path
    cmd, cwd, error = [PY, "-c", "pass"], None, FileNotFoundError
    if case == "no-such-command":
        cmd = [path := str(tmp_path / "no-such-command")]
    elif case == "no-such-cwd":
        cwd = path = str(tmp_path / "no-such-dir")
    else:
        script = tmp_path / "script.sh"
        script.write_text("#!/bin/sh\n")
        script.chmod(0o644)
        cmd, path, error = [str(script)], str(script), PermissionError
    orch = pk.Orchestrator(output=lambda *a: None)
    orch.process("web", cmd, cwd=cwd)
    with anyio.fail_after(20), pytest.raises(pk.StartupError) as info:  # a hang guard
        async with orch.start():
            pass
    cause = info.value.__cause__
    assert type(cause) is error
    assert cause.filename == path
    assert str(info.value) == f"service 'web' failed to start: {error.__name__}: {cause}"
    assert path in str(info.value)


async def test_a_line_that_never_ends_is_emitted_in_bounded_pieces() -> None:
    # a progress bar redrawn with \r (or binary output) never writes "\n": the whole
    # output was kept in one buffer, copied and split again for every chunk read
    limit = 65536  # bytes: the longest piece (process.MAX_LINE)
    size = 3 * limit + 1000
    text = "é" * size  # 2 bytes a character: a piece must not split one
    script = f"import sys; sys.stdout.write('é' * {size}); sys.stdout.flush(); print('\\nend')"
    lines: list[str] = []
    orch = pk.Orchestrator(output=lambda name, stream, line: lines.append(line))
    orch.process("bar", [PY, "-c", script], env={"PYTHONIOENCODING": "utf-8"})
    with anyio.fail_after(20):  # a hang guard
        async with orch.start() as running:
            bar = running["bar"]
            await wait_for(lambda: "end" in lines and bar.returncode is not None)
    assert bar.returncode == 0
    pieces = lines[: lines.index("end")]
    assert len(pieces) > 1
    assert all(len(p.encode()) <= limit for p in pieces)
    assert "".join(pieces) == text  # nothing lost, no character cut in two


async def test_the_stop_never_signals_a_process_group_that_reused_the_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the group is killed (and its id given up) when the process exits; the stop,
    # maybe hours later, sent SIGKILL to that id again, whoever holds it by then
    sent: list[tuple[int, int]] = []
    real_killpg = os.killpg

    def killpg(pgid: int, signum: int) -> None:
        sent.append((pgid, signum))
        real_killpg(pgid, signum)

    monkeypatch.setattr(os, "killpg", killpg)
    orch = pk.Orchestrator(output=lambda *a: None)
    orch.process("once", [PY, "-c", "pass"])
    with anyio.fail_after(20):  # a hang guard
        async with orch.start() as running:
            once = running["once"]
            await wait_for(lambda: once.returncode is not None)
            await wait_for(lambda: (once.pid, signal.SIGKILL) in sent)  # its group, at its exit
            at_exit = list(sent)
    assert sent == at_exit  # the stop sent nothing more


@pytest.mark.skipif(
    not os.access(NS_LAST_PID, os.W_OK), reason="needs a writable /proc/sys/kernel/ns_last_pid"
)
async def test_an_unrelated_process_that_got_the_pid_survives_the_stop() -> None:
    # the real thing: an unrelated session leader is given the exited process's pid
    # (and so its process-group id) before the orchestrator stops
    def spawn_with_pid(pid: int) -> subprocess.Popen[bytes]:
        for _ in range(100):
            NS_LAST_PID.write_text(str(pid - 1))
            other = subprocess.Popen(["sleep", "60"], start_new_session=True)
            if other.pid == pid:
                return other
            other.kill()
            other.wait()
        pytest.skip("could not give the pid to another process")  # pragma: no cover

    orch = pk.Orchestrator(output=lambda *a: None)
    orch.process("once", [PY, "-c", "pass"])
    other: subprocess.Popen[bytes] | None = None
    try:
        with anyio.fail_after(20):  # a hang guard
            async with orch.start() as running:
                once = running["once"]
                await wait_for(lambda: once.returncode is not None and not alive(once.pid))
                assert once.pid is not None
                other = spawn_with_pid(once.pid)
                assert os.getpgid(other.pid) == once.pid
        # a SIGKILL sent by the stop is already pending: it decides the exit status
        other.terminate()
        assert other.wait(timeout=20) == -signal.SIGTERM  # not killed by the stop
    finally:
        if other is not None and other.poll() is None:
            other.kill()
            other.wait()
