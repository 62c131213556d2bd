"""Fault review 8 of ``parallelkit.otel``: early tear-downs, rollbacks, and misuse.

1. A service torn down before the shutdown reached it (it crashed while running, or
   it reached its ``yield`` and never became ready) has, on the ``Timeline``, a
   ``"stop"`` span with the times of that tear-down. Its ``stop <service>``
   OpenTelemetry span must say the same: it began where the shutdown reached the
   service, however long before the tear-down had ended. Virtual time: exact times.
2. A rollback's ``shutdown`` span nests under the ``startup`` span whose failure it
   undoes (the start-up is not over until its rollback is: the ``StartupError``
   comes after it), and says that it is one (``parallelkit.rollback``).
3. What a user does to the plugin: ``instrument()`` twice, a provider shut down, a
   sampler that records nothing, huge names, a flow run in another thread, many
   runs at once in one task group. The work goes on and the spans nest right.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

pytest.importorskip("opentelemetry.sdk")

import contextlib

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode

import parallelkit as pk
from parallelkit._core import instrument
from parallelkit.otel import ParallelkitInstrumentor
from tests.virtual_time import run_virtual

from .orch_helpers import crashing, exception_types, finished

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup  # type: ignore[import-not-found,unused-ignore]

pytest_plugins = ["tests.orch_helpers.spans"]

BACKENDS = ["asyncio", "trio"]
NS = 1e9


# -- 1. the stop spans of tear-downs that ran before the shutdown reached them ---------------
def crash_and_stop(backend: str) -> dict[str, pk.Span]:
    """Run ``crashing``: db crashes, everything stops. The "stop" spans of the timeline."""
    orch, crash = pk.Orchestrator(), anyio.Event()
    crashing(orch, crash)
    seen: dict[str, dict[str, pk.Span]] = {}

    async def main() -> None:
        with pytest.raises(ConnectionError):
            async with orch.start() as running:
                crash.set()
                await anyio.sleep_forever()
        seen["timeline"] = {s.name: s for s in running.timeline if s.kind == "stop"}

    run_virtual(main, backend)
    return seen["timeline"]


def duration(span: ReadableSpan) -> float:
    assert span.start_time is not None
    assert span.end_time is not None
    return (span.end_time - span.start_time) / NS


def began(span: ReadableSpan, since: ReadableSpan) -> float:
    assert span.start_time is not None
    assert since.start_time is not None
    return (span.start_time - since.start_time) / NS


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_crashed_services_stop_span_has_the_times_of_its_tear_down(
    backend: str, exporter: InMemorySpanExporter
) -> None:
    # db's tear-down ran 0 .. 3 s after the crash; the shutdown reached db at 10 s,
    # after api's stop: its span was 10 .. 10 s, a zero-length stop at the wrong time.
    timeline = crash_and_stop(backend)
    spans = finished(exporter)
    db, api = spans["stop db"], spans["stop api"]
    assert timeline["db"].end - timeline["db"].start == pytest.approx(3)  # the timeline's
    assert duration(db) == pytest.approx(3)
    assert began(db, api) == pytest.approx(0, abs=1e-6)  # at the crash, as api's stop
    assert duration(api) == pytest.approx(10)
    # as before: the crash is on it, ERROR, and the shutdown's failures count it
    assert db.status.status_code is StatusCode.ERROR
    assert exception_types(db) == ["ConnectionError"]
    assert (db.attributes or {})["parallelkit.status"] == "error"
    assert (db.attributes or {})["parallelkit.wait.dependencies"] >= 0  # never negative
    assert (spans["shutdown"].attributes or {})["parallelkit.failures"] == 1
    assert db.parent == spans["shutdown"].context


def unready(orch: pk.Orchestrator) -> None:
    """api (not critical) fails its probe at 1 s, and its tear-down takes 2 s."""

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        await anyio.sleep(4)

    @orch.service(ready=lambda _: False, timeout=1, stop_timeout=30, critical=False)
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        await anyio.sleep(2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unready_services_stop_span_has_the_times_of_its_tear_down(
    backend: str, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    # api's tear-down ran 1 .. 3 s into the start; the shutdown reached it at 3 s.
    orch = pk.Orchestrator()
    unready(orch)

    async def main() -> None:
        async with orch.start() as running:
            assert isinstance(running.failed["api"], TimeoutError)

    anyio.run(main, backend=backend, backend_options=virtual(backend))
    spans = finished(exporter)
    api, db = spans["stop api"], spans["stop db"]
    assert duration(api) == pytest.approx(2)
    assert began(db, api) == pytest.approx(2)  # after it, in reverse order, as before
    assert duration(db) == pytest.approx(4)
    assert api.status.status_code is StatusCode.UNSET  # its tear-down went well
    assert (api.attributes or {})["parallelkit.wait.dependencies"] == 0  # not negative
    assert (spans["shutdown"].attributes or {})["parallelkit.rollback"] is False


def virtual(backend: str) -> dict[str, Any]:
    """anyio.run's backend options for virtual time (warnings allowed)."""
    import trio.testing

    from tests.virtual_time import VirtualLoop

    if backend == "trio":
        return {"clock": trio.testing.MockClock(autojump_threshold=0)}
    return {"loop_factory": VirtualLoop}


