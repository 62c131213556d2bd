"""The spans: one trace object per fan-out call and per graph run.

Both are entered around the work they describe (``with trace:``), in the task
that starts that work's workers, so the call's span is the current span of every
worker (their tasks copy the context when they start, on asyncio and on trio):
spans made by your code inside an item, a step or a service's set-up nest under
it. Graph node spans are made current around each node by the engine's
``run_node`` hook, and end when the engine records the node's
:class:`~parallelkit.Span` on the run's :class:`~parallelkit.Timeline`: their
times and waits are the ones the engine measured (converted from anyio's clock
to the wall clock once per run). A shutdown's ``stop <service>`` spans are made
when the shutdown's span ends, from the timeline as it is then: the orchestrator
gives a tear-down that ran before the shutdown reached it (a crash, a service that
never became ready) its own times, and the span carries them (a span's start
cannot be moved once it is made). Nothing nests under a stop span: the tear-down
runs in the task that hosts the service.

No failure of the tracing itself (a broken provider, a span processor that
raises) reaches user code: it is logged on ``parallelkit.otel`` and the work
goes on.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from collections.abc import Callable
from contextvars import Token
from types import FrameType, TracebackType
from typing import Any

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Status, StatusCode
from opentelemetry.util.types import Attributes
from typing_extensions import final

from .._core.backend import is_failure
from .._core.instrument import Call, GraphKind, NodeCall
from .._fanout.pool import fails
from .._graph.scheduler import NodeEnded
from .._graph.timeline import Span as TimelineSpan
from .._graph.timeline import Timeline

__all__ = ["FanoutTrace", "GraphTrace"]

logger = logging.getLogger("parallelkit.otel")

# graph run kind -> (run span name, node span prefix, node attribute)
_GRAPH_NAMES: dict[str, tuple[str, str, str]] = {
    "flow": ("flow", "step", "parallelkit.step"),
    "startup": ("startup", "start", "parallelkit.service"),
    "shutdown": ("shutdown", "stop", "parallelkit.service"),
}
_NODE_KIND = {"flow": "step", "startup": "start", "shutdown": "stop"}
#: the OpenTelemetry context key under which a start-up's span finds itself again: a
#: shutdown made while that span is the current one is the start-up's rollback
_STARTUP = otel_context.create_key("parallelkit.startup")


#: the largest integer an attribute can carry: OpenTelemetry's are signed 64-bit, and an
#: OTLP exporter fails the whole batch (every span in it) on one that does not fit
_INT64_MAX = 2**63 - 1

#: tracing failures by exception type since the last ``instrument()``: the first of
#: each type is logged with its traceback, the rest only counted (a processor that
#: fails every span must not log one traceback per item of a 10,000-item map)
failures: dict[type[BaseException], int] = {}


def report(exc: BaseException) -> None:
    """The tracing failed: log it (once per exception type); the work goes on untraced."""
    kind = type(exc)
    seen = failures.get(kind, 0)
    failures[kind] = seen + 1
    if not seen:
        logger.warning(
            "parallelkit.otel: tracing failed; the work goes on (further %s failures of "
            "the tracing are counted, not logged, until the next instrument())",
            kind.__name__,
            exc_info=exc,
        )
    else:
        logger.debug("parallelkit.otel: tracing failed again (%s: %d)", kind.__name__, seen + 1)


def _describe(exc: BaseException) -> str:
    """``"Type: text"``, even for an exception whose ``__str__`` fails."""
    try:
        text = str(exc)
    except Exception:
        text = "<str() of the exception failed>"
    return f"{type(exc).__name__}: {text}"


def record(span: trace.Span, exc: BaseException, timestamp: int | None = None) -> None:
    """``span.record_exception``; if recording fails (a tracer that raises, an exception
    whose ``__str__`` raises), that is logged and ``exc`` goes on unchanged."""
    try:
        span.record_exception(exc, timestamp=timestamp)
    except Exception as error:
        report(error)


def fail(span: trace.Span, exc: BaseException) -> None:
    """Record ``exc`` on ``span`` and set its status to ERROR (never raises)."""
    record(span, exc)
    try:
        span.set_status(Status(StatusCode.ERROR, _describe(exc)))
    except Exception as error:
        report(error)


def cancelled(span: trace.Span) -> None:
    """Mark ``span`` as ended by cancellation (never raises)."""
    try:
        span.set_attribute("parallelkit.cancelled", True)
    except Exception as error:
        report(error)


def ended_by(span: trace.Span, exc: BaseException) -> bool:
    """``exc`` ended ``span``'s work: a failure (an ``Exception``, a
    ``KeyboardInterrupt``-like ``BaseException``, a stray ``CancelledError``: what the
    engine and the pool treat as one) is recorded with ERROR; a cancellation marks
    it ``parallelkit.cancelled``. Call it in the task that saw ``exc``. Returns
    whether it was a failure (never raises)."""
    if is_failure(exc):
        fail(span, exc)
        return True
    cancelled(span)
    return False


def start(
    tracer: trace.Tracer,
    name: str,
    parent: otel_context.Context | None,
    attributes: Attributes = None,
    start_time: int | None = None,
) -> trace.Span:
    """``tracer.start_span``; if the tracer failed, a non-recording stand-in for the
    parent span (the span of ``parent``, or the current one), so that spans the
    application makes under it stay in the request's trace, under its span."""
    try:
        return tracer.start_span(name, parent, attributes=attributes, start_time=start_time)
    except Exception as exc:
        report(exc)
        return trace.NonRecordingSpan(trace.get_current_span(parent).get_span_context())


