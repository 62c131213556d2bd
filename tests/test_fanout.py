"""gather / map / imap: order, bounds, fail-fast, settle, timeouts, retries, cleanup."""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any, NoReturn

import anyio
import anyio.lowlevel
import pytest
import tenacity
import trio.testing

import parallelkit as pk

pytestmark = pytest.mark.anyio

#: a stray CancelledError is told from a cancellation by Task.cancelling() (3.11+)
STRAY_NEEDS = "Task.cancelling() is new in Python 3.11"


async def stray_cancellation(seen: list[BaseException]) -> NoReturn:
    """Await a future someone else cancelled (asyncio): the ``CancelledError`` that no
    cancellation of this task caused; it is recorded in ``seen``, then raised."""
    import asyncio

    future = asyncio.get_running_loop().create_future()
    future.cancel()
    try:
        await future
    except asyncio.CancelledError as exc:
        seen.append(exc)
        raise
    raise AssertionError  # pragma: no cover - a cancelled future raises


def virtual_clock() -> pytest.MarkDecorator:
    """Run the test on trio's virtual clock: sleeps take no real time, so timing
    assertions are exact and hold on any machine, however loaded."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return pytest.mark.parametrize(
        "anyio_backend", [pytest.param(("trio", {"clock": clock}), id="trio-virtual-clock")]
    )


def live_tasks() -> int:
    """How many tasks exist right now (asyncio or trio)."""
    try:
        import asyncio

        return len(asyncio.all_tasks())
    except RuntimeError:  # not asyncio
        pass
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


class Probe:
    """Counts running items and remembers the peak; records every start and exit."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.started: list[Any] = []
        self.exited: list[Any] = []
        self.cancelled: list[Any] = []

    async def work(self, item: Any, steps: int = 3) -> Any:
        self.started.append(item)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            for _ in range(steps):
                await anyio.lowlevel.checkpoint()
            return item
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(item)
            raise
        finally:
            self.running -= 1
            self.exited.append(item)

    def assert_nothing_left(self) -> None:
        assert self.running == 0
        assert sorted(map(repr, self.started)) == sorted(map(repr, self.exited))


# ---------------------------------------------------------------- order and results
async def test_map_keeps_input_order() -> None:
    finished: list[int] = []

    async def slow_first(i: int) -> int:
        for _ in range(10 - i):  # earlier items take more scheduler passes
            await anyio.lowlevel.checkpoint()
        finished.append(i)
        return i * i

    assert await pk.map(slow_first, range(10), limit=10) == [i * i for i in range(10)]
    assert finished == list(range(9, -1, -1))  # they finished in the opposite order


async def test_gather_keeps_order_and_accepts_callables() -> None:
    async def value(x: int, delay: float) -> int:
        await anyio.sleep(delay)
        return x

    result = await pk.gather(
        value(1, 0.02), lambda: value(2, 0.0), functools.partial(value, 3, 0.01)
    )
    assert result == [1, 2, 3]


async def test_gather_of_nothing_and_map_of_nothing() -> None:
    assert await pk.gather() == []
    assert await pk.map(Probe().work, [], limit=3) == []


async def test_map_accepts_async_iterables() -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(20):
            await anyio.lowlevel.checkpoint()
            yield i

    probe = Probe()
    assert await pk.map(probe.work, numbers(), limit=3) == list(range(20))
    assert probe.peak <= 3


async def test_unbounded_map_runs_everything_at_once() -> None:
    probe = Probe()
    await pk.map(probe.work, range(50))
    assert probe.peak == 50


# ---------------------------------------------------------------- the bound
@pytest.mark.parametrize("limit", [1, 2, 7])
async def test_map_never_exceeds_limit_and_reaches_it(limit: int) -> None:
    probe = Probe()
    await pk.map(probe.work, range(40), limit=limit)
    assert probe.peak == limit


async def test_map_pulls_lazily() -> None:
    """Never more than `limit` items pulled ahead of the completed ones."""
    probe = Probe()
    pulled = 0
    worst = 0

    def source() -> Iterator[int]:
        nonlocal pulled, worst
        for i in range(200):
            pulled += 1
            worst = max(worst, pulled - len(probe.exited))
            yield i

    await pk.map(probe.work, source(), limit=5)
    assert pulled == 200
    assert worst <= 5 + 1


