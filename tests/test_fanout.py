"""gather / map / imap: order, bounds, fail-fast, settle, timeouts, retries, cleanup."""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
import tenacity

import parallelkit as pk

pytestmark = pytest.mark.anyio


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
    async def slow_first(i: int) -> int:
        await anyio.sleep(0.001 * (10 - i))
        return i * i

    assert await pk.map(slow_first, range(10), limit=4) == [i * i for i in range(10)]


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


# ---------------------------------------------------------------- fail-fast
async def test_fail_fast_raises_original_and_cancels_siblings() -> None:
    boom = ValueError("boom")
    probe = Probe()

    async def work(i: int) -> int:
        if i == 3:
            await anyio.sleep(0.01)
            raise boom
        return await probe.work(i, steps=10_000)

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
    with anyio.move_on_after(0.05):
        await pk.map(functools.partial(probe.work, steps=10**9), range(100), limit=10)
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


async def test_settle_does_not_swallow_caller_cancellation() -> None:
    probe = Probe()
    with anyio.move_on_after(0.02) as scope:
        await pk.map(functools.partial(probe.work, steps=10**9), range(4), settle=True)
    assert scope.cancelled_caught
    probe.assert_nothing_left()


# ---------------------------------------------------------------- timeouts and retries
async def test_timeout_applies_to_each_item() -> None:
    async def work(delay: float) -> float:
        await anyio.sleep(delay)
        return delay

    outcomes = await pk.map(work, [0.0, 5.0, 0.0], timeout=0.05, settle=True)
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, TimeoutError)
    with pytest.raises(TimeoutError):
        await pk.gather(work(5.0), timeout=0.01)


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
        await anyio.sleep(10 if attempts == 1 else 0)
        return "ok"

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
async def test_rate_spaces_the_starts() -> None:
    starts: list[float] = []

    async def work(i: int) -> int:
        starts.append(anyio.current_time())
        return i

    await pk.map(work, range(6), rate=50, limit=6)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 1 / 50 - 0.002


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"limit": 0}, ValueError, "limit"),
        ({"limit": -2}, ValueError, "limit"),
        ({"limit": 1.5}, TypeError, "limit"),
        ({"rate": -1}, ValueError, "rate"),
        ({"rate": 0}, ValueError, "rate"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"retry": 3}, TypeError, "retry"),
    ],
)
async def test_bad_options_name_the_argument(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await pk.map(Probe().work, [1], **kwargs)
    coro = Probe().work(1)
    with pytest.raises(error, match=match):
        await pk.gather(coro, **kwargs)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


async def test_gather_names_the_bad_item_index() -> None:
    ok = Probe().work(1)
    with pytest.raises(TypeError, match="gather item 1"):
        await pk.gather(ok, 42)  # type: ignore[arg-type]
    assert inspect.getcoroutinestate(ok) == inspect.CORO_CLOSED


async def test_sync_function_is_a_type_error() -> None:
    def not_async(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="must be async"):
        await pk.map(not_async, [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable"):
        await pk.map(Probe().work, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async callable"):
        await pk.map(5, [1])  # type: ignore[arg-type]


# ---------------------------------------------------------------- progress
async def test_progress_reports_done_and_total() -> None:
    seen: list[tuple[int, int | None]] = []
    await pk.map(Probe().work, [1, 2, 3], limit=2, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen.clear()
    await pk.map(Probe().work, iter([1, 2]), limit=2, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, None), (2, None)]
