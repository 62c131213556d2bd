"""``python -m benchmarks`` broken on purpose: Ctrl-C and SIGTERM in the middle of a
benchmark, bad option values, a Redis server that is down, a report it cannot write.

The signal tests run the playbook benchmark in a subprocess (its own session, like a
terminal's foreground job) with a private ``TMPDIR``, so its temporary SQLite database
can be looked for afterwards, and a token in its environment, so every process it
started can be found whatever became of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchmarks import __main__ as runner
from benchmarks import _util

from .test_crm_main_faults import _processes_with

ROOT = Path(__file__).resolve().parent.parent


class Bench:
    """``python -m benchmarks ARGS`` in a subprocess, with a private TMPDIR and output dir."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.token = f"bench-fault-{uuid.uuid4().hex}"
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()
        self.out = tmp_path / "out"
        env = {
            **os.environ,
            "BENCH_FAULT_TOKEN": self.token,
            "TMPDIR": str(self.tmp),
            "PARALLELKIT_BENCH_RESULTS": str(self.out),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a terminal's foreground job: Ctrl-C hits its group
        )

    def wait_for_database(self) -> None:
        """Until the benchmark's temporary SQLite database exists, then a moment more
        (its statements are running)."""
        for _ in range(600):
            if any(self.tmp.glob("parallelkit-crm-*/*")):
                time.sleep(1.0)  # placing the signal among the statements, not timing them
                return
            assert self.proc.poll() is None, self.proc.communicate()
            time.sleep(0.05)
        pytest.fail("the benchmark never opened its database")

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=30)  # a hang guard
        return self.proc.returncode, out, err


@pytest.fixture
def bench() -> Iterator[list[Bench]]:
    started: list[Bench] = []
    yield started
    for b in started:  # whatever a failed test left behind
        if b.proc.poll() is None:
            os.killpg(b.proc.pid, signal.SIGKILL)
        for pid in _processes_with(b.token):
            os.kill(pid, signal.SIGKILL)
        if b.proc.stdout is not None and not b.proc.stdout.closed:
            b.proc.communicate()  # reads to the end and closes the pipes: none left to warn


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_in_the_middle_of_a_benchmark_stops_it_and_leaves_nothing(
    tmp_path: Path, bench: list[Bench], signum: signal.Signals
) -> None:
    b = Bench(tmp_path, "playbook")
    bench.append(b)
    b.wait_for_database()
    os.killpg(b.proc.pid, signum)  # the process group, as a terminal's Ctrl-C
    code, _, err = b.finish()
    assert code == 128 + signum, err
    assert f"benchmarks stopped by {signum.name}" in err
    assert "Traceback" not in err
    assert list(b.tmp.iterdir()) == []  # the temporary database removed
    assert _processes_with(b.token) == []
    assert not (b.out / "report.md").exists()  # no report of a run that did not finish


@pytest.mark.slow
@pytest.mark.redis
def test_sigterm_to_the_runner_alone_stops_the_redis_benchmarks_child_processes(
    tmp_path: Path, bench: list[Bench], redis_url: str
) -> None:
    """Its cross-process children wait for one another: one left behind waited forever,
    an orphan holding the run's output open (``kill PID``, not the terminal's group)."""
    b = Bench(tmp_path, "--redis", redis_url, "redis")
    bench.append(b)
    while len(_processes_with(b.token)) < 2:  # the runner and its first child
        assert b.proc.poll() is None, b.proc.communicate()
        time.sleep(0.02)
    b.proc.send_signal(signal.SIGTERM)  # the runner only
    code, _, err = b.finish()
    assert code == 128 + signal.SIGTERM, err
    assert "benchmarks stopped by SIGTERM" in err
    for _ in range(300):  # a child just killed may linger as it is reaped (a hang guard)
        if not _processes_with(b.token):
            break
        time.sleep(0.1)
    assert _processes_with(b.token) == []


