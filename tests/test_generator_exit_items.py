"""A ``GeneratorExit`` that an item (``map``, ``gather``, ``imap``) or a Flow step raises
in a worker task is that unit's failure: it stops the work (``settle=True`` too) and
comes out as itself, like any other non-cancellation ``BaseException``, not in a
``BaseExceptionGroup``. A worker coroutine that is really being closed (its task
dropped with a closed event loop, ``coro.close()`` by other code) is not such a
failure: the ``GeneratorExit`` goes on out of it, never swallowed."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Coroutine, Generator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk
from parallelkit._fanout.pool import Pool

BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])
GUARD = 30.0  # a hang guard only: nothing here waits on time


class _Units:
    """Items for one run: item 1 raises a GeneratorExit, the others wait until
    cancelled (and say so): the failure must stop them."""

    def __init__(self) -> None:
        self.raised: GeneratorExit | None = None
        self.started: list[int] = []  # the items (but item 1) that began to wait
        self.cancelled: list[int] = []
        self.stopped: anyio.Event | None = None  # set once two items were cancelled

    async def item(self, x: int) -> int:
        if x == 1:
            await anyio.lowlevel.checkpoint()  # the others are waiting by then
            self.raised = GeneratorExit(f"closed by hand: {x}")
            raise self.raised
        self.started.append(x)
        try:
            await anyio.sleep_forever()
        finally:
            self.cancelled.append(x)
            if len(self.cancelled) == 2 and self.stopped is not None:
                self.stopped.set()
        return x  # pragma: no cover - never reached

    def check(self, raised: BaseException | None, *, all_started: bool = True) -> None:
        """It came out as itself, and stopped every item that had started."""
        assert type(raised) is GeneratorExit, repr(raised)
        assert raised is self.raised  # the item's own object
        assert sorted(self.cancelled) == sorted(self.started)
        if all_started:
            assert sorted(self.started) == [0, 2]
        else:  # an async input: items start as they are pulled
            assert 0 in self.started


async def _caught(coro: Coroutine[Any, Any, object]) -> BaseException | None:
    # caught inside the loop: a GeneratorExit crossing the test runner's loop upsets it
    try:
        with anyio.fail_after(GUARD):
            await coro
    except BaseException as exc:
        return exc
    return None


# ------------------------------------------------------------ raised by the user's code
@BACKENDS
@pytest.mark.parametrize("settle", [False, True])
@pytest.mark.parametrize("limit", [None, 3])
def test_map_item_generator_exit_comes_out_as_itself(
    backend: str, settle: bool, limit: int | None
) -> None:
    units = _Units()
    raised = anyio.run(_caught, pk.map(units.item, range(3), limit=limit, settle=settle),
                       backend=backend)  # fmt: skip
    units.check(raised)


@BACKENDS
@pytest.mark.parametrize("settle", [False, True])
def test_map_over_an_async_input_item_generator_exit_comes_out_as_itself(
    backend: str, settle: bool
) -> None:
    units = _Units()

    async def items() -> AsyncIterator[int]:
        for x in range(3):
            yield x

    raised = anyio.run(_caught, pk.map(units.item, items(), limit=3, settle=settle),
                       backend=backend)  # fmt: skip
    units.check(raised, all_started=False)


@BACKENDS
@pytest.mark.parametrize("settle", [False, True])
def test_gather_item_generator_exit_comes_out_as_itself(backend: str, settle: bool) -> None:
    units = _Units()

    async def main() -> BaseException | None:
        return await _caught(pk.gather(*(units.item(x) for x in range(3)), settle=settle))

    units.check(anyio.run(main, backend=backend))


@BACKENDS
@pytest.mark.parametrize("settle", [False, True])
@pytest.mark.parametrize("ordered", [False, True])
def test_imap_item_generator_exit_comes_out_as_itself(
    backend: str, settle: bool, ordered: bool
) -> None:
    units = _Units()
    seen: list[BaseException] = []

    async def consume() -> None:
        async with pk.imap(units.item, range(3), limit=3, ordered=ordered,
                           settle=settle) as results:  # fmt: skip
            try:
                async for _ in results:
                    pass  # pragma: no cover - no item returns
            except BaseException as exc:
                seen.append(exc)
                raise

    raised = anyio.run(_caught, consume(), backend=backend)
    units.check(raised)
    assert seen == [raised]  # the `async for` got it as itself too


@BACKENDS
def test_imap_item_generator_exit_comes_out_of_a_block_that_does_not_read(backend: str) -> None:
    units = _Units()

    async def body() -> None:
        async with pk.imap(units.item, range(3), limit=3):
            await anyio.sleep_forever()

    async def main() -> BaseException | None:
        async with anyio.create_task_group() as tg:
            outcome: list[BaseException | None] = []

            async def run() -> None:
                outcome.append(await _caught(body()))

            units.stopped = anyio.Event()
            tg.start_soon(run)
            await units.stopped.wait()  # the item failed, the others stopped
            assert units.raised is not None
            for _ in range(10):  # and the block still waits: not the pool's to stop
                await anyio.lowlevel.checkpoint()
            assert not outcome
            tg.cancel_scope.cancel()
        assert outcome
        return outcome[0]

    raised = anyio.run(main, backend=backend)
    # the block was cancelled from outside: the item's failure comes out in its place
    units.check(raised)


@BACKENDS
@pytest.mark.parametrize("settle", [False, True])
def test_flow_step_generator_exit_in_a_worker_comes_out_as_itself(
    backend: str, settle: bool
) -> None:
    flow = pk.Flow()
    stopped: list[str] = []
    raised: list[GeneratorExit] = []

    @flow.step
    async def first() -> None:  # the caller's task takes it
        try:
            await anyio.sleep_forever()
        finally:
            stopped.append("first")

    @flow.step
    async def second() -> None:  # a worker task
        await anyio.lowlevel.checkpoint()
        raised.append(GeneratorExit("closed by hand"))
        raise raised[0]

    got = anyio.run(_caught, flow.run(settle=settle), backend=backend)  # type: ignore[arg-type]
    assert type(got) is GeneratorExit, repr(got)
    assert got is raised[0]
    assert stopped == ["first"]


@BACKENDS
def test_a_generator_exit_from_a_nested_map_comes_out_of_the_outer_one(backend: str) -> None:
    units = _Units()

    async def outer(x: int) -> list[int]:
        if x == 0:
            return await pk.map(units.item, range(3), limit=3)
        await anyio.sleep_forever()
        return []  # pragma: no cover

    raised = anyio.run(_caught, pk.map(outer, range(2), limit=2), backend=backend)
    units.check(raised)


# ------------------------------------------------------- a worker coroutine really closed
def _worker_body(root: Any) -> Any:
    """The pool worker's own coroutine in a task's (suspended) await chain: the task's
    coroutine itself, or the one anyio's per-task wrapper awaits."""
    coro = root
    while getattr(coro, "__qualname__", None) != "Pool._work":
        coro = coro.cr_await
    return coro


