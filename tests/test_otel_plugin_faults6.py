"""parallelkit.otel and the pytest plugin, used the way users break them (round six).

Tracing (the SDK's in-memory exporter and metric readers, on asyncio and trio): a
provider class passed instead of an instance, a misspelt option, instrumenting
again with the same meter provider (monotonic cache counters), concurrent
requests, a background refresh's parent, one exception event per span, imports
that change no global state. The pytest plugin: a test that fails inside its
guards, on both backends under anyio's plugin (child pytest runs, marked slow).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider, ObservableCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import parallelkit as pk
from parallelkit._core import instrument
from parallelkit.otel import ParallelkitInstrumentor

pytest_plugins = ["pytester"]


# -- helpers ------------------------------------------------------------------------------
class Traced:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("app")

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def parent_of(self, span: ReadableSpan) -> str | None:
        ids = {s.context.span_id: s.name for s in self.spans if s.context is not None}
        return None if span.parent is None else ids.get(span.parent.span_id)

    def root_of(self, span: ReadableSpan) -> str:
        by_id = {s.context.span_id: s for s in self.spans if s.context is not None}
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
        return span.name


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
def traced(instrumentor: ParallelkitInstrumentor) -> Traced:
    t = Traced()
    instrumentor.instrument(tracer_provider=t.provider, item_spans=True)
    return t


def counter_points(reader: InMemoryMetricReader, name: str) -> list[int]:
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    return [int(p.value) for p in metric.data.data_points]  # type: ignore[union-attr]
    return []


# -- instrument() arguments ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "cls"), [("tracer_provider", TracerProvider), ("meter_provider", MeterProvider)]
)
def test_a_provider_class_instead_of_an_instance_is_a_type_error_naming_it(
    instrumentor: ParallelkitInstrumentor, option: str, cls: type
) -> None:
    # was: AttributeError: 'str' object has no attribute '_disabled' (the class's
    # get_tracer took the scope name as `self`)
    with pytest.raises(TypeError, match=rf"{option} must be .*instance.*the class"):
        instrumentor.instrument(**{option: cls})
    assert not instrumentor.is_instrumented_by_opentelemetry
    assert instrument.current is None
    instrumentor.instrument(**{option: cls()})  # the instance is fine
    assert instrument.current is not None


def test_a_misspelt_option_is_named_in_a_warning_an_ecosystem_one_is_not(
    instrumentor: ParallelkitInstrumentor, caplog: pytest.LogCaptureFixture
) -> None:
    # was: tracer_provder= silently ignored: spans went to the global (no-op) provider
    t = Traced()
    with caplog.at_level(logging.WARNING, logger="parallelkit.otel"):
        instrumentor.instrument(tracer_provder=t.provider, logger_provider=object())
    assert instrument.current is not None  # ignored, as every instrumentor does
    (warning,) = [r for r in caplog.records if r.name == "parallelkit.otel"]
    assert "tracer_provder" in warning.getMessage()
    assert "tracer_provider" in warning.getMessage()  # the options it has
    assert "logger_provider" not in warning.getMessage()  # a distro's: taken silently
    instrumentor.uninstrument()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="parallelkit.otel"):
        instrumentor.instrument(tracer_provider=t.provider, item_spans=False)
    assert [r for r in caplog.records if r.name == "parallelkit.otel"] == []


# -- metrics ------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_cache_counters_never_go_down_when_instrumented_again(
    instrumentor: ParallelkitInstrumentor,
) -> None:
    # was: instrumenting again with the same meter provider restarted the totals at
    # 0: the cumulative counter went from 3 to 1, a delta reader saw -2
    cumulative = InMemoryMetricReader()
    delta = InMemoryMetricReader(
        preferred_temporality={ObservableCounter: AggregationTemporality.DELTA}
    )
    meters = MeterProvider(metric_readers=[cumulative, delta])
    cache = pk.SWRCache(fresh=60.0, stale=60.0)

    async def load() -> int:
        await anyio.lowlevel.checkpoint()
        return 1

    hits = "parallelkit.cache.hits"
    async with cache:
        await cache.get("k", load)  # a miss
        instrumentor.instrument(meter_provider=meters)
        for _ in range(3):
            await cache.get("k", load)
        assert counter_points(cumulative, hits) == [3]
        assert counter_points(delta, hits) == [3]
        await cache.get("k", load)  # counted, not yet collected
        instrumentor.uninstrument()
        for _ in range(5):  # not instrumented: not counted
            await cache.get("k", load)
        instrumentor.instrument(meter_provider=meters)
        await cache.get("k", load)
        assert counter_points(cumulative, hits) == [5]  # 3 + 1 + 1, never below 4
        assert counter_points(delta, hits) == [2]
        assert counter_points(cumulative, "parallelkit.cache.misses") == [0]
    instrumentor.uninstrument()


# -- spans --------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_concurrent_requests_keep_their_own_spans(traced: Traced) -> None:
    """Two requests interleave map, imap and Flow runs: nothing of one lands in the other."""
    tracer = traced.tracer
    flow = pk.Flow(name="f")

    @flow.step
    async def first(request: int) -> int:
        await anyio.lowlevel.checkpoint()
        return request

    @flow.step
    async def second(first: int) -> int:
        with tracer.start_as_current_span(f"step work {first}"):
            await anyio.lowlevel.checkpoint()
        return first

    async def item(x: tuple[int, int]) -> int:
        request, i = x
        with tracer.start_as_current_span(f"item work {request}"):
            for _ in range(3 - i):
                await anyio.lowlevel.checkpoint()
        return i

    async def handle(request: int) -> None:
        with tracer.start_as_current_span(f"request {request}"):
            await pk.map(item, [(request, i) for i in range(3)], limit=2)
            async with pk.imap(item, [(request, i) for i in range(3)]) as results:
                async for _ in results:
                    with tracer.start_as_current_span(f"body {request}"):
                        await anyio.lowlevel.checkpoint()
            await flow.run(request=request)
            with tracer.start_as_current_span(f"after {request}"):
                pass

    async with anyio.create_task_group() as tg:
        for request in range(2):
            tg.start_soon(handle, request)

    for request in range(2):
        for name in ("item work", "body", "step work", "after"):
            for span in traced.named(f"{name} {request}"):
                assert traced.root_of(span) == f"request {request}", name
        for name in ("body", "after"):  # the caller's own code: under its request
            assert {traced.parent_of(s) for s in traced.named(f"{name} {request}")} == {
                f"request {request}"
            }
    for name in ("pk.map", "pk.imap", "flow f"):
        assert sorted(traced.root_of(s) for s in traced.named(name)) == [
            "request 0",
            "request 1",
        ]
        assert {traced.parent_of(s) for s in traced.named(name)} == {"request 0", "request 1"}


@pytest.mark.anyio
async def test_a_background_refresh_nests_under_the_stale_hit_that_started_it(
    traced: Traced,
) -> None:
    """As docs/tracing.md says: under the request whose stale hit started the refresh,
    not the first caller's (the miss) nor a later caller's that found it running."""
    now = [0.0]
    cache = pk.SWRCache(fresh=1.0, stale=100.0, clock=lambda: now[0])
    tracer = traced.tracer
    release = anyio.Event()
    loads = 0

    async def load() -> int:
        nonlocal loads
        loads += 1
        n = loads
        with tracer.start_as_current_span(f"SELECT {n}"):
            if n == 2:
                await release.wait()
        return n

    async with cache:
        with tracer.start_as_current_span("request miss"):
            assert await cache.get("k", load) == 1
        now[0] = 2.0
        with tracer.start_as_current_span("request stale"):
            assert await cache.get("k", load) == 1  # served stale; the refresh starts
        with tracer.start_as_current_span("request later"):
            assert await cache.get("k", load) == 1  # the refresh still runs
        release.set()
        with anyio.fail_after(30):  # a hang guard only
            while cache.stats.refreshes < 1 or loads < 2:
                await anyio.lowlevel.checkpoint()
        while not traced.named("SELECT 2"):
            await anyio.lowlevel.checkpoint()
    (miss,) = traced.named("SELECT 1")
    assert traced.parent_of(miss) == "request miss"
    (refresh,) = traced.named("SELECT 2")
    assert traced.parent_of(refresh) == "request stale"
    assert loads == 2


@pytest.mark.anyio
async def test_each_span_records_its_failure_once(traced: Traced) -> None:
    """A step fails inside a flow inside a map item inside a gather: every span on the
    way is ERROR with exactly one exception event (none records it twice)."""
    flow = pk.Flow(name="inner")
    other_started = anyio.Event()

    @flow.step
    async def charge() -> int:
        await other_started.wait()
        raise ValueError("card declined")

    @flow.step
    async def other() -> int:
        other_started.set()
        await anyio.sleep_forever()
        return 0  # pragma: no cover - cancelled

    async def item(i: int) -> Any:
        if i == 1:
            return await flow.run()
        await anyio.sleep_forever()  # cancelled by the failure
        return None  # pragma: no cover - cancelled

    async def call() -> Any:
        return await pk.map(item, range(3))

    with pytest.raises(ValueError, match="card declined"):
        await pk.gather(call())
    failing = [
        "step charge",
        "flow inner",
        "pk.map",
        "pk.gather",
        "pk.gather item",
    ]
    for name in failing:
        (span,) = traced.named(name)
        assert not span.status.is_ok, name
        assert [e.name for e in span.events] == ["exception"], name
    items = {(s.attributes or {})["parallelkit.item"]: s for s in traced.named("pk.map item")}
    assert [e.name for e in items[1].events] == ["exception"]
    for i in (0, 2):
        assert items[i].events == ()
        assert (items[i].attributes or {}).get("parallelkit.cancelled") is True
    (other_step,) = traced.named("step other")
    assert other_step.events == ()
    assert (other_step.attributes or {})["parallelkit.status"] == "cancelled"


@pytest.mark.anyio
async def test_uninstrument_while_a_flow_runs_ends_its_spans(
    traced: Traced, instrumentor: ParallelkitInstrumentor
) -> None:
    release = anyio.Event()
    flow = pk.Flow(name="f")

    @flow.step
    async def first() -> int:
        instrumentor.uninstrument()
        await release.wait()
        return 1

    @flow.step
    async def second(first: int) -> int:
        return first

    async with anyio.create_task_group() as tg:
        tg.start_soon(flow.run)
        await anyio.lowlevel.checkpoint()
        release.set()
    assert instrument.current is None
    assert sorted(s.name for s in traced.spans) == ["flow f", "step first", "step second"]
    assert await flow.run() is not None  # not traced any more
    assert len(traced.spans) == 3


# -- imports ------------------------------------------------------------------------------
_SNAPSHOT = """
import logging, warnings
import opentelemetry.context, opentelemetry.instrumentation.instrumentor
import opentelemetry.metrics, opentelemetry.propagate, opentelemetry.trace