def end(span: trace.Span, end_time: int | None = None) -> None:
    """``span.end``; a span processor that raises is logged, not raised."""
    try:
        span.end(end_time)
    except Exception as exc:
        report(exc)


def _attach(span: trace.Span) -> tuple[otel_context.Context, Token[otel_context.Context]]:
    ctx = trace.set_span_in_context(span)
    return ctx, otel_context.attach(ctx)


@final
class FanoutTrace:
    """One ``gather`` / ``map`` / ``imap`` call: a span, items and failures counted."""

    __slots__ = ("_ctx", "_error", "_item_spans", "_kind", "_limit", "_settle", "_span",
                 "_token", "_tracer", "failures", "items")  # fmt: skip

    def __init__(
        self, tracer: trace.Tracer, kind: str, limit: int | None, settle: bool, item_spans: bool
    ) -> None:
        self._tracer = tracer
        self._kind = kind
        self._limit = limit
        self._settle = settle
        self._item_spans = item_spans
        self._span: trace.Span | None = None
        self._ctx: otel_context.Context | None = None
        self._token: Token[otel_context.Context] | None = None
        self._error: BaseException | None = None  # the last item failure counted
        self.items = 0
        self.failures = 0

    def wrap(self, call: Call) -> Call:
        """The per-item call: counts items and failures (and makes item spans if asked)."""
        if self._item_spans:
            return self._with_span(call)

        async def counted(arg: Any) -> Any:
            self.items += 1
            try:
                return await call(arg)
            except BaseException as exc:
                self._failed(exc, inspect.currentframe())
                raise

        return counted

    def _with_span(self, call: Call) -> Call:
        tracer, name = self._tracer, f"pk.{self._kind} item"

        async def traced(arg: Any) -> Any:
            self.items += 1
            span = start(tracer, name, self._ctx, {"parallelkit.item": self.items - 1})
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                return await call(arg)
            except BaseException as exc:
                if self._failed(exc, inspect.currentframe()):
                    fail(span, exc)
                else:
                    cancelled(span)
                raise
            finally:
                otel_context.detach(token)
                end(span)

        return traced

    def _failed(self, exc: BaseException, frame: FrameType | None) -> bool:
        """An item ended with ``exc`` (``frame``: the item call's, called by the pool's
        worker): whether it failed, as the pool decides it (:func:`fails`); counted."""
        if not fails(exc, None if frame is None else frame.f_back):
            return False
        self.failures += 1
        self._error = exc
        return True

    def __enter__(self) -> FanoutTrace:
        attributes: dict[str, Any] = {"parallelkit.settle": self._settle}
        if self._limit is not None:
            attributes["parallelkit.limit"] = min(self._limit, _INT64_MAX)  # (never reached)
        self._span = span = start(self._tracer, f"pk.{self._kind}", None, attributes)
        self._ctx, self._token = _attach(span)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        if span is None:  # pragma: no cover - never entered
            return
        if self._token is not None:
            otel_context.detach(self._token)
        try:
            span.set_attribute("parallelkit.items", self.items)
            span.set_attribute("parallelkit.failures", self.failures)
            if exc is not None and exc is self._error:  # an item's failure (GeneratorExit too)
                fail(span, exc)
            elif exc is not None:
                ended_by(span, exc)
        except Exception as error:
            report(error)
        end(span)


