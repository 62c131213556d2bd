"""Every Python block of the fan-out, Flow and distributed pages runs as pasted.

Each block is a complete program: it is written to a file and run in a fresh
interpreter, from the repository root, and must exit 0. The distributed page's
blocks start real Taskiq worker processes and need Redis (``redis`` marker; the URL
comes from ``PARALLELKIT_TEST_REDIS_URL``, as the blocks read it).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(?:python|py|python3)[^\n]*\n(?P<code>.*?)^```", re.MULTILINE | re.DOTALL)
PAGES = {"fanout.md": False, "flow.md": False, "distributed.md": True}  # page: needs Redis


def blocks(page: str) -> list[tuple[int, str]]:
    """The page's Python blocks: (line, code)."""
    text = (ROOT / "docs" / page).read_text()
    return [(text.count("\n", 0, m.start()) + 1, m["code"]) for m in FENCE.finditer(text)]


def cases() -> list[object]:
    out: list[object] = []
    for page, redis in PAGES.items():
        for line, code in blocks(page):
            marks = [pytest.mark.redis, pytest.mark.slow] if redis else []
            out.append(pytest.param(page, code, marks=marks, id=f"{page}:{line}"))
    return out


def test_every_page_has_blocks() -> None:
    for page in PAGES:
        assert blocks(page), page


@pytest.mark.parametrize(("page", "code"), cases())
def test_block_runs_as_pasted(
    page: str, code: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if PAGES[page]:
        request.getfixturevalue("redis_url")  # skip locally, fail under CI, when Redis is down
    script = tmp_path / "example.py"
    script.write_text(code)
    done = run_program(script, [], {})
    assert done.returncode == 0, f"{page}: exit {done.returncode}\n{done.stderr[-3000:]}"


def run_program(
    script: Path, args: list[str], env: dict[str, str], timeout: float = 100
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as a program in its own process group; whatever it started
    (worker processes) is killed with it. Past ``timeout`` it fails with its output."""
    process = subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        _kill_started_from(script.parent)  # a worker in a session of its own holds the pipes
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out, err = "", "(its output pipes are still held by a process it started)"
        pytest.fail(f"{script.name} still running after {timeout} s\n{err[-3000:]}\n{out[-1000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # leftovers of the program, if any
        _kill_started_from(script.parent)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _kill_started_from(directory: Path) -> None:
    """Kill every process whose command line names ``directory``: the worker processes a
    distributed block starts (``taskiq worker example:broker --app-dir <directory>``) in
    sessions of their own, which outlive a block killed at its timeout and would take
    the next run's messages from the same stream."""
    mark, procs = str(directory).encode(), Path("/proc")
    if not procs.is_dir():  # (not Linux: nothing to look in)
        return
    for proc in procs.iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if mark in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours to read
            continue
