"""Fault review 6: the Orchestrator's stop spans of crashed and unready services, and misuse.

A service that crashed while running was torn down when it crashed: its ``"stop"``
span says so (``"error"``, the crash recorded on its trace span; ``"cancelled"`` when
its ``stop_timeout`` cut that tear-down short), never ``"ok"``. A service that reached
its ``yield`` but failed to become ready was torn down in the rollback: it has a
``"stop"`` span too, its status by how that tear-down ended. Then the cases a fresh
fault review found. Events, counters and orders only: no elapsed time.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

from .orch_helpers import exception_types, finished

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup  # type: ignore[import-not-found,unused-ignore]

pytest_plugins = ["tests.orch_helpers.spans"]

pytestmark = pytest.mark.anyio

BACKENDS = ["asyncio", "trio"]


def stop_spans(timeline: pk.Timeline) -> dict[str, pk.Span]:
    return {s.name: s for s in timeline if s.kind == "stop"}


# -- 1. a service that crashed while running --------------------------------------------------
def crashing_db(
    orch: pk.Orchestrator, crash: anyio.Event, lines: list[str], *, hang: bool = False
) -> None:
    """db (its task group fails with ConnectionError on ``crash``), api on db."""

    @orch.service(stop_timeout=5)
    async def db() -> AsyncIterator[str]:
        try:
            async with anyio.create_task_group() as tg:

                async def die() -> None:
                    await crash.wait()
                    raise ConnectionError("db connection lost")

                tg.start_soon(die)
                yield "db"  # a crash is thrown in here
        finally:
            lines.append("db down")
            if hang:
                await anyio.sleep(60)  # its stop_timeout cuts it short

    @orch.service
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        lines.append("api down")


async def test_a_crashed_service_has_an_error_stop_span() -> None:
    # Its "stop" span said "ok": the crash that tore it down was nowhere in the timeline.
    orch, crash = pk.Orchestrator(), anyio.Event()
    lines: list[str] = []
    crashing_db(orch, crash, lines)
    running: Any = None
    with pytest.raises(ConnectionError, match="db connection lost"):  # reported as before
        async with orch.start() as running:
            crash.set()
            await anyio.sleep_forever()
    spans = stop_spans(running.timeline)
    assert spans["db"].status == "error"
    assert spans["api"].status == "ok"
    assert lines.count("db down") == 1  # torn down once, at the crash
    rendered = {(s["name"], s["kind"]): s["status"] for s in running.timeline.to_dict()["spans"]}
    assert rendered["db", "stop"] == "error"


async def test_a_non_critical_service_that_crashed_has_an_error_stop_span(
    caplog: pytest.LogCaptureFixture,
) -> None:
    orch, crash = pk.Orchestrator(), anyio.Event()

    @orch.service(critical=False)
    async def cache() -> AsyncIterator[str]:
        async with anyio.create_task_group() as tg:

            async def die() -> None:
                await crash.wait()
                raise ConnectionError("cache lost")

            tg.start_soon(die)
            yield "cache"

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    with caplog.at_level(logging.ERROR, logger="parallelkit.orchestrator"):
        async with orch.start() as running:
            crash.set()
            with anyio.fail_after(30):
                while running.state("cache") != "crashed":
                    await anyio.sleep(0.001)
    assert "service 'cache' crashed" in caplog.text  # logged, as before
    spans = stop_spans(running.timeline)
    assert (spans["cache"].status, spans["db"].status) == ("error", "ok")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_crashed_service_whose_tear_down_was_cut_short_has_a_cancelled_stop_span(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    orch, crash = pk.Orchestrator(), anyio.Event()
    lines: list[str] = []
    crashing_db(orch, crash, lines, hang=True)
    seen: dict[str, pk.Span] = {}

    async def main() -> None:
        with pytest.raises(ConnectionError):
            async with orch.start() as running:
                crash.set()
                await anyio.sleep_forever()
        seen.update(stop_spans(running.timeline))

    with caplog.at_level(logging.WARNING, logger="parallelkit.orchestrator"):
        anyio.run(main, backend=backend, backend_options=_virtual(backend))
    assert "did not stop within stop_timeout=5s" in caplog.text
    assert seen["db"].status == "cancelled"


def _virtual(backend: str) -> dict[str, Any]:
    import trio.testing

    from .virtual_time import VirtualLoop

    if backend == "trio":
        return {"clock": trio.testing.MockClock(autojump_threshold=0)}
    return {"loop_factory": VirtualLoop}


async def test_a_crashed_service_has_an_error_otel_span_with_the_crash(exporter: Any) -> None:
    from opentelemetry.trace import StatusCode

    orch, crash = pk.Orchestrator(), anyio.Event()
    lines: list[str] = []
    crashing_db(orch, crash, lines)
    with pytest.raises(ConnectionError):
        async with orch.start():
            crash.set()
            await anyio.sleep_forever()
    spans = finished(exporter)
    db = spans["stop db"]
    assert (db.attributes or {})["parallelkit.status"] == "error"
    assert db.status.status_code is StatusCode.ERROR
    assert exception_types(db) == ["ConnectionError"]
    assert (spans["stop api"].attributes or {})["parallelkit.status"] == "ok"


# -- 2. a service that failed to become ready -------------------------------------------------
async def test_a_service_that_timed_out_becoming_ready_has_a_stop_span(exporter: Any) -> None:
    # Its tear-down ran in the rollback, but the rollback's trace had no "stop" span for
    # it (a failed start's timeline is seen through its trace only).
    orch, lines = pk.Orchestrator(), []

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        lines.append("db down")

    @orch.service(ready=lambda _: False, timeout=0.05)
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        lines.append("api down")

    with pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pytest.fail("api is never ready")  # pragma: no cover
    assert info.value.service == "api"
    assert isinstance(info.value.__cause__, TimeoutError)
    assert lines == ["api down", "db down"]
    spans = finished(exporter)
    api_stop, db_stop = spans["stop api"], spans["stop db"]
    assert (api_stop.attributes or {})["parallelkit.status"] == "ok"
    assert (db_stop.attributes or {})["parallelkit.status"] == "ok"
    assert db_stop.start_time >= api_stop.end_time  # in reverse order
    shutdown = spans["shutdown"].context.span_id
    assert api_stop.parent.span_id == db_stop.parent.span_id == shutdown


async def test_an_unready_service_whose_tear_down_raised_has_an_error_otel_span(
    exporter: Any,
) -> None:
    from opentelemetry.trace import StatusCode

    orch = pk.Orchestrator()
    boom = OSError("api would not close")

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @orch.service(ready=lambda _: False, timeout=0.05)
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        raise boom

    with pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pytest.fail("api is never ready")  # pragma: no cover
    assert info.value.teardown_errors == (("api", boom),)  # reported as before, once
    spans = finished(exporter)
    api_stop = spans["stop api"]
    assert (api_stop.attributes or {})["parallelkit.status"] == "error"
    assert api_stop.status.status_code is StatusCode.ERROR
    assert exception_types(api_stop) == ["OSError"]
    assert (spans["stop db"].attributes or {})["parallelkit.status"] == "ok"


async def test_a_service_that_failed_before_its_yield_has_no_stop_span(exporter: Any) -> None:
    # nothing was torn down: no span says it was
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @orch.service
    async def api(db: str) -> AsyncIterator[str]:
        if db:
            raise ValueError("no config")
        yield "api"  # pragma: no cover

    with pytest.raises(pk.StartupError):
        async with orch.start():
            pytest.fail("api never starts")  # pragma: no cover
    spans = finished(exporter)
    assert "stop api" not in spans
    assert "stop db" in spans


# -- 3. a set-up that reached its yield after its timeout ran out -----------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_set_up_that_overran_its_timeout_in_a_shielded_scope_fails_the_start(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # It counted as ready, then "ended while running" (a RuntimeError that named no
    # cause) at its first await, its code after yield never run, and a warning that
    # blamed its stop_timeout.
    orch, lines = pk.Orchestrator(), []
    seen: dict[str, Any] = {}

    @orch.service(timeout=1)
    async def db() -> AsyncIterator[str]:
        with anyio.CancelScope(shield=True):  # a connect that must not be left half-open
            await anyio.sleep(2)
        yield "db"
        lines.append("db down")
        await anyio.lowlevel.checkpoint()  # cut short here: its timeout ran out
        lines.append("db down, after an await")  # pragma: no cover

    @orch.service
    async def api(db: str) -> str:
        lines.append("api started")  # pragma: no cover
        return "api"  # pragma: no cover

    async def main() -> None:
        with pytest.raises(pk.StartupError) as info:
            async with orch.start():
                pytest.fail("db is not ready")  # pragma: no cover
        seen["error"] = info.value

    with caplog.at_level(logging.WARNING, logger="parallelkit.orchestrator"):
        anyio.run(main, backend=backend, backend_options=_virtual(backend))
    error = seen["error"]
    assert error.service == "db"
    assert isinstance(error.__cause__, TimeoutError)
    assert "did not finish its set-up within 1s" in str(error.__cause__)
    assert lines == ["db down"]  # the code after yield ran, once, as a normal exit
    assert "overran its timeout" in caplog.text
    assert "stop_timeout" not in caplog.text  # not blamed on the stop


async def test_a_set_up_without_an_await_and_a_timeout_below_the_clock_s_step_fails_the_start() -> (
    None
):
    # timeout=1e-12: the deadline has passed when its scope is entered (on the real clock).
    orch, lines = pk.Orchestrator(), []

    @orch.service(timeout=1e-12)
    async def db() -> AsyncIterator[str]:
        yield "db"
        lines.append("db down")

    with pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pytest.fail("db is not ready")  # pragma: no cover
    assert isinstance(info.value.__cause__, TimeoutError)
    assert lines == ["db down"]


# -- 4. process definitions: a wrong value is refused at the door -----------------------------
@pytest.mark.parametrize(
    ("cmd", "match"),
    [
        ([""], r"cmd\[0\] \(the program\) must not be empty"),
        (["  ", "-v"], r"cmd\[0\] \(the program\) must not be empty"),
        (["python", "a\0b"], r"cmd\[1\] must not contain a NUL byte"),
        ("echo \0", "cmd must not contain a NUL byte"),
    ],
)
def test_a_process_command_with_a_bad_value_is_a_value_error_at_the_door(
    cmd: object, match: str
) -> None:
    # It was accepted, and the start failed later with a PermissionError on '' or a
    # bare "embedded null byte" that named no argument.
    with pytest.raises(ValueError, match=match):
        pk.Orchestrator().process("web", cmd)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"env": {"": "1"}}, "env: a variable name must not be empty"),
        ({"env": {"A=B": "1"}}, "env: variable name 'A=B' must not contain '='"),
        ({"env": {"A\0": "1"}}, "env: variable name .* must not contain a NUL byte"),
        ({"env": {"A": "1\0"}}, "env: the value of 'A' must not contain a NUL byte"),
        ({"cwd": "/tmp\0x"}, "cwd must not contain a NUL byte"),
    ],
)
def test_a_process_env_or_cwd_with_a_bad_value_is_a_value_error_at_the_door(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        pk.Orchestrator().process("web", "true", **kwargs)


# -- 5. asyncio: a CancelledError that no cancellation caused (a future cancelled elsewhere) ---
STRAY = pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (trio has none)
if sys.version_info < (3, 11):  # pragma: no cover
    STRAY = pytest.mark.skip(reason="Python 3.10: no Task.cancelling() to tell one")


async def _await_a_cancelled_future() -> None:
    import asyncio

    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.cancel()  # by someone else: a driver's connection closed under it, say
    await future


@STRAY
async def test_a_stray_cancellation_in_a_set_up_is_a_startup_error_naming_the_service() -> None:
    # It left ``async with orch.start()`` as a bare RuntimeError("generator didn't
    # yield") that named no service (the stray cancellation had ended the start).
    orch, lines = pk.Orchestrator(), []

    @orch.service
    async def cache() -> AsyncIterator[str]:
        yield "cache"
        lines.append("cache down")

    @orch.service
    async def db(cache: str) -> AsyncIterator[str]:
        await _await_a_cancelled_future()
        yield "db"  # pragma: no cover

    with pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pytest.fail("db never starts")  # pragma: no cover
    assert info.value.service == "db"
    cause = info.value.__cause__
    assert isinstance(cause, RuntimeError)
    assert "CancelledError" in str(cause)
    assert type(cause.__cause__).__name__ == "CancelledError"  # the original, reachable
    assert lines == ["cache down"]  # rolled back


@STRAY
async def test_a_stray_cancellation_in_a_tear_down_is_a_tear_down_error() -> None:
    # It was lost: the stop said nothing and the "stop" span said "ok".
    orch, lines = pk.Orchestrator(), []

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        lines.append("db down")

    @orch.service
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        await _await_a_cancelled_future()

    running: Any = None
    with pytest.raises(ExceptionGroup) as info:
        async with orch.start() as running:
            pass
    (error,) = info.value.exceptions
    assert isinstance(error, RuntimeError)
    assert "CancelledError" in str(error)
    assert [name for name, _ in running.teardown_errors] == ["api"]
    assert lines == ["db down"]  # the others still stop
    assert stop_spans(running.timeline)["api"].status == "error"


# -- 6. a process that had to be killed after its stop_timeout --------------------------------
@pytest.mark.slow
async def test_a_process_killed_after_its_stop_timeout_has_a_cancelled_stop_span(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It said "ok", while a forced stop's SIGKILL said "cancelled".
    said: list[str] = []
    orch = pk.Orchestrator(output=lambda name, stream, line: said.append(name))
    deaf = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    orch.process(  # ready once it ignores SIGTERM
        "deaf", [sys.executable, "-c", deaf], stop_timeout=0.2, ready=lambda: "deaf" in said
    )
    orch.process("polite", [sys.executable, "-c", "import time; time.sleep(60)"])
    with caplog.at_level(logging.WARNING):
        async with orch.start() as running:
            pass
    assert running["deaf"].returncode == -9  # killed
    assert running["polite"].returncode == -15  # stopped by its SIGTERM
    assert "did not exit within stop_timeout=0.2s" in caplog.text  # logged, as before
    spans = stop_spans(running.timeline)
    assert (spans["deaf"].status, spans["polite"].status) == ("cancelled", "ok")
