"""BatchLoader: one call per tick, max_batch split, per-key errors, dedupe, lifecycle."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

import parallelkit as pk

pytestmark = pytest.mark.anyio


class Source:
    """``load_many`` that records its calls; values are ``key * 10``."""

    def __init__(self, result: Any = None) -> None:
        self.calls: list[list[Any]] = []
        self.result = result
        self.gate: anyio.Event | None = None

    async def __call__(self, keys: list[Any]) -> Mapping[Any, Any] | Sequence[Any]:
        self.calls.append(list(keys))
        if self.gate is not None:
            await self.gate.wait()
        await anyio.lowlevel.checkpoint()
        if self.result is not None:
            return self.result(keys)  # type: ignore[no-any-return]
        return {k: k * 10 for k in keys}


async def load_concurrently(loader: pk.BatchLoader[Any, Any], keys: list[Any]) -> list[Any]:
    results: list[Any] = [None] * len(keys)

    async def one(i: int, key: Any) -> None:
        try:
            results[i] = await loader.load(key)
        except Exception as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i, key in enumerate(keys):
            tg.start_soon(one, i, key)
    return results


async def test_500_concurrent_loads_make_one_call() -> None:
    src = Source()
    async with pk.BatchLoader(src) as loader:
        results = await load_concurrently(loader, list(range(500)))
    assert results == [k * 10 for k in range(500)]
    assert len(src.calls) == 1
    assert loader.stats == pk.BatchStats(requests=500, keys=500, calls=1)


async def test_max_batch_splits() -> None:
    src = Source()
    async with pk.BatchLoader(src, max_batch=100) as loader:
        results = await load_concurrently(loader, list(range(250)))
    assert results == [k * 10 for k in range(250)]
    assert [len(c) for c in src.calls] == [100, 100, 50]
    assert loader.stats == pk.BatchStats(requests=250, keys=250, calls=3)


async def test_duplicate_keys_are_loaded_once() -> None:
    src = Source()
    async with pk.BatchLoader(src) as loader:
        results = await load_concurrently(loader, [1, 2, 1, 3, 2, 1])
        assert await loader.load_many([4, 4, 5]) == [40, 40, 50]
    assert results == [10, 20, 10, 30, 20, 10]
    assert [sorted(c) for c in src.calls] == [[1, 2, 3], [4, 5]]  # trio: any order


async def test_per_key_errors_reach_only_their_callers() -> None:
    bad = ValueError("bad key 2")

    def result(keys: list[int]) -> dict[int, Any]:
        return {k: (bad if k == 2 else k) for k in keys if k != 3}

    async with pk.BatchLoader(Source(result)) as loader:
        r = await load_concurrently(loader, [1, 2, 3, 4])
    assert r[0] == 1
    assert r[3] == 4
    assert r[1] is bad
    assert isinstance(r[2], KeyError)
    assert "3" in str(r[2])


async def test_default_for_missing_keys() -> None:
    async with pk.BatchLoader(Source(lambda keys: {}), default=None) as loader:
        assert await loader.load_many([1, 2]) == [None, None]


async def test_whole_batch_failure_is_the_same_object_for_every_caller() -> None:
    boom = ConnectionError("db down")

    def result(keys: list[int]) -> dict[int, int]:
        raise boom

    async with pk.BatchLoader(Source(result)) as loader:
        r = await load_concurrently(loader, list(range(20)))
    assert all(x is boom for x in r)


async def test_list_results_aligned_and_misaligned() -> None:
    async with pk.BatchLoader(Source(lambda keys: [k + 1 for k in keys])) as loader:
        assert await load_concurrently(loader, [1, 2, 3]) == [2, 3, 4]
    async with pk.BatchLoader(Source(lambda keys: [0])) as loader:
        with anyio.fail_after(5):  # never hangs
            r = await load_concurrently(loader, [1, 2, 3])
    assert all(isinstance(x, ValueError) and "3 keys" in str(x) for x in r)
    assert r[0] is r[1]
    async with pk.BatchLoader(Source(lambda keys: 42)) as loader:
        r = await load_concurrently(loader, [1, 2])
    assert all(isinstance(x, TypeError) for x in r)


async def test_load_many_raises_first_failing_key_in_order() -> None:
    def result(keys: list[int]) -> dict[int, Any]:
        return {k: KeyError(k) if k > 1 else k for k in keys}

    async with pk.BatchLoader(Source(result)) as loader:
        with pytest.raises(KeyError) as info:
            await loader.load_many([1, 3, 2])
    assert info.value.args == (3,)


async def test_cache_false_reloads_in_each_batch_cache_true_memoizes() -> None:
    src = Source()
    async with pk.BatchLoader(src) as loader:
        await loader.load(1)
        await loader.load(1)
    assert len(src.calls) == 2
    src = Source()
    async with pk.BatchLoader(src, cache=True) as loader:
        await loader.load(1)
        assert await loader.load(1) == 10
        assert await loader.load_many([1, 2]) == [10, 20]
        loader.clear(1)
        await loader.load(1)
        loader.clear()
    assert src.calls == [[1], [2], [1]]


async def test_cache_true_does_not_memoize_errors() -> None:
    fails = [True]

    def result(keys: list[int]) -> dict[int, Any]:
        if fails[0]:
            fails[0] = False
            return {k: RuntimeError("once") for k in keys}
        return {k: k for k in keys}

    async with pk.BatchLoader(Source(result), cache=True) as loader:
        with pytest.raises(RuntimeError):
            await loader.load(7)
        assert await loader.load(7) == 7


async def wait_until(cond: Any) -> None:
    while not cond():
        await anyio.lowlevel.checkpoint()


async def let_others_run() -> None:
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


async def test_window_collects_loads_across_ticks() -> None:
    src = Source()
    loader = pk.BatchLoader(src, window=3600, max_batch=3)  # the window never ends here
    async with loader, anyio.create_task_group() as tg:
        for k in range(3):
            tg.start_soon(loader.load, k)
            for _ in range(5):  # several scheduling ticks apart
                await anyio.lowlevel.checkpoint()
            if k < 2:
                assert src.calls == []  # still collecting
    assert [sorted(c) for c in src.calls] == [[0, 1, 2]]  # one batch, sent when full


mock_clock = pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mockclock")],
)


@mock_clock
async def test_window_ends_on_the_clock() -> None:
    src = Source()
    async with pk.BatchLoader(src, window=0.5) as loader, anyio.create_task_group() as tg:
        start = anyio.current_time()
        tg.start_soon(loader.load, 1)
        await anyio.sleep(0.3)
        tg.start_soon(loader.load, 2)  # within the window: joins
        await anyio.sleep(0.3)
        assert len(src.calls) == 1  # the window (0.5 s) ended: sent
        tg.start_soon(loader.load, 3)  # a new batch
    assert [sorted(c) for c in src.calls] == [[1, 2], [3]]
    assert anyio.current_time() - start >= 0.5  # virtual time: the window was waited


async def test_cancelled_caller_does_not_break_the_batch() -> None:
    src = Source()
    src.gate = anyio.Event()
    got: list[int] = []
    cancelled: list[bool] = []
    async with pk.BatchLoader(src) as loader, anyio.create_task_group() as tg:

        async def one(key: int, scope: anyio.CancelScope) -> None:
            with scope:
                got.append(await loader.load(key))
            cancelled.append(scope.cancelled_caught)

        first = anyio.CancelScope()
        tg.start_soon(one, 1, first)
        tg.start_soon(one, 2, anyio.CancelScope())
        await wait_until(lambda: src.calls)  # the batch of both keys is in flight
        first.cancel()
        await wait_until(lambda: cancelled)
        src.gate.set()
    assert [sorted(c) for c in src.calls] == [[1, 2]]
    assert got == [20]  # the other caller got its value
    assert sorted(cancelled) == [False, True]


async def test_leaves_nothing_running_and_fails_callers_on_error_exit() -> None:
    src = Source()
    src.gate = anyio.Event()
    errors: list[BaseException] = []

    async def caller(loader: pk.BatchLoader[int, int]) -> None:
        try:
            await loader.load(1)
        except RuntimeError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as outer:
        with pytest.raises(LookupError):
            async with pk.BatchLoader(src) as loader:
                outer.start_soon(caller, loader)
                await wait_until(lambda: src.calls)  # the batch is in flight
                raise LookupError  # not wrapped in an ExceptionGroup
    assert len(errors) == 1
    assert "closed" in str(errors[0])
    assert loader.stats.calls == 1
    src.gate = None  # the source answers again
    assert await loader.load(7) == 70  # usable after exit, as a not-entered loader
    assert loader.stats.calls == 2


async def test_normal_exit_sends_queued_keys_without_waiting_the_window() -> None:
    src = Source()
    async with anyio.create_task_group() as outer, pk.BatchLoader(src, window=60) as loader:
        outer.start_soon(loader.load, 1)
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
    assert src.calls == [[1]]


async def lm(keys: list[int]) -> list[int]:
    return keys


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("name", "value", "exc"),
    [
        *[("max_batch", v, TypeError) for v in (1.5, True, "500", None)],
        *[("max_batch", v, ValueError) for v in (0, -1)],
        *[("window", v, TypeError) for v in ("0", True, None)],
        *[("window", v, ValueError) for v in (-1, NAN, INF)],
        *[("cache", v, TypeError) for v in (1, "yes", None)],
    ],
)
def test_bad_options_name_the_argument(name: str, value: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=rf"^{name} must be "):
        pk.BatchLoader(lm, **{name: value})


def test_load_many_must_be_async_and_is_refused_before_any_call() -> None:
    calls = 0

    def sync_load_many(keys: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        return keys

    for bad in (sync_load_many, lambda keys: keys, 3, None):
        with pytest.raises(TypeError, match=r"^load_many must be an async callable"):
            pk.BatchLoader(bad)  # type: ignore[arg-type]
    assert calls == 0
    assert "max_batch=500" in repr(pk.BatchLoader(lm))
    assert "window=0.0" in repr(pk.BatchLoader(lm))


def test_statistics_is_the_convention_and_stats_its_alias() -> None:
    loader = pk.BatchLoader(lm)
    assert loader.statistics() == loader.stats == pk.BatchStats(requests=0, keys=0, calls=0)


async def test_enter_once() -> None:
    loader = pk.BatchLoader(lm)
    async with loader:
        with pytest.raises(RuntimeError, match="already entered"):
            await loader.__aenter__()


@settings(max_examples=30, deadline=None)
@given(
    keys=st.lists(st.integers(min_value=0, max_value=40), max_size=60),
    max_batch=st.integers(min_value=1, max_value=10),
)
def test_every_caller_gets_its_value_and_batches_respect_max_batch(
    keys: list[int], max_batch: int
) -> None:
    src = Source()

    async def main() -> list[Any]:
        async with pk.BatchLoader(src, max_batch=max_batch) as loader:
            got = await load_concurrently(loader, keys)
            assert loader.stats.requests == len(keys)
            return got

    assert anyio.run(main) == [k * 10 for k in keys]
    assert all(0 < len(c) <= max_batch and len(set(c)) == len(c) for c in src.calls)


# ---------------------------------------------------------------- not entered
async def test_without_async_with_the_first_caller_runs_the_batch() -> None:
    src = Source()
    loader = pk.BatchLoader(src)  # as in DESIGN.md: no `async with`
    values = await pk.gather(*(loader.load(i) for i in range(500)))
    assert values == [i * 10 for i in range(500)]
    assert len(src.calls) == 1
    assert await loader.load_many([1, 2, 1]) == [10, 20, 10]
    assert len(src.calls) == 2


async def test_without_async_with_a_cancelled_leader_does_not_strand_the_others() -> None:
    src = Source()
    src.gate = anyio.Event()
    loader = pk.BatchLoader(src, window=3600, max_batch=2)  # sent when the follower joins
    got: list[int] = []
    leader_finished = False

    async def leader(scope: anyio.CancelScope) -> None:
        nonlocal leader_finished
        with scope:
            await loader.load(1)  # opens the batch, so this task runs it
            leader_finished = True

    async def follower() -> None:
        got.append(await loader.load(2))

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(leader, scope)
        while loader.stats.requests < 1:  # the leader opens the batch first
            await anyio.lowlevel.checkpoint()
        tg.start_soon(follower)
        while not src.calls:
            await anyio.lowlevel.checkpoint()
        scope.cancel()  # the leader is cancelled while its batch is in flight
        await let_others_run()
        src.gate.set()
    assert src.calls == [[1, 2]]
    assert got == [20]  # the follower got its value
    assert not leader_finished  # and the leader's cancellation took effect after


async def test_without_async_with_max_batch_split_runs_batches_concurrently() -> None:
    src = Source()
    loader = pk.BatchLoader(src, max_batch=100)
    values = await loader.load_many(range(250))
    assert values == [i * 10 for i in range(250)]
    assert [len(c) for c in src.calls] == [100, 100, 50]


# ------------------------------------------------- what load() returns, per backend
asyncio_only = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")]
)


async def test_load_can_be_started_as_a_task_on_both_backends() -> None:
    src = Source()
    async with pk.BatchLoader(src) as loader, anyio.create_task_group() as tg:
        for k in range(3):
            tg.start_soon(loader.load, k)  # load() returns a coroutine (or a future that is one)
    assert [sorted(c) for c in src.calls] == [[0, 1, 2]]


@asyncio_only
async def test_asyncio_load_is_a_future_so_gather_makes_no_task() -> None:
    import asyncio

    src = Source()
    async with pk.BatchLoader(src) as loader:
        pending = [loader.load(k) for k in (1, 2, 1)]
        assert all(asyncio.isfuture(p) for p in pending)
        assert loader.stats.requests == 3  # joined when called, before any await
        tasks_before = len(asyncio.all_tasks())
        gathered = asyncio.gather(*pending)
        assert len(asyncio.all_tasks()) == tasks_before  # futures: no task per key
        assert await gathered == [10, 20, 10]
        task = asyncio.create_task(loader.load(3))  # still accepted as a coroutine
        assert await task == 30
    assert [sorted(c) for c in src.calls] == [[1, 2], [3]]


@asyncio_only
@pytest.mark.parametrize("as_list", [False, True], ids=["mapping", "list"])
async def test_asyncio_a_cancelled_future_only_stops_its_caller(as_list: bool) -> None:
    src = Source((lambda keys: [k * 10 for k in keys]) if as_list else None)
    async with pk.BatchLoader(src) as loader:
        first, other, alone = loader.load(1), loader.load(2), loader.load(3)
        first.cancel()
        alone.cancel()
        assert await other == 20
        first, same_key, other = loader.load(1), loader.load(1), loader.load(2)
        first.cancel()
        assert await same_key == 10
        assert await other == 20
    assert first.cancelled()
    assert alone.cancelled()
    assert src.calls == [[1, 2, 3], [1, 2]]


@asyncio_only
@pytest.mark.parametrize("as_list", [False, True], ids=["mapping", "list"])
async def test_asyncio_futures_get_per_key_errors_and_batch_errors(as_list: bool) -> None:
    import asyncio

    bad = ValueError("bad key 2")

    def per_key(keys: list[int]) -> Any:
        values = [bad if k == 2 else k for k in keys]
        return values if as_list else dict(zip(keys, values, strict=True))

    async with pk.BatchLoader(Source(per_key)) as loader:
        r = await asyncio.gather(*(loader.load(k) for k in [1, 2, 3, 2]), return_exceptions=True)
    assert r == [1, bad, 3, bad]

    boom = ConnectionError("db down")

    def whole(keys: list[int]) -> Any:
        raise boom

    async with pk.BatchLoader(Source(whole)) as loader:
        r = await asyncio.gather(*(loader.load(k) for k in range(5)), return_exceptions=True)
    assert all(x is boom for x in r)

    async with pk.BatchLoader(Source(lambda keys: {k: StopIteration(k) for k in keys})) as loader:
        with pytest.raises(RuntimeError, match="StopIteration"):  # a future cannot hold one
            await loader.load(1)


@asyncio_only
async def test_asyncio_unawaited_failed_loads_log_nothing() -> None:
    import asyncio
    import gc

    logged: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: logged.append(context))
    try:

        def result(keys: list[int]) -> dict[int, Any]:
            return {k: LookupError(k) for k in keys}

        async with pk.BatchLoader(Source(result)) as loader:
            awaited = loader.load(1)
            loader.load(2)  # never awaited
            with pytest.raises(LookupError):
                await awaited
        del awaited
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert logged == []


@asyncio_only
async def test_asyncio_cache_true_futures_share_in_flight_and_finished_loads() -> None:
    src = Source()
    src.gate = anyio.Event()
    async with pk.BatchLoader(src, cache=True) as loader:
        first = loader.load(1)
        await wait_until(lambda: src.calls)  # the batch is in flight
        joined = loader.load(1)  # joins the in-flight load
        src.gate.set()
        assert await first == 10
        assert await joined == 10
        memo = loader.load(1)
        assert memo.done()  # a memo hit is ready at once
        assert await memo == 10
    assert src.calls == [[1]]
    assert loader.stats == pk.BatchStats(requests=3, keys=1, calls=1)


async def test_not_entered_load_waits_as_a_coroutine() -> None:
    import inspect

    loader = pk.BatchLoader(Source())
    pending = loader.load(1)
    assert inspect.iscoroutine(pending)  # the first caller may have to run the batch
    assert await pending == 10


async def test_a_load_made_while_the_loader_is_leaving_is_run_by_its_caller() -> None:
    """`async with loader` leaving waits for a batch in flight; a request still running
    calls load() meanwhile: its caller runs that batch (as on a loader not entered)."""
    src = Source()
    gate = src.gate = anyio.Event()  # holds the first batch in flight
    loader: pk.BatchLoader[int, int] = pk.BatchLoader(src)
    got: list[int] = []
    leaving = anyio.Event()

    async def late_caller() -> None:
        await leaving.wait()
        await let_others_run()  # the loader's __aexit__ now waits for the first batch
        got.append(await loader.load(2))
        gate.set()  # then the first batch may end, and the loader be left

    with anyio.fail_after(5):  # a hang fails the test instead of stalling the suite
        async with anyio.create_task_group() as tg:
            tg.start_soon(late_caller)
            async with loader:
                tg.start_soon(loader.load, 1)
                await wait_until(lambda: len(src.calls) == 1)  # the first batch is in flight
                src.gate = None  # the late batch runs through (the first waits on its gate)
                leaving.set()
    assert got == [20]
    assert [sorted(c) for c in src.calls] == [[1], [2]]


@asyncio_only
async def test_a_load_made_before_entering_joins_a_batch_with_a_list_result() -> None:
    """The coroutine of a load() made before `async with` joins inline when awaited,
    next to a future made inside: the aligned-list fast path must not skip it."""
    import asyncio

    loader = pk.BatchLoader(Source(lambda keys: [f"row {k}" for k in keys]))
    early = loader.load(1)  # a coroutine: the loader is not entered yet
    with anyio.fail_after(5):
        async with loader:
            late = loader.load(2)  # a future, joining the open batch at once
            assert await asyncio.gather(late, early) == ["row 2", "row 1"]


@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
async def test_a_failed_batch_raised_to_many_callers_keeps_one_traceback(entered: bool) -> None:
    """Every caller gets the same exception object; each raise must not add its frames
    to the next caller's traceback (500 callers gave a 1,500-frame traceback)."""
    import traceback
    from contextlib import AsyncExitStack

    boom = ConnectionError("db down")

    def result(keys: list[int]) -> dict[int, int]:
        raise boom

    loader = pk.BatchLoader(Source(result))
    depths: list[int] = []
    errors: list[BaseException] = []

    async def one(key: int) -> None:
        try:
            await loader.load(key)
        except ConnectionError as exc:
            errors.append(exc)
            depths.append(len(traceback.extract_tb(exc.__traceback__)))

    async with AsyncExitStack() as stack:
        if entered:
            await stack.enter_async_context(loader)
        async with anyio.create_task_group() as tg:
            for key in range(50):
                tg.start_soon(one, key)
    assert len(depths) == 50
    assert all(e is boom for e in errors)
    assert max(depths) <= 10, depths  # grew by 3 frames per caller before


async def test_load_many_checks_its_keys_before_queuing_any() -> None:
    src = Source()
    async with pk.BatchLoader(src) as loader:
        with pytest.raises(TypeError, match=r"keys must be hashable, got list \[2\]"):
            await loader.load_many([1, [2], 3])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="keys must be an iterable of keys, got int"):
            await loader.load_many(5)  # type: ignore[arg-type]
        assert await loader.load(5) == 50
    assert src.calls == [[5]]  # key 1 of the refused call was never queued


async def test_load_is_an_async_callable_for_map_and_imap() -> None:
    import inspect
    import sys

    src = Source()
    async with pk.BatchLoader(src) as loader:
        assert await pk.map(loader.load, [1, 2, 3]) == [10, 20, 30]
        async with pk.imap(loader.load, [4, 5]) as results:
            assert sorted([v async for v in results]) == [40, 50]
    if sys.version_info >= (3, 12):
        assert inspect.iscoroutinefunction(loader.load)
