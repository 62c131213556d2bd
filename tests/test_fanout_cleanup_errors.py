"""pk.map / pk.gather / pk.imap: clean-up errors raised while items are being stopped.

An item's clean-up (a ``finally``, an ``async with`` that rolls back) can fail while
the item is cancelled: by a sibling's failure (fail-fast) or by the caller (a deadline
around the call). Neither failure may be lost. The same rules as ``Flow.run``
(tests/test_flow_faults5.py): fail-fast raises the first failure itself, the later
ones on its ``__context__`` chain; a failure while the caller cancels comes out as
itself (never an ExceptionGroup), as a task group would have it, with its
``__context__`` left as it was. Nothing here waits on time: deadlines are made to
expire by hand (``scope.deadline = now``) once the items are running.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

# the same error and helpers as Flow's clean-up tests (one engine: the Pool)
from .test_flow_faults5 import GUARD, CleanupError, _context_chain

pytestmark = pytest.mark.anyio


def _cancelling() -> int:
    """asyncio (3.11+): the current task's pending cancellation requests; else 0."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # trio
        return 0
    cancelling = getattr(task, "cancelling", None)
    return 0 if cancelling is None else int(cancelling())


async def _until(started: list[int], count: int) -> None:
    while len(started) < count:
        await anyio.lowlevel.checkpoint()


class Expiry:
    """Records the items that started; the ``count``-th expires ``scope``'s deadline
    (``scope.deadline = now``, as a timer would) or cancels it (``cancel=True``)."""

    def __init__(self, count: int, *, cancel: bool = False) -> None:
        self.count = count
        self.cancel = cancel
        self.started: list[int] = []
        self.scope: anyio.CancelScope | None = None

    def start(self, i: int) -> None:
        self.started.append(i)
        if len(self.started) == self.count:
            assert self.scope is not None
            if self.cancel:
                self.scope.cancel()
            else:
                self.scope.deadline = anyio.current_time()


Fanout = Callable[[Callable[[int], Awaitable[Any]], int, bool], Awaitable[list[Any]]]


async def _via_map(fn: Callable[[int], Awaitable[Any]], n: int, settle: bool) -> list[Any]:
    return await pk.map(fn, range(n), limit=n, settle=settle)


async def _via_map_async_input(
    fn: Callable[[int], Awaitable[Any]], n: int, settle: bool
) -> list[Any]:
    async def items() -> AsyncIterator[int]:
        for i in range(n):
            yield i

    return await pk.map(fn, items(), limit=n, settle=settle)


async def _via_gather(fn: Callable[[int], Awaitable[Any]], n: int, settle: bool) -> list[Any]:
    return await pk.gather(*(fn(i) for i in range(n)), limit=n, settle=settle)


async def _via_imap(fn: Callable[[int], Awaitable[Any]], n: int, settle: bool) -> list[Any]:
    async with pk.imap(fn, range(n), limit=n, settle=settle) as results:
        return [r async for r in results]


FANOUTS = pytest.mark.parametrize(
    "fanout",
    [_via_map, _via_map_async_input, _via_gather, _via_imap],
    ids=["map", "map-async-input", "gather", "imap"],
)


# -- 1. fail-fast: a sibling's clean-up failure is chained, not dropped ----------------
@FANOUTS
@pytest.mark.parametrize("failing", [0, 2])
async def test_a_siblings_clean_up_failure_under_fail_fast_is_chained(
    fanout: Fanout, failing: int
) -> None:
    # `failing` fails once all three run; fail-fast cancels the others and each one's
    # rollback fails. The first failure is raised itself (never an ExceptionGroup);
    # the rollbacks' failures are on its context chain (shown by its traceback): they
    # were dropped, seen by nobody.
    started: list[int] = []

    async def item(i: int) -> int:
        started.append(i)
        if i == failing:
            await _until(started, 3)
            msg = "card declined"
            raise ConnectionError(msg)
        try:
            await anyio.sleep_forever()
        finally:
            msg = f"rollback of {i} failed"
            raise CleanupError(msg)

    with anyio.fail_after(GUARD), pytest.raises(ConnectionError, match="card declined") as info:
        await fanout(item, 3, False)
    assert type(info.value) is ConnectionError  # the original itself
    lost = sorted(str(e) for e in _context_chain(info.value) if isinstance(e, CleanupError))
    assert lost == [f"rollback of {i} failed" for i in range(3) if i != failing]
    assert _cancelling() == 0


