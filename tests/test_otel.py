"""parallelkit.otel: spans for fan-out, flows and start-up; cache, limiter, batch metrics.

Everything is checked with the OpenTelemetry SDK's in-memory exporter and metric
reader, on asyncio and trio. Times are only compared on trio's virtual clock.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import parallelkit as pk
from parallelkit._core import instrument
from parallelkit.otel import ParallelkitInstrumentor

from .test_fanout import virtual_clock

pytestmark = pytest.mark.anyio


@dataclass
class Otel:
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    provider: TracerProvider
    meters: MeterProvider

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, f"{name}: {[s.name for s in self.spans]}"
        return found[0]

    def children(self, parent: ReadableSpan) -> list[str]:
        return sorted(s.name for s in self.spans if s.parent == parent.context)

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        return list(metric.data.data_points)
        return []

    def value(self, name: str) -> int:
        points = self.points(name)
        assert len(points) == 1, f"{name}: {points}"
        return int(points[0].value)


def make_otel() -> Otel:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    return Otel(exporter, reader, provider, MeterProvider(metric_readers=[reader]))


@pytest.fixture
def instrumentor() -> Iterator[ParallelkitInstrumentor]:
    """The instrumentor, uninstrumented again after the test whatever happened."""
    inst = ParallelkitInstrumentor()
    try:
        yield inst
    finally:
        if inst.is_instrumented_by_opentelemetry:
            inst.uninstrument()
        assert instrument.current is None


@pytest.fixture
def otel(instrumentor: ParallelkitInstrumentor) -> Otel:
    o = make_otel()
    instrumentor.instrument(tracer_provider=o.provider, meter_provider=o.meters)
    return o


@pytest.fixture
def item_otel(instrumentor: ParallelkitInstrumentor) -> Otel:
    o = make_otel()
    instrumentor.instrument(tracer_provider=o.provider, meter_provider=o.meters, item_spans=True)
    return o


def app_span(otel: Otel, name: str) -> Any:
    """A span of the application's own (say, an HTTP request's), made current."""
    return otel.provider.get_tracer("app").start_as_current_span(name)


async def double(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return 2 * x


async def fail_on_two(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    if x == 2:
        raise ValueError("two")
    return x


# ------------------------------------------------------------------------------ fan-out
async def test_map_is_one_span_under_the_current_one(otel: Otel) -> None:
    tracer = otel.provider.get_tracer("app")

    async def work(x: int) -> int:
        with tracer.start_as_current_span(f"fetch {x}"):  # the user's own span
            await anyio.lowlevel.checkpoint()
        return x

    with app_span(otel, "request"):
        assert await pk.map(work, range(5), limit=2) == [0, 1, 2, 3, 4]
    request, call = otel.one("request"), otel.one("pk.map")
    assert call.parent == request.context
    assert dict(call.attributes or {}) == {
        "parallelkit.settle": False,
        "parallelkit.limit": 2,
        "parallelkit.items": 5,
        "parallelkit.failures": 0,
    }
    assert call.status.status_code is StatusCode.UNSET
    # no item spans unless asked; the items' own spans are children of the call
    assert otel.children(call) == [f"fetch {x}" for x in range(5)]


async def test_gather_settle_counts_failures(otel: Otel) -> None:
    outcomes = await pk.gather(*(fail_on_two(x) for x in range(4)), settle=True)
    assert [o.ok for o in outcomes] == [True, True, False, True]
    call = otel.one("pk.gather")
    assert call.attributes is not None
    assert call.attributes["parallelkit.items"] == 4
    assert call.attributes["parallelkit.failures"] == 1
    assert "parallelkit.limit" not in call.attributes
    assert call.status.status_code is StatusCode.UNSET  # the call itself succeeded
    assert otel.children(call) == []


async def test_fail_fast_records_the_error(otel: Otel) -> None:
    with pytest.raises(ValueError, match="two"):
        await pk.map(fail_on_two, range(4), limit=1)
    call = otel.one("pk.map")
    assert call.status.status_code is StatusCode.ERROR
    assert call.attributes is not None
    assert call.attributes["parallelkit.failures"] == 1
    (event,) = call.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"


async def test_imap_is_one_span_and_its_items_see_it(otel: Otel) -> None:
    tracer = otel.provider.get_tracer("app")

    async def work(x: int) -> int:
        with tracer.start_as_current_span("inner"):
            await anyio.lowlevel.checkpoint()
        return x

    with app_span(otel, "request"):
        async with pk.imap(work, range(4), limit=2, ordered=True) as results:
            assert [r async for r in results] == [0, 1, 2, 3]
    call = otel.one("pk.imap")
    assert call.parent == otel.one("request").context
    assert call.attributes is not None
    assert call.attributes["parallelkit.items"] == 4
    assert call.attributes["parallelkit.limit"] == 2
    assert otel.children(call) == ["inner"] * 4


async def test_imap_settle_counts_failures(otel: Otel) -> None:
    async with pk.imap(fail_on_two, range(4), settle=True) as results:
        outcomes = [r async for r in results]
    assert sum(not o.ok for o in outcomes) == 1
    call = otel.one("pk.imap")
    assert call.attributes is not None
    assert call.attributes["parallelkit.failures"] == 1


async def test_item_spans_only_when_asked(item_otel: Otel) -> None:
    with pytest.raises(ValueError, match="two"):
        await pk.map(fail_on_two, range(3), limit=1)
    call = item_otel.one("pk.map")
    items = item_otel.named("pk.map item")
    assert [s.parent for s in items] == [call.context] * 3
    assert [(s.attributes or {})["parallelkit.item"] for s in items] == [0, 1, 2]
    failed = [s for s in items if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    assert failed[0].events[0].name == "exception"
    await pk.gather(double(1), double(2))
    assert len(item_otel.named("pk.gather item")) == 2


# ------------------------------------------------------------------------------ Flow
def payment_flow(tracer: trace.Tracer, unit: float = 0.001) -> pk.Flow:
    """charge (1 unit), then record (0.5: two child tasks) and notify (2) in parallel."""
    flow = pk.Flow(name="payment")

    @flow.step
    async def charge(payment_id: str) -> str:
        await anyio.sleep(unit)
        return f"ch_{payment_id}"

    @flow.step
    async def record(charge: str) -> str:
        async def child(n: int) -> None:  # child tasks see the step's span
            with tracer.start_as_current_span(f"insert {n}"):
                await anyio.sleep(0.5 * unit)

        async with anyio.create_task_group() as tg:
            tg.start_soon(child, 1)
            tg.start_soon(child, 2)
        return f"rec_{charge}"

    @flow.step
    async def notify(charge: str) -> None:
        await anyio.sleep(2 * unit)

    return flow


async def test_flow_run_and_its_steps_nest(otel: Otel) -> None:
    flow = payment_flow(otel.provider.get_tracer("app"))
    with app_span(otel, "request"):
        result = await flow.run(payment_id="p1")
    run = otel.one("flow payment")
    assert run.parent == otel.one("request").context
    assert otel.children(run) == ["step charge", "step notify", "step record"]
    record = otel.one("step record")
    assert otel.children(record) == ["insert 1", "insert 2"]
    attributes = record.attributes or {}
    assert attributes["parallelkit.step"] == "record"
    assert attributes["parallelkit.status"] == "ok"
    assert attributes["parallelkit.waited_for"] == ("charge",)
    assert attributes["parallelkit.wait.limit"] == 0.0
    assert run.attributes is not None
    assert run.attributes["parallelkit.nodes"] == 3
    assert run.attributes["parallelkit.failures"] == 0
    path = [s.name for s in result.timeline.critical_path()]
    assert run.attributes["parallelkit.critical_path"] == tuple(path)


@virtual_clock()
async def test_flow_span_times_and_waits_are_the_timelines() -> None:
    o = make_otel()
    inst = ParallelkitInstrumentor()
    inst.instrument(tracer_provider=o.provider, meter_provider=o.meters)
    try:
        flow = payment_flow(o.provider.get_tracer("app"), unit=1.0)
        result = await flow.run(payment_id="p1", limit=1)
    finally:
        inst.uninstrument()
    timeline = result.timeline
    for name in ("charge", "record", "notify"):
        span, step = o.one(f"step {name}"), timeline[name]
        assert span.end_time is not None
        assert span.start_time is not None
        assert (span.end_time - span.start_time) / 1e9 == pytest.approx(step.duration, abs=1e-6)
        attributes = span.attributes or {}
        assert attributes["parallelkit.wait.limit"] == pytest.approx(step.wait, abs=1e-6)
        waited = step.queued - timeline.origin
        assert attributes["parallelkit.wait.dependencies"] == pytest.approx(waited, abs=1e-6)
    # limit=1: charge (1 s), then record and notify one after the other
    notify, record = timeline["notify"], timeline["record"]
    assert notify.queued - timeline.origin == pytest.approx(1.0)
    first, second = sorted((notify, record), key=lambda s: s.start)
    assert first.wait == 0.0
    assert second.wait == pytest.approx(first.duration)  # waited for the one slot
    assert second.wait > 0
    run = o.one("flow payment")
    assert run.attributes is not None
    assert run.attributes["parallelkit.limit"] == 1
    assert run.end_time is not None
    assert run.start_time is not None
    assert (run.end_time - run.start_time) / 1e9 == pytest.approx(timeline.total, abs=1e-6)


async def test_flow_fail_fast_marks_the_failing_step(otel: Otel) -> None:
    flow = pk.Flow()

    @flow.step
    async def slow() -> None:
        await anyio.sleep_forever()

    @flow.step
    async def broken() -> None:
        await anyio.lowlevel.checkpoint()
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await flow.run()
    run = otel.one("flow")
    assert run.status.status_code is StatusCode.ERROR
    assert otel.one("step broken").status.status_code is StatusCode.ERROR
    assert otel.one("step broken").events[0].name == "exception"
    cancelled = otel.one("step slow")
    assert cancelled.status.status_code is StatusCode.UNSET
    assert (cancelled.attributes or {})["parallelkit.status"] == "cancelled"


async def test_flow_settle_counts_failures_and_skips(otel: Otel) -> None:
    flow = pk.Flow(name="f")

    @flow.step
    async def first() -> int:
        raise ValueError("no")

    @flow.step
    async def second(first: int) -> int:
        return first

    @flow.step
    async def other() -> int:
        return 1

    outcomes = await flow.run(settle=True)
    assert not outcomes.ok
    run = otel.one("flow f")
    assert run.status.status_code is StatusCode.UNSET
    assert run.attributes is not None
    assert run.attributes["parallelkit.failures"] == 1
    assert run.attributes["parallelkit.skipped"] == 1
    skipped = otel.one("step second")
    assert (skipped.attributes or {})["parallelkit.status"] == "skipped"
    assert skipped.parent == run.context


# ------------------------------------------------------------------------------ Orchestrator
def crm_orchestrator(tracer: trace.Tracer) -> pk.Orchestrator:
    orch = pk.Orchestrator(name="crm", output="logging")
    ready = {"now": False}

    @orch.service
    async def db() -> AsyncIterator[str]:
        with tracer.start_as_current_span("connect"):  # in the service's own task
            await anyio.sleep(0.001)
        yield "engine"

    @orch.service
    async def cache(db: str) -> AsyncIterator[str]:
        yield "cache"
        with tracer.start_as_current_span("flush"):  # the tear-down: the same task
            await anyio.lowlevel.checkpoint()

    async def probe() -> bool:
        ready["now"] = not ready["now"]  # fails once, then passes
        return not ready["now"]

    @orch.service(ready=pk.probes.call(probe))
    async def http(db: str, cache: str) -> AsyncIterator[str]:
        yield "http"

    return orch


async def test_orchestrator_startup_and_shutdown(otel: Otel) -> None:
    orch = crm_orchestrator(otel.provider.get_tracer("app"))
    with app_span(otel, "lifespan"):
        async with orch.start() as running:
            startup = otel.one("startup crm")
            assert otel.named("shutdown crm") == []
        assert running["http"] == "http"
    lifespan = otel.one("lifespan")
    assert startup.parent == lifespan.context
    assert otel.children(startup) == ["start cache", "start db", "start http"]
    assert otel.children(otel.one("start db")) == ["connect"]  # set-up spans nest
    # a tear-down runs in the task that set the service up: its spans nest there too
    assert otel.children(otel.one("start cache")) == ["flush"]
    assert otel.children(otel.one("start http")) == ["ready http"]
    http = otel.one("start http").attributes or {}
    assert http["parallelkit.service"] == "http"
    assert sorted(http["parallelkit.waited_for"]) == ["cache", "db"]
    assert startup.attributes is not None
    assert startup.attributes["parallelkit.critical_path"] == tuple(
        s.name for s in running.timeline.critical_path(kind="start")
    )
    shutdown = otel.one("shutdown crm")
    assert shutdown.parent == lifespan.context
    assert otel.children(shutdown) == ["stop cache", "stop db", "stop http"]
    assert (otel.one("stop db").attributes or {})["parallelkit.waited_for"] == ("cache", "http")


async def test_orchestrator_startup_failure(otel: Otel) -> None:
    orch = pk.Orchestrator(output="logging")

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "engine"

    @orch.service
    async def http(db: str) -> str:
        raise OSError("port in use")

    with pytest.raises(pk.StartupError):
        async with orch.start():
            pass  # pragma: no cover
    startup = otel.one("startup")
    assert startup.status.status_code is StatusCode.ERROR
    assert otel.one("start http").status.status_code is StatusCode.ERROR
    rollback = otel.one("shutdown")  # the rollback is part of the start-up
    assert rollback.parent == startup.context
    assert otel.children(rollback) == ["stop db"]


# ------------------------------------------------------------------------------ metrics
async def test_cache_metrics(otel: Otel) -> None:
    now = [0.0]
    cache = pk.SWRCache(fresh=10, stale=10, clock=lambda: now[0])
    refreshed = anyio.Event()

    async def load(key: str) -> str:
        if key == "bad":
            raise LookupError(key)
        if now[0] > 0:
            refreshed.set()
        return key.upper()

    async with cache:
        assert await cache.get("a", load) == "A"  # miss
        assert await cache.get("a", load) == "A"  # hit
        assert await cache.get("a", load) == "A"  # hit
        with pytest.raises(LookupError):
            await cache.get("bad", load)  # miss, load error
        now[0] = 15.0
        assert await cache.get("a", load) == "A"  # stale: served, refreshed
        await refreshed.wait()
    assert otel.value("parallelkit.cache.hits") == 2
    assert otel.value("parallelkit.cache.misses") == 2
    assert otel.value("parallelkit.cache.stale_hits") == 1
    assert otel.value("parallelkit.cache.refreshes") == 1
    assert otel.value("parallelkit.cache.load_errors") == 1
    assert otel.value("parallelkit.cache.refresh_errors") == 0


async def test_cache_counts_start_at_instrument(instrumentor: ParallelkitInstrumentor) -> None:
    cache = pk.SWRCache()
    await cache.get("a", double_key)
    await cache.get("a", double_key)  # a hit before instrumenting: not counted
    o = make_otel()
    instrumentor.instrument(tracer_provider=o.provider, meter_provider=o.meters)
    await cache.get("a", double_key)
    assert o.value("parallelkit.cache.hits") == 1
    assert o.value("parallelkit.cache.misses") == 0


async def double_key(key: str) -> str:
    return key * 2


@virtual_clock()
async def test_limiter_wait_metric() -> None:
    o = make_otel()
    inst = ParallelkitInstrumentor()
    inst.instrument(tracer_provider=o.provider, meter_provider=o.meters)
    try:
        limiter = pk.Limiter(concurrency=1)

        async def hold(seconds: float) -> None:
            async with limiter:
                await anyio.sleep(seconds)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, 3.0)
            await anyio.lowlevel.checkpoint()  # the first one holds the slot
            tg.start_soon(hold, 1.0)  # waits 3 s
        rate = pk.Limiter(rate=2)  # a start every 0.5 s
        for _ in range(3):
            await rate.wait_rate()
    finally:
        inst.uninstrument()
    points = o.points("parallelkit.limiter.wait")
    by_reason = {p.attributes["parallelkit.wait_for"]: p for p in points}
    assert by_reason["concurrency"].count == 1
    assert by_reason["concurrency"].sum == pytest.approx(3.0)
    assert by_reason["rate"].count == 2
    assert by_reason["rate"].sum == pytest.approx(1.0)  # the 2nd and 3rd: 0.5 s each


async def test_limiter_without_waits_records_nothing(otel: Otel) -> None:
    limiter = pk.Limiter(concurrency=2)
    await pk.map(double, range(2), limit=limiter)
    assert otel.points("parallelkit.limiter.wait") == []


async def test_batch_size_metric(otel: Otel) -> None:
    async def load_many(keys: Sequence[int]) -> list[int]:
        return [2 * k for k in keys]

    loader = pk.BatchLoader(load_many, max_batch=3)
    assert await loader.load_many(range(5)) == [0, 2, 4, 6, 8]
    (point,) = otel.points("parallelkit.batch.size")
    assert (point.count, point.sum, point.min, point.max) == (2, 5, 2, 3)


# ------------------------------------------------------------------------------ the instrumentor
async def test_instrument_twice_is_idempotent(otel: Otel) -> None:
    inst = ParallelkitInstrumentor()
    assert inst is ParallelkitInstrumentor()  # one per process (BaseInstrumentor)
    first = instrument.current
    other = make_otel()
    inst.instrument(tracer_provider=other.provider)  # ignored: already instrumented
    assert instrument.current is first
    await pk.map(double, range(3))
    assert len(otel.named("pk.map")) == 1
    assert other.spans == []


async def test_uninstrument_restores_zero_cost(instrumentor: ParallelkitInstrumentor) -> None:
    o = make_otel()
    instrumentor.instrument(tracer_provider=o.provider, meter_provider=o.meters)
    assert instrument.current is not None
    instrumentor.uninstrument()
    assert instrument.current is None
    assert not instrumentor.is_instrumented_by_opentelemetry
    cache = pk.SWRCache()
    await cache.get("a", double_key)
    await pk.map(double, range(3))
    await pk.gather(double(1))
    async with pk.imap(double, range(2)) as results:
        assert sorted([r async for r in results]) == [0, 2]
    await payment_flow(trace.NoOpTracer()).run(payment_id="p")
    async with crm_orchestrator(trace.NoOpTracer()).start():
        pass
    assert o.spans == []
    assert o.points("parallelkit.cache.misses") == []
    # and instrumenting again on the same providers works (the instruments are reused)
    instrumentor.instrument(tracer_provider=o.provider, meter_provider=o.meters)
    await cache.get("a", double_key)
    await pk.map(double, range(3))
    assert len(o.named("pk.map")) == 1
    assert o.value("parallelkit.cache.hits") == 1


async def test_item_spans_must_be_a_bool(instrumentor: ParallelkitInstrumentor) -> None:
    with pytest.raises(TypeError, match="item_spans must be a bool"):
        instrumentor.instrument(item_spans=1)
    assert instrument.current is None
    assert not instrumentor.is_instrumented_by_opentelemetry


class FailingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise ConnectionError("collector down")


class RaisingProcessor(SpanProcessor):
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        raise RuntimeError("on_start")

    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("on_end")


class BrokenTracer(trace.NoOpTracer):
    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        raise RuntimeError("broken tracer")


class BrokenProvider(trace.NoOpTracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return BrokenTracer()


@pytest.mark.parametrize("setup", ["exporter", "processor", "tracer"])
async def test_a_failing_tracing_never_breaks_user_code(
    instrumentor: ParallelkitInstrumentor, setup: str, caplog: pytest.LogCaptureFixture
) -> None:
    provider: Any
    if setup == "tracer":
        provider = BrokenProvider()
    else:
        provider = TracerProvider()
        processor = SimpleSpanProcessor(FailingExporter()) if setup == "exporter" else None
        provider.add_span_processor(processor or RaisingProcessor())
    instrumentor.instrument(tracer_provider=provider, item_spans=True)
    assert await pk.map(double, range(3), limit=2) == [0, 2, 4]
    result = await payment_flow(trace.NoOpTracer()).run(payment_id="p")
    assert result["record"] == "rec_ch_p"
    async with pk.imap(double, range(2)) as results:
        assert sorted([r async for r in results]) == [0, 2]
    orch = crm_orchestrator(trace.NoOpTracer())
    async with orch.start() as running:
        assert running["http"] == "http"
    with pytest.raises(ValueError, match="two"):  # and errors still come out as themselves
        await pk.map(fail_on_two, range(3))
    assert caplog.records, "the tracing failure is logged"


class Unprintable(Exception):
    """An exception whose ``__str__`` fails (it reads an attribute never set)."""

    def __str__(self) -> str:
        return str(self.message)  # type: ignore[attr-defined]


class SpanMethodsRaise(trace.NonRecordingSpan):
    def record_exception(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("record_exception")

    def set_status(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("set_status")

    def set_attribute(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("set_attribute")


class SpanMethodsRaiseTracer(trace.NoOpTracer):
    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return SpanMethodsRaise(trace.INVALID_SPAN_CONTEXT)


class SpanMethodsRaiseProvider(trace.NoOpTracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return SpanMethodsRaiseTracer()


@pytest.mark.parametrize("setup", ["unprintable error", "span methods raise"])
async def test_tracing_a_failure_never_changes_the_exception(
    instrumentor: ParallelkitInstrumentor, setup: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Fail-fast raises the original, settle keeps it: with tracing on too, even when
    recording the error fails (a real SDK formats ``str(exc)``; a tracer may raise)."""
    provider: Any = TracerProvider() if setup == "unprintable error" else SpanMethodsRaiseProvider()
    instrumentor.instrument(tracer_provider=provider, item_spans=True)
    error = Unprintable() if setup == "unprintable error" else ValueError("two")

    async def step_fails() -> None:
        await anyio.lowlevel.checkpoint()
        raise error

    async def item(x: int) -> int:
        if x == 2:
            await step_fails()
        return x

    flow = pk.Flow()
    flow.step(step_fails)
    with pytest.raises(type(error)) as raised:
        await flow.run()
    assert raised.value is error
    with pytest.raises(type(error)) as raised:
        await pk.map(item, range(3))
    assert raised.value is error
    outcomes = await pk.map(item, range(3), settle=True)
    assert outcomes[2].error is error
    assert [o.value for o in outcomes if o.ok] == [0, 1]
    assert caplog.records, "the tracing failure is logged"


