"""Tracing, the pytest plugin and readiness probes, used the way users break them.

Probes: HTTP servers that answer garbage status codes, malformed URLs, IPv6,
host names that do not resolve, a probe function raising a BaseException.
Tracing (the SDK's in-memory exporter, on asyncio and trio): instrument and
uninstrument twice, no providers, a broken meter provider, cancelled fan-outs,
uninstrument mid-run, a missing ``opentelemetry-instrumentation``.
The pytest plugin: bad ini values and its fixtures in child pytest runs
(``pytester``, marked slow).
"""

from __future__ import annotations

import collections
import importlib
import logging
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import NoOpHistogram, NoOpMeter, NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import parallelkit as pk
from parallelkit._core import instrument
from parallelkit.otel import ParallelkitInstrumentor

pytest_plugins = ["pytester"]


# -- helpers ------------------------------------------------------------------------------
class Interrupt(BaseException):
    """A KeyboardInterrupt-like error (not an Exception, not a cancellation)."""


class Opened(SpanProcessor):
    """Counts the spans started and ended, by span id: each must end exactly once."""

    def __init__(self) -> None:
        self.started: dict[int, str] = {}
        self.ended: collections.Counter[int] = collections.Counter()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.started[span.context.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        assert span.context is not None
        self.ended[span.context.span_id] += 1

    def still_open(self) -> list[str]:
        return [name for sid, name in self.started.items() if sid not in self.ended]

    def ended_twice(self) -> list[str]:
        return [self.started.get(sid, "?") for sid, n in self.ended.items() if n > 1]


class Traced:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.opened = Opened()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.provider.add_span_processor(self.opened)

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def parent_of(self, span: ReadableSpan) -> str | None:
        ids = {s.context.span_id: s.name for s in self.spans if s.context is not None}
        return None if span.parent is None else ids.get(span.parent.span_id)


@pytest.fixture
def instrumentor() -> Iterator[ParallelkitInstrumentor]:
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


Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    """``port = await serve(handler)``: a real TCP server on 127.0.0.1 for the test."""
    async with anyio.create_task_group() as tg:
        listeners: list[anyio.abc.Listener[anyio.abc.SocketStream]] = []

        async def start(handler: Handler) -> int:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            listeners.append(listener)
            tg.start_soon(listener.serve, handler)
            port: int = listener.extra(anyio.abc.SocketAttribute.local_port)
            return port

        yield start
        tg.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()


def answering(payload: bytes) -> Handler:
    """A handler that reads the request, sends ``payload`` and waits for the client."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
                await stream.send(payload)
                await stream.receive()  # until the probe closes
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    return handle


# -- probes -------------------------------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize(
    "status_line",
    [
        b"HTTP/1.1 \xb200 OK",  # a latin-1 superscript two: str.isdigit() says yes
        b"HTTP/1.1 99999999999999999999 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
    ],
)
async def test_a_status_code_that_is_not_three_digits_is_not_an_http_response(
    serve: Callable[[Handler], Awaitable[int]], status_line: bytes
) -> None:
    # "\xb200" was a "ValueError: invalid literal for int()" reason, and a 20-digit
    # code was reported as "status 99999999999999999999"
    port = await serve(answering(status_line + b"\r\nContent-Length: 0\r\n\r\n"))
    probe = pk.probes.http(f"http://127.0.0.1:{port}/", status=range(100, 600))
    why = await probe.reason()
    assert why is not None
    assert why.startswith("not an HTTP response: "), why


@pytest.mark.anyio
async def test_500_redirect_garbage_and_a_slow_body(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    async def slow_body(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with anyio.CancelScope() as scope:
                try:
                    await stream.receive()
                    await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nx")
                    await anyio.sleep_forever()  # the body never comes
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    scope.cancel()

    cases = {
        b"HTTP/1.1 500 Internal Server Error\r\n\r\n": "status 500",
        b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\n\r\n": "status 302",
        b"\x16\x03\x01\x00\xff garbage\r\n": "not an HTTP response",
    }
    for payload, expected in cases.items():
        port = await serve(answering(payload))
        why = await pk.probes.http(f"http://127.0.0.1:{port}/").reason()
        assert why is not None
        assert why.startswith(expected), why
    port = await serve(slow_body)
    assert await pk.probes.http(f"http://127.0.0.1:{port}/").reason() is None


@pytest.mark.anyio
async def test_a_status_line_ended_by_a_bare_lf_before_a_slow_body_is_read(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    # HTTP lets a recipient take a bare LF as a line end; the probe waited for a
    # CRLF that never came and reported "no answer within request_timeout"
    async def lf_then_hang(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                await stream.receive()
                await stream.send(b"HTTP/1.0 200 OK\nContent-Length: 100\n\nx")
                await stream.receive()  # the body never comes; until the probe closes
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    port = await serve(lf_then_hang)
    probe = pk.probes.http(f"http://127.0.0.1:{port}/", request_timeout=5)
    with anyio.fail_after(30):  # a hang guard, not a timing assertion
        assert await probe.reason() is None


@pytest.mark.anyio
async def test_an_https_probe_loads_the_ca_store_once_and_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ssl.create_default_context() reads the system CA store: tens of ms of blocking
    # I/O, which every check did in the event loop (stalling every other start-up)
    made_in: list[threading.Thread] = []
    create = ssl.create_default_context

    def recorded(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made_in.append(threading.current_thread())
        return create(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", recorded)
    with socket.socket() as closed:  # a port nobody listens on: each check is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        probe = pk.probes.http(f"https://127.0.0.1:{port}/", request_timeout=5)
        for _ in range(3):
            why = await probe.reason()
            assert why is not None
            assert "Refused" in why or "refused" in why, why
    assert len(made_in) == 1
    assert made_in[0] is not threading.current_thread()


@pytest.mark.parametrize("url", ["http://[::1/", "http://[::1", "http://[not-ip]/"])
def test_a_malformed_ipv6_url_is_a_value_error_naming_url(url: str) -> None:
    # urlsplit's bare "Invalid IPv6 URL" named no argument
    with pytest.raises(ValueError, match=r"^url must be .*got '"):
        pk.probes.http(url)


@pytest.mark.parametrize(
    ("port", "error"),
    [(0, ValueError), (70000, ValueError), (-1, ValueError), (True, TypeError), (80.0, TypeError)],
)
def test_bad_tcp_ports_name_the_argument(port: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"^port must"):
        pk.probes.tcp("127.0.0.1", port)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1.0, 0, float("nan"), float("inf"), True])
def test_bad_timeouts_name_the_argument(timeout: object) -> None:
    with pytest.raises((TypeError, ValueError), match=r"^connect_timeout must"):
        pk.probes.tcp("127.0.0.1", 80, connect_timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match=r"^request_timeout must"):
        pk.probes.http("http://127.0.0.1/", request_timeout=timeout)  # type: ignore[arg-type]


def test_an_ipv6_tcp_probe_is_named_with_brackets() -> None:
    # was "tcp ::1:5432", which reads as a host "::1:5432" (or port 1:5432)
    assert pk.probes.tcp("::1", 5432).name == "tcp [::1]:5432"
    assert pk.probes.tcp("127.0.0.1", 5432).name == "tcp 127.0.0.1:5432"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.anyio
@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_loopback_for_tcp_and_http() -> None:
    listener = await anyio.create_tcp_listener(local_host="::1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, answering(b"HTTP/1.1 204 No Content\r\n\r\n"))
        assert await pk.probes.http(f"http://[::1]:{port}/", status=204).reason() is None
        assert await pk.probes.tcp("::1", port).reason() is None
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_host_that_does_not_resolve_is_a_clear_reason() -> None:
    with anyio.fail_after(30):  # a hang guard, not a timing assertion
        why = await pk.probes.tcp("no-such-host.invalid", 80, connect_timeout=5).reason()
        assert why is not None
        assert why.startswith(("gaierror: ", "TimeoutError: no connection within")), why
        why = await pk.probes.http("http://no-such-host.invalid/", request_timeout=5).reason()
        assert why is not None
        assert why.startswith(("gaierror: ", "TimeoutError: no answer within")), why


def test_a_probe_function_that_can_never_answer_is_refused_at_once() -> None:
    # a generator function "returned" a generator object: truthy, so always ready;
    # a required keyword-only parameter failed every check until the timeout
    async def agen() -> AsyncIterator[bool]:
        yield False

    def gen() -> Iterator[bool]:
        yield False

    def needs_keyword(engine: object, *, retries: int) -> bool:
        return False

    for fn in (agen, gen):
        with pytest.raises(TypeError, match=r"^fn must .*generator"):
            pk.probes.call(fn)
    with pytest.raises(TypeError, match="retries"):
        pk.probes.call(needs_keyword)


@pytest.mark.anyio
async def test_a_probe_function_raising_a_base_exception_comes_out_as_itself() -> None:
    error = Interrupt()

    def interrupted() -> bool:
        raise error

    probe = pk.probes.call(interrupted)
    with pytest.raises(Interrupt) as caught:
        await probe.check()
    assert caught.value is error
    with pytest.raises(Interrupt):
        await probe.wait(timeout=5)


# -- tracing ------------------------------------------------------------------------------
def test_instrument_and_uninstrument_twice_and_with_no_providers(
    instrumentor: ParallelkitInstrumentor, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        instrumentor.uninstrument()  # never instrumented: a warning, nothing else
        instrumentor.instrument()  # the global providers
        installed = instrument.current
        assert installed is not None
        instrumentor.instrument()  # a second time: a warning, nothing changes
        assert instrument.current is installed
        instrumentor.uninstrument()
        instrumentor.uninstrument()
    assert "already instrumented" in caplog.text
    assert "already uninstrumented" in caplog.text
    assert instrument.current is None


def test_a_meter_provider_that_raises_leaves_nothing_instrumented(
    instrumentor: ParallelkitInstrumentor,
) -> None:
    class Broken:
        def get_meter(self, *args: object, **kwargs: object) -> Any:
            msg = "meter provider down"
            raise RuntimeError(msg)

    t = Traced()
    with pytest.raises(RuntimeError, match="meter provider down"):
        instrumentor.instrument(tracer_provider=t.provider, meter_provider=Broken())
    assert instrument.current is None
    assert not instrumentor.is_instrumented_by_opentelemetry
    instrumentor.instrument(tracer_provider=t.provider, meter_provider=MeterProvider())
    assert instrument.current is not None


class RaisingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        msg = "collector down"
        raise ConnectionError(msg)


class BlockedExporter(SpanExporter):
    """An exporter stuck on a dead collector until the test releases it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        self.release.wait(60)
        return SpanExportResult.SUCCESS


@pytest.mark.anyio
async def test_an_exporter_that_raises_or_blocks_never_reaches_the_work(
    instrumentor: ParallelkitInstrumentor, caplog: pytest.LogCaptureFixture
) -> None:
    t = Traced()
    t.provider.add_span_processor(SimpleSpanProcessor(RaisingExporter()))
    blocked = BlockedExporter()
    batch = BatchSpanProcessor(blocked, schedule_delay_millis=1)
    t.provider.add_span_processor(batch)
    instrumentor.instrument(tracer_provider=t.provider, item_spans=True)

    async def item(i: int) -> int:
        await anyio.lowlevel.checkpoint()
        return i

    try:
        with caplog.at_level(logging.ERROR, logger="opentelemetry.sdk.trace.export"):
            assert await pk.map(item, range(20), limit=4) == list(range(20))
            assert await pk.map(item, range(20), limit=4, settle=True)
    finally:
        blocked.release.set()
        batch.shutdown()  # type: ignore[no-untyped-call]
    assert len(t.named("pk.map")) == 2
    assert len(t.named("pk.map item")) == 40
    assert t.opened.still_open() == []


class RaisingHistogram(NoOpHistogram):
    def record(self, *args: object, **kwargs: object) -> None:
        msg = "histogram down"
        raise RuntimeError(msg)


class RaisingMeter(NoOpMeter):
    def create_histogram(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return RaisingHistogram(name)


class RaisingMeterProvider(NoOpMeterProvider):
    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return RaisingMeter(name)


@pytest.mark.anyio
async def test_a_meter_that_raises_on_record_never_reaches_limiters_or_batches(
    instrumentor: ParallelkitInstrumentor, caplog: pytest.LogCaptureFixture
) -> None:
    instrumentor.instrument(meter_provider=RaisingMeterProvider())
    limiter = pk.Limiter(concurrency=1)

    async def item(i: int) -> int:
        async with limiter:
            await anyio.lowlevel.checkpoint()
        return i

    async def load_many(keys: list[int]) -> list[int]:
        return keys

    loader = pk.BatchLoader(load_many)
    with caplog.at_level(logging.DEBUG, logger="parallelkit.otel"):
        assert await pk.map(item, range(5)) == list(range(5))  # they wait for the slot
        assert await pk.gather(loader.load(1), loader.load(2)) == [1, 2]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per kind of failure, then counted
    assert "RuntimeError" in warnings[0].getMessage()


@pytest.mark.anyio
async def test_a_cancelled_fan_out_leaves_no_span_open_and_parents_user_spans(
    traced: Traced,
) -> None:
    tracer = trace.get_tracer("app", tracer_provider=traced.provider)
    running = 0
    all_running = anyio.Event()

    async def item(i: int) -> None:
        nonlocal running
        with tracer.start_as_current_span(f"user {i}"):
            running += 1
            if running == 3:
                all_running.set()
            await anyio.sleep_forever()

    with tracer.start_as_current_span("request"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: pk.map(item, range(10), limit=3))
            await all_running.wait()
            tg.cancel_scope.cancel()
    assert traced.opened.still_open() == []
    assert traced.opened.ended_twice() == []
    (call,) = traced.named("pk.map")
    assert traced.parent_of(call) == "request"
    assert (call.attributes or {}).get("parallelkit.cancelled") is True
    items = traced.named("pk.map item")
    assert len(items) == 3
    assert all((s.attributes or {}).get("parallelkit.cancelled") is True for s in items)
    for i in range(3):
        (user,) = traced.named(f"user {i}")
        assert traced.parent_of(user) == "pk.map item"


@pytest.mark.anyio
async def test_uninstrument_while_a_fan_out_runs_ends_its_spans(
    traced: Traced, instrumentor: ParallelkitInstrumentor
) -> None:
    async def item(i: int) -> int:
        if i == 0:
            instrumentor.uninstrument()
        await anyio.lowlevel.checkpoint()
        return i

    assert await pk.map(item, range(4), limit=2) == [0, 1, 2, 3]
    assert traced.opened.still_open() == []
    assert len(traced.named("pk.map")) == 1
    assert await pk.map(item, range(2)) == [0, 1]  # not instrumented any more
    assert len(traced.named("pk.map")) == 1


@pytest.mark.anyio
async def test_settle_with_per_item_timeouts_marks_the_timed_out_items_as_errors(
    traced: Traced,
) -> None:
    async def item(i: int) -> int:
        if i % 2:
            await anyio.sleep_forever()
        return i

    outcomes = await pk.map(item, range(4), timeout=0.01, settle=True)
    assert [o.ok for o in outcomes] == [True, False, True, False]
    (call,) = traced.named("pk.map")
    assert call.status.is_ok
    assert (call.attributes or {})["parallelkit.failures"] == 2
    by_index = {(s.attributes or {})["parallelkit.item"]: s for s in traced.named("pk.map item")}
    for i in (1, 3):
        assert not by_index[i].status.is_ok
        assert "parallelkit.cancelled" not in (by_index[i].attributes or {})
        assert by_index[i].events[0].name == "exception"
    assert by_index[0].status.is_ok
    assert traced.opened.still_open() == []


@pytest.mark.anyio
async def test_cancelled_flow_and_start_up_leave_no_span_open(traced: Traced) -> None:
    flow = pk.Flow(name="payment")
    step_started = anyio.Event()

    @flow.step
    async def charge() -> int:
        step_started.set()
        await anyio.sleep_forever()
        return 1

    @flow.step
    async def record(charge: int) -> int:
        return charge

    orch = pk.Orchestrator(name="crm")
    setting_up = anyio.Event()

    @orch.service
    async def db() -> AsyncIterator[int]:
        yield 1

    @orch.service
    async def http(db: int) -> AsyncIterator[int]:
        setting_up.set()
        await anyio.sleep_forever()
        yield db

    async def start() -> None:
        async with orch.start():
            pass  # pragma: no cover - never ready

    for run, started in ((flow.run, step_started), (start, setting_up)):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await started.wait()
            tg.cancel_scope.cancel()
    assert traced.opened.still_open() == []
    assert traced.opened.ended_twice() == []
    (step,) = traced.named("step charge")
    assert (step.attributes or {})["parallelkit.status"] == "cancelled"
    assert step.status.is_ok  # cancelled, not an error
    (flow_run,) = traced.named("flow payment")
    assert (flow_run.attributes or {}).get("parallelkit.cancelled") is True
    (startup,) = traced.named("startup crm")
    assert (startup.attributes or {}).get("parallelkit.cancelled") is True
    assert traced.parent_of(traced.named("start http")[0]) == "startup crm"
    assert traced.named("stop db")  # the rollback is traced too


@pytest.mark.anyio
async def test_cache_loads_and_batches_nest_under_the_callers_span(traced: Traced) -> None:
    tracer = trace.get_tracer("app", tracer_provider=traced.provider)
    cache = pk.SWRCache(fresh=60.0, stale=60.0)

    async def load() -> int:
        with tracer.start_as_current_span("SELECT conversation"):
            return 1

    async def load_many(keys: list[int]) -> dict[int, int]:
        with tracer.start_as_current_span("SELECT contacts"):
            return {k: k for k in keys}

    loader = pk.BatchLoader(load_many)
    async with cache:
        with tracer.start_as_current_span("request"):
            assert await cache.get("c1", load) == 1
            assert await pk.gather(loader.load(1), loader.load(2)) == [1, 2]
    (select,) = traced.named("SELECT conversation")
    assert traced.parent_of(select) == "request"
    (batch,) = traced.named("SELECT contacts")
    assert traced.parent_of(batch) in {"pk.gather item", "pk.gather", "request"}
    assert traced.opened.still_open() == []


def test_importing_otel_without_opentelemetry_instrumentation_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # was: "No module named 'opentelemetry.instrumentation.instrumentor'; ..."
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.instrumentor", None)
    for name in ("parallelkit.otel", "parallelkit.otel._instrumentor", "parallelkit.otel._require"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError, match=r"parallelkit\[otel\]"):
        importlib.import_module("parallelkit.otel")


@pytest.mark.slow
def test_parallelkit_otel_needs_only_the_api_not_the_sdk() -> None:
    code = (
        "import sys\n"
        "sys.modules['opentelemetry.sdk'] = None  # not installed\n"
        "import anyio, parallelkit as pk\n"
        "from parallelkit.otel import ParallelkitInstrumentor\n"
        "ParallelkitInstrumentor().instrument(item_spans=True)\n"
        "async def item(i): return i\n"
        "assert anyio.run(pk.map, item, range(3)) == [0, 1, 2]\n"
        "ParallelkitInstrumentor().uninstrument()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


# -- the pytest plugin (child pytest runs) --------------------------------------------------
@pytest.mark.slow
def test_a_bad_guard_sessions_ini_value_is_one_usage_error_naming_the_option(
    pytester: pytest.Pytester,
) -> None:
    # was: an error at the set-up of every test, "invalid truth value 'maybe'"
    pytester.makeini("[pytest]\nparallelkit_guard_sessions = maybe\n")
    pytester.makepyfile("def test_one(): pass\ndef test_two(): pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*parallelkit_guard_sessions*maybe*"])


@pytest.mark.slow
def test_the_fixtures_in_async_tests_on_asyncio_and_trio(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(
        """
        import anyio
        import pytest
        from sqlalchemy import create_engine, text

        from parallelkit.sqlalchemy import TooManyQueries

        @pytest.fixture(params=["asyncio", "trio"])
        def anyio_backend(request):
            return request.param

        @pytest.fixture
        def engine():
            engine = create_engine("sqlite://")
            yield engine
            engine.dispose()

        @pytest.mark.anyio
        async def test_counts(engine, query_counter, max_queries):
            await anyio.lowlevel.checkpoint()
            with query_counter(engine) as q, engine.connect() as connection:
                connection.execute(text("select 1"))
                connection.execute(text("select 2"))
            assert q.count == 2
            with pytest.raises(TooManyQueries):
                with max_queries(engine, 1), engine.connect() as connection:
                    connection.execute(text("select 1"))
                    connection.execute(text("select 2"))

        def test_bad_values(engine, query_counter, max_queries):
            with pytest.raises(TypeError, match="target"):
                query_counter("not an engine")
            with pytest.raises(ValueError, match="n must"):
                max_queries(engine, -1)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


@pytest.mark.slow
def test_the_session_guard_is_on_during_the_session_and_put_back_after(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        from parallelkit.sqlalchemy import _testing, guard_sessions

        def test_on():
            assert _testing.active
            was = guard_sessions(True)
            guard_sessions(was)
            assert was
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    pytester.makeini("[pytest]\nparallelkit_guard_sessions = false\n")
    pytester.makepyfile(
        """
        import sys

        def test_off():
            assert "parallelkit.sqlalchemy" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
