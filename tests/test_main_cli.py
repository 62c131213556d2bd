"""``python -m parallelkit run``: targets that are factories, but not the kind it can call."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from parallelkit.__main__ import UsageError, load, main

CLI_FACTORIES = """
import functools

import parallelkit as pk

orch = pk.Orchestrator()


async def make_async():
    return orch


make_partial = functools.partial(make_async)


def make_coroutine():
    return make_async()


def make_with(config):
    return orch


def make_with_default(config=None):
    return orch


def make_type_error():
    return len(42)  # the factory's own bug: not a usage error
"""


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "cli_factories.py").write_text(CLI_FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("cli_factories", None)


@pytest.mark.parametrize(
    ("target", "said"),
    [
        ("cli_factories:make_async", "is an async function"),
        ("cli_factories:make_partial", "is an async function"),
        ("cli_factories:make_coroutine", "returned a coroutine"),
        ("cli_factories:make_with", "takes arguments (config)"),
    ],
    ids=["async def", "partial of async def", "returns a coroutine", "needs arguments"],
)
def test_a_factory_it_cannot_call_is_a_usage_error(
    factories: Path, capsys: pytest.CaptureFixture[str], target: str, said: str
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as info:
            main(["run", target])
        gc.collect()  # a coroutine never awaited warns when it is collected
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert said in err
    assert "Traceback" not in err
    assert [str(w.message) for w in caught] == []  # no "coroutine ... never awaited"


def test_a_factory_with_defaults_is_called(factories: Path) -> None:
    orch = load("cli_factories:orch")
    assert load("cli_factories:make_with_default") is orch


def test_a_type_error_inside_the_factory_is_its_own_error(
    factories: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TypeError, match="len"):
        load("cli_factories:make_type_error")
    assert main(["run", "cli_factories:make_type_error"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_builtin_that_needs_arguments_is_a_usage_error(factories: Path) -> None:
    with pytest.raises(UsageError, match=r"'os\.path:join' takes arguments"):
        load("os.path:join")


CRASHING_APP = """
import sys

import parallelkit as pk

orch = pk.Orchestrator()
orch.process("worker", [sys.executable, "-c", "print('hi'); raise SystemExit(3)"])
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_crashed_process_is_reported_once_without_the_cancellation_it_caused(
    tmp_path: Path, backend: str
) -> None:
    # the ProcessError came with "During handling of the above exception, another
    # exception occurred" and the orchestrator's own CancelledError before it
    (tmp_path / "crashing.py").write_text(CRASHING_APP)
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "parallelkit", "run", "crashing:orch", "--backend", backend],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root / "src")},
        capture_output=True,
        text=True,
        timeout=60,  # a hang guard
        check=False,
    )
    assert result.returncode == 1
    err = result.stderr
    assert "During handling" not in err
    assert "Cancelled" not in err
    # one report: what exited, its code and its last output (no traceback of
    # parallelkit's own frames: there is no code of yours in it)
    assert "Traceback" not in err
    assert err.count("exited with code 3") == 1
    report = err[err.index("parallelkit: process 'worker' exited with code 3") :]
    assert report.splitlines() == [
        "parallelkit: process 'worker' exited with code 3; its last output:",
        "    hi",
    ]
