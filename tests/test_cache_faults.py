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


class GatedStore:
    """A network-like store: each ``set`` waits for its own gate (a slow round trip)."""

    def __init__(self) -> None:
        self.data: dict[Hashable, Any] = {}
        self.gates: list[anyio.Event] = []  # one per set in flight, in arrival order

    async def get(self, key: Hashable) -> Any:
        await anyio.lowlevel.checkpoint()
        return self.data.get(key)

    async def set(self, key: Hashable, entry: Any, *, ttl: float) -> None:
        gate = anyio.Event()
        self.gates.append(gate)
        await gate.wait()
        self.data[key] = entry

    async def delete(self, key: Hashable) -> None:
        await anyio.lowlevel.checkpoint()
        self.data.pop(key, None)

    async def clear(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.data.clear()


async def test_writes_of_a_key_land_in_the_order_they_were_made() -> None:
    """``set(v1)`` is in flight; ``set(v2)`` waits for its turn; then the task that
    wrote v1 invalidates the key. The invalidation came last, so the key must end up
    deleted. The turn used to go to whoever asked first *after* it was freed: the
    invalidation, called right after v1 landed and before v2's writer woke up, went
    ahead of v2, and v2 (written before the invalidation was called) landed after it
    and came back to the callers."""
    store = GatedStore()
    cache = pk.SWRCache(fresh=10, stale=100, store=store, clock=FakeClock())

    async def first_writer() -> None:
        await cache.set("k", "v1")
        await cache.invalidate("k")  # right after v1 landed: the last write of "k"

    async with anyio.create_task_group() as tg:
        tg.start_soon(first_writer)
        await wait_until(lambda: len(store.gates) == 1)  # v1 in flight
        tg.start_soon(cache.set, "k", "v2")  # waits for v1's turn to end
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        assert len(store.gates) == 1
        store.gates[0].set()  # v1 lands; v2 is next, then the invalidation
        await wait_until(lambda: len(store.gates) == 2)
        store.gates[1].set()
    assert "k" not in store.data, store.data


class SlowClearStore(GatedStore):
    """A ``GatedStore`` whose ``clear`` waits for its own gate too."""

    def __init__(self) -> None:
        super().__init__()
        self.clearing = anyio.Event()
        self.clear_gate = anyio.Event()

    async def clear(self) -> None:
        self.clearing.set()
        await self.clear_gate.wait()
        self.data.clear()


async def test_a_set_called_while_the_store_is_cleared_lands_after_the_clear() -> None:
    """``set(v1)`` is in flight when ``clear()`` is called; ``set(v2)`` is called
    after it. ``v2`` must survive: it used to get its turn as soon as ``v1`` landed,
    land while the store's (slow) clear was under way, and be erased by it."""
    store = SlowClearStore()
    cache = pk.SWRCache(fresh=10, stale=100, store=store, clock=FakeClock())
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.set, "k", "v1")
        await wait_until(lambda: len(store.gates) == 1)  # v1 in flight
        tg.start_soon(cache.clear)
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        tg.start_soon(cache.set, "k", "v2")  # asked for after the clear
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        store.gates[0].set()  # v1 lands; the clear reaches the store
        await store.clearing.wait()
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        if len(store.gates) == 2:  # v2 already on its way: let it land first
            store.gates[1].set()
            await wait_until(lambda: store.data.get("k") is not None)
        store.clear_gate.set()
        await wait_until(lambda: len(store.gates) == 2)
        store.gates[1].set()
    assert store.data["k"].value == "v2", store.data


async def test_a_write_queued_for_its_turn_and_cancelled_passes_the_turn_on() -> None:
    """Writers of one key take turns; one cancelled while it waits for its turn must
    not keep the key busy (nor lose the turn of the writer after it)."""
    store = GatedStore()
    cache = pk.SWRCache(fresh=10, stale=100, store=store, clock=FakeClock())
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.set, "k", "v1")
        await wait_until(lambda: len(store.gates) == 1)
        cancelled = anyio.CancelScope()

        async def queued() -> None:
            with cancelled:
                await cache.set("k", "cancelled")

        tg.start_soon(queued)
        tg.start_soon(cache.invalidate, "k")
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        cancelled.cancel()  # gives up while it waits for its turn
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        store.gates[0].set()
        await wait_until(lambda: not len(cache._loads.writes))
    assert "k" not in store.data
    assert len(store.gates) == 1  # the cancelled write never reached the store


