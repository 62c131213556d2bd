"""Review of "a GeneratorExit raised by an item or a Flow step comes out as itself":
the places the first change left out. A Flow step run in the caller's own task (the
pool's first worker, ``Pool.run_here``) while another step runs in a helper task, and
an input iterator pulled before the workers start (``Pool.fill``), raise it as
themselves too, not in a ``BaseExceptionGroup``, as a ``KeyboardInterrupt`` is."""

from __future__ import annotations

from collections.abc import Coroutine, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])
GUARD = 30.0  # a hang guard only: nothing here waits on time


async def _caught(coro: Coroutine[Any, Any, object]) -> BaseException | None:
    # caught inside the loop: a GeneratorExit crossing the test runner's loop upsets it
    try:
        with anyio.fail_after(GUARD):
            await coro
    except BaseException as exc:
        return exc
    return None


@BACKENDS
@pytest.mark.parametrize("settle", [False, True])
def test_a_step_in_the_callers_task_raising_generator_exit_beside_a_helper_comes_out_as_itself(
    backend: str, settle: bool
) -> None:
    flow = pk.Flow()
    raised: list[GeneratorExit] = []
    tasks: dict[str, int] = {}
    stopped: list[str] = []
    helping: list[anyio.Event] = []  # made in the run's loop

    @flow.step
    async def first() -> None:  # the caller's task takes it (the pool's first worker)
        tasks["first"] = anyio.get_current_task().id
        await helping[0].wait()
        raised.append(GeneratorExit("closed by hand"))
        raise raised[0]

    @flow.step
    async def second() -> None:  # a helper task
        tasks["second"] = anyio.get_current_task().id
        helping[0].set()
        try:
            await anyio.sleep_forever()
        finally:
            stopped.append("second")

    async def main() -> tuple[BaseException | None, int]:
        caller = anyio.get_current_task().id
        helping.append(anyio.Event())
        return await _caught(flow.run(settle=settle)), caller  # type: ignore[call-overload]

    got, caller = anyio.run(main, backend=backend)
    assert tasks["first"] == caller != tasks["second"]  # inline, beside a helper
    assert type(got) is GeneratorExit, repr(got)
    assert got is raised[0]
    assert stopped == ["second"]  # the failure stopped the helper


def _input(before: int, raised: list[GeneratorExit]) -> Iterator[int]:
    """A generator input that raises a GeneratorExit after ``before`` items."""
    yield from range(before)
    raised.append(GeneratorExit("from the input"))
    raise raised[0]


@BACKENDS
@pytest.mark.parametrize("settle", [False, True])
@pytest.mark.parametrize("before", [0, 2, 5])
def test_a_generator_exit_raised_by_a_sync_input_comes_out_as_itself(
    backend: str, settle: bool, before: int
) -> None:
    # limit=3: the first three items are pulled before the workers start (in the
    # caller's task: Pool.fill), later ones by the workers; either way as itself
    raised: list[GeneratorExit] = []

    async def item(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x

    run = pk.map(item, _input(before, raised), limit=3, settle=settle)  # type: ignore[call-overload]
    got = anyio.run(_caught, run, backend=backend)
    assert type(got) is GeneratorExit, repr(got)
    assert got is raised[0]


@BACKENDS
@pytest.mark.parametrize("before", [0, 2])
def test_an_interrupt_raised_by_a_sync_input_before_the_workers_start_comes_out_as_itself(
    backend: str, before: int
) -> None:
    # the reference the GeneratorExit above is held to
    def interrupted() -> Iterator[int]:
        yield from range(before)
        raise KeyboardInterrupt

    async def item(x: int) -> int:
        return x

    got = anyio.run(_caught, pk.map(item, interrupted(), limit=3), backend=backend)
    assert type(got) is KeyboardInterrupt, repr(got)