async def test_shared_limiter_bounds_two_calls_together() -> None:
    probe = Probe()
    limiter = pk.Limiter(concurrency=3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(pk.map, probe.work, range(30), limit=limiter))
        tg.start_soon(functools.partial(pk.map, probe.work, range(30, 60), limit=limiter))
    assert probe.peak == 3
    assert limiter.statistics().running == 0


# ---------------------------------------------------------------- workers start as items arrive
class Gate:
    """Holds every item until ``expected`` are running at once, then counts the
    tasks alive at that moment: the workers, plus what was alive before."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.running = 0
        self.all_in = anyio.Event()
        self.tasks_then = 0

    async def work(self, item: Any) -> Any:
        self.running += 1
        if self.running == self.expected:
            self.tasks_then = live_tasks()
            self.all_in.set()
        await self.all_in.wait()
        return item


async def _items_async(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await anyio.lowlevel.checkpoint()
        yield i


def _count_up(n: int) -> Iterator[int]:
    yield from range(n)


HUGE = 10_000  # a limit far above the work: the old pool started this many workers


@pytest.mark.parametrize("source", ["list", "generator", "async generator"])
async def test_map_starts_workers_as_items_arrive(source: str) -> None:
    """``limit`` far above the work costs what the items cost: 5 items, not
    ``limit`` workers. (Counted, not timed: the pool used to start every worker.)"""
    before = live_tasks()
    gate = Gate(5)
    items: Any = {"list": list(range(5)), "generator": _count_up(5), "async generator": None}[
        source
    ]
    if items is None:
        items = _items_async(5)
    assert await pk.map(gate.work, items, limit=HUGE) == list(range(5))
    assert gate.tasks_then - before <= 5 + 1  # 5 workers (+ one waiting for a 6th item)


@pytest.mark.parametrize("source", ["generator", "async generator"])
@pytest.mark.parametrize("ordered", [False, True])
async def test_imap_starts_workers_as_items_arrive(source: str, ordered: bool) -> None:
    before = live_tasks()
    gate = Gate(5)
    items = _count_up(5) if source == "generator" else _items_async(5)
    async with pk.imap(gate.work, items, limit=HUGE, ordered=ordered) as results:
        got = [r async for r in results]
    assert sorted(got) == list(range(5))
    assert gate.tasks_then - before <= 5 + 2  # + imap's producer task (+ one waiting)


async def test_gather_and_shared_limiter_start_workers_as_items_arrive() -> None:
    before = live_tasks()
    gate = Gate(5)
    assert await pk.gather(*(gate.work(i) for i in range(5)), limit=HUGE) == list(range(5))
    assert gate.tasks_then - before <= 5
    gate = Gate(5)
    shared = pk.Limiter(concurrency=HUGE)
    assert await pk.map(gate.work, _count_up(5), limit=shared) == list(range(5))
    assert gate.tasks_then - before <= 5


async def test_a_large_limit_still_runs_everything_at_once() -> None:
    """Started lazily, still all running together (200 items, limit far above)."""
    gate = Gate(200)
    assert await pk.map(gate.work, _count_up(200), limit=HUGE) == list(range(200))
    gate = Gate(200)
    assert await pk.map(gate.work, _items_async(200), limit=HUGE) == list(range(200))


@pytest.mark.parametrize("limit", [None, 7, 50])
async def test_items_start_in_input_order(limit: int | None) -> None:
    """Whichever worker runs first takes the next item (trio shuffles its run
    queue: a worker per pre-assigned item would start them out of order)."""
    started: list[int] = []

    async def work(i: int) -> int:
        started.append(i)
        await anyio.lowlevel.checkpoint()
        return i

    await pk.map(work, range(50), limit=limit)
    assert started == list(range(50))
    started.clear()
    await pk.map(work, _count_up(50), limit=limit)
    assert started == list(range(50))
    started.clear()
    await pk.gather(*(work(i) for i in range(50)), limit=limit)
    assert started == list(range(50))
    started.clear()
    async with pk.imap(work, _count_up(50), limit=limit) as results:
        assert sorted([r async for r in results]) == list(range(50))
    assert started == list(range(50))


# ---------------------------------------------------------------- fail-fast
async def test_fail_fast_raises_original_and_cancels_siblings() -> None:
    boom = ValueError("boom")
    probe = Probe()
    others_running = anyio.Event()

    async def work(i: int) -> int:
        if i == 3:
            await others_running.wait()
            raise boom
        if len(probe.started) == 4:
            others_running.set()
        return await probe.work(i, steps=10**9)

    with pytest.raises(ValueError, match="boom") as info:
        await pk.map(work, range(6), limit=6)
    assert info.value is boom
    assert len(probe.cancelled) == 5  # every sibling saw cancellation
    probe.assert_nothing_left()


async def test_fail_fast_stops_pulling_new_items() -> None:
    pulled = []

    def source() -> Iterator[int]:
        for i in range(1000):
            pulled.append(i)
            yield i

    async def work(i: int) -> int:
        await anyio.lowlevel.checkpoint()
        if i == 2:
            raise KeyError(i)
        return i

    with pytest.raises(KeyError):
        await pk.map(work, source(), limit=2)
    assert len(pulled) < 10


@pytest.mark.parametrize("fan_out", ["map", "gather", "imap"])
async def test_fail_fast_starts_no_item_after_the_first_failure(fan_out: str) -> None:
    # Items 0 and 1 wake in the same tick; 0 fails. The worker of 1 finishes its item
    # (cancellation reaches it only at its next await): it must not go on to items 2-9,
    # which never await (a cache hit), so nothing would ever stop them.
    events: list[object] = []
    gate = anyio.Event()

    async def fn(i: int) -> int:
        events.append(i)
        if i < 2:
            await gate.wait()
            if i == 0:
                events.append("failed")
                raise KeyError(i)
        return i

    async def open_gate() -> None:
        while len(events) < 2:
            await anyio.lowlevel.checkpoint()
        gate.set()

    async def run() -> None:
        if fan_out == "map":
            await pk.map(fn, range(10), limit=2)
        elif fan_out == "gather":
            await pk.gather(*(fn(i) for i in range(10)), limit=2)
        else:
            async with pk.imap(fn, range(10), limit=2) as results:
                async for _ in results:
                    pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_gate)
        with pytest.raises(KeyError):
            await run()
    assert "failed" in events
    assert events[events.index("failed") + 1 :] == []  # nothing started after it


@pytest.mark.parametrize("fan_out", ["map", "gather", "imap"])
async def test_fail_fast_starts_no_item_when_the_failing_one_hands_its_limiter_slot_on(
    fan_out: str,
) -> None:
    # A shared limiter with one slot taken elsewhere: item 0 runs, item 1's worker
    # waits for a slot. Item 0 fails; leaving the limiter hands its slot to item 1's
    # worker, which must not then start item 1 (a cache hit would run to the end).
    events: list[object] = []
    limiter = pk.Limiter(concurrency=2)
    other = anyio.Event()

    async def fn(i: int) -> int:
        events.append(i)
        await anyio.lowlevel.checkpoint()
        if i == 0:
            events.append("failed")
            raise KeyError(i)
        return i

    async def run() -> None:
        if fan_out == "map":
            await pk.map(fn, range(5), limit=limiter)
        elif fan_out == "gather":
            await pk.gather(*(functools.partial(fn, i) for i in range(5)), limit=limiter)
        else:
            async with pk.imap(fn, range(5), limit=limiter) as results:
                async for _ in results:
                    pass

    async with anyio.create_task_group() as tg:
        await tg.start(hold_one_slot, limiter, other)
        with pytest.raises(KeyError):
            await run()
        other.set()
    assert events == [0, "failed"]  # nothing started after it
    assert limiter.statistics() == pk.LimiterStatistics(2, None, 0, 0)


async def hold_one_slot(
    limiter: pk.Limiter, release: anyio.Event, *, task_status: anyio.abc.TaskStatus[None]
) -> None:
    async with limiter:
        task_status.started()
        await release.wait()


async def test_gather_closes_coroutines_that_never_started() -> None:
    started = []

    async def item(i: int) -> int:
        started.append(i)
        if i == 0:
            raise RuntimeError("first fails")
        await anyio.sleep(1)
        return i

    coros = [item(i) for i in range(5)]
    with pytest.raises(RuntimeError, match="first fails"):
        await pk.gather(*coros, limit=1)
    assert started == [0]
    assert all(inspect.getcoroutinestate(c) == inspect.CORO_CLOSED for c in coros)


async def test_caller_cancellation_leaves_no_task_behind() -> None:
    probe = Probe()
    ten_running = anyio.Event()

    async def work(i: int) -> int:
        if len(probe.started) == 9:
            ten_running.set()
        return await probe.work(i, steps=10**9)

    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(pk.map, work, range(100), limit=10))
        await ten_running.wait()
        tg.cancel_scope.cancel()
    assert len(probe.started) == 10
    assert len(probe.cancelled) == 10
    probe.assert_nothing_left()


# ---------------------------------------------------------------- settle
async def test_settle_returns_every_outcome_in_order() -> None:
    async def work(i: int) -> int:
        await anyio.lowlevel.checkpoint()
        if i % 3 == 0:
            raise ValueError(i)
        return i

    outcomes = await pk.map(work, range(9), limit=2, settle=True)
    assert [o.ok for o in outcomes] == [i % 3 != 0 for i in range(9)]
    assert [o.value for o in outcomes if o.ok] == [1, 2, 4, 5, 7, 8]
    assert [o.error.args[0] for o in outcomes if o.error is not None] == [0, 3, 6]
    with pytest.raises(ValueError):
        outcomes[0].unwrap()
    assert outcomes[1].unwrap() == 1


async def test_gather_settle() -> None:
    async def bad() -> int:
        raise OSError("down")

    async def good() -> int:
        return 7

    a, b = await pk.gather(bad(), good(), settle=True)
    assert isinstance(a.error, OSError)
    assert b == pk.Outcome.success(7)


async def test_settle_runs_each_item_under_the_worker_itself_not_a_wrapper() -> None:
    """Settle mode costs no coroutine frame per item between the worker and the item
    (such a frame is resumed at every await of the item); outcomes as in fail-fast."""
    callers: list[str] = []

    async def item(x: int) -> int:
        callers.append(sys._getframe(1).f_code.co_name)
        await anyio.lowlevel.checkpoint()
        if x == 1:
            raise ValueError(x)
        return x

    outcomes = await pk.map(item, range(3), settle=True)
    assert [o.value for o in outcomes if o.ok] == [0, 2]
    assert isinstance(outcomes[1].error, ValueError)
    assert callers == ["_work"] * 3


async def test_settle_does_not_swallow_caller_cancellation() -> None:
    probe = Probe()
    finished = False

    async def caller() -> None:
        nonlocal finished
        await pk.map(functools.partial(probe.work, steps=10**9), range(4), settle=True)
        finished = True  # pragma: no cover - must not be reached

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        while len(probe.started) < 4:
            await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert not finished
    assert len(probe.cancelled) == 4
    probe.assert_nothing_left()


class Interrupt(BaseException):
    """A non-cancellation BaseException (stands in for KeyboardInterrupt/SystemExit)."""


@pytest.mark.parametrize("settle", [False, True])
@pytest.mark.parametrize("fan_out", ["map", "gather", "imap"])
async def test_a_base_exception_from_one_item_comes_out_unchanged(
    fan_out: str, settle: bool
) -> None:
    """One item raises a BaseException that is not a cancellation: it stops the
    fan-out (also in settle mode) and comes out as itself, not wrapped in a
    BaseExceptionGroup (it was wrapped: once, twice for imap)."""
    probe = Probe()
    interrupt = Interrupt("stop")

    async def work(i: int) -> int:
        if i == 2:
            await anyio.lowlevel.checkpoint()
            raise interrupt
        return await probe.work(i, steps=10**9 if i > 2 else 1)

    with pytest.raises(Interrupt) as raised:
        if fan_out == "map":
            await pk.map(work, range(6), limit=4, settle=settle)
        elif fan_out == "gather":
            await pk.gather(*(functools.partial(work, i) for i in range(6)), limit=4,
                            settle=settle)  # fmt: skip
        else:
            async with pk.imap(work, range(6), limit=4, settle=settle) as results:
                async for _ in results:
                    pass
    assert raised.value is interrupt
    probe.assert_nothing_left()


def _stray_cancellation(seen: list[BaseException]) -> Any:
    """An item that awaits a future someone else cancelled (asyncio): it raises
    CancelledError although nobody cancelled the fan-out or its caller."""

    async def work(i: int) -> int:
        await anyio.lowlevel.checkpoint()
        if i == 1:
            await stray_cancellation(seen)
        await anyio.lowlevel.checkpoint()
        return i

    return work


@pytest.mark.skipif(sys.version_info < (3, 11), reason=STRAY_NEEDS)
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("limit", [None, 1, 2])
async def test_an_item_raising_cancelled_error_by_itself_is_a_failure(
    limit: int | None,
) -> None:
    """A CancelledError that no cancellation of the fan-out caused (the item awaited
    a future cancelled elsewhere) is that item's failure: fail-fast raises it and
    settle keeps it in an Outcome. It used to end the task group quietly: ``map``
    returned ``None`` for that item and for every item not yet started."""
    seen: list[BaseException] = []
    work = _stray_cancellation(seen)
    outcomes = await pk.map(work, range(4), limit=limit, settle=True)
    assert [o.value for o in outcomes] == [0, None, 2, 3]
    assert outcomes[1].error is seen[-1]
    gathered = await pk.gather(*(functools.partial(work, i) for i in range(4)), limit=limit,
                               settle=True)  # fmt: skip
    assert gathered[1].error is seen[-1]
    assert [o.ok for o in gathered] == [True, False, True, True]
    with pytest.raises(BaseException) as raised:  # checked by identity below
        await pk.map(work, range(4), limit=limit)
    assert raised.value is seen[-1]
    with pytest.raises(BaseException) as raised:
        async with pk.imap(work, range(4), limit=limit) as results:
            async for _ in results:
                pass
    assert raised.value is seen[-1]
    async with pk.imap(work, range(4), limit=limit, settle=True, ordered=True) as results:
        streamed = [o async for o in results]
    assert [o.value for o in streamed] == [0, None, 2, 3]
    assert streamed[1].error is seen[-1]


# ---------------------------------------------------------------- timeouts and retries
@virtual_clock()
async def test_timeout_applies_to_each_item() -> None:
    async def work(delay: float) -> float:
        await anyio.sleep(delay)
        return delay

    outcomes = await pk.map(work, [1.0, 5.0, 2.9], timeout=3, settle=True)
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, TimeoutError)
    started = anyio.current_time()
    with pytest.raises(TimeoutError):
        await pk.gather(work(60.0), timeout=0.5)
    assert anyio.current_time() - started == pytest.approx(0.5)  # virtual seconds


async def test_timeout_never_hits_an_item_that_does_not_wait() -> None:
    """On both backends: an item with no await inside cannot be timed out."""

    async def instant(x: int) -> int:
        return x

    async def hangs(x: int) -> int:
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    outcomes = await pk.gather(instant(1), hangs(2), instant(3), timeout=0.01, settle=True)
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, TimeoutError)


async def test_retry_reinvokes_the_configured_number_of_times() -> None:
    calls: dict[int, int] = {}

    async def flaky(i: int) -> int:
        calls[i] = calls.get(i, 0) + 1
        if calls[i] < 3:
            raise ConnectionError(i)
        return i

    assert await pk.map(flaky, range(4), retry=pk.Retry(attempts=3, backoff=0)) == [0, 1, 2, 3]
    assert calls == {0: 3, 1: 3, 2: 3, 3: 3}

    calls.clear()
    outcomes = await pk.map(flaky, [9], retry=pk.Retry(attempts=2, backoff=0), settle=True)
    assert calls == {9: 2}
    assert isinstance(outcomes[0].error, ConnectionError)  # the original, not RetryError


async def test_retry_only_on_listed_exceptions() -> None:
    calls = 0

    async def fails() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("not retried")

    with pytest.raises(KeyError):
        await pk.gather(fails, retry=pk.Retry(attempts=5, backoff=0, on=(ConnectionError,)))
    assert calls == 1


async def test_retry_accepts_tenacity_policy_and_retries_timeouts() -> None:
    attempts = 0

    async def slow_then_fast() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await anyio.sleep_forever()
        return "ok"  # the second attempt does not wait: no timeout can hit it

    policy = tenacity.AsyncRetrying(stop=tenacity.stop_after_attempt(2), reraise=True)
    assert await pk.gather(slow_then_fast, timeout=0.02, retry=policy) == ["ok"]
    assert attempts == 2


async def test_retry_with_coroutine_objects_is_a_type_error() -> None:
    async def job() -> None: ...

    coro = job()
    with pytest.raises(TypeError, match=r"cannot be retried.*callables"):
        await pk.gather(coro, retry=pk.Retry())
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


# ---------------------------------------------------------------- rate
@virtual_clock()
async def test_rate_spaces_the_starts() -> None:
    starts: list[float] = []

    async def work(i: int) -> int:
        starts.append(anyio.current_time())
        await anyio.sleep(0.5)  # long items: the rate, not the limit, spaces them
        return i

    await pk.map(work, range(6), rate=50, limit=6)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps == pytest.approx([1 / 50] * 5)


@virtual_clock()
async def test_rate_counts_each_retry_attempt() -> None:
    starts: list[float] = []
    attempts: dict[int, int] = {}

    async def flaky(i: int) -> int:
        starts.append(anyio.current_time())
        attempts[i] = attempts.get(i, 0) + 1
        if attempts[i] == 1:
            raise ConnectionError(i)
        return i

    assert await pk.map(flaky, range(3), rate=10, retry=pk.Retry(attempts=2, backoff=0)) == [
        0,
        1,
        2,
    ]
    assert len(starts) == 6
    assert all(math.isclose(b - a, 0.1) for a, b in itertools.pairwise(starts))


# ---------------------------------------------------------------- bad input
NAN, INF = float("nan"), float("inf")

#: (option, value, error, the start of the message): the one rule of the checker
BAD_OPTIONS = [
    ("limit", 0, ValueError, "limit must be >= 1"),
    ("limit", -2, ValueError, "limit must be >= 1"),
    ("limit", 1.5, TypeError, "limit must be an int"),
    ("limit", True, TypeError, "limit must be an int"),
    ("limit", "2", TypeError, "limit must be an int"),
    ("rate", 0, ValueError, "rate must be > 0"),
    ("rate", -1, ValueError, "rate must be > 0"),
    ("rate", NAN, ValueError, "rate must be > 0"),
    ("rate", INF, ValueError, "rate must be finite"),
    ("rate", True, TypeError, "rate must be a number"),
    ("rate", "1", TypeError, "rate must be a number"),
    ("timeout", 0, ValueError, "timeout must be > 0"),
    ("timeout", -1, ValueError, "timeout must be > 0"),
    ("timeout", NAN, ValueError, "timeout must be > 0"),
    ("timeout", INF, ValueError, "timeout must be finite"),
    ("timeout", False, TypeError, "timeout must be a number"),
    ("retry", 3, TypeError, "retry must be"),
    ("settle", 1, TypeError, "settle must be a bool"),
    ("settle", "yes", TypeError, "settle must be a bool"),
    ("settle", None, TypeError, "settle must be a bool"),
]


class Recorder:
    """An async function that records its calls: a bad argument must stop everything
    before the first one."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    async def __call__(self, item: Any) -> Any:
        self.calls.append(item)
        return item


