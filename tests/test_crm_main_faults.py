"""The main job's command lines, broken on purpose: Ctrl-C, SIGTERM, a database that is
down, bad option values, and ``python -m parallelkit`` before it serves.

``python -m examples.crm`` runs in a subprocess (its own session, like a terminal's
foreground job) with a token in its environment, so every process it started can be
found afterwards, whatever became of it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from examples.crm.__main__ import cli

from parallelkit.__main__ import main as parallelkit_main

# subprocesses / whole benchmark runs: the main job only, not the fast unit set
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _processes_with(token: str) -> list[int]:
    """Pids of the live processes whose environment holds ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if token.encode() in environ and state != "Z":
            found.append(int(entry.name))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    """``python -m examples.crm ARGS`` in a subprocess; ``wait_for(text)`` reads its output."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.token = f"crm-fault-{uuid.uuid4().hex}"
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()
        env = {
            **os.environ,
            "CRM_FAULT_TOKEN": self.token,
            "TMPDIR": str(self.tmp),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "examples.crm", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a terminal's foreground job: Ctrl-C hits its group
        )
        self.out: list[str] = []

    def wait_for(self, text: str) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.append(line)
            if text in line:
                return
        pytest.fail(f"the demo ended before printing {text!r}: {''.join(self.out)}")

    def signal(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)  # the process group, as a terminal's Ctrl-C

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=60)  # a hang guard
        return self.proc.returncode, "".join(self.out) + out, err

    def kill(self) -> None:
        for pid in _processes_with(self.token):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for d in started:  # whatever a failed test left behind
        if d.proc.poll() is None:
            d.signal(signal.SIGKILL)
            d.proc.communicate()
        d.kill()


def _wait_until_gone(token: str) -> list[int]:
    """The processes still there once the demo has exited (a short grace: reaping)."""
    import time

    for _ in range(50):  # a process just killed may linger as it is reaped
        left = _processes_with(token)
        if not left:
            return []
        time.sleep(0.1)
    return left


# -- Ctrl-C and SIGTERM --------------------------------------------------------------------
MOMENTS = [
    pytest.param(("files", "devflow"), "== 1 parallel reads", id="reading files"),
    pytest.param(("devflow",), "dev_server    | Serving HTTP", id="dev server starting"),
    pytest.param(("devflow", "webhook"), "test_runner   |", id="watchers running"),
    # (not while a scenario opens new SQLite connections: SQLAlchemy's terminate of a
    # connection whose connect was cancelled can wait forever on aiosqlite's stopped
    # thread, an upstream race that asyncio.run's final task cancellation then waits on)
    # (and a scenario after the cache one: the signal sent at its title must find the
    # demo still running, not finished and exiting 0 on a slow machine)
    pytest.param(("webhook", "cache", "startup"), "== 6 cache", id="database scenarios"),
    pytest.param(("startup",), "== 7 start-up", id="start-up"),
]


@pytest.mark.parametrize(("scenarios", "moment"), MOMENTS)
@pytest.mark.parametrize("presses", [1, 2], ids=["once", "twice"])
def test_ctrl_c_stops_at_once_without_a_traceback_and_leaves_nothing(
    tmp_path: Path, demo: list[Demo], scenarios: tuple[str, ...], moment: str, presses: int
) -> None:
    # it printed asyncio's KeyboardInterrupt traceback; a second Ctrl-C raised
    # KeyboardInterrupt in the middle of the clean-up: a hang, the dev server left running
    d = Demo(tmp_path, *scenarios)
    demo.append(d)
    d.wait_for(moment)
    for _ in range(presses):
        d.signal(signal.SIGINT)
    code, out, err = d.finish()
    assert "Traceback" not in err
    assert "KeyboardInterrupt" not in err
    # (-SIGINT: the second press landed as Python was exiting, after the demo was over)
    assert code in ((128 + signal.SIGINT,) if presses == 1 else (130, -signal.SIGINT)), err
    assert err.strip().splitlines()[-1].startswith("CRM demo stopped by SIGINT after")
    assert "CRM demo done" not in out
    assert _wait_until_gone(d.token) == []  # the dev server and the watchers too
    assert list(d.tmp.iterdir()) == []  # the SQLite directory was removed


def test_sigterm_stops_it_like_ctrl_c(tmp_path: Path, demo: list[Demo]) -> None:
    # SIGTERM (a supervisor, `timeout`, `kill`) ended the demo on the spot: the dev
    # server and its watchers (each in a process group of its own) went on running
    d = Demo(tmp_path, "devflow")
    demo.append(d)
    d.wait_for("test_runner   |")
    d.signal(signal.SIGTERM)
    code, _out, err = d.finish()
    assert code == 128 + signal.SIGTERM
    assert "Traceback" not in err
    assert "stopped by SIGTERM" in err
    assert _wait_until_gone(d.token) == []


@pytest.mark.postgres
def test_ctrl_c_drops_the_demos_schema(tmp_path: Path, demo: list[Demo], pg_url: str) -> None:
    d = Demo(tmp_path, "--database", pg_url, "webhook", "payment", "bulk", "cache")
    demo.append(d)
    d.wait_for("== 4 payment")
    d.signal(signal.SIGINT)
    code, _out, err = d.finish()
    assert code == 128 + signal.SIGINT
    assert "Traceback" not in err
    schema = f"pk_crm_demo_{d.proc.pid}"
    check = (
        "import asyncio, asyncpg, sys\n"
        "async def main():\n"
        "    c = await asyncpg.connect(sys.argv[1])\n"
        "    q = 'select count(*) from pg_namespace where nspname=$1'\n"
        "    n = await c.fetchval(q, sys.argv[2])\n"
        "    await c.close(); print(n)\n"
        "asyncio.run(main())\n"
    )
    plain = pg_url.replace("postgresql+asyncpg://", "postgresql://")
    left = subprocess.run(
        [sys.executable, "-c", check, plain, schema],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert left.stdout.strip() == "0"


# -- a database that cannot be used --------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("postgresql+asyncpg://postgres@127.0.0.1:{port}/test", "ConnectionRefusedError"),
        ("postgresql://postgres:secret@127.0.0.1:{port}/test", "ConnectionRefusedError"),
        ("foo://x", "NoSuchModuleError"),
        ("not a url", "ArgumentError"),
    ],
    ids=["postgres down", "postgres down, with a password", "unknown dialect", "not a URL"],
)
def test_a_database_it_cannot_open_is_one_line_before_any_scenario(
    capsys: pytest.CaptureFixture[str], url: str, said: str
) -> None:
    # it ran the first scenarios, then printed a 240-line traceback
    url = url.format(port=_free_port())
    assert cli(["--database", url, "files", "webhook"]) == 1
    captured = capsys.readouterr()
    assert "==" not in captured.out  # no scenario ran
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("python -m examples.crm: error: cannot open the database (")
    assert said in lines[0]
    assert "secret" not in lines[0]


# -- bad option values ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--scale", "-1", "payment"], "--scale: expected a finite number >= 0, got '-1'"),
        (["--scale", "nan", "startup"], "--scale: expected a finite number >= 0, got 'nan'"),
        (["--scale", "inf", "payment"], "--scale: expected a finite number >= 0, got 'inf'"),
        (["--scale", "abc"], "--scale: expected a finite number >= 0, got 'abc'"),
        (["nosuch"], "unknown scenario 'nosuch' (one of files, devflow, webhook"),
    ],
    ids=["negative scale", "nan scale", "infinite scale", "not a number", "unknown scenario"],
)
def test_a_bad_option_value_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    # a negative or NaN scale ran until a sleep refused it (a traceback), an infinite
    # one slept forever; an unknown scenario listed "[]" among the choices
    with pytest.raises(SystemExit) as info:
        cli(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert said in err
    assert "[]" not in err


# -- python -m parallelkit -----------------------------------------------------------------
def test_parallelkit_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    # it showed the module docstring's ``literals`` and :class:`~roles`
    with pytest.raises(SystemExit) as info:
        parallelkit_main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for rest in ("``", ":class:", ":func:", "~parallelkit"):
        assert rest not in text
    assert "Exit codes:" in text
    assert "module:orch" in text


def test_ctrl_c_while_the_target_loads_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a Ctrl-C before serve() took over SIGINT (a slow import, trio's own import, the
    # loop starting) printed Python's KeyboardInterrupt traceback
    (tmp_path / "slow_to_import.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        code = parallelkit_main(["run", "slow_to_import:orch"])
    except KeyboardInterrupt:  # (not out of the test: it would stop the whole session)
        pytest.fail("KeyboardInterrupt came out of python -m parallelkit")
    finally:
        sys.modules.pop("slow_to_import", None)
    assert code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip() == "parallelkit: interrupted"


def test_a_task_that_never_ends_cannot_hold_the_exit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the shape of SQLAlchemy's graceful close of an aiosqlite connection whose worker
    # thread had stopped: cancelled, it waits again, for a future nobody will resolve;
    # asyncio.run's final cancellation of the leftover tasks waited for it forever
    import asyncio

    import examples.crm.__main__ as crm_main

    monkeypatch.setattr(crm_main, "LEFTOVER_GRACE", 0.01)

    async def never_ends() -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_future()
        finally:
            await loop.create_future()

    async def work() -> None:
        asyncio.get_running_loop().create_task(never_ends())
        await asyncio.sleep(0)

    assert crm_main._run(work()) is None
    err = capsys.readouterr().err
    assert "left behind after 0.01 s: 1 task(s) that did not finish (" in err
    assert "never_ends" in err


def test_a_reader_that_goes_away_is_no_traceback(tmp_path: Path, demo: list[Demo]) -> None:
    # `python -m examples.crm | head -3`: a BrokenPipeError traceback
    d = Demo(tmp_path, "files", "devflow")
    demo.append(d)
    d.wait_for("== 1 parallel reads")
    assert d.proc.stdout is not None
    d.proc.stdout.close()  # what `head` does once it has its lines
    _, err = d.proc.communicate(timeout=60)  # a hang guard
    assert "Traceback" not in err
    assert "BrokenPipeError" not in err
    assert d.proc.returncode == 128 + signal.SIGPIPE
    assert _wait_until_gone(d.token) == []