@pytest.mark.parametrize("first", ["cancel", "hand"])
async def test_a_writer_cancelled_as_it_is_handed_the_turn_passes_it_on(first: str) -> None:
    """The turn goes straight to the next writer in line. One cancelled as it is
    handed the turn (both before it runs) gives it to the writer after it, or takes
    it and then gives it on: either way the key is not left busy."""
    from parallelkit._cache.writes import KeyedWrites

    writes = KeyedWrites()
    order: list[str] = []
    await writes.acquire("k")  # held here
    scopes = {name: anyio.CancelScope() for name in ("b", "c")}

    async def writer(name: str) -> None:
        with scopes[name]:
            await writes.acquire("k")
            order.append(name)
            writes.release("k")

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer, "b")
        await wait_until(lambda: len(writes._busy["k"] or ()) == 1)
        tg.start_soon(writer, "c")
        await wait_until(lambda: len(writes._busy["k"] or ()) == 2)
        if first == "cancel":
            scopes["b"].cancel()
            writes.release("k")  # handed to b, whose cancellation is on its way
        else:
            writes.release("k")
            scopes["b"].cancel()
    if first == "cancel":
        assert order == ["c"]
    else:  # b may have taken its turn before its cancellation arrived
        assert order in (["c"], ["b", "c"])
    assert not len(writes)


@pytest.mark.parametrize("round_", range(8))
async def test_a_write_waiting_for_a_clear_goes_before_a_clear_asked_for_after_it(
    round_: int,
) -> None:
    """A clear runs; a write of ``k`` is asked for, then a second clear. The write
    came first, so it must land before the second clear: the second clear then
    erases it. Both used to wait for the first clear's end on its barrier, and
    whichever woke first went: on trio (which runs a batch of woken tasks in either
    order) the second clear could snapshot the keys before the write took its turn,
    and the write landed after the later clear (a value back after a clear)."""
    from parallelkit._cache.writes import KeyedWrites

    writes = KeyedWrites()
    order: list[str] = []
    first_clear_end = anyio.Event()

    async def clear(name: str, until: anyio.Event | None) -> None:
        async with writes.exclusive():
            order.append(f"{name} starts")
            if until is not None:
                await until.wait()
            order.append(f"{name} ends")

    async def write() -> None:
        await writes.acquire("k")
        try:
            await anyio.lowlevel.checkpoint()
            order.append("write lands")
        finally:
            writes.release("k")

    async with anyio.create_task_group() as tg:
        tg.start_soon(clear, "clear 1", first_clear_end)
        await wait_until(lambda: order == ["clear 1 starts"])
        tg.start_soon(write)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        tg.start_soon(clear, "clear 2", None)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        first_clear_end.set()
    assert order == [
        "clear 1 starts",
        "clear 1 ends",
        "write lands",
        "clear 2 starts",
        "clear 2 ends",
    ]
    assert not len(writes)


async def test_writes_and_clears_cancelled_while_a_clear_runs_keep_the_line_moving() -> None:
    """Waiting behind a clear, a write and a clear are cancelled: neither keeps a key
    busy nor holds the next clear off; a write queued after them still goes."""
    from parallelkit._cache.writes import KeyedWrites

    writes = KeyedWrites()
    order: list[str] = []
    release = anyio.Event()
    scopes = [anyio.CancelScope(), anyio.CancelScope()]

    async def first_clear() -> None:
        async with writes.exclusive():
            order.append("clear")
            await release.wait()

    async def cancelled_write() -> None:
        with scopes[0]:
            await writes.acquire("k")
            order.append("cancelled write ran")
            writes.release("k")

    async def cancelled_clear() -> None:
        with scopes[1]:
            async with writes.exclusive():
                order.append("cancelled clear ran")

    async def write() -> None:
        await writes.acquire("k")
        order.append("write")
        writes.release("k")

    async with anyio.create_task_group() as tg:
        tg.start_soon(first_clear)
        await wait_until(lambda: order == ["clear"])
        for task in (cancelled_write, cancelled_clear, write):
            tg.start_soon(task)
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
        for scope in scopes:
            scope.cancel()
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        release.set()
    assert order == ["clear", "write"]
    assert not len(writes)
    async with writes.exclusive():  # nothing left holding the clear off
        pass
