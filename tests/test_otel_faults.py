"""parallelkit.otel on fault paths: a KeyboardInterrupt-like failure is an error, not a
cancellation; a real cancellation is still one; spans always end.

The in-memory exporter of the OpenTelemetry SDK, on asyncio and trio.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterator

import anyio
import anyio.lowlevel
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

import parallelkit as pk
from parallelkit._core import instrument
from parallelkit.otel import ParallelkitInstrumentor

from .test_fanout import STRAY_NEEDS, stray_cancellation
from .test_otel import Otel, make_otel

pytestmark = pytest.mark.anyio


class Interrupt(BaseException):
    """A KeyboardInterrupt-like failure (a BaseException that is no cancellation)."""


@pytest.fixture
def otel() -> Iterator[Otel]:
    """Instrumented with item spans; uninstrumented again whatever happened."""
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
    """The recorded exceptions' class names (the SDK qualifies them with the module)."""
    return [str((e.attributes or {}).get("exception.type")).rpartition(".")[2] for e in span.events]


def interrupt_on_one() -> Callable[[int], Awaitable[int]]:
    """An item function: item 1 fails with :class:`Interrupt` once items 0 and 2 run."""
    others_running = anyio.Event()
    running = 0

    async def item(x: int) -> int:
        nonlocal running
        if x == 1:
            await others_running.wait()
            raise Interrupt
        running += 1
        if running == 2:
            others_running.set()
        await anyio.sleep_forever()  # cancelled by the failure of item 1
        return x  # pragma: no cover

    return item


@pytest.mark.parametrize("kind", ["map", "gather"])
async def test_a_keyboard_interrupt_like_item_is_a_failure_not_a_cancellation(
    otel: Otel, kind: str
) -> None:
    item = interrupt_on_one()
    with pytest.raises(Interrupt):
        if kind == "map":
            await pk.map(item, range(3))
        else:
            await pk.gather(*(item(x) for x in range(3)))
    call = otel.one(f"pk.{kind}")
    assert call.status.status_code is StatusCode.ERROR
    assert exception_types(call) == ["Interrupt"]
    assert attrs(call)["parallelkit.failures"] == 1
    assert "parallelkit.cancelled" not in attrs(call)
    items = {attrs(s)["parallelkit.item"]: s for s in otel.named(f"pk.{kind} item")}
    assert len(items) == 3
    failed = [s for s in items.values() if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    assert exception_types(failed[0]) == ["Interrupt"]
    others = [s for s in items.values() if s is not failed[0]]
    assert all(attrs(s).get("parallelkit.cancelled") is True for s in others)
    assert all(s.status.status_code is StatusCode.UNSET for s in others)


async def test_a_keyboard_interrupt_like_imap_item_is_a_failure(otel: Otel) -> None:
    with pytest.raises(Interrupt):
        async with pk.imap(interrupt_on_one(), range(3)) as results:
            async for _ in results:
                pass  # pragma: no cover
    call = otel.one("pk.imap")
    assert call.status.status_code is StatusCode.ERROR
    assert attrs(call)["parallelkit.failures"] == 1
    assert "parallelkit.cancelled" not in attrs(call)


async def test_a_keyboard_interrupt_like_step_is_a_failure_not_a_cancellation(
    otel: Otel,
) -> None:
    flow = pk.Flow(name="f")
    slow_started = anyio.Event()

    @flow.step
    async def first() -> int:
        await anyio.lowlevel.checkpoint()
        return 1

    @flow.step
    async def breaks(first: int) -> int:
        await slow_started.wait()
        raise Interrupt

    @flow.step
    async def slow(first: int) -> int:
        slow_started.set()
        await anyio.sleep_forever()
        return 1  # pragma: no cover

    with pytest.raises(Interrupt):
        await flow.run()
    run = otel.one("flow f")
    assert run.status.status_code is StatusCode.ERROR
    assert exception_types(run) == ["Interrupt"]
    assert "parallelkit.cancelled" not in attrs(run)
    assert attrs(run)["parallelkit.failures"] == 1
    step = otel.one("step breaks")
    assert step.status.status_code is StatusCode.ERROR
    assert exception_types(step) == ["Interrupt"]  # recorded once, on its own span
    assert attrs(otel.one("step slow"))["parallelkit.status"] == "cancelled"
    assert otel.one("step slow").status.status_code is StatusCode.UNSET


async def test_a_cancelled_call_is_still_marked_cancelled(otel: Otel) -> None:
    async def forever(x: int) -> int:
        await anyio.sleep_forever()
        return x  # pragma: no cover

    flow = pk.Flow(name="g")

    @flow.step
    async def a() -> None:
        await anyio.sleep_forever()

    @flow.step
    async def b() -> None:
        await anyio.sleep_forever()

    for work in (pk.map(forever, range(2)), flow.run()):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: work)  # noqa: B023 - awaited in this iteration
                await anyio.wait_all_tasks_blocked()
                scope.cancel()
    for name in ("pk.map", "flow g"):
        span = otel.one(name)
        assert span.status.status_code is StatusCode.UNSET
        assert attrs(span)["parallelkit.cancelled"] is True
        assert span.events == ()
    assert attrs(otel.one("pk.map"))["parallelkit.failures"] == 0
    items = otel.named("pk.map item")
    assert [attrs(s)["parallelkit.cancelled"] for s in items] == [True, True]
    assert [attrs(otel.one(f"step {n}"))["parallelkit.status"] for n in "ab"] == ["cancelled"] * 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.skipif(sys.version_info < (3, 11), reason=STRAY_NEEDS)
async def test_a_stray_cancelled_error_is_the_items_failure(otel: Otel) -> None:
    """asyncio: an item that awaits a future cancelled elsewhere fails with a
    CancelledError no cancellation of its task caused; pk.map settles it as the
    item's error, and the tracing counts it as a failure too."""

    seen: list[BaseException] = []

    async def awaits_a_cancelled_future(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        if x == 1:
            await stray_cancellation(seen)
        return x

    outcomes = await pk.map(awaits_a_cancelled_future, range(3), settle=True)
    assert [o.ok for o in outcomes] == [True, False, True]
    call = otel.one("pk.map")
    assert attrs(call)["parallelkit.failures"] == 1
    failed = [s for s in otel.named("pk.map item") if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    assert "parallelkit.cancelled" not in attrs(failed[0])
