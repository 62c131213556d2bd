"""BatchLoader: a batch nobody waits for any more is cancelled (DESIGN principle 5),
and what a user trying to break the loader found."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

from .batch_helpers import entered_or_not, owned

pytestmark = pytest.mark.anyio

asyncio_only = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")]
)


async def wait_until(cond: Any) -> None:
    with anyio.fail_after(30):  # a hang guard, not a timing assertion
        while not cond():
            await anyio.lowlevel.checkpoint()


async def let_others_run(times: int = 20) -> None:
    for _ in range(times):
        await anyio.lowlevel.checkpoint()


class Gated:
    """A ``load_many`` that waits on a gate, and records how each call ended."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.calls: list[list[int]] = []
        self.cancelled: list[list[int]] = []  # calls that were cancelled
        self.cleaned: list[list[int]] = []  # calls whose clean-up ran

    async def __call__(self, keys: list[int]) -> dict[int, int]:
        self.calls.append(list(keys))
        try:
            await self.gate.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(list(keys))
            raise
        finally:
            self.cleaned.append(list(keys))
        return {k: k * 10 for k in keys}


@contextlib.contextmanager
def nothing_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with caplog.at_level(logging.DEBUG):
        yield
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == []


# --------------------------------------------- the last caller leaving cancels the batch
@entered_or_not
async def test_the_batch_of_a_cancelled_only_caller_is_cancelled(
    entered: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The only caller of a batch is cancelled while ``load_many`` runs: nobody wants
    the batch any more, so ``load_many`` is cancelled (its clean-up runs) instead of
    running to its end. Not entered, it used to run to its end in the cancelled
    caller's task (shielded), which also held the caller's cancellation back."""
    src = Gated()
    loader = pk.BatchLoader(src)
    with nothing_logged(caplog):
        async with owned(loader, entered):
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(loader.load, 1)
                    await wait_until(lambda: src.calls)
                    scope.cancel()
            await wait_until(lambda: src.cleaned)
            assert src.cancelled == [[1]]
            src.gate.set()
            assert await loader.load(1) == 10  # a new batch: the loader still works
    assert src.calls == [[1], [1]]
    assert loader.stats.calls == 2


@asyncio_only
@entered_or_not
@pytest.mark.parametrize(
    "how",
    [
        "task.cancel",
        pytest.param(
            "asyncio.timeout",
            marks=pytest.mark.skipif(
                sys.version_info < (3, 11), reason="asyncio.timeout: Python 3.11+"
            ),
        ),
    ],
)
async def test_asyncio_native_cancellation_of_the_only_caller_cancels_its_batch(
    entered: bool, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The same for asyncio's own cancellation (``task.cancel()``, ``asyncio.timeout``,
    a server cancelling the handler of a client that left)."""
    src = Gated()
    loader = pk.BatchLoader(src)
    outcome: list[str] = []

    async def caller() -> None:
        if how == "asyncio.timeout":
            try:
                async with asyncio.timeout(None) as deadline:
                    deadlines.append(deadline)
                    await loader.load(1)
            except TimeoutError:
                outcome.append("timed out")
        else:
            await loader.load(1)

    deadlines: list[asyncio.Timeout] = []
    with nothing_logged(caplog):
        async with owned(loader, entered):
            task = asyncio.ensure_future(caller())
            await wait_until(lambda: src.calls)
            if how == "asyncio.timeout":
                deadlines[0].reschedule(asyncio.get_running_loop().time())
            else:
                task.cancel()
            with anyio.fail_after(30):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert src.cancelled == [[1]]
            assert src.cleaned == [[1]]
            assert task.cancelled() == (how == "task.cancel")
            assert outcome == (["timed out"] if how == "asyncio.timeout" else [])
            src.gate.set()
            assert await loader.load(2) == 20


@entered_or_not
async def test_the_batch_goes_on_while_one_caller_waits_and_stops_with_the_last(
    entered: bool,
) -> None:
    """Two callers share a batch: the first one cancelled, the batch goes on for the
    second; once the second leaves too, ``load_many`` is cancelled. Not entered,
    the first caller is the one that runs the batch (its leader)."""
    src = Gated()
    loader = pk.BatchLoader(src, window=3600, max_batch=2)  # sent when the second key joins
    scopes = [anyio.CancelScope(), anyio.CancelScope()]
    ended: list[int] = []

    async def caller(i: int, key: int) -> None:
        with scopes[i]:
            await loader.load(key)
        ended.append(i)

    async with owned(loader, entered), anyio.create_task_group() as tg:
        tg.start_soon(caller, 0, 1)
        await wait_until(lambda: loader.stats.requests == 1)
        tg.start_soon(caller, 1, 2)
        await wait_until(lambda: src.calls)
        assert src.calls == [[1, 2]]
        scopes[0].cancel()
        await let_others_run()
        assert src.cancelled == []  # the second caller still waits: it goes on
        if entered:
            assert ended == [0]  # the first one left at once
        scopes[1].cancel()
        await wait_until(lambda: src.cleaned)
        assert src.cancelled == [[1, 2]]
    assert sorted(ended) == [0, 1]


@entered_or_not
async def test_the_leader_left_the_follower_gets_its_value(entered: bool) -> None:
    """The other way round: the caller that stays gets the batch's values, and the
    cancelled one's cancellation is not turned into a failure of anyone."""
    src = Gated()
    loader = pk.BatchLoader(src, window=3600, max_batch=2)  # sent when the second key joins
    got: list[int] = []
    scope = anyio.CancelScope()

    async def first() -> None:
        with scope:
            await loader.load(1)

    async def second() -> None:
        got.append(await loader.load(2))

    async with owned(loader, entered), anyio.create_task_group() as tg:
        tg.start_soon(first)
        await wait_until(lambda: loader.stats.requests == 1)
        tg.start_soon(second)
        await wait_until(lambda: src.calls)
        scope.cancel()
        await let_others_run()
        src.gate.set()
    assert got == [20]
    assert src.cancelled == []


@entered_or_not
async def test_a_load_many_caller_keeps_all_its_batches_going(entered: bool) -> None:
    """``load_many([1, 2, 3])`` over two batches (``max_batch=2``) waits for both:
    another caller of the first batch leaving does not cancel it, and cancelling
    the ``load_many`` caller (the last one of both) cancels both."""
    src = Gated()
    loader = pk.BatchLoader(src, max_batch=2)
    other = anyio.CancelScope()
    many = anyio.CancelScope()

    async def one() -> None:
        with other:
            await loader.load(1)

    async def several() -> None:
        with many:
            await loader.load_many([1, 2, 3])

    async with owned(loader, entered), anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(several)  # the same tick: key 1 is one batch's for both
        await wait_until(lambda: len(src.calls) == 2)
        assert sorted(src.calls) == [[1, 2], [3]]
        other.cancel()
        await let_others_run()
        assert src.cancelled == []  # load_many still waits for key 1's batch
        many.cancel()
        await wait_until(lambda: len(src.cleaned) == 2)
    assert sorted(src.cancelled) == [[1, 2], [3]]


@entered_or_not
async def test_a_batch_left_in_its_window_is_never_sent(entered: bool) -> None:
    """Every caller leaves while the batch still collects keys (a ``window``): it is
    never sent, and the next load opens a batch of its own."""
    src = Gated()
    src.gate.set()
    loader = pk.BatchLoader(src, window=3600)
    scope = anyio.CancelScope()

    async def caller() -> None:
        with scope:
            await loader.load(1)

    async with owned(loader, entered):
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            await wait_until(lambda: loader.stats.requests == 1)
            scope.cancel()
        await let_others_run()
        assert src.calls == []
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(loader.load, 2)
                await wait_until(lambda: loader.stats.requests == 2)
                loader._flush(loader._batch)  # type: ignore[arg-type]  # no window to sit out
    assert src.calls == [[2]]


@entered_or_not
async def test_with_cache_a_cancelled_batch_is_not_memoized(entered: bool) -> None:
    """``cache=True``: a batch cancelled because its callers left leaves no memo
    entry behind: the next load of its key loads it again and gets the value (not
    the "closed" error of the cancelled batch)."""
    src = Gated()
    loader = pk.BatchLoader(src, cache=True)
    scope = anyio.CancelScope()

    async def caller() -> None:
        with scope:
            await loader.load(1)

    async with owned(loader, entered):
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            await wait_until(lambda: src.calls)
            scope.cancel()
        await wait_until(lambda: src.cleaned)
        src.gate.set()
        assert await loader.load(1) == 10
        assert await loader.load(1) == 10  # memoized now
    assert src.calls == [[1], [1]]


@asyncio_only
async def test_asyncio_gather_cancelled_cancels_its_batch() -> None:
    """Entered on asyncio, ``load()`` is a future: ``asyncio.gather`` of them being
    cancelled (``wait_for`` timing out) cancels every future, hence the batch."""
    src = Gated()
    async with pk.BatchLoader(src) as loader:
        gathered = asyncio.gather(loader.load(1), loader.load(2), loader.load(1))
        await wait_until(lambda: src.calls)
        gathered.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gathered
        await wait_until(lambda: src.cleaned)
        assert src.cancelled == [[1, 2]]


@asyncio_only
async def test_asyncio_a_load_task_cancelled_before_it_ran_leaves_its_batch() -> None:
    """``asyncio.create_task(loader.load(k))`` cancelled before its first step: the
    future-as-coroutine is thrown a ``CancelledError`` without being awaited; that
    caller left too, so the batch nobody else waits for is cancelled."""
    src = Gated()
    async with pk.BatchLoader(src) as loader:
        task = asyncio.create_task(loader.load(1))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await let_others_run()
        assert src.calls == []  # never sent (or cancelled at once)
        src.gate.set()
        assert await loader.load(1) == 10