def test_a_stuck_leftover_task_cannot_hold_a_benchmark_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiosqlite's graceful close cancelled at the wrong moment never ends: not our exit's."""
    monkeypatch.setattr(_util, "LEFTOVER_GRACE", 0.05)
    never: list[asyncio.Future[None]] = []

    async def stubborn() -> None:
        while True:  # refuses every cancellation, as the stuck close does
            fut = asyncio.get_running_loop().create_future()
            never.append(fut)
            with contextlib.suppress(asyncio.CancelledError):
                await fut

    async def main() -> int:
        asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0)
        return 7

    assert _util.run_async(main()) == 7


def test_ctrl_c_in_a_benchmark_loop_is_a_keyboard_interrupt_even_if_swallowed() -> None:
    async def main() -> str:
        signal.raise_signal(signal.SIGINT)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return "swallowed"
        return "not cancelled"

    with pytest.raises(KeyboardInterrupt):
        _util.run_async(main())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--database", "notaurl", "eager"], "not a database URL: 'notaurl'"),
        (["--database", "mysql://u:secret@h/db", "eager"], "not 'mysql': 'mysql://u:***@h/db'"),
        (["--redis", "localhost:6379", "redis"], "not a Redis URL: 'localhost:6379'"),
    ],
    ids=["malformed database", "unsupported database", "malformed redis"],
)
def test_a_bad_server_url_is_a_usage_error_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], said: str
) -> None:
    with pytest.raises(SystemExit) as info:
        runner.main([*args, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert said in err
    assert "secret" not in err
    assert not (tmp_path / "out").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_named_redis_that_does_not_answer_fails_the_run_instead_of_a_skip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    assert runner.main(["--redis", url, "redis", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert f"--redis for redis: nothing answers at {url}" in captured.err
    assert not (tmp_path / "report.md").exists()


def test_a_report_directory_it_cannot_create_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as info:
        runner.main(["otel", "--out", str(blocker / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot write the report to" in err
    assert "Traceback" not in err


# -- python -m examples.service: bad values are usage errors before anything starts ---------------
@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--port", "70000"], "argument --port: expected a TCP port, 1 to 65535, got '70000'"),
        (["--port", "-1"], "argument --port: expected a TCP port, 1 to 65535, got '-1'"),
        (["--pool-size", "-3"], "argument --pool-size: expected a whole number >= 1, got '-3'"),
        (["--pool-size", "0"], "argument --pool-size: expected a whole number >= 1, got '0'"),
        (["--database", "notaurl"], "argument --database: not a database URL: 'notaurl'"),
        (["--redis", "localhost:6379"], "argument --redis: not a Redis URL: 'localhost:6379'"),
        (["--store", "redis"], "--store redis needs a Redis URL (--redis URL)"),
        (["--name", "BAD"], "--name: name must be lowercase letters"),
    ],
    ids=[
        "port too large",
        "negative port",
        "negative pool",
        "zero pool",
        "malformed database",
        "malformed redis",
        "redis store without redis",
        "uppercase name",
    ],
)
def test_a_bad_service_option_is_a_usage_error_before_the_server_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], said: str
) -> None:
    from examples.service import __main__ as service_main

    def never(*_: object, **__: object) -> None:  # pragma: no cover - the defect
        pytest.fail("the server started with a bad option")

    monkeypatch.setattr(service_main.uvicorn, "run", never)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(SystemExit) as info:
        service_main.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert said in err
    assert "Traceback" not in err


@pytest.mark.parametrize("size", [0, -3])
def test_a_service_pool_of_no_connection_is_refused(size: int) -> None:
    """SQLAlchemy reads 0 as "no limit" and a negative size as a pool that never lends
    (every start-up waited 120 s for its first connection)."""
    from examples.service.shared import Settings

    with pytest.raises(ValueError, match=f"pool_size must be at least 1, got {size}"):
        Settings(pool_size=size)


# -- the report: an older run's entry says where it ran -----------------------------------------
def test_an_entry_kept_from_an_older_run_names_its_own_database() -> None:
    """results.json keeps each benchmark's last entry: after ``--database PG eager`` then
    ``otel``, the heading says SQLite (the last run's); eager's section must say PG."""
    from benchmarks._results import _sections

    sqlite, pg = "SQLite (embedded)", "postgresql://postgres@127.0.0.1/test"
    env = {
        "generated": "now",
        "machine": "m",
        "cpu": "c",
        "cpus": 2,
        "platform": "p",
        "python": "3",
        "database": sqlite,
        "redis": "not asked",
        "quick": True,
    }

    def entry(name: str, database: str) -> dict[str, object]:
        return {
            "name": name,
            "ok": True,
            "quick": True,
            "seconds": 1.0,
            "finished": "then",
            "result": {"targets": []},
            "database": database,
            "redis": "not asked",
        }

    merged = {
        "environment": env,
        "benchmarks": {"eager": entry("eager", pg), "otel": entry("otel", sqlite)},
    }
    lines = [line for line in _sections(merged, lambda _name: None) if line.startswith("Run then")]
    assert lines == [
        f"Run then, quick mode, 1.0 s. Database: {pg}.",
        "Run then, quick mode, 1.0 s.",
    ]


def test_the_runner_records_where_each_entry_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    monkeypatch.setattr(runner, "_call", lambda name, args: ("a title", {"targets": []}))
    assert runner.main(["otel", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())["benchmarks"]["otel"]
    assert saved["database"].startswith("SQLite")
    assert saved["redis"] == "not asked (no --redis)"
