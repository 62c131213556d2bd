"""pk.Flow faults, fifth round: errors raised while a run is being stopped.

Found by running the recipes of docs/flow.md and docs/recipes/payment-flow.md with
steps whose clean-up (a ``finally``, an ``async with`` that rolls back) fails while
the step is cancelled, by a sibling's failure (fail-fast) or by the caller (a
deadline around ``run()``), on asyncio and trio. Nothing here waits on time: the
cancellations are made by hand once the steps are running.
"""

from __future__ import annotations

import asyncio
import sys

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

pytestmark = pytest.mark.anyio

GUARD = 30.0  # a hang guard only: nothing here waits on time


class CleanupError(Exception):
    """A step's clean-up failed while the step was being cancelled."""


def _context_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], {id(exc)}
    current = exc.__context__
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__context__
    return chain


def _two_steps(started: list[str], fails_on_cancel: set[str]) -> pk.Flow:
    """Two independent steps (``first`` runs in the caller's task, ``second`` in a
    worker); those in ``fails_on_cancel`` fail in their clean-up when cancelled."""
    flow = pk.Flow(name="two")

    async def body(name: str) -> str:
        started.append(name)
        try:
            await anyio.sleep_forever()
        finally:
            if name in fails_on_cancel:
                msg = f"rollback of {name} failed"
                raise CleanupError(msg)
        return name  # pragma: no cover - never reached

    @flow.step
    async def first(order_id: str) -> str:
        return await body("first")

    @flow.step
    async def second(order_id: str) -> str:
        return await body("second")

    return flow


async def _run_and_cancel(flow: pk.Flow, started: list[str]) -> BaseException | None:
    """Run ``flow``; cancel the run from outside once both steps are running. Returns
    what ``run()`` raised (``None``: the cancellation, caught by its scope)."""
    raised: list[BaseException] = []
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def run() -> None:
                with scope:
                    try:
                        await flow.run(order_id="o1")
                    except BaseException as exc:
                        raised.append(exc)
                        if isinstance(exc, anyio.get_cancelled_exc_class()):
                            raise

            tg.start_soon(run)
            while len(started) < 2:
                await anyio.lowlevel.checkpoint()
            scope.cancel()
    return _not_cancelled(raised[0]) if raised else None


def _not_cancelled(exc: BaseException) -> BaseException | None:
    return None if isinstance(exc, anyio.get_cancelled_exc_class()) else exc


# -- a step's clean-up fails while the caller cancels the run --------------------------
@pytest.mark.parametrize("failing", ["first", "second"])
async def test_a_clean_up_failure_while_the_caller_cancels_is_raised(failing: str) -> None:
    # A deadline around run() fires; a step's `finally` fails while it is cancelled.
    # As with a single step (run in the caller's task: raised) and as a task group
    # does, the failure must come out, unchanged; it was lost (the cancellation was
    # all the caller saw) when the step ran in the pool.
    started: list[str] = []
    flow = _two_steps(started, {failing})
    raised = await _run_and_cancel(flow, started)
    assert isinstance(raised, CleanupError)  # itself, never an ExceptionGroup
    assert str(raised) == f"rollback of {failing} failed"
    # raised while its step was being cancelled: the cancellation is its context
    assert isinstance(raised.__context__, anyio.get_cancelled_exc_class())


async def test_a_single_step_clean_up_failure_while_cancelled_is_raised() -> None:
    # the reference behaviour (a chain runs in the caller's task): raised as itself
    flow = pk.Flow()
    started: list[str] = []

    @flow.step
    async def only(order_id: str) -> None:
        started.append("only")
        started.append("only")  # _run_and_cancel waits for two entries
        try:
            await anyio.sleep_forever()
        finally:
            msg = "rollback of only failed"
            raise CleanupError(msg)

    raised = await _run_and_cancel(flow, started)
    assert isinstance(raised, CleanupError)
    assert str(raised) == "rollback of only failed"