@pytest.mark.anyio
async def test_a_stop_span_whose_tear_down_raised_keeps_its_error(
    exporter: InMemorySpanExporter,
) -> None:
    # the tear-down's error (raised in the stop) is recorded on the stop span, at its end
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        raise OSError("disk gone")

    with pytest.raises(ExceptionGroup):
        async with orch.start():
            pass
    stop = finished(exporter)["stop db"]
    assert stop.status.status_code is StatusCode.ERROR
    assert exception_types(stop) == ["OSError"]
    (event,) = stop.events
    assert stop.start_time is not None
    assert stop.end_time is not None
    assert stop.start_time <= event.timestamp <= stop.end_time


# -- 2. a rollback nests under its start-up, and says it is one -------------------------------
@pytest.mark.anyio
async def test_a_rollback_is_marked_as_one(exporter: InMemorySpanExporter) -> None:
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @orch.service
    async def http(db: str) -> str:
        raise OSError("port in use")

    with pytest.raises(pk.StartupError):
        async with orch.start():
            pass  # pragma: no cover
    spans = finished(exporter)
    rollback, startup = spans["shutdown"], spans["startup"]
    assert rollback.parent == startup.context  # as before: part of the start-up
    assert (rollback.attributes or {})["parallelkit.rollback"] is True
    assert startup.end_time is not None
    assert rollback.end_time is not None
    assert rollback.end_time <= startup.end_time


@pytest.mark.anyio
async def test_a_stop_is_not_a_rollback(exporter: InMemorySpanExporter) -> None:
    orch = pk.Orchestrator(name="app")

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    async with orch.start():
        pass
    shutdown = finished(exporter)["shutdown app"]
    assert (shutdown.attributes or {})["parallelkit.rollback"] is False
    assert shutdown.parent is None  # a root, as the start-up: nothing was current


@pytest.mark.anyio
async def test_a_start_cancelled_from_outside_rolls_back_under_it(
    exporter: InMemorySpanExporter,
) -> None:
    orch = pk.Orchestrator()
    ready = anyio.Event()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @orch.service
    async def slow(db: str) -> AsyncIterator[str]:
        ready.set()
        await anyio.sleep_forever()
        yield "never"  # pragma: no cover

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:

            async def start() -> None:
                async with orch.start():
                    pass  # pragma: no cover

            tg.start_soon(start)
            await ready.wait()
            tg.cancel_scope.cancel()
    spans = finished(exporter)
    assert (spans["shutdown"].attributes or {})["parallelkit.rollback"] is True
    assert spans["shutdown"].parent == spans["startup"].context