def _pool_of(body: Any) -> Any:
    return body.cr_frame.f_locals["self"]


def test_a_worker_closed_while_no_loop_runs_lets_the_close_through() -> None:
    """The loop is stopped with the workers waiting, and their coroutines are closed
    from outside it (what the garbage collector does to the tasks of a loop dropped
    this way): not taken for an item's failure. The ``GeneratorExit`` goes on out of
    each (not swallowed), its item's ``finally`` runs, the pool records no failure
    (and asks no cancellation of a loop that is not running); the run, resumed and
    cancelled, then ends with no task left."""
    roots: list[Any] = []
    finished: list[int] = []

    async def item(x: int) -> int:
        roots.append(asyncio.current_task().get_coro())  # type: ignore[union-attr]
        try:
            await anyio.sleep_forever()
        finally:
            finished.append(x)
        return x  # pragma: no cover

    async def main() -> list[int]:
        return await pk.map(item, range(3), limit=2)

    async def started() -> None:
        while len(roots) < 2:
            await asyncio.sleep(0)

    loop = asyncio.new_event_loop()
    try:
        caller = loop.create_task(main())
        loop.run_until_complete(started())
        bodies = [_worker_body(root) for root in roots]
        pool = _pool_of(bodies[0])
        for body in bodies:
            with pytest.raises(GeneratorExit):  # not swallowed (StopIteration), not changed
                body.throw(GeneratorExit())
            assert body.cr_frame is None  # closed: nothing left to run in it
        assert sorted(finished) == [0, 1]
        assert pool.error is None
        assert not caller.done()
        # the run ends when cancelled: nothing left running (the closed workers' tasks,
        # resumed, cannot run a closed coroutine: a RuntimeError comes out of the run)
        caller.cancel()
        loop.run_until_complete(asyncio.wait([caller]))
        if not caller.cancelled():
            assert caller.exception() is not None  # (retrieved: not logged at exit)
        assert not asyncio.all_tasks(loop)
    finally:
        loop.close()