# -- fail-fast: a second failure, in a step cancelled by the first, is not lost ---------
@pytest.mark.parametrize("failing", ["first", "second"])
async def test_a_clean_up_failure_of_a_step_stopped_by_fail_fast_is_chained(
    failing: str,
) -> None:
    # `failing` fails; the other step is cancelled and its rollback fails too. The run
    # raises the first failure itself (never an ExceptionGroup), and the rollback's
    # failure is on its context chain (shown by its traceback), as imap does: it was
    # dropped, seen by nobody.
    flow = pk.Flow(name="payment")
    started: list[str] = []

    async def body(name: str) -> str:
        started.append(name)
        if name == failing:
            while len(started) < 2:
                await anyio.lowlevel.checkpoint()
            msg = "card declined"
            raise ConnectionError(msg)
        try:
            await anyio.sleep_forever()
        finally:
            msg = f"rollback of {name} failed"
            raise CleanupError(msg)
        return name  # pragma: no cover - never reached

    @flow.step
    async def first(order_id: str) -> str:
        return await body("first")

    @flow.step
    async def second(order_id: str) -> str:
        return await body("second")

    with anyio.fail_after(GUARD), pytest.raises(ConnectionError, match="card declined") as info:
        await flow.run(order_id="o1")
    assert type(info.value) is ConnectionError  # the original itself
    other = "second" if failing == "first" else "first"
    lost = [e for e in _context_chain(info.value) if isinstance(e, CleanupError)]
    assert [str(e) for e in lost] == [f"rollback of {other} failed"]


async def test_the_same_error_raised_by_two_steps_is_not_chained_to_itself() -> None:
    # two steps awaiting one shared failure (a BatchLoader batch reaches each of its
    # callers as the same exception object): raised once, its context left alone
    flow = pk.Flow()
    shared = ConnectionError("batch failed")
    started: list[str] = []

    @flow.step
    async def first(order_id: str) -> None:
        started.append("first")
        while len(started) < 2:
            await anyio.lowlevel.checkpoint()
        raise shared

    @flow.step
    async def second(order_id: str) -> None:
        started.append("second")
        try:
            await anyio.sleep_forever()
        finally:
            raise shared

    with anyio.fail_after(GUARD), pytest.raises(ConnectionError) as info:
        await flow.run(order_id="o1")
    assert info.value is shared
    assert shared.__context__ is None or not isinstance(shared.__context__, ConnectionError)


# -- asyncio: a task.cancel() of a worker task that no scope made, in settle mode -------
def _driver_cancels(started: list[str]) -> pk.Flow:
    """``first`` runs in the caller's task, ``second`` in a worker task, where the code
    it calls cancels the task it runs in (a driver on a lost connection)."""
    flow = pk.Flow(name="orders")

    @flow.step
    async def first(order_id: str) -> str:
        started.append("first")
        while len(started) < 2:
            await anyio.lowlevel.checkpoint()
        return "f"

    @flow.step
    async def second(order_id: str) -> str:
        started.append("second")
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # by code the step calls: no cancel scope was cancelled
        await asyncio.sleep(0)
        return "s"  # pragma: no cover - never reached

    @flow.step
    async def after_second(second: str) -> str:
        return second

    @flow.step
    async def after_first(first: str) -> str:
        await anyio.lowlevel.checkpoint()
        return first

    return flow


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_settle_keeps_a_workers_foreign_cancellation_as_the_steps_outcome() -> None:
    # pk.map(settle=True) keeps such a cancellation as the item's outcome and runs the
    # rest; a flow's step in a worker task did not: the whole settled run raised a
    # CancelledError (its other outcomes lost), as if the caller had been cancelled.
    started: list[str] = []
    flow = _driver_cancels(started)
    with anyio.fail_after(GUARD):
        outcomes = await flow.run(order_id="o1", settle=True)
    assert outcomes["first"].value == "f"
    assert outcomes["after_first"].value == "f"
    assert isinstance(outcomes["second"].error, asyncio.CancelledError)
    skipped = outcomes["after_second"].error
    assert isinstance(skipped, pk.DependencyFailed)
    assert skipped.__cause__ is outcomes["second"].error
    timeline = outcomes.timeline
    assert timeline["second"].status == "error"  # it failed; nobody cancelled the run
    assert timeline["after_second"].status == "skipped"
    task = asyncio.current_task()
    assert task is not None
    if sys.version_info >= (3, 11):
        assert task.cancelling() == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_fail_fast_raises_a_workers_foreign_cancellation_as_map_does() -> None:
    # fail-fast: the step's failure is that CancelledError, raised itself (pk.map's rule)
    started: list[str] = []
    flow = _driver_cancels(started)
    with anyio.fail_after(GUARD), pytest.raises(asyncio.CancelledError):
        await flow.run(order_id="o1")