@FANOUTS
async def test_the_same_error_raised_by_two_items_is_not_chained_to_itself(
    fanout: Fanout,
) -> None:
    # two items awaiting one shared failure (a BatchLoader batch reaches each of its
    # callers as the same exception object): raised once, its context left alone
    shared = ConnectionError("batch failed")
    started: list[int] = []

    async def item(i: int) -> int:
        started.append(i)
        if i == 0:
            await _until(started, 2)
            raise shared
        try:
            await anyio.sleep_forever()
        finally:
            raise shared

    with anyio.fail_after(GUARD), pytest.raises(ConnectionError) as info:
        await fanout(item, 2, False)
    assert info.value is shared
    assert shared.__context__ is None or not isinstance(shared.__context__, ConnectionError)
    assert all(e is not shared for e in _context_chain(shared))


async def test_a_clean_up_failure_that_saw_the_first_is_chained_without_a_cycle() -> None:
    # a sibling's rollback fails while handling the very error that failed the map
    # (its __context__ is that error): chained all the same, without making a cycle
    shared = ConnectionError("batch failed")
    started: list[int] = []

    async def item(i: int) -> int:
        started.append(i)
        if i == 0:
            await _until(started, 2)
            raise shared
        try:
            await anyio.sleep_forever()
        finally:
            try:
                raise shared
            except ConnectionError:
                msg = "rollback failed"
                raise CleanupError(msg)  # noqa: B904 - its context is the point

    with anyio.fail_after(GUARD), pytest.raises(ConnectionError) as info:
        await pk.map(item, range(2), limit=2)
    assert info.value is shared
    chain = _context_chain(shared)
    assert all(e is not shared for e in chain)  # no cycle through `shared`
    assert [str(e) for e in chain if isinstance(e, CleanupError)] == ["rollback failed"]


# -- 2. the caller cancels: a clean-up failure comes out, not the cancellation ---------
def _failing_cleanup(expiry: Expiry, failing: set[int]) -> Callable[[int], Awaitable[int]]:
    """Items that wait until cancelled; those in ``failing`` fail in their clean-up."""

    async def item(i: int) -> int:
        expiry.start(i)
        try:
            await anyio.sleep_forever()
        finally:
            if i in failing:
                msg = f"rollback of {i} failed"
                raise CleanupError(msg)
        return i  # pragma: no cover - never reached

    return item


@FANOUTS
@pytest.mark.parametrize("settle", [False, True], ids=["fail-fast", "settle"])
@pytest.mark.parametrize("scope_kind", ["move_on_after", "fail_after"])
async def test_a_clean_up_failure_while_the_caller_cancels_is_raised(
    fanout: Fanout, settle: bool, scope_kind: str
) -> None:
    # A deadline around the call expires; item 1's `finally` fails while it is
    # cancelled. As a task group would, the failure comes out, itself (never an
    # ExceptionGroup), with its context (the cancellation it was raised in) left as
    # it was; it was lost (the cancellation was all the caller saw). The deadline is
    # still seen as hit: the scope's next checkpoint is cancelled and the scope ends
    # it as its own; on asyncio the task is left with no cancellation pending.
    before = _cancelling()
    expiry = Expiry(3)
    item = _failing_cleanup(expiry, {1})
    raised: list[BaseException] = []
    reached: list[str] = []
    timed_out: list[BaseException] = []
    make = anyio.move_on_after if scope_kind == "move_on_after" else anyio.fail_after
    try:
        with make(GUARD) as scope:
            expiry.scope = scope
            try:
                await fanout(item, 3, settle)
            except CleanupError as exc:
                raised.append(exc)
            reached.append("checkpoint")
            await anyio.lowlevel.checkpoint()  # the deadline was hit: cancelled here
            reached.append("not cancelled")  # pragma: no cover - the failure
    except TimeoutError as exc:  # fail_after: its deadline was hit
        timed_out.append(exc)
    assert reached == ["checkpoint"]
    assert scope.cancelled_caught
    assert len(timed_out) == (scope_kind == "fail_after")
    assert len(raised) == 1
    error = raised[0]
    assert type(error) is CleanupError
    assert str(error) == "rollback of 1 failed"
    # raised while its item was being cancelled: that cancellation is its context
    assert isinstance(error.__context__, anyio.get_cancelled_exc_class())
    assert _cancelling() == before == 0