# -- 3. what a user does to the plugin -------------------------------------------------------
def traced(**options: Any) -> tuple[TracerProvider, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(**options)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


@pytest.fixture
def instrumentor() -> Iterator[ParallelkitInstrumentor]:
    inst = ParallelkitInstrumentor()
    try:
        yield inst
    finally:
        if inst.is_instrumented_by_opentelemetry:
            inst.uninstrument()
        assert instrument.current is None


def payment_flow(fail: bool = False, tracer: trace.Tracer | None = None) -> pk.Flow:
    flow = pk.Flow(name="payment")
    tracer = tracer or trace.get_tracer("app")

    @flow.step
    async def charge(payment_id: str) -> str:
        await anyio.lowlevel.checkpoint()
        if fail:
            raise ValueError("card declined")
        return f"ch_{payment_id}"

    @flow.step
    async def record(charge: str) -> str:
        with tracer.start_as_current_span("INSERT payments"):
            await anyio.lowlevel.checkpoint()
        return charge

    return flow


def names(memory: InMemorySpanExporter) -> list[str]:
    return sorted(s.name for s in memory.get_finished_spans())


@pytest.mark.anyio
async def test_instrument_twice_keeps_the_first_providers(
    instrumentor: ParallelkitInstrumentor,
) -> None:
    first, first_memory = traced()
    second, second_memory = traced()
    instrumentor.instrument(tracer_provider=first)
    instrumentor.instrument(tracer_provider=second, item_spans=True)  # a warning, nothing more
    assert (await payment_flow().run(payment_id="p1"))["record"] == "ch_p1"
    assert await pk.map(echo, [1, 2]) == [1, 2]
    assert names(first_memory) == ["flow payment", "pk.map", "step charge", "step record"]
    assert names(second_memory) == []
    instrumentor.uninstrument()
    instrumentor.uninstrument()  # twice: harmless
    assert instrument.current is None


@pytest.mark.anyio
async def test_a_provider_shut_down_before_the_work_changes_nothing_for_it(
    instrumentor: ParallelkitInstrumentor,
) -> None:
    provider, memory = traced()
    instrumentor.instrument(tracer_provider=provider, item_spans=True)
    provider.shutdown()
    assert (await payment_flow().run(payment_id="p1"))["record"] == "ch_p1"
    with pytest.raises(ValueError, match="card declined"):  # the error, as itself
        await payment_flow(fail=True).run(payment_id="p1")
    assert await pk.map(echo, [1, 2]) == [1, 2]
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    async with orch.start() as running:
        assert running["db"] == "db"
    assert memory.get_finished_spans() == ()  # nothing exported after the shut-down


@pytest.mark.anyio
async def test_a_provider_shut_down_while_spans_are_open(
    instrumentor: ParallelkitInstrumentor,
) -> None:
    # spans started before the shut-down end after it: a batch processor that has shut
    # down drops them; the work goes on, and its errors come out as themselves
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(memory))
    instrumentor.instrument(tracer_provider=provider)
    flow = pk.Flow()

    @flow.step
    async def first() -> int:
        provider.shutdown()  # in the middle of the run
        return 1

    @flow.step
    async def second(first: int) -> int:
        raise LookupError(first)

    with pytest.raises(LookupError):
        await flow.run()
    assert await pk.map(echo, [1]) == [1]
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached


@pytest.mark.anyio
@pytest.mark.parametrize("item_spans", [False, True])
async def test_a_sampler_that_records_nothing(
    instrumentor: ParallelkitInstrumentor, item_spans: bool
) -> None:
    provider, memory = traced(sampler=ALWAYS_OFF)
    instrumentor.instrument(tracer_provider=provider, item_spans=item_spans)
    tracer = provider.get_tracer("app")
    seen: list[Any] = []
    flow = payment_flow()

    @flow.step
    async def notify(charge: str) -> None:
        seen.append(trace.get_current_span().get_span_context())

    with tracer.start_as_current_span("POST /payments") as request:
        assert (await flow.run(payment_id="p1"))["record"] == "ch_p1"
        with pytest.raises(ValueError, match="card declined"):
            await payment_flow(fail=True).run(payment_id="p2")
        with pytest.raises(LookupError):
            await pk.map(_fail, [1, 2], limit=1)
        assert trace.get_current_span() is request  # restored after each
    assert memory.get_finished_spans() == ()
    (step,) = seen
    assert step.trace_id == request.get_span_context().trace_id  # still the request's trace
    assert not step.trace_flags.sampled