def option_ids(cases: list[tuple[Any, ...]]) -> list[str]:
    return [f"{case[0]}={case[1]!r}" for case in cases]


@pytest.mark.parametrize(
    ("option", "value", "error", "message"), BAD_OPTIONS, ids=option_ids(BAD_OPTIONS)
)
async def test_bad_options_are_refused_before_any_item_runs(
    option: str, value: Any, error: type[Exception], message: str
) -> None:
    kwargs = {option: value}
    fn = Recorder()
    with pytest.raises(error, match=f"^{message}"):
        await pk.map(fn, [1, 2], **kwargs)
    with pytest.raises(error, match=f"^{message}"):
        pk.imap(fn, [1, 2], **kwargs)
    assert fn.calls == []
    coro = Probe().work(1)
    with pytest.raises(error, match=f"^{message}"):
        await pk.gather(coro, **kwargs)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED  # never awaited, closed


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"progress": 5}, TypeError, "progress must be a callable"),
        ({"progress": "print"}, TypeError, "progress must be a callable"),
    ],
)
async def test_map_progress_is_checked_before_any_item_runs(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    fn = Recorder()
    with pytest.raises(error, match=f"^{message}"):
        await pk.map(fn, [1, 2], **kwargs)
    assert fn.calls == []


@pytest.mark.parametrize("ordered", [1, "yes", None])
def test_imap_ordered_is_a_bool(ordered: Any) -> None:
    with pytest.raises(TypeError, match=r"^ordered must be a bool"):
        pk.imap(Recorder(), [1], ordered=ordered)


def _sync(x: int) -> int:
    return x


def _gen(x: int) -> Iterator[int]:
    yield x


async def _agen(x: int) -> AsyncIterator[int]:
    yield x


class _SyncCallable:
    def __call__(self, x: int) -> int:
        return x


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (_sync, r"^fn must be an async function \(async def\), got sync function _sync"),
        (_SyncCallable(), r"^fn must be an async function \(async def\)"),
        (functools.partial(_sync, 1), r"^fn must be an async function \(async def\)"),
        (_gen, "^fn must be an async function returning one value, got generator"),
        (_agen, "^fn must be an async function returning one value, got generator"),
        (5, "^fn must be an async function, got int 5"),
    ],
    ids=["function", "callable-object", "partial", "generator", "async-generator", "int"],
)
async def test_a_sync_fn_is_refused_before_it_is_called_even_once(fn: Any, message: str) -> None:
    calls: list[Any] = []

    def items() -> Iterator[int]:
        calls.append("pulled")
        yield 1

    with pytest.raises(TypeError, match=message):
        await pk.map(fn, items(), limit=10)
    with pytest.raises(TypeError, match=message):
        pk.imap(fn, items(), limit=10)
    assert calls == []  # neither called nor an item pulled


