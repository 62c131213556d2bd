"""``python -m parallelkit run``: targets that are factories, but not the kind it can call."""

from __future__ import annotations

import gc
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
