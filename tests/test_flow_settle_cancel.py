"""``Flow.run(settle=True)`` cancelled by its caller while a step's clean-up fails:
the failure comes out, as from ``pk.map(settle=True)`` (a cancelled call never returns
its outcomes; an error raised while it is being cancelled is a failure, not one of
them). It was lost: the step's error became an outcome nobody would see, and only the
cancellation came out."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

from .test_flow_faults5 import GUARD, CleanupError, _two_steps

pytestmark = pytest.mark.anyio


async def _run_settled_and_cancel(flow: pk.Flow, started: list[str]) -> BaseException:
    """Run ``flow`` with ``settle=True``; cancel it from outside once both steps run.
    Returns what ``run()`` raised."""
    raised: list[BaseException] = []
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def run() -> None:
                with scope:
                    try:
                        await flow.run(order_id="o1", settle=True)
                    except BaseException as exc:
                        raised.append(exc)
                        if isinstance(exc, anyio.get_cancelled_exc_class()):
                            raise
                    else:
                        raised.append(AssertionError("a cancelled run returned its outcomes"))

            tg.start_soon(run)
            while len(started) < 2:
                await anyio.lowlevel.checkpoint()
            scope.cancel()
    return raised[0]


@pytest.mark.parametrize("failing", ["first", "second"])
async def test_a_clean_up_failure_while_the_caller_cancels_a_settled_run_is_raised(
    failing: str,
) -> None:
    started: list[str] = []
    raised = await _run_settled_and_cancel(_two_steps(started, {failing}), started)
    assert isinstance(raised, CleanupError), raised  # itself, not the cancellation
    assert str(raised) == f"rollback of {failing} failed"
    assert isinstance(raised.__context__, anyio.get_cancelled_exc_class())


async def test_a_settled_run_cancelled_with_clean_clean_ups_raises_the_cancellation() -> None:
    started: list[str] = []
    raised = await _run_settled_and_cancel(_two_steps(started, set()), started)
    assert isinstance(raised, anyio.get_cancelled_exc_class())


async def test_a_settled_run_keeps_a_steps_error_as_its_outcome_when_not_cancelled() -> None:
    # the guard: without a cancellation, a failing step is an outcome, as before
    flow = pk.Flow()

    @flow.step
    async def first(order_id: str) -> str:
        raise CleanupError(order_id)

    @flow.step
    async def second(order_id: str) -> str:
        await anyio.lowlevel.checkpoint()
        return "ok"

    outcomes = await flow.run(order_id="o1", settle=True)
    assert isinstance(outcomes["first"].error, CleanupError)
    assert outcomes["second"].value == "ok"