@pytest.mark.parametrize("scope_kind", ["move_on_after", "fail_after"])
async def test_a_clean_up_failure_escapes_a_deadline_it_is_not_caught_in(
    scope_kind: str,
) -> None:
    # not caught inside the scope: the failure passes through move_on_after /
    # fail_after unchanged (as through a task group), not swallowed as the deadline
    # (and fail_after raises no TimeoutError over it)
    expiry = Expiry(2)
    item = _failing_cleanup(expiry, {0})
    make = anyio.move_on_after if scope_kind == "move_on_after" else anyio.fail_after
    with pytest.raises(CleanupError, match="rollback of 0 failed") as info, make(GUARD) as scope:
        expiry.scope = scope
        await pk.map(item, range(2), limit=2)
    assert type(info.value) is CleanupError
    assert scope.cancel_called
    assert not scope.cancelled_caught
    assert _cancelling() == 0


@pytest.mark.parametrize("which", ["inner", "outer"])
async def test_nested_deadlines_see_their_own_expiry(which: str) -> None:
    # move_on_after(outer) { move_on_after(inner) { map } }: the failure comes out of
    # the map; afterwards only the scope whose deadline was hit is cancelled, and ends
    # that cancellation itself.
    expiry = Expiry(2)
    item = _failing_cleanup(expiry, {0})
    raised: list[BaseException] = []
    reached: list[str] = []
    with anyio.move_on_after(GUARD) as outer:
        with anyio.move_on_after(GUARD) as inner:
            expiry.scope = inner if which == "inner" else outer
            try:
                await pk.map(item, range(2), limit=2)
            except CleanupError as exc:
                raised.append(exc)
            await anyio.lowlevel.checkpoint()
            reached.append("inner body")  # pragma: no cover - cancelled either way
        reached.append("outer body")
        await anyio.lowlevel.checkpoint()
        reached.append("after outer checkpoint")
    assert [str(e) for e in raised] == ["rollback of 0 failed"]
    if which == "inner":
        assert inner.cancelled_caught
        assert not outer.cancel_called
        assert reached == ["outer body", "after outer checkpoint"]
    else:
        assert outer.cancelled_caught
        assert not inner.cancelled_caught
        assert reached == []
    assert _cancelling() == 0


async def test_the_caller_cancelling_with_two_clean_up_failures_chains_the_second() -> None:
    # two items fail in their clean-up as the caller cancels: the first comes out,
    # the second is on its context chain
    expiry = Expiry(2, cancel=True)
    item = _failing_cleanup(expiry, {0, 1})
    raised: list[BaseException] = []
    with anyio.CancelScope() as scope:
        expiry.scope = scope
        try:
            await pk.map(item, range(2), limit=2)
        except CleanupError as exc:
            raised.append(exc)
    assert len(raised) == 1
    messages = {str(raised[0])} | {
        str(e) for e in _context_chain(raised[0]) if isinstance(e, CleanupError)
    }
    assert messages == {"rollback of 0 failed", "rollback of 1 failed"}
    assert _cancelling() == 0


