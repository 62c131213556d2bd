"""Fault review: serve() under signals, a second serve(), bad signal declarations.

The subprocess tests send real signals to a real program (a serve() left without
its handler dies of the SIGTERM, which must never happen to the test run itself).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import parallelkit as pk

# subprocesses / whole benchmark runs: the main job only, not the fast unit set
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["asyncio", "trio"]


def run_helper(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.orch_helpers.serve_twice", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,  # a hang guard
        check=False,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_second_serve_leaves_the_first_one_its_signals(backend: str) -> None:
    # The second serve() of the same orchestrator was refused only after it had
    # installed its own signal receiver; on asyncio, closing that receiver removed
    # the handler of the serve() that runs, and the next SIGTERM killed the program
    # with no stop at all (its processes, each in a group of its own, left running).
    result = run_helper(backend, "same")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("refused: this Orchestrator 'first' is already started")
    assert lines[1:] == ["first db stopped", "first served"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_serve_of_another_orchestrator_for_the_same_signals_is_refused(
    backend: str,
) -> None:
    # A signal reaches one receiver only: two serve() for SIGTERM left one of them
    # deaf to it (on asyncio, the first SIGTERM stopped the second and the next
    # one killed the program, the first orchestrator never stopped).
    result = run_helper(backend, "other")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("refused: another serve() in this program already handles")
    assert "SIGTERM" in lines[0]
    assert lines[1:] == ["first db stopped", "first served"]


@pytest.mark.anyio
async def test_a_bool_is_not_a_signal_number() -> None:
    # True is 1 to Python: serve(signals=[True]) waited for SIGHUP, a wrong type
    # taken silently (every other option refuses a bool where it wants an int).
    orch = pk.Orchestrator()
    started: list[str] = []

    @orch.service
    async def db() -> str:
        started.append("db")
        return "db"

    with anyio.fail_after(10):  # a hang guard: the old code served for ever
        with pytest.raises(TypeError, match=r"signals must hold signal numbers.*True"):
            await orch.serve(signals=[True])
    assert started == []  # refused before anything started