@pytest.mark.parametrize(
    "option", [{"tracer_provider": "nope"}, {"meter_provider": 42}], ids=["tracer", "meter"]
)
async def test_providers_must_be_providers(
    instrumentor: ParallelkitInstrumentor, option: dict[str, Any]
) -> None:
    name = next(iter(option))
    with pytest.raises(TypeError, match=f"{name} must be an OpenTelemetry"):
        instrumentor.instrument(**option)
    assert instrument.current is None
    assert not instrumentor.is_instrumented_by_opentelemetry


def test_import_parallelkit_does_not_import_opentelemetry() -> None:
    code = (
        "import sys\n"
        "import parallelkit\n"
        "from parallelkit._core import instrument\n"
        "assert instrument.current is None\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'opentelemetry')\n"
        "assert not loaded, loaded\n"
        "import parallelkit.otel\n"
        "assert 'opentelemetry' in sys.modules\n"
        "assert instrument.current is None  # importing instruments nothing\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


def test_opentelemetry_instrument_finds_the_instrumentor() -> None:
    from importlib.metadata import entry_points

    (entry,) = [
        e for e in entry_points(group="opentelemetry_instrumentor") if e.name == "parallelkit"
    ]
    assert entry.load() is ParallelkitInstrumentor
    assert ParallelkitInstrumentor().instrumentation_dependencies() == ()
