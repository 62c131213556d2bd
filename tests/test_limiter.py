"""Limiter: the concurrency bound and the rate, as invariants (hypothesis)."""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import anyio
import pytest
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import parallelkit as pk

from .test_fanout import virtual_clock

BACKENDS = ["asyncio", "trio"]


# ---------------------------------------------------------------- invariants
@settings(max_examples=40, deadline=None)
@given(
    limit=st.integers(1, 6),
    holds=st.lists(st.integers(1, 6), min_size=1, max_size=30),
    callers=st.integers(2, 4),
    backend=st.sampled_from(BACKENDS),
)
def test_bound_is_never_exceeded(limit: int, holds: list[int], callers: int, backend: str) -> None:
    """More contenders than slots, so an over-admitting limiter is caught: tasks
    entering the limiter directly, and several ``map`` calls sharing it (each with
    ``limit`` workers of its own). The bound is reached when there are enough
    direct contenders (no under-admission)."""
    running = peak = 0

    async def hold(n: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            for _ in range(n):
                await anyio.lowlevel.checkpoint()
            return n
        finally:
            running -= 1

    async def direct(limiter: pk.Limiter, n: int) -> None:
        async with limiter:
            await hold(n)

    async def main() -> list[list[int]]:
        limiter = pk.Limiter(concurrency=limit)
        results: list[list[int]] = [[] for _ in range(callers)]

        async def one_map(i: int) -> None:
            results[i] = await pk.map(hold, holds, limit=limiter)

        async with anyio.create_task_group() as tg:
            for n in holds:
                tg.start_soon(direct, limiter, n)
            for i in range(callers):
                tg.start_soon(one_map, i)
        assert limiter.statistics() == pk.LimiterStatistics(limit, None, 0, 0)
        return results

    assert anyio.run(main, backend=backend) == [holds] * callers
    assert peak <= limit
    if len(holds) >= limit:  # the direct tasks alone fill every slot at once
        assert peak == limit


def test_the_bound_property_catches_an_over_admitting_limiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The property above can fail: with a limiter that admits everyone, it does."""

    async def admit_everyone(self: pk.Limiter) -> None:
        return None

    monkeypatch.setattr(pk.Limiter, "acquire_slot", admit_everyone)
    monkeypatch.setattr(pk.Limiter, "release", lambda self: None)
    with pytest.raises(AssertionError):
        test_bound_is_never_exceeded.hypothesis.inner_test(  # type: ignore[attr-defined]
            limit=2, holds=[3, 3, 3], callers=2, backend="asyncio"
        )


@settings(max_examples=40, deadline=None)
@given(
    rate=st.sampled_from([1, 2.5, 10, 40, 1000]),
    burst=st.integers(1, 4),
    n=st.integers(1, 30),
    limit=st.sampled_from([None, 1, 3]),
)
def test_rate_is_never_exceeded_in_any_window(
    rate: float, burst: int, n: int, limit: int | None
) -> None:
    """On trio's virtual clock: no window of 1 s holds more starts than allowed."""
    starts: list[float] = []

    async def work(i: int) -> int:
        starts.append(anyio.current_time())
        await anyio.sleep(0.013 * (i % 3))
        return i

    async def main() -> None:
        limiter = pk.Limiter(concurrency=limit, rate=rate, burst=burst)
        await pk.map(work, range(n), limit=limiter)

    anyio.run(
        main,
        backend="trio",
        backend_options={"clock": trio.testing.MockClock(autojump_threshold=0)},
    )
    assert len(starts) == n
    allowed = burst - 1 + math.ceil(rate)  # burst back to back, then 1/rate apart
    eps = 1e-9
    for i, t in enumerate(starts):
        in_window = sum(1 for u in starts[i:] if u < t + 1.0 - eps)
        assert in_window <= allowed
    interval = 1 / rate
    # GCRA: any j - i starts beyond the burst take at least that many intervals
    for i in range(n):
        for j in range(i + burst, n):
            assert starts[j] - starts[i] >= (j - i - (burst - 1)) * interval - 1e-6


# ---------------------------------------------------------------- behaviour
@pytest.mark.anyio
async def test_limiter_hands_slots_over_in_fifo_order() -> None:
    limiter = pk.Limiter(concurrency=1)
    order: list[int] = []

    async def user(i: int) -> None:
        async with limiter:
            order.append(i)
            await anyio.lowlevel.checkpoint()

    async with limiter, anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(user, i)
            while limiter.statistics().waiting < i + 1:  # queue them in order
                await anyio.lowlevel.checkpoint()
        assert limiter.statistics().waiting == 5
        limiter.release()
        await limiter.acquire()  # re-take the slot we gave back, after everyone
    assert order == [0, 1, 2, 3, 4]


@pytest.mark.anyio
async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    limiter = pk.Limiter(concurrency=1)
    async with limiter:
        with anyio.move_on_after(0.01):
            await limiter.acquire()
    stats = limiter.statistics()
    assert (stats.running, stats.waiting) == (0, 0)
    async with limiter:
        assert limiter.statistics().running == 1


@pytest.mark.anyio
async def test_release_without_acquire_is_an_error() -> None:
    limiter = pk.Limiter(concurrency=2)
    with pytest.raises(RuntimeError, match="more times"):
        limiter.release()


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"concurrency": 0}, ValueError, "concurrency must be >= 1"),
        ({"concurrency": -1}, ValueError, "concurrency must be >= 1"),
        ({"concurrency": 1.5}, TypeError, "concurrency must be an int"),
        ({"concurrency": True}, TypeError, "concurrency must be an int"),
        ({"concurrency": "2"}, TypeError, "concurrency must be an int"),
        ({"rate": 0}, ValueError, "rate must be > 0"),
        ({"rate": -3}, ValueError, "rate must be > 0"),
        ({"rate": NAN}, ValueError, "rate must be > 0"),
        ({"rate": INF}, ValueError, "rate must be finite"),
        ({"rate": True}, TypeError, "rate must be a number"),
        ({"rate": "5"}, TypeError, "rate must be a number"),
        ({"rate": 1, "burst": 0}, ValueError, "burst must be >= 1"),
        ({"rate": 1, "burst": 1.5}, TypeError, "burst must be an int"),
        ({"rate": 1, "burst": True}, TypeError, "burst must be an int"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_limiter_rejects_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{message}"):
        pk.Limiter(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"attempts": 0}, ValueError, "attempts must be >= 1"),
        ({"attempts": 2.5}, TypeError, "attempts must be an int"),
        ({"attempts": True}, TypeError, "attempts must be an int"),
        *[
            case
            for name in ("backoff", "max_backoff", "jitter")
            for case in (
                ({name: -1}, ValueError, f"{name} must be >= 0"),
                ({name: NAN}, ValueError, f"{name} must be >= 0"),
                ({name: INF}, ValueError, f"{name} must be finite"),
                ({name: True}, TypeError, f"{name} must be a number"),
                ({name: "1"}, TypeError, f"{name} must be a number"),
            )
        ],
        ({"on": (int,)}, TypeError, "on must be exception types or a predicate"),
        ({"on": int}, TypeError, "on must be exception types or a predicate"),
        ({"on": 5}, TypeError, "on must be exception types or a predicate"),
        ({"on": "OSError"}, TypeError, "on must be exception types or a predicate"),
        ({"on": ()}, ValueError, "on must name at least one exception type"),
        ({"backoff": 5, "max_backoff": 1}, ValueError, r"max_backoff \(1\) must be >= backoff"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_retry_rejects_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{message}"):
        pk.Retry(**kwargs)  # type: ignore[arg-type]


def test_retry_accepts_zero_waits_types_and_predicates() -> None:
    assert pk.Retry(backoff=0, max_backoff=0, jitter=0).to_tenacity() is not None
    assert pk.Retry(on=OSError).to_tenacity() is not None
    assert pk.Retry(on=(OSError, KeyError)).to_tenacity() is not None
    assert pk.Retry(on=lambda e: isinstance(e, OSError)).to_tenacity() is not None


def test_limiter_repr_and_statistics() -> None:
    limiter = pk.Limiter(concurrency=3, rate=2.0)
    assert "concurrency=3" in repr(limiter)
    assert limiter.statistics() == pk.LimiterStatistics(3, 2.0, 0, 0)
    assert (limiter.concurrency, limiter.rate, limiter.burst) == (3, 2.0, 1)


def test_outcome_basics() -> None:
    ok = pk.Outcome.success(5)
    bad: pk.Outcome[int] = pk.Outcome.failure(KeyError("k"))
    assert ok.ok
    assert ok.unwrap() == 5
    assert ok.error is None
    assert not bad.ok
    assert bad.value is None
    with pytest.raises(KeyError):
        bad.unwrap()
    assert "KeyError" in repr(bad)
    with pytest.raises(AttributeError):
        ok.value = 3  # type: ignore[misc]


# ---------------------------------------------------------------- the backend lookups
@pytest.mark.anyio
async def test_task_id_is_anyios_task_id() -> None:
    """``_core.backend.task_id``: anyio's own answer, on both backends, one per task."""
    from parallelkit._core import backend

    assert backend.task_id() == anyio.get_current_task().id
    seen: list[tuple[int, int]] = []

    async def child() -> None:
        seen.append((backend.task_id(), anyio.get_current_task().id))

    async with anyio.create_task_group() as tg:
        tg.start_soon(child)
        tg.start_soon(child)
    assert [ours == theirs for ours, theirs in seen] == [True, True]
    assert len({seen[0][0], seen[1][0], backend.task_id()}) == 3  # one identity per task


@pytest.mark.anyio
@virtual_clock()
async def test_the_backend_clock_is_anyios_clock() -> None:
    """On trio's virtual clock the readings are exact: the same clock, moved by sleeps."""
    from parallelkit._core import backend

    clock = backend.clock()
    assert clock() == anyio.current_time()
    before = clock()
    await anyio.sleep(5)
    assert clock() - before == 5


def _on_virtual_clock(main: Any) -> None:
    anyio.run(
        main,
        backend="trio",
        backend_options={"clock": trio.testing.MockClock(autojump_threshold=0)},
    )


def test_cancelled_rate_waiters_give_their_starts_back() -> None:
    """50 callers give up waiting on `rate=1`: a start that never happened must not
    delay the next caller (it waited 44.5 s before)."""
    waited: list[float] = []

    async def main() -> None:
        limiter = pk.Limiter(rate=1)
        async with anyio.create_task_group() as tg:
            for _ in range(50):

                async def impatient() -> None:
                    with anyio.move_on_after(0.5):
                        async with limiter:
                            await anyio.sleep(0.1)

                tg.start_soon(impatient)
        await anyio.sleep(5)
        began = anyio.current_time()
        async with limiter:
            waited.append(anyio.current_time() - began)

    _on_virtual_clock(main)
    assert waited == [0.0]


def test_a_start_given_back_in_the_middle_keeps_the_spacing() -> None:
    """A caller that leaves while later ones still wait gives its turn to the next in
    line: the later ones move up one turn each (never closer than 1/rate), and a
    newcomer comes after the last of them."""
    starts: list[float] = []

    async def main() -> None:
        limiter = pk.Limiter(rate=1)
        scopes: list[anyio.CancelScope] = []

        async def caller(i: int) -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                await limiter.wait_rate()
                starts.append(anyio.current_time())

        async with anyio.create_task_group() as tg:
            for i in range(4):  # turns at 0, 1, 2, 3
                tg.start_soon(caller, i)
                await anyio.lowlevel.checkpoint()
            scopes[1].cancel()  # the turn at 1 is given back in the middle: 2 takes it
            await anyio.sleep(0.5)
            tg.start_soon(caller, 4)  # a newcomer: after the last standing turn
        assert starts == [0.0, 1.0, 2.0, 3.0]

    _on_virtual_clock(main)


@pytest.mark.anyio
async def test_cancelled_slot_waiters_are_not_counted_as_waiting() -> None:
    limiter = pk.Limiter(concurrency=1)
    async with limiter:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(limiter.acquire)
            while limiter.statistics().waiting < 3:
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
        assert limiter.statistics().waiting == 0
    assert limiter.statistics().running == 0


def test_rate_is_kept_when_items_also_wait_for_a_shared_limiter() -> None:
    """Another job holds every slot of the shared limiter until t=5: the rate=1 job's
    starts must still be 1 s apart once slots free up (four went at once before)."""
    starts: list[float] = []

    async def main() -> None:
        shared = pk.Limiter(concurrency=4)

        async def hog() -> None:
            async with shared:
                await anyio.sleep(5)

        async def job(i: int) -> int:
            starts.append(anyio.current_time())
            await anyio.sleep(0.1)
            return i

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(hog)
            await anyio.lowlevel.checkpoint()
            assert await pk.map(job, range(6), limit=shared, rate=1) == list(range(6))

    _on_virtual_clock(main)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert starts[0] == 5.0
    assert all(gap >= 1.0 - 1e-9 for gap in gaps), starts


@pytest.mark.parametrize("limit", [pk.Limiter, "class"], ids=["the class", "str"])
@pytest.mark.anyio
async def test_limit_must_be_a_limiter_instance(limit: object) -> None:
    async def f(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"^limit must be an int"):
        await pk.map(f, [1, 2], limit=limit)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^limit must be an int"):
        pk.imap(f, [1, 2], limit=limit)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_shared_limiter_with_no_slot_is_refused() -> None:
    class NoSlots:
        concurrency = 0

        async def __aenter__(self) -> None:
            pass

        async def __aexit__(self, *exc: object) -> None:
            pass

    calls: list[int] = []

    async def f(x: int) -> int:
        calls.append(x)
        return x

    with pytest.raises(ValueError, match=r"^limit\.concurrency must be >= 1"):
        await pk.map(f, [1, 2], limit=NoSlots())  # type: ignore[arg-type]
    assert calls == []  # it returned [None, None] without calling f before


@pytest.mark.anyio
async def test_slot_released_between_a_waiters_cancellation_and_its_wake_up() -> None:
    """A waiter is cancelled and, before it runs again, the slot is released: the
    release passes over the cancelled waiter, which then leaves with its
    cancellation (no error of ours), and the slot is free for the next caller."""
    limiter = pk.Limiter(concurrency=1)
    scopes: list[anyio.CancelScope] = []
    left: list[str] = []

    async def waiter() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await limiter.acquire()
            left.append("acquired")  # not reached: cancelled while waiting
        left.append("cancelled")

    await limiter.acquire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        while limiter.statistics().waiting < 1:
            await anyio.lowlevel.checkpoint()
        scopes[0].cancel()
        limiter.release()  # in the same step: the waiter has not run yet
    assert left == ["cancelled"]
    stats = limiter.statistics()
    assert (stats.running, stats.waiting) == (0, 0)
    await limiter.acquire()  # free: taken without waiting
    assert limiter.statistics().running == 1


@pytest.mark.parametrize("concurrency", [None, 2])
def test_a_calls_own_rate_keeps_the_shared_limiters_rate(concurrency: int | None) -> None:
    """A job with ``rate=1`` and a shared ``Limiter(rate=2)`` used by another job: no
    window of 1 s holds more than 2 starts of the two jobs together, and the job's own
    starts stay 1 s apart. (The job took its turns under the shared rate at once, then
    started later, at its own pace, on top of the other job's turns.)"""
    starts: list[tuple[str, float]] = []

    async def main() -> None:
        shared = pk.Limiter(concurrency=concurrency, rate=2)

        async def job(i: int) -> int:
            starts.append(("job", anyio.current_time()))
            return i

        async def other(i: int) -> int:
            starts.append(("other", anyio.current_time()))
            await anyio.sleep(1)
            return i

        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(pk.map, job, range(4), limit=shared, rate=1))
            tg.start_soon(functools.partial(pk.map, other, range(4), limit=shared))
        assert shared.statistics().running == 0

    _on_virtual_clock(main)
    times = sorted(t for _, t in starts)
    assert len(times) == 8
    for k, t in enumerate(times):
        assert sum(1 for u in times[k:] if u < t + 1.0 - 1e-9) <= 2, starts
    for a, b in itertools.pairwise(times):
        assert b - a >= 0.5 - 1e-9, starts  # GCRA, burst 1: 1/rate apart
    own = [t for who, t in starts if who == "job"]
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(own)), starts
