"""Faults met by the fan-out / Flow recipes in a real service, second round.

Found by running the recipes of docs/fanout.md, docs/flow.md and docs/recipes/
(parallel-reads, payment-flow) in a FastAPI + uvicorn service calling a slow, failing
upstream over httpx, with clients disconnecting mid-request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

import parallelkit as pk

pytestmark = pytest.mark.anyio

GUARD = 30.0  # a hang guard only: nothing here waits on time


# -- an async generator input is closed when the fan-out stops reading it ---------------
class Rows:
    """A streaming query (a server-side cursor): an async generator whose ``finally``
    gives its connection back. The fan-out that stops reading it early (a failure, a
    cancelled request, a consumer leaving an ``imap`` block) must close it before it
    returns: else the clean-up runs later, at garbage collection, in a task nobody owns
    (asyncio) or with a ResourceWarning (trio), after the response was sent."""

    def __init__(self) -> None:
        self.closed = False
        self.pulled = 0

    async def stream(self, n: int = 1_000) -> AsyncIterator[int]:
        try:
            for i in range(n):
                self.pulled += 1
                yield i
        finally:
            self.closed = True


async def _fail_at_5(i: int) -> int:
    await anyio.lowlevel.checkpoint()
    if i == 5:
        msg = "upstream 500"
        raise ValueError(msg)
    return i


async def _echo(i: int) -> int:
    await anyio.lowlevel.checkpoint()
    return i


async def test_map_closes_an_async_generator_input_it_stopped_reading() -> None:
    rows = Rows()
    with anyio.fail_after(GUARD), pytest.raises(ValueError, match="upstream 500"):
        await pk.map(_fail_at_5, rows.stream(), limit=4)
    assert rows.closed  # before map returned, not at garbage collection
    assert rows.pulled < 1_000


@pytest.mark.parametrize("settle", [False, True], ids=["fail-fast", "settle"])
async def test_a_cancelled_map_closes_its_async_generator_input(settle: bool) -> None:
    rows = Rows()
    started = anyio.Event()

    async def slow(i: int) -> int:
        started.set()
        await anyio.sleep_forever()
        return i  # pragma: no cover

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:  # the request's task group

            async def handler() -> None:
                await pk.map(slow, rows.stream(), limit=4, settle=settle)

            tg.start_soon(handler)
            await started.wait()
            tg.cancel_scope.cancel()  # the client disconnected
    assert rows.closed


@pytest.mark.parametrize("ordered", [False, True])
async def test_leaving_an_imap_block_early_closes_its_async_generator_input(
    ordered: bool,
) -> None:
    rows = Rows()
    with anyio.fail_after(GUARD):
        async with pk.imap(_echo, rows.stream(), limit=4, ordered=ordered) as results:
            async for r in results:
                if r >= 3:
                    break
        assert rows.closed  # the block has ended: so has the stream
    assert rows.pulled < 1_000


async def test_an_imap_failure_closes_its_async_generator_input() -> None:
    rows = Rows()
    with anyio.fail_after(GUARD), pytest.raises(ValueError, match="upstream 500"):
        async with pk.imap(_fail_at_5, rows.stream(), limit=4) as results:
            async for _ in results:
                pass
    assert rows.closed


async def test_an_exhausted_async_generator_input_is_left_alone() -> None:
    rows = Rows()
    with anyio.fail_after(GUARD):
        assert await pk.map(_echo, rows.stream(10), limit=3) == list(range(10))
    assert rows.closed
    assert rows.pulled == 10


async def test_an_async_iterable_that_is_not_a_generator_is_not_closed() -> None:
    """A user's stream object (a memory channel) is theirs: only async generators the
    fan-out iterated are closed, never an object with an ``aclose`` of its own."""
    send, receive = anyio.create_memory_object_stream[int](10)
    async with send, receive:
        for i in range(10):
            await send.send(i)
        with anyio.fail_after(GUARD), pytest.raises(ValueError, match="upstream 500"):
            await pk.map(_fail_at_5, receive, limit=2)
        await send.send(99)  # the channel is still open
        assert receive.receive_nowait() is not None


# -- an item raising StopAsyncIteration does not end an imap stream quietly ----------------
async def _nothing() -> AsyncIterator[int]:
    return
    yield  # pragma: no cover - an async generator that yields nothing


async def _first_row(i: int) -> int:
    """``await anext(rows)`` on a query that returned nothing: StopAsyncIteration."""
    await anyio.lowlevel.checkpoint()
    if i == 3:
        return await anext(_nothing())
    return i


@pytest.mark.parametrize("ordered", [False, True])
async def test_an_item_raising_stop_async_iteration_is_not_the_end_of_imap(ordered: bool) -> None:
    """Raised as is from ``__anext__``, the item's StopAsyncIteration would read as "no
    more results" to ``async for``: the stream ended early, the error lost."""
    got: list[int] = []
    with anyio.fail_after(GUARD), pytest.raises(RuntimeError, match="StopAsyncIteration") as info:
        async with pk.imap(_first_row, range(10), limit=2, ordered=ordered) as results:
            async for r in results:
                got.append(r)
    assert isinstance(info.value.__cause__, StopAsyncIteration)  # the original, reachable
    assert 3 not in got


# -- one Limiter as a step's limit= and as run(limit=...) is refused, not a hang -----------
async def test_the_same_limiter_for_a_step_and_for_the_run_is_refused_before_any_step() -> None:
    """Each running step would hold one slot (the run's) while waiting for another (the
    step's): with a few concurrent requests every slot is held by a waiter, forever."""
    partner = pk.Limiter(concurrency=2)
    flow = pk.Flow(name="payment")
    calls: list[str] = []

    @flow.step(limit=partner)
    async def charge(payment_id: str) -> str:
        calls.append("charge")
        return payment_id

    @flow.step
    async def notify(charge: str) -> str:
        calls.append("notify")
        return charge

    @flow.step
    async def audit(payment_id: str) -> str:
        return payment_id

    with anyio.fail_after(GUARD):
        with pytest.raises(ValueError, match=r"limit.*'charge'") as info:
            await flow.run(payment_id="p1", limit=partner)
        assert "deadlock" in str(info.value)
        assert calls == []
        # only the steps that run count: a target without the limited step is fine
        assert (await flow.run(payment_id="p1", targets=[audit], limit=partner))["audit"] == "p1"
        # a run bound of its own, or the limiter on the step only, is the fix
        assert (await flow.run(payment_id="p1", limit=2))["notify"] == "p1"
        assert (await flow.run(payment_id="p1"))["notify"] == "p1"
    assert partner.statistics().running == 0