# -- settle=True: the caller's cancellation wins over the outcomes ----------------------
@FANOUTS
async def test_settle_when_the_caller_cancels_and_items_turn_it_into_errors(
    fanout: Fanout,
) -> None:
    # Every item turns its cancellation into an error (a driver raising its own error
    # when interrupted). The outcomes are not the answer: the caller cancelled. The
    # failure comes out (rule of a clean-up failure while cancelled), the others on its
    # chain; on trio the run returned the errors as outcomes, on asyncio it raised the
    # cancellation and lost them.
    expiry = Expiry(3, cancel=True)

    async def item(i: int) -> int:
        expiry.start(i)
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            msg = f"interrupted {i}"
            raise CleanupError(msg)  # noqa: B904 - the cancellation is its context
        return i  # pragma: no cover - never reached

    raised: list[BaseException] = []
    returned: list[Any] = []
    with anyio.CancelScope() as scope:
        expiry.scope = scope
        try:
            returned.append(await fanout(item, 3, True))
        except CleanupError as exc:
            raised.append(exc)
    assert returned == []  # a cancelled call does not return normally
    assert len(raised) == 1
    messages = {str(raised[0])} | {
        str(e) for e in _context_chain(raised[0]) if isinstance(e, CleanupError)
    }
    assert messages == {"interrupted 0", "interrupted 1", "interrupted 2"}
    assert _cancelling() == 0


@FANOUTS
@pytest.mark.parametrize("settle", [False, True], ids=["fail-fast", "settle"])
async def test_the_caller_cancelling_items_that_return_anyway_raises_the_cancellation(
    fanout: Fanout, settle: bool
) -> None:
    # items that swallow the cancellation and return: still, a cancelled call does not
    # return normally (on trio it returned the values)
    expiry = Expiry(3, cancel=True)

    async def item(i: int) -> int:
        expiry.start(i)
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            return i
        return i  # pragma: no cover - never reached

    returned: list[Any] = []
    with anyio.CancelScope() as scope:
        expiry.scope = scope
        returned.append(await fanout(item, 3, settle))
    assert scope.cancelled_caught
    assert returned == []
    assert _cancelling() == 0


async def test_settle_without_cancellation_keeps_errors_as_outcomes() -> None:
    # the rule above is for a cancelled call only: a settled run keeps every error
    async def item(i: int) -> int:
        await anyio.lowlevel.checkpoint()
        if i % 2:
            msg = f"bad {i}"
            raise CleanupError(msg)
        return i

    outcomes = await pk.map(item, range(4), limit=2, settle=True)
    assert [o.value for o in outcomes if o.ok] == [0, 2]
    assert [str(o.error) for o in outcomes if not o.ok] == ["bad 1", "bad 3"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is 3.11+")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_timeout_around_map_sees_the_failure_and_is_left_clean() -> None:
    # a native deadline (asyncio.timeout) around the map: the failure comes out, the
    # task has no cancellation left pending
    loop = asyncio.get_running_loop()
    holder: list[Any] = []

    async def item(i: int) -> int:
        if i == 1:
            holder[0].reschedule(loop.time())  # the deadline expires now
        try:
            await anyio.sleep_forever()
        finally:
            if i == 0:
                msg = "rollback of 0 failed"
                raise CleanupError(msg)
        return i  # pragma: no cover - never reached

    with pytest.raises(CleanupError):
        async with asyncio.timeout(None) as deadline:  # type: ignore[attr-defined,unused-ignore]
            holder.append(deadline)
            await pk.map(item, range(2), limit=2)
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


# -- imap: a block left early cancels the outstanding items -----------------------------
@pytest.mark.parametrize("ordered", [False, True])
async def test_imap_left_early_raises_a_clean_up_failure_of_the_cancelled_work(
    ordered: bool,
) -> None:
    # leaving the block (a `break`) cancels the items still running; one's rollback
    # fails: it comes out of the `async with`, itself (it was lost)
    started: list[int] = []

    async def item(i: int) -> int:
        started.append(i)
        if i == 0:
            await _until(started, 3)
            return i
        try:
            await anyio.sleep_forever()
        finally:
            if i == 2:
                msg = "rollback of 2 failed"
                raise CleanupError(msg)
        return i  # pragma: no cover - never reached

    got: list[int] = []
    with anyio.fail_after(GUARD), pytest.raises(CleanupError, match="rollback of 2") as info:
        async with pk.imap(item, range(3), limit=3, ordered=ordered) as results:
            async for value in results:
                got.append(value)
                break
    assert got == [0]
    assert type(info.value) is CleanupError
    assert isinstance(info.value.__context__, anyio.get_cancelled_exc_class())
