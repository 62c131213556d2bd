"""An orchestrator's ``"stop"`` spans say how each tear-down ended.

A tear-down that raised (an ``Exception`` or a ``KeyboardInterrupt``-like error) has an
``"error"`` stop span; one cut short by its ``stop_timeout`` (or by a forced stop) a
``"cancelled"`` one; on the timeline and in the OpenTelemetry spans. The other services
still stop, in order, and the errors come out exactly as before. The graph engine's
way for a node to report such an outcome (:class:`~parallelkit._graph.scheduler.NodeEnded`)
fails nothing and skips nothing. asyncio and trio; the OpenTelemetry SDK's in-memory
exporter; virtual time for the timeouts.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
import trio.testing

import parallelkit as pk
from parallelkit._graph.graph import Graph, Node, Param
from parallelkit._graph.scheduler import NodeEnded, Run
from tests.virtual_time import VirtualLoop

from .orch_helpers import exception_types, finished

pytest_plugins = ["tests.orch_helpers.spans"]

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

BACKENDS = ["asyncio", "trio"]


class Interrupt(BaseException):
    """A ``KeyboardInterrupt``-like error (not an ``Exception``, not a cancellation)."""


def stop_spans(timeline: pk.Timeline) -> dict[str, pk.Span]:
    return {s.name: s for s in timeline if s.kind == "stop"}


def three_services(
    orch: pk.Orchestrator, lines: list[str], db_teardown: Callable[[], Awaitable[None]]
) -> None:
    """db; cache (independent); api on db. db's tear-down is ``db_teardown``."""

    @orch.service(stop_timeout=5)
    async def db() -> AsyncIterator[str]:
        yield "db"
        lines.append("db down")
        await db_teardown()

    @orch.service
    async def cache() -> AsyncIterator[str]:
        yield "cache"
        lines.append("cache down")

    @orch.service
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        lines.append("api down")


# -- the timeline ----------------------------------------------------------------------------
@pytest.mark.anyio
async def test_a_tear_down_that_raised_has_an_error_stop_span() -> None:
    # It said "ok", like the tear-downs that went well.
    orch, lines = pk.Orchestrator(), []
    boom = ConnectionError("db would not close")

    async def teardown() -> None:
        raise boom

    three_services(orch, lines, teardown)
    with pytest.raises(ExceptionGroup) as caught:  # reported as before: the group
        async with orch.start() as running:
            pass
    assert caught.value.exceptions == (boom,)
    assert running.teardown_errors == [("db", boom)]
    assert lines.index("api down") < lines.index("db down")  # order kept
    assert "cache down" in lines
    spans = stop_spans(running.timeline)
    assert spans["db"].status == "error"
    assert spans["api"].status == "ok"
    assert spans["cache"].status == "ok"
    assert spans["db"].start >= spans["api"].end  # still waited for api
    rendered = {(s["name"], s["kind"]): s["status"] for s in running.timeline.to_dict()["spans"]}
    assert rendered["db", "stop"] == "error"


@pytest.mark.anyio
async def test_a_failed_tear_down_stops_nothing_else_and_its_dependencies_still_stop() -> None:
    # api (on db) fails its tear-down: db still stops after it, cache alongside.
    orch, lines = pk.Orchestrator(), []
    boom = RuntimeError("api would not close")

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        lines.append("db down")

    @orch.service
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        lines.append("api down")
        raise boom

    with pytest.raises(ExceptionGroup):
        async with orch.start() as running:
            pass
    assert lines == ["api down", "db down"]
    spans = stop_spans(running.timeline)
    assert (spans["api"].status, spans["db"].status) == ("error", "ok")


@pytest.mark.anyio
async def test_an_interrupt_in_a_tear_down_has_an_error_stop_span() -> None:
    orch, lines = pk.Orchestrator(), []
    stop = Interrupt("db interrupted")

    async def teardown() -> None:
        raise stop

    three_services(orch, lines, teardown)
    running: Any = None
    with pytest.raises(BaseException) as caught:  # what comes out is the point
        async with orch.start() as running:
            pass
    assert caught.value is stop  # as itself, as before
    spans = stop_spans(running.timeline)
    assert spans["db"].status == "error"
    assert (spans["api"].status, spans["cache"].status) == ("ok", "ok")


