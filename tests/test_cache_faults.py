"""SWRCache fault paths: stray cancellations from a loader, a refresh failing for a
very long time."""

from __future__ import annotations

import sys
from collections.abc import Hashable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

from .test_fanout import STRAY_NEEDS, stray_cancellation

pytestmark = pytest.mark.anyio

asyncio_only = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")]
)


class FakeClock:
    """An injectable clock: tests move time by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def wait_until(cond: Any) -> None:
    with anyio.fail_after(5):  # a hang guard, not a timing assertion
        while not cond():
            await anyio.lowlevel.checkpoint()


def stray_loader(seen: list[BaseException], calls: list[Hashable]) -> Any:
    """A loader that awaits a future someone else cancelled (asyncio): it raises
    CancelledError although nobody cancelled it or its callers."""

    async def loader(key: Hashable) -> str:
        calls.append(key)
        await anyio.lowlevel.checkpoint()
        await stray_cancellation(seen)

    return loader


@asyncio_only
@pytest.mark.skipif(sys.version_info < (3, 11), reason=STRAY_NEEDS)
@pytest.mark.parametrize("entered", [True, False])
async def test_a_stray_cancelled_error_from_a_loader_is_the_loads_failure(entered: bool) -> None:
    """Every waiter of the flight gets that CancelledError (the same object), the
    loader runs once, and the cache's body goes on. Entered, it used to reach the
    cache's task group as a cancellation: the ``async with cache`` body was cancelled
    quietly and the waiters retried the load; not entered, the followers retried."""
    import contextlib

    seen: list[BaseException] = []
    calls: list[Hashable] = []
    loader = stray_loader(seen, calls)
    cache = pk.SWRCache(fresh=10, stale=100, clock=FakeClock())
    out: list[object] = []

    async def call() -> None:
        try:
            out.append(await cache.get("k", loader))
        except BaseException as exc:
            out.append(exc)

    body_went_on = False
    async with cache if entered else contextlib.nullcontext(cache):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(call)
        await anyio.lowlevel.checkpoint()
        body_went_on = True
    assert body_went_on
    assert calls == ["k"]
    assert len(seen) == 1
    assert out == [seen[0]] * 3
    assert cache.stats.load_errors == 1


@asyncio_only
@pytest.mark.skipif(sys.version_info < (3, 11), reason=STRAY_NEEDS)
async def test_a_stray_cancelled_error_from_a_refresh_is_a_refresh_error() -> None:
    """A background refresh that raises a stray CancelledError is a failed refresh:
    counted, handed to ``on_error``, the stale value kept in service; the cache's
    body goes on."""
    seen: list[BaseException] = []
    calls: list[Hashable] = []
    errors: list[tuple[Hashable, BaseException]] = []
    clock = FakeClock()
    cache = pk.SWRCache(
        fresh=10, stale=100, clock=clock, on_error=lambda k, e: errors.append((k, e))
    )
    body_went_on = False
    async with cache:
        await cache.set("k", "v")
        clock.now += 20
        assert await cache.get("k", stray_loader(seen, calls)) == "v"
        await wait_until(lambda: cache.stats.refresh_errors == 1)
        assert errors == [("k", seen[0])]
        assert await cache.get("k", stray_loader(seen, calls)) == "v"  # backing off
        body_went_on = True
    assert body_went_on  # the refresh's error used to cancel the body quietly
    assert calls == ["k"]


async def test_a_refresh_failing_a_thousand_times_keeps_backing_off() -> None:
    """The back-off doubles up to ``max_backoff`` however many refreshes failed in a
    row: at the 1025th, ``backoff * 2 ** 1024`` used to raise OverflowError inside the
    flight's cleanup, which crashed the cache's task group (and its body)."""
    clock = FakeClock()
    errors: list[Exception] = []
    cache = pk.SWRCache(
        fresh=1, stale=1e9, backoff=1, max_backoff=1, clock=clock,
        on_error=lambda _, e: errors.append(e),
    )  # fmt: skip

    async def failing(key: Hashable) -> str:
        raise LookupError(key)

    body_went_on = False
    async with cache:
        await cache.set("k", "v")
        for failed in range(1, 1101):
            clock.now += 2  # past the fresh window, and past the (capped) back-off
            assert await cache.get("k", failing) == "v"  # stale-if-error
            await wait_until(lambda n=failed: cache.stats.refresh_errors == n)
        clock.now += 0.5  # within the capped back-off: no refresh
        assert await cache.get("k", failing) == "v"
        await anyio.lowlevel.checkpoint()
        body_went_on = True
    assert body_went_on
    assert len(errors) == 1100
    assert cache.stats.refresh_errors == 1100