async def echo(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return x


async def _fail(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    raise LookupError(x)


@pytest.mark.anyio
async def test_huge_names_and_long_runs_are_traced_within_the_span_limits(
    instrumentor: ParallelkitInstrumentor,
) -> None:
    provider, memory = traced(span_limits=SpanLimits(max_attribute_length=64))
    instrumentor.instrument(tracer_provider=provider)
    flow = pk.Flow(name="n" * 1_000_000)
    previous: str | None = None
    for index in range(300):  # a chain of 300 steps: the critical path names them all
        name = f"step_{index}_" + "x" * 10_000

        async def step(**kwargs: Any) -> int:
            await anyio.lowlevel.checkpoint()
            return len(kwargs)

        step.__signature__ = _signature(previous)  # type: ignore[attr-defined]
        flow.step(name=name)(step)
        previous = name
    await flow.run()
    run = next(s for s in memory.get_finished_spans() if s.name.startswith("flow "))
    attributes = run.attributes or {}
    assert attributes["parallelkit.nodes"] == 300
    path = attributes["parallelkit.critical_path"]
    assert isinstance(path, tuple)
    assert len(path) == 300
    assert all(len(p) <= 64 for p in path)  # the provider's limits apply
    assert len(str(attributes["parallelkit.name"])) == 64


def _signature(dependency: str | None) -> Any:
    import inspect

    if dependency is None:
        return inspect.Signature()
    kind = inspect.Parameter.KEYWORD_ONLY
    return inspect.Signature([inspect.Parameter(dependency, kind)])


@pytest.mark.anyio
async def test_a_flow_run_in_a_worker_thread_nests_under_the_request(
    instrumentor: ParallelkitInstrumentor,
) -> None:
    # anyio.to_thread copies the context into the thread: a flow run there (its own
    # event loop) nests under the request's span
    provider, memory = traced()
    instrumentor.instrument(tracer_provider=provider)
    tracer = provider.get_tracer("app")

    def in_thread() -> str:
        result = anyio.run(lambda: payment_flow(tracer=tracer).run(payment_id="t"))
        return str(result["record"])

    with tracer.start_as_current_span("request") as request:
        assert await anyio.to_thread.run_sync(in_thread) == "ch_t"
    spans = finished(memory)
    assert spans["flow payment"].parent == request.get_span_context()
    assert spans["INSERT payments"].parent == spans["step record"].context


def test_flows_in_threads_of_their_own_each_trace_on_their_own(
    instrumentor: ParallelkitInstrumentor,
) -> None:
    provider, memory = traced()
    instrumentor.instrument(tracer_provider=provider)
    tracer = provider.get_tracer("app")
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        async def main() -> None:
            with tracer.start_as_current_span(f"job {index}"):
                for _ in range(5):
                    await payment_flow().run(payment_id=str(index))

        try:
            anyio.run(main, backend=BACKENDS[index % 2])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    spans = memory.get_finished_spans()
    jobs = {s.context.span_id: s.name for s in spans if s.name.startswith("job ")}
    runs = [s for s in spans if s.name == "flow payment"]
    assert len(runs) == 20
    assert sorted(jobs[s.parent.span_id] for s in runs if s.parent) == sorted(
        f"job {i}" for i in range(4) for _ in range(5)
    )
    by_id = {s.context.span_id: s for s in spans}
    for span in spans:  # every step in its own run's trace
        if span.name.startswith("step "):
            assert span.parent is not None
            assert by_id[span.parent.span_id].name == "flow payment"
            assert span.context.trace_id == by_id[span.parent.span_id].context.trace_id


@pytest.mark.anyio
async def test_runs_at_once_in_one_task_group_keep_their_own_contexts(
    instrumentor: ParallelkitInstrumentor,
) -> None:
    provider, memory = traced()
    instrumentor.instrument(tracer_provider=provider, item_spans=True)
    tracer = provider.get_tracer("app")

    async def request(index: int) -> None:
        with tracer.start_as_current_span(f"request {index}") as span:
            for fail in (False, True):
                with contextlib.suppress(ValueError):
                    await payment_flow(fail=fail and index % 2 == 0).run(payment_id=str(index))
                assert trace.get_current_span() is span
            async with pk.imap(echo, range(10), limit=2) as results:
                async for _ in results:
                    break  # left early
            assert trace.get_current_span() is span

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for index in range(20):
                tg.start_soon(request, index)
    spans = memory.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}

    def root(span: ReadableSpan) -> str:
        while span.parent is not None:
            span = by_id[span.parent.span_id]
        return span.name

    for span in spans:
        if span.name.startswith(("flow", "step", "INSERT", "pk.imap")):
            assert root(span).startswith("request ")
            assert span.context.trace_id == by_id[span.parent.span_id].context.trace_id  # type: ignore[union-attr]
    assert len([s for s in spans if s.name == "flow payment"]) == 40


@pytest.mark.anyio
async def test_a_huge_limit_is_an_attribute_an_exporter_can_encode(
    instrumentor: ParallelkitInstrumentor,
) -> None:
    # limit=10**20 was the span's parallelkit.limit as is: beyond OpenTelemetry's
    # 64-bit integers, so an OTLP exporter fails the batch it is in (and every other
    # span of that batch). Any limit that large is never reached: the largest one.
    provider, memory = traced()
    instrumentor.instrument(tracer_provider=provider)
    assert await pk.map(echo, [1, 2], limit=10**20) == [1, 2]
    assert await pk.gather(echo(1), limit=2**63) == [1]
    flow = pk.Flow()

    @flow.step
    async def one() -> int:
        return 1

    assert (await flow.run(limit=10**20))["one"] == 1
    limits = [(s.attributes or {})["parallelkit.limit"] for s in memory.get_finished_spans()
              if s.name in ("pk.map", "pk.gather", "flow")]  # fmt: skip
    assert limits == [2**63 - 1] * 3


# -- 4. fail-fast: the steps it stopped, and those that never started --------------------------
@pytest.mark.anyio
async def test_a_fail_fast_run_shows_it_stopped_early(
    instrumentor: ParallelkitInstrumentor,
) -> None:
    # charge fails; notify (running beside it) is cancelled; record (on charge) never
    # starts: no span, as on the timeline. The run's span says it ended early.
    provider, memory = traced()
    instrumentor.instrument(tracer_provider=provider)
    flow = pk.Flow(name="payment")
    started = anyio.Event()

    @flow.step
    async def charge() -> str:
        await started.wait()
        raise ValueError("card declined")

    @flow.step
    async def record(charge: str) -> str:  # pragma: no cover - never starts
        return charge

    @flow.step
    async def notify() -> None:
        started.set()
        await anyio.sleep_forever()

    with anyio.fail_after(30), pytest.raises(ValueError, match="card declined"):
        await flow.run()
    spans = finished(memory)
    run = spans["flow payment"]
    assert run.status.status_code is StatusCode.ERROR
    assert exception_types(run) == ["ValueError"]
    assert (spans["step charge"].attributes or {})["parallelkit.status"] == "error"
    assert (spans["step notify"].attributes or {})["parallelkit.status"] == "cancelled"
    assert "step record" not in spans  # never started: no span
    attributes = run.attributes or {}
    assert (attributes["parallelkit.nodes"], attributes["parallelkit.failures"]) == (2, 1)
