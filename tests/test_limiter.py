"""Limiter: the concurrency bound and the rate, as invariants (hypothesis)."""

from __future__ import annotations

import math

import anyio
import pytest
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import parallelkit as pk

BACKENDS = ["asyncio", "trio"]


# ---------------------------------------------------------------- invariants
@settings(max_examples=40, deadline=None)
@given(
    limit=st.integers(1, 8),
    steps=st.lists(st.integers(0, 6), min_size=1, max_size=40),
    backend=st.sampled_from(BACKENDS),
    shared=st.booleans(),
)
def test_bound_is_never_exceeded(limit: int, steps: list[int], backend: str, shared: bool) -> None:
    running = peak = 0

    async def work(n: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            for _ in range(n):
                await anyio.lowlevel.checkpoint()
            return n
        finally:
            running -= 1

    async def main() -> list[int]:
        bound: int | pk.Limiter = pk.Limiter(concurrency=limit) if shared else limit
        return await pk.map(work, steps, limit=bound)

    assert anyio.run(main, backend=backend) == steps
    assert peak <= limit


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
            await anyio.sleep(0.001)

    async with limiter, anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(user, i)
            await anyio.sleep(0.001)  # queue them in order
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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"rate": 0}, "rate"),
        ({"rate": -3}, "rate"),
        ({"rate": float("inf")}, "rate"),
        ({"rate": 1, "burst": 0}, "burst"),
    ],
)
def test_limiter_rejects_bad_values(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pk.Limiter(**kwargs)  # type: ignore[arg-type]


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


def test_retry_validation() -> None:
    with pytest.raises(ValueError, match="attempts"):
        pk.Retry(attempts=0)
    with pytest.raises(ValueError, match="backoff"):
        pk.Retry(backoff=-1)
    with pytest.raises(TypeError, match="on must be"):
        pk.Retry(on=(int,))  # type: ignore[arg-type]
    assert pk.Retry(on=lambda e: isinstance(e, OSError)).to_tenacity() is not None