def run_virtual(main: Callable[[], Awaitable[None]], backend: str) -> None:
    options: dict[str, Any]
    if backend == "trio":
        options = {"clock": trio.testing.MockClock(autojump_threshold=0)}
    else:
        options = {"loop_factory": VirtualLoop}
    anyio.run(main, backend=backend, backend_options=options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tear_down_cut_short_by_stop_timeout_has_a_cancelled_stop_span(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    orch, lines = pk.Orchestrator(), []
    seen: dict[str, pk.Span] = {}

    async def teardown() -> None:
        await anyio.sleep(60)  # longer than its stop_timeout (5 s)
        lines.append("db waited")  # pragma: no cover

    three_services(orch, lines, teardown)

    async def main() -> None:
        async with orch.start() as running:
            pass
        seen.update(stop_spans(running.timeline))
        assert running.teardown_errors == []  # a timeout is no error: as before

    with caplog.at_level(logging.WARNING, logger="parallelkit.orchestrator"):
        run_virtual(main, backend)
    assert "db waited" not in lines
    assert "did not stop within stop_timeout=5s" in caplog.text  # logged, as before
    assert seen["db"].status == "cancelled"
    assert seen["db"].duration == pytest.approx(5)
    assert (seen["api"].status, seen["cache"].status) == ("ok", "ok")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_forced_stop_has_cancelled_stop_spans(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A forced stop (serve()'s second signal) cuts api's tear-down short as it runs, and
    # db's as it begins: both cut short, like a stop_timeout.
    orch, lines = pk.Orchestrator(), []
    seen: dict[str, pk.Span] = {}
    holder: dict[str, Any] = {}

    async def teardown() -> None:
        await anyio.sleep(30)
        lines.append("db waited")  # pragma: no cover

    @orch.service(stop_timeout=60)
    async def db() -> AsyncIterator[str]:
        yield "db"
        lines.append("db down")
        await teardown()

    @orch.service(stop_timeout=60)
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        holder["running"]._session.force()  # what the second signal does
        await anyio.sleep(30)
        lines.append("api waited")  # pragma: no cover

    async def main() -> None:
        async with orch.start() as running:
            holder["running"] = running
        seen.update(stop_spans(running.timeline))

    with caplog.at_level(logging.WARNING, logger="parallelkit.orchestrator"):
        run_virtual(main, backend)
    assert lines == ["db down"]
    assert "the stop was forced" in caplog.text  # logged, as before
    assert (seen["api"].status, seen["db"].status) == ("cancelled", "cancelled")


# -- OpenTelemetry ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_tear_down_that_raised_has_an_error_otel_span(exporter: Any) -> None:
    from opentelemetry.trace import StatusCode

    orch, lines = pk.Orchestrator(), []
    boom = ConnectionError("db would not close")

    async def teardown() -> None:
        raise boom

    three_services(orch, lines, teardown)
    with pytest.raises(ExceptionGroup):
        async with orch.start():
            pass
    spans = finished(exporter)
    db = spans["stop db"]
    assert (db.attributes or {})["parallelkit.status"] == "error"
    assert db.status.status_code is StatusCode.ERROR
    assert exception_types(db) == ["ConnectionError"]  # the error itself, recorded
    for name in ("stop api", "stop cache"):
        assert (spans[name].attributes or {})["parallelkit.status"] == "ok"
        assert spans[name].status.status_code is not StatusCode.ERROR
        assert exception_types(spans[name]) == []
    shutdown = spans["shutdown"]
    assert (shutdown.attributes or {})["parallelkit.failures"] == 1
    assert shutdown.status.status_code is not StatusCode.ERROR  # the stop itself went on


@pytest.mark.anyio
async def test_a_rollback_tear_down_that_raised_has_an_error_otel_span(exporter: Any) -> None:
    from opentelemetry.trace import StatusCode

    orch = pk.Orchestrator()
    boom = ConnectionError("db would not close")

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        raise boom

    @orch.service
    async def api(db: str) -> str:
        raise ValueError("api failed")

    with pytest.raises(pk.StartupError):
        async with orch.start():
            pass  # pragma: no cover
    stopped = finished(exporter)["stop db"]
    assert (stopped.attributes or {})["parallelkit.status"] == "error"
    assert stopped.status.status_code is StatusCode.ERROR
    assert exception_types(stopped) == ["ConnectionError"]


@pytest.mark.anyio
async def test_an_interrupt_in_a_tear_down_has_an_error_otel_span(exporter: Any) -> None:
    from opentelemetry.trace import StatusCode

    orch, lines = pk.Orchestrator(), []
    stop = Interrupt("db interrupted")

    async def teardown() -> None:
        raise stop

    three_services(orch, lines, teardown)
    with pytest.raises(BaseException) as caught:  # what comes out is the point
        async with orch.start():
            pass
    assert caught.value is stop
    db = finished(exporter)["stop db"]
    assert (db.attributes or {})["parallelkit.status"] == "error"
    assert db.status.status_code is StatusCode.ERROR
    assert exception_types(db) == ["Interrupt"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tear_down_cut_short_by_stop_timeout_has_a_cancelled_otel_span(
    backend: str, exporter: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from opentelemetry.trace import StatusCode

    orch, lines = pk.Orchestrator(), []

    async def teardown() -> None:
        await anyio.sleep(60)

    three_services(orch, lines, teardown)

    async def main() -> None:
        async with orch.start():
            pass

    with caplog.at_level(logging.WARNING, logger="parallelkit.orchestrator"):
        run_virtual(main, backend)
    spans = finished(exporter)
    db = spans["stop db"]
    assert (db.attributes or {})["parallelkit.status"] == "cancelled"
    assert db.status.status_code is not StatusCode.ERROR  # cut short, not failed
    assert exception_types(db) == []
    assert (spans["shutdown"].attributes or {})["parallelkit.failures"] == 0


# -- the engine: a node that reports how it ended ------------------------------------------
@pytest.mark.anyio
async def test_a_node_that_reports_an_error_fails_nothing_and_skips_nothing() -> None:
    # A fail-fast run: ``b`` reports an error; ``a`` (after b) and ``c`` still run.
    ran: list[str] = []
    error = OSError("b's clean-up")

    async def run_node(node: Node, kwargs: dict[str, Any]) -> Any:
        ran.append(node.name)
        await anyio.lowlevel.checkpoint()
        if node.name == "b":
            raise NodeEnded("error", error, value="b-value")
        return node.name

    graph = Graph(kind="service")
    graph.add(Node("b", ()))
    graph.add(Node("c", ()))
    graph.add(Node("a", (Param("b"),)))
    timeline = pk.Timeline()
    run = Run(graph.plan(), {}, run_node=run_node, timeline=timeline, kind="stop")
    await run.execute()
    assert sorted(ran) == ["a", "b", "c"]
    assert run.failed is None
    assert run.results() == {"a": "a", "b": "b-value", "c": "c"}
    statuses = {s.name: s.status for s in timeline}
    assert statuses == {"a": "ok", "b": "error", "c": "ok"}


def test_node_ended_checks_its_status() -> None:
    with pytest.raises(ValueError, match="status"):
        NodeEnded("skipped")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status"):
        NodeEnded("ok")  # type: ignore[arg-type]
