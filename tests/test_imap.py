"""imap: streaming, ordering, bounded memory, early exit, errors."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

from .test_fanout import Probe

pytestmark = pytest.mark.anyio


async def test_unordered_yields_in_completion_order() -> None:
    async def work(delay: float) -> float:
        await anyio.sleep(delay)
        return delay

    async with pk.imap(work, [0.05, 0.0, 0.02], limit=3) as results:
        got = [r async for r in results]
    assert got == [0.0, 0.02, 0.05]


async def test_ordered_yields_in_input_order() -> None:
    async def work(i: int) -> int:
        await anyio.sleep(0.001 * ((7 * i) % 5))
        return i

    async with pk.imap(work, range(30), limit=4, ordered=True) as results:
        assert [r async for r in results] == list(range(30))


@pytest.mark.parametrize("ordered", [False, True])
async def test_memory_stays_bounded_by_limit(ordered: bool) -> None:
    """Pulled-but-not-consumed items never exceed the 2 * limit window."""
    probe = Probe()
    pulled = consumed = worst = 0

    def source() -> Iterator[int]:
        nonlocal pulled, worst
        for i in range(500):
            pulled += 1
            worst = max(worst, pulled - consumed)
            yield i

    async with pk.imap(probe.work, source(), limit=4, ordered=ordered) as results:
        async for _ in results:
            consumed += 1
            await anyio.lowlevel.checkpoint()  # a slow consumer
    assert consumed == 500
    assert worst <= 2 * 4 + 1
    assert probe.peak <= 4


async def test_early_break_cancels_outstanding_work() -> None:
    probe = Probe()

    async def work(i: int) -> int:
        if i == 0:
            return i
        return await probe.work(i, steps=10**9)

    async with pk.imap(work, range(100), limit=5) as results:
        async for r in results:
            assert r == 0
            break
    assert probe.cancelled  # the running ones saw cancellation
    probe.assert_nothing_left()


async def test_error_is_raised_from_the_loop_and_cancels_the_rest() -> None:
    probe = Probe()
    boom = LookupError("nope")

    async def work(i: int) -> int:
        if i == 2:
            raise boom
        return await probe.work(i, steps=10**9 if i > 2 else 1)

    got = []
    with pytest.raises(LookupError) as info:
        async with pk.imap(work, range(10), limit=5) as results:
            async for r in results:
                got.append(r)
    assert info.value is boom
    probe.assert_nothing_left()


async def test_settle_yields_outcomes() -> None:
    async def work(i: int) -> int:
        if i == 1:
            raise ValueError(i)
        return i

    async with pk.imap(work, range(3), limit=2, ordered=True, settle=True) as results:
        outcomes = [o async for o in results]
    assert [o.ok for o in outcomes] == [True, False, True]


async def test_caller_cancellation_inside_the_block() -> None:
    probe = Probe()
    with anyio.move_on_after(0.05):
        async with pk.imap(
            functools.partial(probe.work, steps=10**9), range(50), limit=3
        ) as results:
            async for _ in results:
                pass
    assert len(probe.started) == 3
    probe.assert_nothing_left()


async def test_imap_can_be_entered_once() -> None:
    stream = pk.imap(Probe().work, [1], limit=1)
    async with stream as results:
        assert [r async for r in results] == [1]
    with pytest.raises(RuntimeError, match="once"):
        async with stream:
            pass


async def test_unbounded_imap_and_empty_input() -> None:
    async with pk.imap(Probe().work, range(5)) as results:
        assert sorted([r async for r in results]) == list(range(5))
    async with pk.imap(Probe().work, [], limit=2) as results:
        assert [r async for r in results] == []
