"""Fault review 7: the Orchestrator under asyncio's cancel-every-task, stray cancellations
in a service's own tasks, and the ``"ready"`` span of a readiness that failed.

``asyncio.run`` cancels every task still running when its main coroutine returns, and
uvicorn's force quit (a second Ctrl+C) ends that way: a ``Task.cancel()`` of the task
that holds ``orch.start()`` *and* of every service's task (and of the tasks a service
runs in its own task group). That is a cancellation of the start, not a crash: every
service that reached its ``yield`` tears down once, in reverse order, and the
cancellation goes on. Events, counters and orders only; virtual time for the slow
tear-down.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import parallelkit as pk
from tests.virtual_time import VirtualLoop

pytest_plugins = ["tests.orch_helpers.spans"]

ASYNCIO = pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (trio has no Task.cancel())


ORDER = pytest.mark.parametrize("services_first", [True, False], ids=["services", "holder"])


def cancel_every_task(*, services_first: bool) -> None:
    """What ``asyncio.run`` does at exit: ``cancel()`` every task but the caller's.

    The tasks run their cancellation in the order they were cancelled: the services'
    own tasks first, or the others (the holder of ``orch.start()``, the starts).
    """
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    tasks.sort(key=lambda t: t.get_name().startswith("parallelkit service") != services_first)
    for task in tasks:
        task.cancel()


def services(
    orch: pk.Orchestrator,
    lines: list[str],
    *,
    api_gate: anyio.Event | None,
    api_waiting: anyio.Event | None = None,
    api_ready: Any = None,
) -> None:
    """db; cache (a task of its own, in its own task group); slow on db (a slow tear-down);
    api on slow (its set-up waits for ``api_gate`` when given, setting ``api_waiting``;
    ``api_ready`` its probe)."""

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        lines.append("db down")

    @orch.service
    async def cache() -> AsyncIterator[str]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep_forever)  # a refresher, say
            yield "cache"
            lines.append("cache down")
            tg.cancel_scope.cancel()

    @orch.service(stop_timeout=30)
    async def slow(db: str) -> AsyncIterator[str]:
        yield "slow"
        lines.append("slow stopping")
        await anyio.sleep(1)  # flushing, say
        lines.append("slow down")

    @orch.service(ready=api_ready)
    async def api(slow: str) -> AsyncIterator[str]:
        try:
            if api_gate is not None:
                assert api_waiting is not None
                api_waiting.set()
                await api_gate.wait()
            yield "api"
            lines.append("api down")
        finally:
            lines.append("api finally")


def run_virtual_asyncio(main: Any) -> None:
    anyio.run(main, backend="asyncio", backend_options={"loop_factory": VirtualLoop})


# -- 1. the event loop cancels every task ----------------------------------------------------
@ORDER
def test_cancelling_every_task_while_running_stops_every_service_in_order(
    services_first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # It raised RuntimeError("service 'slow' ended while running"), logged "service 'db'
    # ended while running" as an ERROR, and ran no tear-down at all.
    orch, lines = pk.Orchestrator(), []
    services(orch, lines, api_gate=None)
    seen: dict[str, Any] = {}

    async def main() -> None:
        entered = anyio.Event()

        async def hold() -> None:
            async with orch.start():
                entered.set()
                await anyio.sleep_forever()

        task = asyncio.get_running_loop().create_task(hold())
        with anyio.fail_after(30):
            await entered.wait()
        cancel_every_task(services_first=services_first)
        try:
            await task
        except BaseException as exc:  # what it raised is the point
            seen["raised"] = exc

    with caplog.at_level(logging.DEBUG, logger="parallelkit"):
        run_virtual_asyncio(main)
    assert isinstance(seen["raised"], asyncio.CancelledError)  # as a cancellation
    assert lines.count("slow down") == lines.count("db down") == 1
    assert lines.count("api down") == lines.count("cache down") == 1
    assert lines.index("api down") < lines.index("slow stopping")  # dependents first
    assert lines.index("slow down") < lines.index("db down")
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == []  # no crash, no failed start: a cancellation  # no crash logged


@ORDER
@pytest.mark.parametrize("where", ["set-up", "probe"])
def test_cancelling_every_task_during_start_up_rolls_back_in_order(
    where: str, services_first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # The same, while api is still starting (in its set-up, or its readiness probe).
    orch, lines = pk.Orchestrator(), []
    gate, waiting = anyio.Event(), anyio.Event()
    if where == "set-up":
        services(orch, lines, api_gate=gate, api_waiting=waiting)
    else:  # api reached its yield: its readiness wait is under way

        def api_ready(_: str) -> bool:
            waiting.set()
            return False

        services(orch, lines, api_gate=None, api_ready=api_ready)
    seen: dict[str, Any] = {}

    async def main() -> None:
        async def hold() -> None:
            async with orch.start():
                pytest.fail("api never becomes ready")  # pragma: no cover

        task = asyncio.get_running_loop().create_task(hold())
        with anyio.fail_after(30):
            await waiting.wait()
        cancel_every_task(services_first=services_first)
        try:
            await task
        except BaseException as exc:  # what it raised is the point
            seen["raised"] = exc

    with caplog.at_level(logging.DEBUG, logger="parallelkit"):
        run_virtual_asyncio(main)
    assert isinstance(seen["raised"], asyncio.CancelledError)
    if where == "set-up":
        assert "api down" not in lines  # before its yield: its finally only
    else:
        assert lines.count("api down") == 1
        assert lines.index("api down") < lines.index("slow stopping")
    assert lines.count("api finally") == 1
    assert lines.count("slow down") == lines.count("db down") == lines.count("cache down") == 1
    assert lines.index("slow down") < lines.index("db down")
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == []  # no crash, no failed start: a cancellation


@ORDER
def test_cancelling_every_task_while_stopping_still_stops_every_service_once(
    services_first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # The orchestrator's own stop is cancelled too: it hung (the services still to stop
    # waited for a turn that never came), or, before that, db never tore down and was
    # logged as "ended while running". slow's tear-down, under way, is cut short.
    orch, lines = pk.Orchestrator(), []
    services(orch, lines, api_gate=None)
    seen: dict[str, Any] = {}

    async def main() -> None:
        async def hold() -> None:
            async with orch.start():
                pass

        task = asyncio.get_running_loop().create_task(hold())
        with anyio.fail_after(30):
            while "slow stopping" not in lines:
                await anyio.sleep(0.01)
        cancel_every_task(services_first=services_first)
        try:
            with anyio.fail_after(30):
                await task
        except BaseException as exc:  # what it raised is the point
            seen["raised"] = exc

    with caplog.at_level(logging.DEBUG, logger="parallelkit"):
        run_virtual_asyncio(main)
    assert isinstance(seen["raised"], asyncio.CancelledError)
    assert "slow down" not in lines  # cut short at its await, as a forced stop
    assert lines.count("db down") == lines.count("api down") == lines.count("cache down") == 1
    assert lines.index("slow stopping") < lines.index("db down")
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# -- 3. a readiness that failed has its "ready" span ------------------------------------------


async def _answers_true(_: str) -> Any:
    return True  # a Probe check answers None or a reason: a TypeError out of the probe


BROKEN = pk.probes.Probe("broken", _answers_true)


@pytest.mark.anyio
@pytest.mark.parametrize("probe", ["times out", "raises"])
async def test_a_failed_readiness_has_an_error_ready_span(probe: str, exporter: Any) -> None:
    # There was no "ready api" span at all, on the timeline or in OpenTelemetry.
    from opentelemetry.trace import StatusCode

    orch = pk.Orchestrator()
    ready: Any = (lambda _: False) if probe == "times out" else BROKEN

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @orch.service(ready=ready, timeout=0.05)
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"

    with pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pytest.fail("api is never ready")  # pragma: no cover
    cause = info.value.__cause__
    finished = {s.name: s for s in exporter.get_finished_spans()}
    ready_api = finished["ready api"]
    assert ready_api.status.status_code is StatusCode.ERROR
    assert (ready_api.attributes or {})["parallelkit.status"] == "error"
    types = [
        str((e.attributes or {}).get("exception.type")).rsplit(".", 1)[-1]
        for e in ready_api.events
        if e.name == "exception"
    ]
    assert types == ["TimeoutError" if probe == "times out" else "TypeError"]
    assert isinstance(cause, TimeoutError if probe == "times out" else TypeError)
    assert ready_api.parent.span_id == finished["start api"].context.span_id
    assert ready_api.start_time <= ready_api.end_time <= finished["stop api"].start_time


@pytest.mark.anyio
async def test_a_failed_readiness_has_an_error_ready_span_on_the_timeline() -> None:
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @orch.service(ready=BROKEN, critical=False)
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"

    async with orch.start() as running:
        assert isinstance(running.failed["api"], TypeError)
    ready = [s for s in running.timeline if s.kind == "ready"]
    assert [(s.name, s.status) for s in ready] == [("api", "error")]
    assert ready[0].start <= ready[0].end
    rendered = {(s["name"], s["kind"]): s["status"] for s in running.timeline.to_dict()["spans"]}
    assert rendered["api", "ready"] == "error"


# -- 2. a stray CancelledError in a task of the service's own task group ---------------------
STRAY = pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (trio has none)
if sys.version_info < (3, 11):  # pragma: no cover
    STRAY = pytest.mark.skip(reason="Python 3.10: no Task.cancelling() to tell one")


async def _await_a_cancelled_future() -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.cancel()  # by someone else: a driver's connection closed under it, say
    await future


@pytest.mark.anyio
@STRAY
async def test_a_stray_cancellation_in_a_service_s_own_task_is_a_crash_that_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It was a bare RuntimeError("service 'db' ended while running"): nothing said why.
    # (anyio's task group drops the task's CancelledError: it cannot be the cause; the
    # message says where to look.)
    orch, lines, go = pk.Orchestrator(), [], anyio.Event()

    @orch.service
    async def db() -> AsyncIterator[str]:
        async with anyio.create_task_group() as tg:

            async def refresh() -> None:
                await go.wait()
                await _await_a_cancelled_future()

            tg.start_soon(refresh)
            yield "db"
        lines.append("db down")

    @orch.service
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        lines.append("api down")

    running: Any = None
    with pytest.raises(RuntimeError) as info:
        async with orch.start() as running:
            go.set()
            await anyio.sleep_forever()
    message = str(info.value)
    assert message.startswith("service 'db' ended while running: its own task group")
    assert "CancelledError" in message
    assert lines == ["db down", "api down"]  # torn down at the crash, then the rest
    assert running.state("db") == "crashed"
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []  # raised, once
