"""Process supervision under faults: the stop's signals to a process's children, restarts.

A process service runs in a process group of its own; the stop is ``SIGTERM`` to the
group, ``SIGKILL`` after ``stop_timeout``. These tests use a shell command whose
child does the work (``cd app && server``: the shell waits for the child, and dies at
``SIGTERM`` at once), the usual shape of a dev server or worker started from a
command string.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import parallelkit as pk

from .test_process import alive, wait_for

pytestmark = pytest.mark.anyio

PY = sys.executable

CHILD = """
import os, pathlib, signal, sys, time

out = pathlib.Path(sys.argv[1])
mode = sys.argv[2]


def put(text):  # whole or not at all: the probe (out.exists) may read it at any moment
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)


def term(*_):
    if mode == "graceful":
        time.sleep(0.2)  # finish the work in hand
        put("graceful")
        sys.exit(0)
    put(f"term {os.getpid()}")  # and go on: SIGTERM is not enough


signal.signal(signal.SIGTERM, term)
put(f"up {os.getpid()}")
while True:
    time.sleep(1)
"""


def shell_with_child(orch: pk.Orchestrator, tmp_path: Path, mode: str, stop_timeout: float) -> Path:
    """A process service ``w``: a shell that runs a Python child and waits for it."""
    out = tmp_path / "out"
    (tmp_path / "child.py").write_text(CHILD)
    orch.process(
        "w",
        f"cd {tmp_path} && {PY} child.py {out} {mode}",
        ready=pk.probes.call(out.exists),
        timeout=20,
        stop_timeout=stop_timeout,
    )
    return out


def child_pid(out: Path) -> int:
    return int(out.read_text().split()[1])


async def test_the_child_of_a_shell_command_gets_the_grace_period_too(tmp_path: Path) -> None:
    # the shell died at SIGTERM at once, and the group got SIGKILL the moment it had:
    # its child, the real server, was killed in the middle of its graceful stop
    orch = pk.Orchestrator(output=lambda *a: None)
    out = shell_with_child(orch, tmp_path, "graceful", stop_timeout=60)
    with anyio.fail_after(30):  # a hang guard
        async with orch.start() as running:
            pid = child_pid(out)
            assert running["w"].pid != pid  # the shell is the process; the child is its own
    assert out.read_text() == "graceful"
    assert not alive(pid)


async def test_a_child_that_ignores_sigterm_is_killed_after_stop_timeout_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the shell's exit ended the wait for the group: the child that ignored SIGTERM was
    # killed at once, and nothing said that the stop had to kill anything
    orch = pk.Orchestrator(output=lambda *a: None)
    out = shell_with_child(orch, tmp_path, "ignore", stop_timeout=2)
    with caplog.at_level("WARNING"), anyio.fail_after(30):  # a hang guard
        async with orch.start():
            pid = child_pid(out)
    assert out.read_text() == f"term {pid}"  # it got SIGTERM, and ignored it
    await wait_for(lambda: not alive(pid))  # then SIGKILL (reaped by init: polled)
    warnings = [r.getMessage() for r in caplog.records if r.name == "parallelkit.process"]
    assert warnings == [
        "process 'w' did not exit within stop_timeout=2.0s after SIGTERM; sending SIGKILL"
    ]


async def test_a_second_signal_kills_what_is_left_of_the_group(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the process (the shell) had exited, its child had not: the forced stop of a
    # second signal sent SIGKILL to the process only, and so to nobody; the stop
    # waited for the whole stop_timeout
    orch = pk.Orchestrator(output=lambda *a: None)
    out = shell_with_child(orch, tmp_path, "ignore", stop_timeout=20)

    async def force_once_terminated(running: pk.Running) -> None:
        await wait_for(lambda: out.read_text().startswith("term"))
        running._session.force()  # what serve() does at a second SIGINT / SIGTERM

    with caplog.at_level("WARNING"), anyio.fail_after(60):  # a hang guard
        async with anyio.create_task_group() as tg, orch.start() as running:
            pid = child_pid(out)
            tg.start_soon(force_once_terminated, running)
    await wait_for(lambda: not alive(pid))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "process 'w': the stop was forced (a second signal); its tear-down was cut short"
    ]


async def test_restarts_used_up_before_ready_fail_the_start_with_the_exit(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    script = (
        "import pathlib, sys\n"
        f"p = pathlib.Path({str(runs)!r})\n"
        "p.write_text(str(int(p.read_text()) + 1 if p.exists() else 1))\n"
        "print('boom', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    orch = pk.Orchestrator(output=lambda *a: None)
    orch.process(
        "w",
        [PY, "-c", script],
        restart="on-failure",
        max_restarts=2,
        ready=pk.probes.call(lambda: False, name="never"),
    )
    with anyio.fail_after(30), pytest.raises(pk.StartupError) as info:  # a hang guard
        async with orch.start():
            pytest.fail("never ready")
    error = info.value.__cause__
    assert isinstance(error, pk.ProcessError)
    assert isinstance(error, subprocess.CalledProcessError)
    assert (error.returncode, error.restarts) == (3, 2)
    assert runs.read_text() == "3"  # the first run and two restarts
    assert "[stderr] boom" in error.tail