def snapshot():
    from opentelemetry import context, metrics, propagate, trace
    loggers = {
        name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled, list(lg.filters))
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    return {
        "root": (logging.root.level, list(logging.root.handlers), list(logging.root.filters)),
        "disable": logging.root.manager.disable,
        "factory": logging.getLogRecordFactory(),
        "logger_class": logging.getLoggerClass(),
        "loggers": loggers,
        "warnings": list(warnings.filters),
        "tracer_provider": trace._TRACER_PROVIDER,
        "meter_provider": metrics._internal._METER_PROVIDER,
        "context": dict(context.get_current()),
        "propagator": propagate.get_global_textmap(),
    }

import parallelkit  # its own loggers are not this test's
before = snapshot()
import parallelkit.otel, parallelkit.pytest_plugin
after = snapshot()
new = set(after["loggers"]) - set(before["loggers"])
assert new <= {"parallelkit.otel"}, new
for name in new:  # a plain logger: no level, handler or filter of its own
    assert after["loggers"][name] == (logging.NOTSET, [], True, False, []), name
after["loggers"] = {k: v for k, v in after["loggers"].items() if k not in new}
changed = [key for key in before if before[key] != after[key]]
assert not changed, changed
"""


@pytest.mark.slow
def test_importing_otel_and_the_plugin_changes_no_global_state() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SNAPSHOT], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


# -- the pytest plugin (child pytest runs) --------------------------------------------------
@pytest.mark.slow
def test_a_test_failing_inside_the_guards_reports_its_own_failure(
    pytester: pytest.Pytester,
) -> None:
    """An async test (anyio's plugin, asyncio and trio) fails inside ``max_queries``
    after going over the budget: the report shows its own assertion, not the budget's
    error; the session guard stays on for the tests after it."""
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(
        """
        import anyio
        import pytest
        from sqlalchemy import create_engine, text

        @pytest.fixture(params=["asyncio", "trio"])
        def anyio_backend(request):
            return request.param

        @pytest.fixture
        def engine():
            engine = create_engine("sqlite://")
            yield engine
            engine.dispose()

        @pytest.mark.anyio
        async def test_fails(engine, max_queries, query_counter):
            await anyio.lowlevel.checkpoint()
            with query_counter(engine) as counted:
                with max_queries(engine, 1), engine.connect() as connection:
                    connection.execute(text("select 1"))
                    connection.execute(text("select 2"))
                    assert counted.count == 0, "the test's own failure"

        def test_after():
            from parallelkit.sqlalchemy import _testing
            assert _testing.active
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*AssertionError: the test's own failure*"])
    result.stdout.no_fnmatch_line("*TooManyQueries*")


@pytest.mark.slow
@pytest.mark.parametrize("autoload", ["on", "off"])
def test_dash_p_parallelkit_loads_the_plugin_with_or_without_autoload(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, autoload: str
) -> None:
    """What docs/reference/pytest-plugin.md tells a suite that turns auto-loading off."""
    if autoload == "off":
        monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    else:
        monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pytester.makeini("[pytest]\naddopts = -p parallelkit\n")
    pytester.makepyfile(
        """
        def test_fixtures(query_counter, max_queries):
            assert callable(query_counter) and callable(max_queries)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


class GrowsWhileIterated(weakref.WeakSet[Any]):
    """A weak set that another thread adds to during the first iteration, as a cache
    made while a metric reader's thread collects."""

    def __init__(self, late: Any) -> None:
        super().__init__()
        self.late: Any = late

    def __iter__(self) -> Iterator[Any]:
        for n, item in enumerate(super().__iter__()):
            if n == 0 and self.late is not None:
                late, self.late = self.late, None
                self.add(late)  # the set changes size: RuntimeError in the iteration
            yield item


@pytest.mark.anyio
async def test_a_cache_made_while_the_reader_collects_does_not_fail_the_collection(
    instrumentor: ParallelkitInstrumentor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # was: "RuntimeError: Set changed size during iteration" in the callback: the SDK
    # logged it and left the cache counters out of that collection
    reader = InMemoryMetricReader()
    instrumentor.instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    first = pk.SWRCache(fresh=60.0, stale=60.0)
    second = pk.SWRCache(fresh=60.0, stale=60.0)

    async def load() -> int:
        await anyio.lowlevel.checkpoint()
        return 1

    async with first:
        await first.get("k", load)
    caches = GrowsWhileIterated(late=second)
    caches.add(first)
    caches.add(pk.SWRCache(fresh=60.0, stale=60.0))  # two, so the iteration goes on
    monkeypatch.setattr(instrument, "caches", caches)
    for field in ("hits", "stale_hits", "misses", "refreshes", "load_errors", "refresh_errors"):
        expected = [1] if field == "misses" else [0]
        assert counter_points(reader, f"parallelkit.cache.{field}") == expected, field


@pytest.mark.anyio
async def test_instrument_with_one_provider_then_another(
    instrumentor: ParallelkitInstrumentor, caplog: pytest.LogCaptureFixture
) -> None:
    """A second instrument() with other providers changes nothing (a warning); after
    uninstrument(), the new providers get everything and the old ones nothing."""
    first, second = Traced(), Traced()

    async def item(i: int) -> int:
        await anyio.lowlevel.checkpoint()
        return i

    instrumentor.instrument(tracer_provider=first.provider)
    with caplog.at_level(logging.WARNING):
        instrumentor.instrument(tracer_provider=second.provider)
    assert "already instrumented" in caplog.text
    await pk.map(item, range(2))
    assert [s.name for s in first.spans] == ["pk.map"]
    assert second.spans == []
    instrumentor.uninstrument()
    instrumentor.instrument(tracer_provider=second.provider)
    await pk.map(item, range(2))
    assert [s.name for s in first.spans] == ["pk.map"]
    assert [s.name for s in second.spans] == ["pk.map"]
