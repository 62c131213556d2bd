"""Faults met by the fan-out / Flow recipes pasted into a service.

Found by running the recipes of docs/recipes/payment-flow.md, bulk-enrollment.md,
parallel-reads.md and docs/fanout.md, docs/flow.md in a real service under faults
(cancellation at awkward moments, a client disconnecting, a misplaced block).
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import tenacity

import parallelkit as pk

pytestmark = pytest.mark.anyio

GUARD = 30.0  # a hang guard only: nothing here waits on time


def _retry_everything(_: BaseException) -> bool:
    # a predicate a service writes: "retry anything but my validation errors"
    return not isinstance(_, ValueError)


RETRY_POLICIES: list[Any] = [
    pytest.param(pk.Retry(attempts=3, backoff=0, on=_retry_everything), id="predicate"),
    pytest.param(pk.Retry(attempts=3, backoff=0, on=(BaseException,)), id="base-exception"),
    pytest.param(
        tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(3), retry=tenacity.retry_always, reraise=True
        ),
        id="tenacity-retry-always",
    ),
]


# -- cancellation is never retried -------------------------------------------------------
@pytest.mark.parametrize("policy", RETRY_POLICIES)
async def test_a_cancelled_flow_step_is_not_called_again(policy: Any) -> None:
    """The payment recipe's ``@flow.step(retry=...)``: a client disconnect (a cancelled
    caller) while the charge runs must not charge again, whatever ``on=`` retries."""
    flow = pk.Flow(name="payment")
    calls = 0
    started = anyio.Event()

    @flow.step(retry=policy)
    async def charge(amount: int) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await anyio.sleep_forever()
        return "unreachable"  # pragma: no cover

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await flow.run(amount=1999)

            tg.start_soon(run)
            await started.wait()
            tg.cancel_scope.cancel()
    assert calls == 1


@pytest.mark.parametrize("policy", RETRY_POLICIES)
async def test_a_cancelled_map_item_is_not_called_again(policy: Any) -> None:
    calls = 0
    started = anyio.Event()

    async def enroll(company_id: int) -> int:
        nonlocal calls
        calls += 1
        started.set()
        await anyio.sleep_forever()
        return company_id  # pragma: no cover

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: pk.map(enroll, [1], retry=policy, settle=True))
            await started.wait()
            tg.cancel_scope.cancel()
    assert calls == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("policy", RETRY_POLICIES)
async def test_task_cancel_of_a_flow_run_is_not_swallowed_by_its_retry(policy: Any) -> None:
    """asyncio's ``task.cancel()`` (uvicorn, ``asyncio.wait_for``) is delivered once: a
    step that retried it finished the run and returned a result to a cancelled caller."""
    flow = pk.Flow(name="payment")
    started = asyncio.Event()
    calls = 0

    @flow.step(retry=policy)
    async def charge(amount: int) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.sleep(0 if calls > 1 else 3600)
        return f"ch_{calls}"

    task = asyncio.ensure_future(flow.run(amount=1999))
    with anyio.fail_after(GUARD):
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert calls == 1


async def test_a_keyboard_interrupt_is_not_retried() -> None:
    calls = 0

    async def item(_: int) -> None:
        nonlocal calls
        calls += 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await pk.map(item, [1], retry=pk.Retry(attempts=3, backoff=0, on=_retry_everything))
    assert calls == 1


async def test_a_predicate_still_retries_errors() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("reset")
        return "ok"

    policy = pk.Retry(attempts=3, backoff=0, on=_retry_everything)
    assert await pk.gather(flaky, retry=policy) == ["ok"]
    assert calls == 3


# -- imap: results read outside the block -------------------------------------------------
async def test_imap_iterated_after_its_block_raises_instead_of_ending_early() -> None:
    """parallel-reads.md's streaming recipe with its ``async for`` dedented by one level:
    the block ended (and cancelled the reads) before anything was read, and the loop
    silently saw a few buffered results or none: a wrong total, no error."""

    async def read(path: str) -> str:
        await anyio.lowlevel.checkpoint()
        return f"content of {path}"

    paths = [f"file_{i}.txt" for i in range(100)]
    async with pk.imap(read, paths, limit=4) as results:
        await anyio.lowlevel.checkpoint()
    with pytest.raises(RuntimeError, match="inside"):
        async for _ in results:
            pass  # pragma: no cover


async def test_imap_consumers_waiting_when_the_block_ends_see_the_end() -> None:
    """A consumer already waiting in ``async for`` when the stream is exhausted ends its
    loop normally (the check is on a new ``__anext__`` after the block, not on a wake)."""

    async def item(i: int) -> int:
        await anyio.lowlevel.checkpoint()
        return i

    got: list[int] = []

    async def consume(results: pk.imap[int]) -> None:
        async for value in results:
            got.append(value)

    with anyio.fail_after(GUARD):
        async with pk.imap(item, range(20), limit=3) as results, anyio.create_task_group() as tg:
            tg.start_soon(consume, results)
            tg.start_soon(consume, results)
    assert sorted(got) == list(range(20))