def test_a_worker_task_closed_by_code_in_another_task_lets_the_close_through() -> None:
    """Code in another task closes a worker task's coroutine (``coro.close()``): the
    ``GeneratorExit`` thrown into it goes on out of it (not swallowed), and the pool
    takes it for no item's failure: the other worker goes on. (asyncio only: a trio
    task whose coroutine is closed under it breaks trio's run loop.)"""
    roots: list[Any] = []
    finished: list[int] = []

    async def item(x: int) -> int:
        roots.append(asyncio.current_task().get_coro())  # type: ignore[union-attr]
        try:
            await anyio.sleep_forever()
        finally:
            finished.append(x)
        return x  # pragma: no cover

    async def main() -> list[str]:
        closed: list[str] = []
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_caught, pk.map(item, range(3), limit=2))
                while len(roots) < 2:
                    await anyio.lowlevel.checkpoint()
                body = _worker_body(roots[0])
                pool = _pool_of(body)
                try:
                    body.throw(GeneratorExit())
                except GeneratorExit:
                    closed.append("went on")
                except StopIteration:  # pragma: no cover - the failure this test is for
                    closed.append("swallowed")
                for _ in range(10):  # the other worker and the caller go on
                    await anyio.lowlevel.checkpoint()
                closed.append(f"finished={sorted(finished)} error={pool.error!r}")
                # the closed worker's task, resumed by the cancellation, cannot run a
                # closed coroutine: a RuntimeError comes out of the run; only the
                # observations above are this test's
                tg.cancel_scope.cancel()
        return closed

    assert anyio.run(main, backend="asyncio") == ["went on", "finished=[0] error=None"]
    assert sorted(finished) == [0, 1]  # the other worker was cancelled with the run


@types.coroutine
def _suspend() -> Generator[str, None, None]:
    yield "suspended"  # a bare suspension: the one driving the coroutine gets this


@BACKENDS
def test_a_worker_coroutine_closed_by_the_code_driving_it_lets_the_close_through(
    backend: str,
) -> None:
    """A worker coroutine that no task of its own runs (driven by hand, here in the
    test's task) and is closed: the ``GeneratorExit`` goes on out of it, its item's
    ``finally`` runs, and the pool records no failure and cancels nothing."""
    finished: list[int] = []

    async def item(x: int) -> int:
        try:
            await _suspend()
        finally:
            finished.append(x)
        return x  # pragma: no cover

    async def main() -> tuple[BaseException | None, bool]:
        pool = Pool(item, iter([(0, 0)]), {}, max_workers=1)
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                pool._tg = tg  # as Pool.run sets it: a failure would cancel it
                body = pool._work()
                assert body.send(None) == "suspended"
                with pytest.raises(GeneratorExit):  # not swallowed (StopIteration)
                    body.throw(GeneratorExit())
                cancelled = tg.cancel_scope.cancel_called
                pool._tg = None
        return pool.error, cancelled

    assert anyio.run(main, backend=backend) == (None, False)
    assert finished == [0]
