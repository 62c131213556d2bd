"""parallelkit.otel in a service whose tracing misbehaves: the application's own trace
stays whole, and instrumenting or uninstrumenting while requests run breaks nothing.

The in-memory exporter of the OpenTelemetry SDK, on asyncio and trio.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import parallelkit as pk
from parallelkit._core import instrument
from parallelkit.otel import ParallelkitInstrumentor

pytestmark = pytest.mark.anyio


class RefusesParallelkitSpans(SpanProcessor):
    """A span processor that raises when a span of parallelkit's starts (the SDK then
    raises from ``start_span``); the application's own spans start as usual."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if span.instrumentation_scope.name == "parallelkit":
            raise RuntimeError("on_start")

    def on_end(self, span: ReadableSpan) -> None:
        pass


@pytest.fixture
def instrumentor() -> Iterator[ParallelkitInstrumentor]:
    inst = ParallelkitInstrumentor()
    try:
        yield inst
    finally:
        if inst.is_instrumented_by_opentelemetry:
            inst.uninstrument()
        assert instrument.current is None


def work_under_request(exporter: InMemorySpanExporter) -> None:
    """Every ``work`` span of the application is in the request's trace, under it."""
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.name == "request"]
    work = [s for s in spans if s.name == "work"]
    assert work
    for span in work:
        assert span.context.trace_id == request.context.trace_id, span
        assert span.parent is not None
        assert span.parent.span_id == request.context.span_id, span


@pytest.mark.parametrize("item_spans", [False, True])
async def test_a_span_that_cannot_start_keeps_the_apps_spans_in_the_request_trace(
    instrumentor: ParallelkitInstrumentor, item_spans: bool, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(RefusesParallelkitSpans())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor.instrument(tracer_provider=provider, item_spans=item_spans)
    tracer = provider.get_tracer("app")

    async def item(x: int) -> int:
        with tracer.start_as_current_span("work"):
            await anyio.lowlevel.checkpoint()
        return x

    flow = pk.Flow(name="f")

    @flow.step
    async def step() -> None:
        await item(0)

    orch = pk.Orchestrator(name="o", output="logging")

    @orch.service
    async def svc() -> AsyncIterator[str]:
        await item(0)
        yield "svc"

    with tracer.start_as_current_span("request"):
        assert await pk.map(item, range(3)) == [0, 1, 2]
        async with pk.imap(item, range(2)) as results:
            assert sorted([r async for r in results]) == [0, 1]
        await flow.run()
        async with orch.start():
            pass
        assert trace.get_current_span().is_recording()  # still the request's span
    assert len([s for s in exporter.get_finished_spans() if s.name == "work"]) == 7
    work_under_request(exporter)
    scopes = {s.instrumentation_scope for s in exporter.get_finished_spans()}
    assert [scope.name for scope in scopes if scope is not None] == ["app"]
    assert caplog.records, "the tracing failure is logged"


class EndCounting(trace.NonRecordingSpan):
    """A span whose setters raise (a broken tracer), counting its ``end()`` calls."""

    ended: ClassVar[list[str]] = []

    def __init__(self, name: str) -> None:
        super().__init__(trace.INVALID_SPAN_CONTEXT)
        self.name = name

    def set_attributes(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("set_attributes")

    def set_attribute(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("set_attribute")

    def set_status(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("set_status")

    def end(self, end_time: int | None = None) -> None:
        EndCounting.ended.append(self.name)


class EndCountingTracer(trace.NoOpTracer):
    def start_span(self, name: str, *args: Any, **kwargs: Any) -> trace.Span:
        return EndCounting(name)


class EndCountingProvider(trace.NoOpTracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return EndCountingTracer()


async def test_every_span_ends_once_even_when_its_setters_raise(
    instrumentor: ParallelkitInstrumentor, caplog: pytest.LogCaptureFixture
) -> None:
    EndCounting.ended.clear()
    instrumentor.instrument(tracer_provider=EndCountingProvider(), item_spans=True)
    flow = pk.Flow(name="f")

    @flow.step
    async def ok() -> int:
        await anyio.lowlevel.checkpoint()
        return 1

    @flow.step
    async def fails(ok: int) -> None:
        raise ValueError("fails")

    @flow.step
    async def skipped(fails: None) -> None:
        pass  # pragma: no cover

    outcomes = await flow.run(settle=True)
    assert not outcomes.ok
    assert await pk.map(double, range(2)) == [0, 2]
    orch = pk.Orchestrator(name="o", output="logging")

    @orch.service(ready=pk.probes.call(lambda: True))
    async def svc() -> AsyncIterator[str]:
        yield "svc"

    async with orch.start():
        pass
    flow_spans = ["step ok", "step fails", "step skipped", "flow f"]
    map_spans = ["pk.map item", "pk.map item", "pk.map"]
    orch_spans = ["start svc", "ready svc", "startup o", "stop svc", "shutdown o"]
    assert sorted(EndCounting.ended) == sorted([*flow_spans, *map_spans, *orch_spans])
    assert caplog.records, "the tracing failure is logged"


async def double(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return 2 * x


async def test_a_tracing_failure_is_logged_once_per_kind_and_counted(
    instrumentor: ParallelkitInstrumentor, caplog: pytest.LogCaptureFixture
) -> None:
    """A span processor that fails every parallelkit span: a 200-item map with item
    spans logged one traceback per span. Now the first failure of each kind is
    logged (with its traceback), the rest counted; a new ``instrument()`` logs again."""
    from parallelkit.otel import _spans

    provider = TracerProvider()
    provider.add_span_processor(RefusesParallelkitSpans())

    async def item(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x

    for _ in range(2):
        caplog.clear()
        instrumentor.instrument(tracer_provider=provider, item_spans=True)
        with caplog.at_level("WARNING", logger="parallelkit.otel"):
            assert await pk.map(item, range(200), limit=10) == list(range(200))
        instrumentor.uninstrument()
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert warnings[0].exc_info is not None
        assert "RuntimeError" in warnings[0].getMessage()
        assert _spans.failures[RuntimeError] == 201  # the call's span and each item's