async def test_async_callables_of_every_shape_are_accepted() -> None:
    class Method:
        async def __call__(self, x: int) -> int:
            return x + 1

    async def add(x: int, y: int) -> int:
        return x + y

    assert await pk.map(Method(), [1, 2]) == [2, 3]
    assert await pk.map(functools.partial(add, 10), [1, 2]) == [11, 12]


async def test_items_must_be_iterable() -> None:
    with pytest.raises(TypeError, match=r"^items must be an iterable or an async iterable"):
        await pk.map(Recorder(), 5)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"^items must be an iterable or an async iterable"):
        pk.imap(Recorder(), 5)  # type: ignore[arg-type]


async def test_gather_names_the_bad_item_index() -> None:
    ok = Probe().work(1)
    with pytest.raises(TypeError, match=r"^gather item 1 is int 42"):
        await pk.gather(ok, 42)  # type: ignore[arg-type]
    assert inspect.getcoroutinestate(ok) == inspect.CORO_CLOSED


async def test_gather_callable_returning_no_awaitable_is_named_by_index() -> None:
    """Items stay "awaitable or zero-argument callable returning an awaitable": what a
    callable returns can only be known by calling it, when its turn comes."""

    async def fine() -> int:
        return 1

    with pytest.raises(TypeError, match=r"^gather item 1 returned int, not an awaitable"):
        await pk.gather(fine, lambda: 42)  # type: ignore[arg-type,list-item]


# ---------------------------------------------------------------- progress
async def test_progress_reports_done_and_total() -> None:
    seen: list[tuple[int, int | None]] = []
    await pk.map(Probe().work, [1, 2, 3], limit=2, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen.clear()
    await pk.map(Probe().work, iter([1, 2]), limit=2, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, None), (2, None)]
