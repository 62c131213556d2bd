"""Fault review 5: the Orchestrator's rollback errors, interrupts in set-up, bad input.

A tear-down that fails during a rollback reaches the user with its traceback, once;
a ``KeyboardInterrupt``-like error raised in a service's set-up shows as a failure in
the timeline's spans (not as "cancelled") and still comes out as itself; and the
cases a fresh fault review found. Events, counters and orders only: no elapsed time.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

from .test_orchestrator_faults4 import Interrupt, interrupted_at
from .virtual_time import run_virtual

pytestmark = pytest.mark.anyio


class RollbackFailed(Exception):
    pass


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("parallelkit") and r.exc_info]


# -- a rollback whose tear-down fails ------------------------------------------------------
def cache_cannot_stop(orch: pk.Orchestrator) -> RollbackFailed:
    """db, cache on db (its tear-down raises), payments on db (fails to start)."""
    error = RollbackFailed("cache could not flush")

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    starts: list[int] = []

    @orch.service
    async def cache(db: str) -> AsyncIterator[str]:
        starts.append(1)
        first = len(starts) == 1
        yield "cache"
        flush_cache_on_stop(error if first else RollbackFailed("again"))  # a new one

    @orch.service
    async def payments(db: str, cache: str) -> str:
        raise ConnectionError("payment provider unreachable")

    return error


def flush_cache_on_stop(error: RollbackFailed) -> None:
    raise error


async def test_a_rollback_error_reaches_the_user_with_its_traceback_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Only its repr was in the StartupError's message: its traceback (where the
    # tear-down failed) was printed nowhere, not logged and not in the StartupError's.
    caplog.set_level(logging.DEBUG)
    orch = pk.Orchestrator()
    error = cache_cannot_stop(orch)
    with pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pytest.fail("payments never starts")
    assert info.value.service == "payments"
    assert [e for _, e in info.value.teardown_errors] == [error]
    printed = "".join(traceback.format_exception(info.value))
    assert printed.count("in flush_cache_on_stop") == 1  # the tear-down's traceback, once
    assert "RollbackFailed: cache could not flush" in printed
    assert "ConnectionError: payment provider unreachable" in printed  # the cause, still
    assert error_records(caplog) == []  # raised to the user, so not also logged


async def test_a_rollback_error_of_a_second_failed_start_is_not_doubled() -> None:
    # Each start builds its own StartupError: the first one's traceback text is not
    # carried into the second.
    orch = pk.Orchestrator()
    cache_cannot_stop(orch)
    errors = []
    for _ in range(2):
        with pytest.raises(pk.StartupError) as info:
            async with orch.start():
                pytest.fail("payments never starts")
        errors.append(info.value)
    for err in errors:
        assert "".join(traceback.format_exception(err)).count("in flush_cache_on_stop") == 1


# -- a KeyboardInterrupt-like error in a service's set-up -------------------------------------
@pytest.fixture
def spans() -> Iterator[object]:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from parallelkit.otel import ParallelkitInstrumentor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    inst = ParallelkitInstrumentor()
    inst.instrument(tracer_provider=provider)
    try:
        yield exporter
    finally:
        inst.uninstrument()


async def what_comes_out(orch: pk.Orchestrator) -> BaseException | None:
    """What ``async with orch.start()`` raises (a start that must fail)."""
    try:
        with anyio.fail_after(20):  # a hang guard
            async with orch.start():
                pytest.fail("the start should have failed")
    except BaseException as exc:  # what came out is the point
        return exc
    return None  # pragma: no cover


@pytest.mark.parametrize("where", ["setup", "probe"])
async def test_an_interrupt_in_a_set_up_shows_as_a_failure_not_a_cancellation(
    spans: object, where: str
) -> None:
    # The start span of the service that raised it said "cancelled", as if a sibling's
    # failure had stopped it.
    from opentelemetry.trace import StatusCode

    orch, log, stop = interrupted_at(where)
    caught = await what_comes_out(orch)
    assert caught is stop, f"{caught!r} came out"  # still as itself
    assert log[-1] == "db down"
    finished = {s.name: s for s in spans.get_finished_spans()}  # type: ignore[attr-defined]
    started = finished["start api"]
    assert (started.attributes or {})["parallelkit.status"] == "error"
    assert started.status.status_code is StatusCode.ERROR
    assert (finished["start db"].attributes or {})["parallelkit.status"] == "ok"


async def test_an_interrupt_while_a_failed_start_rolls_back_loses_neither_error(
    spans: object, caplog: pytest.LogCaptureFixture
) -> None:
    # ``a`` failed; ``b``'s set-up, cancelled by that, raised a KeyboardInterrupt-like
    # error on its way out. On asyncio the interrupt was lost (a StartupError came out);
    # on trio the interrupt came out with a cancellation as its context, and ``a``'s
    # error was lost: not raised, not logged.
    orch = pk.Orchestrator()
    stop = Interrupt("b interrupted")
    failure = ConnectionError("a failed")
    b_waits = anyio.Event()

    @orch.service
    async def a() -> str:
        await b_waits.wait()
        raise failure

    @orch.service
    async def b() -> AsyncIterator[str]:
        try:
            b_waits.set()
            await anyio.sleep_forever()
        finally:
            raise stop  # the point of the test
        yield "b"  # pragma: no cover

    caught = await what_comes_out(orch)
    assert caught is stop, f"{caught!r} came out"
    context = caught.__context__
    assert isinstance(context, pk.StartupError), repr(context)  # ``a``'s failure, reachable
    assert context.service == "a"
    assert context.__cause__ is failure
    assert error_records(caplog) == []
    finished = {s.name: s for s in spans.get_finished_spans()}  # type: ignore[attr-defined]
    assert (finished["start a"].attributes or {})["parallelkit.status"] == "error"
    assert (finished["start b"].attributes or {})["parallelkit.status"] == "error"


# -- a start made before it is entered --------------------------------------------------------
def timed_orchestrator() -> pk.Orchestrator:
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        await anyio.sleep(1)
        yield "db"

    return orch


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_timeline_starts_when_the_start_is_entered(backend: str) -> None:
    # The timeline's origin was the moment ``orch.start()`` was called: a context
    # manager made, then entered 10 s later, said the start-up took 11 s.
    orch = timed_orchestrator()

    async def main() -> float:
        starting = orch.start()
        await anyio.sleep(10)
        async with starting as running:
            assert running.timeline.origin == anyio.current_time() - 1
            return running.timeline.total

    assert run_virtual(main, backend) == 1.0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_start_made_outside_the_event_loop_can_be_entered_in_it(backend: str) -> None:
    # ``orch.start()`` before ``anyio.run`` (an exit stack, a framework's lifespan
    # built at import) raised anyio's NoEventLoopError: the start read the clock.
    orch = timed_orchestrator()
    starting = orch.start()

    async def main() -> str:
        async with starting as running:
            return str(running["db"])

    assert run_virtual(main, backend) == "db"


def test_a_definition_error_is_still_raised_by_start_itself() -> None:
    orch = pk.Orchestrator()

    @orch.service
    async def api(db: str) -> str:
        return "api"

    with pytest.raises(pk.DefinitionError, match="needs 'db'"):
        orch.start()  # before any event loop, before anything starts


# -- bad input ------------------------------------------------------------------------------
def test_a_callable_without_a_name_is_told_to_pass_one() -> None:
    # An object with an async ``__call__`` has no ``__name__``: the error said
    # "service name must be an identifier str, got None", not what to do.
    class Client:
        async def __call__(self) -> str:
            return "client"

    orch = pk.Orchestrator()
    with pytest.raises(pk.DefinitionError, match=r"has no __name__.*name="):
        orch.service(Client())
    orch.service(name="client")(Client())  # with a name it is a service
    assert list(orch.services) == ["client"]
