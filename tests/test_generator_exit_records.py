"""A GeneratorExit that an item or a Flow step raises itself fails the run as itself
(``Pool._work``); the records agree: the timeline says "error", ``Run.failed`` names
the step, and the OpenTelemetry spans are ERROR with the exception, not
``parallelkit.cancelled``. On both backends, with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

import parallelkit as pk
from parallelkit._core import instrument
from parallelkit._graph.graph import Graph, Node, params_of
from parallelkit._graph.scheduler import Run
from parallelkit._graph.timeline import Timeline
from parallelkit.otel import ParallelkitInstrumentor

from .test_otel import Otel, make_otel

pytestmark = pytest.mark.anyio


@pytest.fixture
def otel() -> Iterator[Otel]:
    inst = ParallelkitInstrumentor()
    o = make_otel()
    inst.instrument(tracer_provider=o.provider, meter_provider=o.meters, item_spans=True)
    try:
        yield o
    finally:
        inst.uninstrument()
        assert instrument.current is None


def attrs(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


def exception_types(span: ReadableSpan) -> list[str]:
    return [str((e.attributes or {}).get("exception.type")).rpartition(".")[2] for e in span.events]


async def caught(aw: Any) -> BaseException | None:
    try:
        with anyio.fail_after(30):
            await aw
    except BaseException as exc:  # a GeneratorExit must not cross the test runner's loop
        return exc
    return None


def graph_of(*fns: Any) -> Graph:
    graph = Graph(kind="step")
    for fn in fns:
        graph.add(Node(fn.__name__, params_of(fn, kind="step", node=fn.__name__), fn))
    return graph


def statuses(timeline: Timeline) -> dict[str, str]:
    return {span.name: span.status for span in timeline.spans}


# ------------------------------------------------------------------- the engine
@pytest.mark.parametrize("settle", [False, True])
@pytest.mark.parametrize("where", ["alone", "caller", "helper"])
async def test_a_steps_own_generator_exit_is_recorded_as_its_error(
    settle: bool, where: str
) -> None:
    raised = GeneratorExit("the step's own")
    go = anyio.Event()

    async def breaks() -> None:
        if where == "alone":
            await anyio.lowlevel.checkpoint()
        else:
            await go.wait()
        raise raised

    async def other() -> None:
        go.set()
        await anyio.sleep_forever()

    if where == "alone":  # one ready node: run inline in the caller's task, no pool
        graph = graph_of(breaks)
    elif where == "caller":  # the pool's first worker: the caller's own task
        graph = graph_of(breaks, other)
    else:  # a helper task of the pool
        graph = graph_of(other, breaks)
    timeline = Timeline()
    run = Run(graph.plan(), {}, settle=settle, timeline=timeline)
    assert await caught(run.execute()) is raised
    assert statuses(timeline)["breaks"] == "error"
    assert run.failed == "breaks"
    if where != "alone":
        assert statuses(timeline)["other"] == "cancelled"


# ------------------------------------------------------------------ OpenTelemetry
@pytest.mark.parametrize("settle", [False, True])
@pytest.mark.parametrize("where", ["alone", "caller", "helper"])
async def test_a_steps_own_generator_exit_is_an_error_span(
    otel: Otel, settle: bool, where: str
) -> None:
    flow = pk.Flow(name="f")
    raised = GeneratorExit("the step's own")
    go = anyio.Event()

    async def breaks() -> None:
        if where == "alone":
            await anyio.lowlevel.checkpoint()
        else:
            await go.wait()
        raise raised

    async def other() -> None:
        go.set()
        await anyio.sleep_forever()

    # registered first, a step is taken first: by the caller's task (the pool's first
    # worker); the second by a helper task
    steps = {"alone": [breaks], "caller": [breaks, other], "helper": [other, breaks]}[where]
    for step in steps:
        flow.step(step)
    assert await caught(flow.run(settle=settle)) is raised  # type: ignore[call-overload]
    run = otel.one("flow f")
    assert run.status.status_code is StatusCode.ERROR
    assert "parallelkit.cancelled" not in attrs(run)
    assert attrs(run)["parallelkit.failures"] == 1
    assert exception_types(run) == ["GeneratorExit"]
    step = otel.one("step breaks")
    assert attrs(step)["parallelkit.status"] == "error"
    assert step.status.status_code is StatusCode.ERROR
    assert exception_types(step) == ["GeneratorExit"]
    if where != "alone":
        assert attrs(otel.one("step other"))["parallelkit.status"] == "cancelled"
        assert otel.one("step other").events == ()


async def _fan_out(kind: str, item: Any, settle: bool) -> None:
    if kind == "map":
        await pk.map(item, range(2), settle=settle)  # type: ignore[call-overload]
    elif kind == "gather":
        await pk.gather(item(0), item(1), settle=settle)  # type: ignore[call-overload]
    else:
        async with pk.imap(item, range(2), settle=settle) as results:  # type: ignore[call-overload]
            async for _ in results:
                pass  # pragma: no cover - the failure comes first


@pytest.mark.parametrize("settle", [False, True])
@pytest.mark.parametrize("kind", ["map", "gather", "imap"])
async def test_an_items_own_generator_exit_is_an_error_span(
    otel: Otel, settle: bool, kind: str
) -> None:
    raised = GeneratorExit("the item's own")
    go = anyio.Event()

    async def item(x: int) -> int:
        if x == 1:
            await go.wait()
            raise raised
        go.set()
        await anyio.sleep_forever()
        return x  # pragma: no cover

    assert await caught(_fan_out(kind, item, settle)) is raised
    call = otel.one(f"pk.{kind}")
    assert call.status.status_code is StatusCode.ERROR
    assert "parallelkit.cancelled" not in attrs(call)
    assert attrs(call)["parallelkit.failures"] == 1
    spans = {attrs(s)["parallelkit.item"]: s for s in otel.named(f"pk.{kind} item")}
    assert spans[1].status.status_code is StatusCode.ERROR
    assert "parallelkit.cancelled" not in attrs(spans[1])
    assert exception_types(spans[1]) == ["GeneratorExit"]
    assert attrs(spans[0])["parallelkit.cancelled"] is True


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_helper_closed_by_another_task_is_no_failure_of_its_step() -> None:
    """The reference: a step's worker task whose coroutine code in another task closes
    (``coro.close()``) is not taken for the step's failure (the pool's rule), and the
    records say so: "cancelled", no failed step. (asyncio only: a trio task whose
    coroutine is closed under it breaks trio's run loop.)"""
    roots: list[Any] = []
    go = anyio.Event()

    async def first() -> None:
        await anyio.sleep_forever()

    async def second() -> None:  # a helper task
        roots.append(asyncio.current_task().get_coro())  # type: ignore[union-attr]
        await anyio.sleep_forever()

    timeline = Timeline()
    run = Run(graph_of(first, second).plan(), {}, timeline=timeline)
    async with anyio.create_task_group() as tg:
        tg.start_soon(caught, run.execute())
        while not roots:
            await anyio.lowlevel.checkpoint()
        body = roots[0]
        while getattr(body, "__qualname__", None) != "Pool._work":
            body = body.cr_await
        with pytest.raises(GeneratorExit):
            body.throw(GeneratorExit())
        go.set()
        assert statuses(timeline) == {"second": "cancelled"}
        assert run.failed is None
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_item_whose_worker_task_is_cancelled_natively_is_counted_as_its_outcome(
    otel: Otel,
) -> None:
    """The same decision for the other unit failure the pool tells from a cancellation:
    a ``task.cancel()`` that no cancel scope made, delivered to a worker task, is kept as
    that item's failed ``Outcome`` (settle): its span is ERROR and counted, as the
    outcome says, not ``parallelkit.cancelled``."""

    async def item(x: int) -> int:
        if x == 1:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # by code the item calls: no cancel scope was cancelled
            await asyncio.sleep(0)
        return x

    outcomes = await pk.map(item, range(3), settle=True)
    assert [o.ok for o in outcomes] == [True, False, True]
    call = otel.one("pk.map")
    assert attrs(call)["parallelkit.failures"] == 1
    spans = {attrs(s)["parallelkit.item"]: s for s in otel.named("pk.map item")}
    assert spans[1].status.status_code is StatusCode.ERROR
    assert "parallelkit.cancelled" not in attrs(spans[1])


@pytest.mark.parametrize(
    "raised_type",
    [
        KeyboardInterrupt,  # the reference
        pytest.param(
            GeneratorExit,
            marks=pytest.mark.xfail(
                reason="the Orchestrator's start (_orchestrator/starting.py) takes a "
                "service's own GeneratorExit for a cancellation: not the pool's path",
                strict=True,
            ),
        ),
    ],
)
async def test_a_services_own_base_exception_is_recorded_as_its_failed_start(
    otel: Otel, raised_type: type[BaseException]
) -> None:
    orch = pk.Orchestrator(name="o")
    raised = raised_type("the service's own")

    @orch.service
    async def a() -> Any:
        await anyio.lowlevel.checkpoint()
        raise raised
        yield  # pragma: no cover - an async generator service

    @orch.service
    async def b() -> Any:
        await anyio.sleep_forever()
        yield  # pragma: no cover

    async def start() -> None:
        async with orch.start():
            pass  # pragma: no cover

    assert await caught(start()) is raised
    started = otel.one("start a")
    assert attrs(started)["parallelkit.status"] == "error"
    assert started.status.status_code is StatusCode.ERROR
    assert otel.one("startup o").status.status_code is StatusCode.ERROR
