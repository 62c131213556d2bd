"""A worker task cancelled by a ``task.cancel()`` that no cancel scope made (a driver
cancelling ``asyncio.current_task()`` on a lost connection, a watchdog holding the
task): that item's failure, never a pool that ends quietly with results missing.
The caller's own native cancellation (``asyncio.wait_for``) still cancels it all."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

import parallelkit as pk


async def _item(i: int) -> int:
    if i == 1:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # by code the item calls: no cancel scope was cancelled
        await asyncio.sleep(0)
    return i


@pytest.mark.parametrize("limit", [None, 1, 2])
def test_settle_keeps_the_cancelled_item_as_its_outcome_and_runs_the_rest(
    limit: int | None,
) -> None:
    async def main() -> list[pk.Outcome[int]]:
        return await pk.map(_item, [0, 1, 2, 3], limit=limit, settle=True)

    outcomes = asyncio.run(main())
    assert [o.value for o in outcomes if o.ok] == [0, 2, 3]
    assert isinstance(outcomes[1].error, asyncio.CancelledError)


@pytest.mark.parametrize("limit", [None, 1])
def test_fail_fast_raises_the_cancellation_instead_of_returning_holes(limit: int | None) -> None:
    async def main() -> Any:
        try:
            return await pk.map(_item, [0, 1, 2, 3], limit=limit)
        except asyncio.CancelledError as exc:
            return exc

    assert isinstance(asyncio.run(main()), asyncio.CancelledError)


def test_gather_settle_keeps_it_as_an_outcome() -> None:
    async def main() -> list[pk.Outcome[int]]:
        return await pk.gather(_item(0), _item(1), _item(2), settle=True)

    outcomes = asyncio.run(main())
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, asyncio.CancelledError)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout: Python 3.11+")
def test_the_worker_that_kept_it_is_not_left_cancelling() -> None:
    # with limit=1 one worker runs every item: after it kept the cancellation as an
    # outcome, asyncio.timeout in its next item still times out as a TimeoutError
    async def item(i: int) -> str:
        if i == 1:
            await _item(1)
        if i == 2:
            try:
                async with asyncio.timeout(0):
                    await asyncio.sleep(10)
            except TimeoutError:
                return "timed out"
        return "ok"

    async def main() -> list[pk.Outcome[str]]:
        return await pk.map(item, [0, 1, 2], limit=1, settle=True)

    outcomes = asyncio.run(main())
    assert outcomes[0].value == "ok"
    assert not outcomes[1].ok
    assert outcomes[2].value == "timed out"


@pytest.mark.parametrize("settle", [False, True])
def test_the_callers_own_native_cancellation_still_cancels_the_map(settle: bool) -> None:
    started = 0

    async def slow(i: int) -> int:
        nonlocal started
        started += 1
        await asyncio.sleep(10)
        return i

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):  # wait_for cancels its task natively
            await asyncio.wait_for(pk.map(slow, range(4), settle=settle), 0.01)

    asyncio.run(main())
    assert started == 4


@pytest.mark.parametrize("settle", [False, True])
def test_the_callers_own_native_cancellation_still_cancels_a_flow(settle: bool) -> None:
    flow = pk.Flow()

    @flow.step
    async def a() -> int:
        return 1

    @flow.step
    async def b(a: int) -> int:
        await asyncio.sleep(10)  # the caller runs one of b/c itself
        return a

    @flow.step
    async def c(a: int) -> int:
        await asyncio.sleep(10)
        return a

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(flow.run(settle=settle), 0.01)

    asyncio.run(main())
