"""Fault review 8: ``orch.process`` argument checks, and the stop spans of early tear-downs.

1. A bad *value* given to ``orch.process`` (an empty argument list, an empty ``cwd``)
   is a ``ValueError`` naming the argument, checked at the door; a wrong *type* in
   the argument list is a ``TypeError`` naming the item (``cmd[1]``).
2. A service torn down before the shutdown reached it (it crashed while running, or
   it reached its ``yield`` and failed to become ready) has a ``"stop"`` span with
   the times of that tear-down, not the moment the shutdown came to it. Virtual
   time (trio's ``MockClock``, ``tests/virtual_time.py``): exact times, no sleeping.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio.testing

import parallelkit as pk
from tests.virtual_time import VirtualLoop, run_virtual

from .orch_helpers import crashing

BACKENDS = ["asyncio", "trio"]


# -- 1. orch.process: a bad value is a ValueError, a bad type a TypeError --------------------
@pytest.mark.parametrize("cmd", [[], ()], ids=["list", "tuple"])
def test_an_empty_argument_list_is_a_value_error_naming_cmd(cmd: Any) -> None:
    # It was a TypeError ("must be a shell string or a non-empty list of str"): the type
    # (a list) is right, its value (empty) is not.
    with pytest.raises(ValueError, match=r"^cmd must not be empty"):
        pk.Orchestrator().process("web", cmd)


@pytest.mark.parametrize(
    ("cmd", "match"),
    [
        (["true", 3], r"^cmd\[1\] must be a str or os\.PathLike, got 3"),
        ([None], r"^cmd\[0\] must be a str or os\.PathLike, got None"),
        (["true", b"-v"], r"^cmd\[1\] must be a str or os\.PathLike, got b'-v'"),
    ],
)
def test_an_argument_of_the_wrong_type_is_a_type_error_naming_it(cmd: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        pk.Orchestrator().process("web", cmd)


@pytest.mark.parametrize("cmd", [b"true", 5, None, {"true": 1}, iter(["true"])])
def test_a_command_of_the_wrong_type_is_still_a_type_error(cmd: Any) -> None:
    with pytest.raises(TypeError, match=r"^cmd must be a shell string or a non-empty list"):
        pk.Orchestrator().process("web", cmd)


def test_an_empty_cwd_is_a_value_error_at_the_door() -> None:
    # It was taken, and the start failed with FileNotFoundError: ''.
    orch = pk.Orchestrator()
    with pytest.raises(ValueError, match=r"^cwd must not be empty"):
        orch.process("web", "true", cwd="")
    assert "web" not in orch.services  # nothing registered


def test_good_commands_and_cwds_are_still_taken(tmp_path: Path) -> None:
    orch = pk.Orchestrator()
    orch.process("a", ["true", Path("x"), ""], cwd=tmp_path)  # an empty later argument is fine
    orch.process("b", ("true",), cwd=str(tmp_path))
    orch.process("c", "true", cwd=Path())  # Path("") is "."
    assert orch.services["a"].extra["cmd"] == ["true", os.fspath(Path("x")), ""]


# -- 2. stop spans of tear-downs that ran before the shutdown reached them --------------------
def stop_spans(timeline: pk.Timeline) -> dict[str, pk.Span]:
    return {s.name: s for s in timeline if s.kind == "stop"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_crashed_service_stop_span_has_the_times_of_its_tear_down(backend: str) -> None:
    # db crashes at t; its tear-down takes 3 s (t .. t+3). api (on db) stops in the
    # shutdown, 10 s: the shutdown reached db only at t+10. Its span was t+10 .. t+10.
    orch = pk.Orchestrator()
    crash = anyio.Event()
    seen: dict[str, Any] = {}

    crashing(orch, crash)

    async def main() -> None:
        with pytest.raises(ConnectionError):
            async with orch.start() as running:
                seen["crashed at"] = anyio.current_time()
                crash.set()
                await anyio.sleep_forever()
        seen["spans"] = stop_spans(running.timeline)

    run_virtual(main, backend)
    spans, crashed_at = seen["spans"], seen["crashed at"]
    assert spans["db"].status == "error"  # as before
    assert spans["db"].start == pytest.approx(crashed_at)
    assert spans["db"].queued == spans["db"].start  # no limit: no wait for a slot
    assert spans["db"].end == pytest.approx(crashed_at + 3)
    assert spans["api"].start == pytest.approx(crashed_at)  # stopped alongside, as before
    assert spans["api"].end == pytest.approx(crashed_at + 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unready_service_stop_span_has_the_times_of_its_tear_down(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # api (not critical) is never ready: its probe times out at 1 s, and its tear-down
    # takes 2 s (1 .. 3), in the start. The shutdown reached it at 3: its span was 3 .. 3.
    orch = pk.Orchestrator()
    seen: dict[str, Any] = {}

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        await anyio.sleep(4)

    @orch.service(ready=lambda _: False, timeout=1, stop_timeout=30, critical=False)
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        await anyio.sleep(2)

    async def main() -> None:
        began = anyio.current_time()
        async with orch.start() as running:
            assert isinstance(running.failed["api"], TimeoutError)
            seen["body"] = anyio.current_time()
        seen["began"] = began
        seen["spans"] = stop_spans(running.timeline)

    with caplog.at_level(logging.WARNING, logger="parallelkit.orchestrator"):
        anyio.run(main, backend=backend, backend_options=virtual(backend))
    assert "non-critical service 'api' failed to start" in caplog.text  # as before
    began, spans = seen["began"], seen["spans"]
    assert seen["body"] == pytest.approx(began + 3)  # the start waited for the tear-down
    assert spans["api"].start == pytest.approx(began + 1)
    assert spans["api"].end == pytest.approx(began + 3)
    assert spans["api"].status == "ok"
    assert spans["db"].start >= spans["api"].end  # in reverse order, as before
    assert spans["db"].end == pytest.approx(began + 7)


def virtual(backend: str) -> dict[str, Any]:
    """anyio.run's backend options for virtual time (warnings allowed, unlike run_virtual)."""
    if backend == "trio":
        return {"clock": trio.testing.MockClock(autojump_threshold=0)}
    return {"loop_factory": VirtualLoop}