@final
class GraphTrace:
    """One run of the graph engine: a span for the run, one per node (see module docs)."""

    __slots__ = ("_clock0", "_ctx", "_error", "_errors", "_kind", "_limit", "_live",
                 "_previous", "_span", "_stops", "_timeline", "_token", "_tracer", "_wall0",
                 "failures", "nodes", "skipped")  # fmt: skip

    def __init__(
        self, tracer: trace.Tracer, kind: GraphKind, timeline: Timeline, limit: int | None
    ) -> None:
        self._tracer = tracer
        self._kind = kind
        self._timeline = timeline
        self._limit = limit
        self._live: dict[str, trace.Span] = {}
        self._stops: list[tuple[int, TimelineSpan]] = []  # a shutdown's, made at its end
        self._errors: dict[str, BaseException] = {}  # what ended each node, until recorded
        self._error: BaseException | None = None  # the first node failure recorded
        self._span: trace.Span = INVALID_SPAN
        self._ctx: otel_context.Context | None = None
        self._token: Token[otel_context.Context] | None = None
        self._previous: Callable[[TimelineSpan], object] | None = None
        self._clock0 = 0.0
        self._wall0 = 0
        self.nodes = self.failures = self.skipped = 0

    def _ns(self, clock_time: float) -> int:
        """A reading of the run's clock as wall-clock nanoseconds."""
        return self._wall0 + round((clock_time - self._clock0) * 1e9)

    # -- the run -----------------------------------------------------------------------
    def __enter__(self) -> GraphTrace:
        self._clock0 = anyio.current_time()
        self._wall0 = time.time_ns()
        run_name, _, _ = _GRAPH_NAMES[self._kind]
        title = self._timeline.name
        attributes: dict[str, Any] = {}
        if title:
            attributes["parallelkit.name"] = title
        if self._limit is not None:
            attributes["parallelkit.limit"] = min(self._limit, _INT64_MAX)  # (never reached)
        name = f"{run_name} {title}" if title else run_name
        if self._kind == "shutdown":  # made while its start-up's span is current: its rollback
            startup = otel_context.get_value(_STARTUP)
            attributes["parallelkit.rollback"] = (
                startup is not None and startup is trace.get_current_span()
            )
        self._span = span = start(self._tracer, name, None, attributes, self._wall0)
        if self._kind == "startup":
            self._ctx = trace.set_span_in_context(span, otel_context.set_value(_STARTUP, span))
            self._token = otel_context.attach(self._ctx)
        else:
            self._ctx, self._token = _attach(span)
        self._previous = self._timeline._on_add
        self._timeline._on_add = self._record
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._timeline._on_add = self._previous
        if self._token is not None:
            otel_context.detach(self._token)
        span = self._span
        try:
            for node in self._live.values():  # pragma: no cover - the engine records each
                end(node)
            self._end_stops()
            path = self._timeline.critical_path(kind=_NODE_KIND[self._kind])
            span.set_attributes(
                {
                    "parallelkit.nodes": self.nodes,
                    "parallelkit.failures": self.failures,
                    "parallelkit.skipped": self.skipped,
                    "parallelkit.critical_path": [s.name for s in path],
                }
            )
            if exc is not None and exc is self._error:  # a node's failure (GeneratorExit too)
                fail(span, exc)
            elif exc is not None:
                ended_by(span, exc)
            end_time = self._ns(anyio.current_time())
        except Exception as error:
            report(error)
            end_time = None
        end(span, end_time)

    # -- the nodes ---------------------------------------------------------------------
    def run_node(self, inner: NodeCall | None) -> NodeCall:
        """The engine's ``run_node``: each node runs with its span current."""
        _, prefix, attribute = _GRAPH_NAMES[self._kind]
        tracer, live, errors = self._tracer, self._live, self._errors
        if self._kind == "shutdown":
            return self._stop_node(inner)

        async def traced(node: Any, kwargs: dict[str, Any]) -> Any:
            name: str = node.name
            began = self._ns(anyio.current_time())
            span = start(tracer, f"{prefix} {name}", self._ctx, {attribute: name}, began)
            live[name] = span
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                if inner is None:
                    return await node.call(**kwargs)
                return await inner(node, kwargs)
            except NodeEnded as ended:  # not a failure of the run: how the node ended
                if ended.error is not None:
                    record(span, ended.error)
                raise
            except BaseException as exc:
                # recorded on the span if the engine records the node as failed (its
                # GeneratorExit too, as the pool decides it), when it records it (_record)
                errors[name] = exc
                raise
            finally:
                otel_context.detach(token)

        return traced

    def _stop_node(self, inner: NodeCall | None) -> NodeCall:
        """A shutdown's ``run_node``: no span yet (see :meth:`_end_stops`); what ended
        each stop (its tear-down's error, a crash) is kept for it."""
        errors = self._errors

        async def stop(node: Any, kwargs: dict[str, Any]) -> Any:
            try:
                if inner is None:  # pragma: no cover - the orchestrator passes its stop
                    return await node.call(**kwargs)
                return await inner(node, kwargs)
            except NodeEnded as ended:
                if ended.error is not None:
                    errors[node.name] = ended.error
                raise
            except BaseException as exc:
                if is_failure(exc):
                    errors[node.name] = exc
                raise

        return stop

    def _end_stops(self) -> None:
        """Make and end the shutdown's stop spans, with the times the timeline has now."""
        spans = self._timeline._done
        for index, recorded in self._stops:
            final = spans[index] if index < len(spans) else recorded
            if (final.name, final.kind) != (recorded.name, recorded.kind):  # pragma: no cover
                final = recorded  # (the orchestrator replaces a span in place, or not at all)
            span = start(self._tracer, f"stop {final.name}", self._ctx,
                         {"parallelkit.service": final.name}, self._ns(final.start))  # fmt: skip
            self._close(span, final, self._errors.pop(final.name, None))
        self._stops.clear()

    def _record(self, recorded: TimelineSpan) -> None:
        """The engine recorded a node's span: end ours with its times and waits."""
        try:
            if recorded.kind == "ready":
                self._ready(recorded)
                return
            if self._kind == "shutdown":
                self._count(recorded)
                self._stops.append((len(self._timeline._done) - 1, recorded))
                return
            _, prefix, attribute = _GRAPH_NAMES[self._kind]
            error = self._errors.pop(recorded.name, None)
            if recorded.status != "error":
                error = None  # a cancellation (or a coroutine closed): nothing to record
            elif error is not None and self._error is None:
                self._error = error
            span = self._live.pop(recorded.name, None)
            if span is None:  # never ran (skipped: a dependency failed)
                span = start(self._tracer, f"{prefix} {recorded.name}", self._ctx,
                             {attribute: recorded.name}, self._ns(recorded.start))  # fmt: skip
        except Exception as exc:  # pragma: no cover - start() and _ready() never raise
            report(exc)
            return
        self._count(recorded)
        self._close(span, recorded, error)

    def _count(self, recorded: TimelineSpan) -> None:
        self.nodes += 1
        if recorded.status == "error":
            self.failures += 1
        elif recorded.status == "skipped":
            self.skipped += 1

    def _close(
        self, span: trace.Span, recorded: TimelineSpan, error: BaseException | None = None
    ) -> None:
        """Give a node's span its status and waits (and ``error``), and end it."""
        end_time = self._ns(recorded.end)
        try:
            span.set_attributes(
                {
                    "parallelkit.status": recorded.status,
                    "parallelkit.waited_for": list(recorded.waited_for),
                    # (a tear-down that ran before the shutdown began waited for nothing)
                    "parallelkit.wait.dependencies": max(0.0, recorded.queued - self._clock0),
                    "parallelkit.wait.limit": recorded.wait,
                }
            )
            if error is not None:
                record(span, error, end_time)
            if recorded.status == "error":
                span.set_status(Status(StatusCode.ERROR))
        except Exception as exc:
            report(exc)
        end(span, end_time)  # always, exactly once

    def _ready(self, recorded: TimelineSpan) -> None:
        """A service's readiness wait (set-up done until its probe passed, or failed).

        A failed one (``"error"``: its probe raised or timed out) is ERROR, with the
        error recorded: the orchestrator records that span while it handles the
        error (``sys.exc_info()``), before the service's tear-down.
        """
        parent = self._live.get(recorded.name)
        ctx = trace.set_span_in_context(parent) if parent is not None else self._ctx
        span = start(self._tracer, f"ready {recorded.name}", ctx,
                     {"parallelkit.service": recorded.name}, self._ns(recorded.start))  # fmt: skip
        if recorded.status != "ok":
            try:
                span.set_attribute("parallelkit.status", recorded.status)
                error = sys.exc_info()[1]
                if recorded.status == "error" and error is not None:
                    fail(span, error)
                elif recorded.status == "error":
                    span.set_status(Status(StatusCode.ERROR))
            except Exception as exc:
                report(exc)
        end(span, self._ns(recorded.end))
