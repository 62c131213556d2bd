"""Objects that own background work (``async with obj:``) and the body's errors.

``OwnedTaskGroup`` (``_core/owned.py``) is the one way an object owns a task
group; every owner closes it the same way, so an error raised in the body comes
out as itself, never wrapped in a ``BaseExceptionGroup`` by the task group.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio


class Interrupt(BaseException):
    """A ``KeyboardInterrupt``-like exception: a ``BaseException``, no cancellation."""


async def _load_many(keys: Sequence[int]) -> list[int]:
    return list(keys)


async def _one(x: int) -> int:
    return x


OWNERS: dict[str, Callable[[], AbstractAsyncContextManager[Any]]] = {
    "SWRCache": lambda: pk.SWRCache(fresh=1, stale=2),
    "BatchLoader": lambda: pk.BatchLoader(_load_many),
    "imap": lambda: pk.imap(_one, range(3), limit=2),
}


@pytest.mark.parametrize("owner", sorted(OWNERS))
@pytest.mark.parametrize("error", [Interrupt("body"), ValueError("body")], ids=repr)
async def test_an_error_in_the_body_comes_out_as_itself(owner: str, error: BaseException) -> None:
    caught: BaseException | None = None
    try:
        async with OWNERS[owner]():
            raise error
    except BaseException as exc:  # what came out is the point
        caught = exc
    assert caught is error, f"{caught!r} came out"


@pytest.mark.parametrize("owner", sorted(OWNERS))
async def test_a_cancellation_of_the_body_still_cancels(owner: str) -> None:
    with anyio.move_on_after(1) as scope:
        async with OWNERS[owner]():
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught


async def test_a_base_exception_from_an_owners_own_task_comes_out_as_itself() -> None:
    """An owner's tasks hand ``Exception``s to whoever waits; a ``KeyboardInterrupt``-
    like one they let through. It comes out of ``async with`` as itself (the backend's
    task group wrapped it in a ``BaseExceptionGroup``); the body's error is its context."""
    stop = Interrupt("load_many")

    async def load_many(keys: Sequence[int]) -> list[int]:
        await anyio.lowlevel.checkpoint()
        raise stop

    caught: BaseException | None = None
    try:
        async with pk.BatchLoader(load_many) as loader:
            await loader.load(1)  # its batch dies with the loader: a RuntimeError here
    except BaseException as exc:  # what came out is the point
        caught = exc
    assert caught is stop, f"{caught!r} came out"
    assert isinstance(caught.__context__, RuntimeError)


async def test_several_base_exceptions_from_an_owners_tasks_stay_a_group() -> None:
    async def fail(name: str) -> None:
        raise Interrupt(name)  # at once: a checkpoint first could see the other's cancel

    with pytest.raises(BaseExceptionGroup) as info:
        async with pk.SWRCache(fresh=1, stale=2) as cache:
            tg = cache._owner.tg
            assert tg is not None
            tg.start_soon(fail, "a")
            tg.start_soon(fail, "b")
            await anyio.sleep_forever()
    assert sorted(str(e) for e in info.value.exceptions) == ["a", "b"]
