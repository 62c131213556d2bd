"""imap: streaming, ordering, bounded memory, early exit, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

from .test_fanout import Probe

pytestmark = pytest.mark.anyio


async def test_unordered_yields_in_completion_order() -> None:
    """Each item waits for the one that should finish before it (an event chain)."""
    order = ["b", "c", "a"]  # the completion order we force
    finished = {name: anyio.Event() for name in order}

    async def work(name: str) -> str:
        position = order.index(name)
        if position:
            await finished[order[position - 1]].wait()
        finished[name].set()
        return name

    async with pk.imap(work, ["a", "b", "c"], limit=3) as results:
        got = [r async for r in results]
    assert got == order


async def test_ordered_yields_in_input_order() -> None:
    async def work(i: int) -> int:
        for _ in range((7 * i) % 5):  # completion order != input order
            await anyio.lowlevel.checkpoint()
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
    three_running = anyio.Event()

    async def work(i: int) -> int:
        if len(probe.started) == 2:
            three_running.set()
        return await probe.work(i, steps=10**9)

    async def consumer() -> None:
        async with pk.imap(work, range(50), limit=3) as results:
            async for _ in results:
                pass  # pragma: no cover - nothing finishes

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        await three_running.wait()
        tg.cancel_scope.cancel()
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


@pytest.mark.parametrize("ordered", [False, True])
async def test_async_input_with_a_bounded_window(ordered: bool) -> None:
    """An async iterable, a slow consumer: the window bounds what is pulled ahead."""
    pulled = consumed = worst = 0

    async def source() -> AsyncIterator[int]:
        nonlocal pulled, worst
        for i in range(200):
            await anyio.lowlevel.checkpoint()
            pulled += 1
            worst = max(worst, pulled - consumed)
            yield i

    probe = Probe()
    got = []
    async with pk.imap(probe.work, source(), limit=3, ordered=ordered) as results:
        async for r in results:
            got.append(r)
            consumed += 1
            await anyio.lowlevel.checkpoint()
    assert sorted(got) == list(range(200))
    if ordered:
        assert got == list(range(200))
    assert worst <= 2 * 3 + 1
    assert probe.peak <= 3


async def test_fail_fast_from_an_async_input() -> None:
    async def source() -> AsyncIterator[int]:
        yield 1
        raise OSError("the input broke")

    with pytest.raises(OSError, match="the input broke"):
        async with pk.imap(Probe().work, source(), limit=2, settle=True) as results:
            async for _ in results:
                pass


@pytest.mark.anyio
async def test_an_item_failure_shows_with_the_body_error_that_escapes() -> None:
    """An item fails (fail-fast) while the body raises its own error before reading it:
    the body's error escapes, unchanged, and the item's failure is in its context
    (it was lost before: no chain, no log)."""

    class Boom(Exception):
        pass

    lost = KeyError(0)

    async def work(x: int) -> int:
        if x == 0:
            raise lost
        await anyio.sleep(1)
        return x

    with pytest.raises(Boom) as raised:
        async with pk.imap(work, range(3), limit=3):
            for _ in range(20):  # the workers run (item 0 fails); the body never reads it
                await anyio.lowlevel.checkpoint()
            raise Boom
    assert raised.value.__context__ is lost


@pytest.mark.parametrize("ordered", [False, True])
async def test_several_consumer_tasks_share_one_stream(ordered: bool) -> None:
    """Consumers in several tasks read one imap: every result reaches exactly one of
    them, and none is left waiting (a second waiting consumer used to replace the
    first's wake-up, which then waited forever)."""
    probe = Probe()
    got: list[int] = []

    async def consume(results: pk.imap[int]) -> None:
        async for r in results:
            got.append(r)

    # fail_after: a guard against the hang, not a timing assertion
    with anyio.fail_after(10):
        async with (
            pk.imap(probe.work, range(40), limit=4, ordered=ordered) as results,
            anyio.create_task_group() as tg,
        ):
            for _ in range(3):
                tg.start_soon(consume, results)
    assert sorted(got) == list(range(40))
    probe.assert_nothing_left()
