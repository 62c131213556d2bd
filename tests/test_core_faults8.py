"""Core fan-out faults, round 8: inputs whose length is not what they iterate, an
interrupt from a generator input or an item, a shared limiter's turn taken as a run
is cancelled, an async generator input whose clean-up fails as the caller cancels."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

from .virtual_time import run_virtual

pytestmark = pytest.mark.anyio


async def _same(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return x


# ------------------------------------------------------------ inputs and their len()
async def test_imap_streams_a_range_too_long_for_len() -> None:
    # len(range(10**20)) raises OverflowError: the input is streamed, as one without
    # a length is, instead of failing before any item runs
    seen = []
    with anyio.fail_after(30):
        async with pk.imap(_same, range(10**20), limit=4, ordered=True) as results:
            async for value in results:
                seen.append(value)
                if len(seen) == 10:
                    break
    assert seen == list(range(10))


class _Stop(Exception):
    pass


async def test_map_over_a_range_too_long_for_len_runs_its_items() -> None:
    async def stop_at_five(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        if x == 5:
            raise _Stop(x)
        return x

    with anyio.fail_after(30), pytest.raises(_Stop):
        await pk.map(stop_at_five, range(10**20), limit=2)


@pytest.mark.parametrize("limit", [None, 1, 3])
async def test_map_over_a_list_its_items_append_to_says_so(limit: int | None) -> None:
    # a work queue: each item may add more. map runs the items a list holds when it is
    # called (its hot path is a plain enumerate: supporting growth costs 5 ns an item);
    # a list that grows under it is a clear error, not an IndexError from the results
    queue = [0]

    async def crawl(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        if x < 5:
            queue.append(x + 1)
        return x * 10

    with anyio.fail_after(30), pytest.raises(RuntimeError, match="grew while map ran") as info:
        await pk.map(crawl, queue, limit=limit)
    assert "1 items when it was called" in str(info.value)
    assert isinstance(info.value.__cause__, IndexError)


async def test_an_items_own_index_error_is_raised_as_itself_when_the_list_grew() -> None:
    items = [0]

    async def grow_then_fail(x: int) -> int:
        items.append(1)
        return [][x]  # the item's own IndexError: not taken for the list's growth

    with pytest.raises(IndexError, match="list index out of range") as info:
        await pk.map(grow_then_fail, items)
    assert info.value.__traceback__ is not None


@pytest.mark.parametrize("settle", [False, True])
@pytest.mark.parametrize("limit", [None, 1, 2])
async def test_map_over_a_list_that_shrinks_returns_no_missing_results(
    limit: int | None, settle: bool
) -> None:
    # was: None for the items that were never there (a result nobody computed)
    items = [1, 2, 3, 4]

    async def first_drops_the_last(x: int) -> int:
        if x == 1:
            items.pop()
        await anyio.lowlevel.checkpoint()
        return x

    with anyio.fail_after(30):
        results = await pk.map(first_drops_the_last, items, limit=limit, settle=settle)
    values = [r.unwrap() for r in results] if settle else results
    assert values == [1, 2, 3]


class _Claims:
    """A sized iterable whose ``len()`` is not what it iterates."""

    def __init__(self, items: list[int], length: int) -> None:
        self._items = items
        self._length = length

    def __iter__(self) -> Iterator[int]:
        return iter(self._items)

    def __len__(self) -> int:
        return self._length


@pytest.mark.parametrize(("items", "length"), [([1, 2, 3], 5), ([1, 2, 3, 4, 5], 2)])
@pytest.mark.parametrize("limit", [None, 2])
async def test_map_results_are_what_the_input_iterated_not_what_len_said(
    items: list[int], length: int, limit: int | None
) -> None:
    done: list[int] = []
    with anyio.fail_after(30):
        got = await pk.map(
            _same, _Claims(items, length), limit=limit, progress=lambda n, _t: done.append(n)
        )
    assert got == items
    assert done[-1] == len(items)


class _AsyncClaims(_Claims):
    """An async iterable with a ``len()`` that is not what it iterates."""

    def __aiter__(self) -> AsyncIterator[int]:
        return self._each()

    async def _each(self) -> AsyncIterator[int]:
        for item in self:
            yield item


@pytest.mark.parametrize(("items", "length"), [([1, 2, 3], 5), ([1, 2, 3, 4, 5], 2)])
@pytest.mark.parametrize("limit", [None, 2])
async def test_map_results_are_what_an_async_input_iterated_not_what_len_said(
    items: list[int], length: int, limit: int | None
) -> None:
    with anyio.fail_after(30):
        assert await pk.map(_same, _AsyncClaims(items, length), limit=limit) == items


# ------------------------------------- a BaseException that is not a cancellation
# Both need src/parallelkit/_fanout/pool.py (not this round's to edit): see the report.
def _interrupted_input() -> Iterator[int]:
    yield 1
    raise SystemExit(3)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("settle", [False, True])
def test_an_interrupt_raised_by_a_generator_input_comes_out_as_itself(
    backend: str, settle: bool
) -> None:
    # as documented: a BaseException that is not a cancellation comes out as itself;
    # with limit=None (or a limit above what is pulled ahead) it came in a group.
    # (Caught inside the loop: a SystemExit crossing the test runner's loop upsets it.)
    async def main() -> BaseException | None:
        try:
            with anyio.fail_after(30):
                await pk.map(_same, _interrupted_input(), settle=settle)
        except BaseException as exc:
            return exc
        return None

    raised = anyio.run(main, backend=backend)
    assert type(raised) is SystemExit, repr(raised)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("settle", [False, True])
def test_a_generator_exit_raised_by_an_item_comes_out_as_itself(backend: str, settle: bool) -> None:
    async def item(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        if x == 1:
            raise GeneratorExit
        return x

    async def main() -> BaseException | None:
        try:
            with anyio.fail_after(30):
                await pk.map(item, range(3), limit=2, settle=settle)
        except BaseException as exc:
            return exc
        return None

    raised = anyio.run(main, backend=backend)
    assert type(raised) is GeneratorExit, repr(raised)


# ---------------------------------------------- a shared limiter's turn, not started
class _Failed(Exception):
    pass


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("own_rate", [None, 10.0])
def test_a_turn_taken_as_the_run_is_cancelled_is_given_back(
    backend: str, own_rate: float | None
) -> None:
    """A worker waiting for a shared limiter's slot is handed one as a sibling fails: it
    takes its turn under the limiter's rate at once (none is due yet) and then sees the
    cancellation, so its item never starts. That turn was used up all the same: the
    next caller of the limiter waited one turn (1 s here) for a start nobody made."""
    shared = pk.Limiter(concurrency=2, rate=1)
    starts: list[float] = []

    async def item(x: int) -> int:
        starts.append(anyio.current_time())
        await anyio.sleep(5)
        raise _Failed(x)

    async def main() -> float:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                held = anyio.Event()
                done = anyio.Event()

                async def hold() -> None:
                    async with shared:  # the other slot, for the whole run
                        held.set()
                        await done.wait()

                tg.start_soon(hold)
                await held.wait()
                with pytest.raises(_Failed):
                    await pk.map(item, range(3), limit=shared, rate=own_rate)
                assert shared.statistics().running == 1  # the holder's only
                began = anyio.current_time()
                async with shared:
                    waited = anyio.current_time() - began
                done.set()
        assert shared.statistics() == pk.LimiterStatistics(2, 1.0, 0, 0)
        return waited

    assert run_virtual(main, backend) == 0.0
    assert starts == [1.0]  # the holder's turn at 0, the item's at 1, failing at 6


# --------------------------------------- an async generator input's failed clean-up
async def _slow(x: int) -> int:
    await anyio.sleep(10)
    return x


class _CloseFailed(Exception):
    pass


async def _cursor() -> AsyncIterator[int]:
    try:
        for i in range(100):
            yield i
    finally:
        raise _CloseFailed("the cursor could not be closed")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("settle", [False, True])
def test_map_reports_an_input_whose_close_fails_as_the_caller_cancels(
    backend: str, settle: bool
) -> None:
    """A deadline around ``map`` over an async generator whose clean-up fails: the
    failure comes out in place of the cancellation, as ``imap`` (and an item's failed
    clean-up) does; it was chained to the cancellation, which the deadline swallowed."""

    async def main() -> None:
        raised: list[BaseException] = []
        with anyio.move_on_after(1) as deadline:
            try:
                await pk.map(_slow, _cursor(), limit=2, settle=settle)
            except _CloseFailed as exc:
                raised.append(exc)
            await anyio.lowlevel.checkpoint()  # still past the deadline: cancelled here
            pytest.fail("not cancelled")  # pragma: no cover
        assert deadline.cancelled_caught
        assert len(raised) == 1
        assert isinstance(raised[0].__context__, GeneratorExit)  # as it was raised

    run_virtual(main, backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_imap_reports_an_input_whose_close_fails_as_the_caller_cancels(backend: str) -> None:
    async def main() -> None:
        raised: list[BaseException] = []
        with anyio.move_on_after(1) as deadline:
            try:
                async with pk.imap(_slow, _cursor(), limit=2) as results:
                    async for _ in results:
                        pass  # pragma: no cover
            except _CloseFailed as exc:
                raised.append(exc)
            await anyio.lowlevel.checkpoint()
            pytest.fail("not cancelled")  # pragma: no cover
        assert deadline.cancelled_caught
        assert len(raised) == 1

    run_virtual(main, backend)
