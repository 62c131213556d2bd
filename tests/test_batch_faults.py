"""BatchLoader fault paths: stray cancellations, bad keys, cancelled batches, keys lists
edited by ``load_many``."""

from __future__ import annotations

import sys
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


async def wait_until(cond: Any) -> None:
    with anyio.fail_after(5):  # a hang guard, not a timing assertion
        while not cond():
            await anyio.lowlevel.checkpoint()


@asyncio_only
@pytest.mark.skipif(sys.version_info < (3, 11), reason=STRAY_NEEDS)
@pytest.mark.parametrize("entered", [True, False])
async def test_a_stray_cancelled_error_from_load_many_fails_its_batch_not_the_body(
    entered: bool,
) -> None:
    """A CancelledError that no cancellation caused (load_many awaited a future
    cancelled elsewhere) is that batch's failure: every caller gets the same object.
    It used to reach the loader's task group as a cancellation, which cancelled the
    ``async with loader`` body quietly (callers got "closed before this batch
    finished"); not entered, the followers got that RuntimeError."""
    seen: list[BaseException] = []

    async def load_many(keys: list[int]) -> dict[int, int]:
        if 13 in keys:
            await stray_cancellation(seen)
        await anyio.lowlevel.checkpoint()
        return {k: k * 10 for k in keys}

    async def call(loader: pk.BatchLoader[int, int], key: int, out: list[object]) -> None:
        try:
            out.append(await loader.load(key))
        except BaseException as exc:
            out.append(exc)

    loader = pk.BatchLoader(load_many)
    out: list[object] = []
    body_went_on = False
    async with contextlib_entered(loader, entered):
        async with anyio.create_task_group() as tg:
            for key in (13, 1):
                tg.start_soon(call, loader, key, out)
        await anyio.lowlevel.checkpoint()
        assert await loader.load(2) == 20  # the loader still works
        body_went_on = True
    assert body_went_on
    assert len(seen) == 1
    assert out == [seen[0], seen[0]]  # the same object for every caller of the batch


def contextlib_entered(loader: pk.BatchLoader[Any, Any], entered: bool) -> Any:
    import contextlib

    return loader if entered else contextlib.nullcontext(loader)


async def test_an_unhashable_key_opens_no_batch() -> None:
    """``load([1])`` raises a TypeError naming the key, before anything is queued: it
    used to open a batch first, so ``load_many([])`` was called with no keys."""
    calls: list[list[Any]] = []

    async def load_many(keys: list[Any]) -> dict[Any, Any]:
        calls.append(keys)
        return {k: k for k in keys}

    for cache in (False, True):
        async with pk.BatchLoader(load_many, cache=cache) as loader:
            with pytest.raises(TypeError, match=r"key must be hashable, got list \[1\]"):
                await loader.load([1])
            assert loader.stats == pk.BatchStats(requests=0, keys=0, calls=0)
            assert await loader.load(2) == 2
        loose = pk.BatchLoader(load_many, cache=cache)  # not entered: same check
        with pytest.raises(TypeError, match="key must be hashable"):
            await loose.load({})
        with pytest.raises(TypeError, match=r"keys must be hashable, got dict \{\}"):
            await loose.load_many([1, {}])
    assert calls == [[2], [2]]


async def test_a_batch_cancelled_before_its_call_is_not_memoized() -> None:
    """``cache=True``: a batch cancelled while it collected keys (the scope around
    ``async with loader`` was cancelled) fails its callers, but that failure is not
    memoized: the key used to fail with "closed before this batch ran" for the
    loader's whole life, entered again or not."""
    calls: list[list[int]] = []

    async def load_many(keys: list[int]) -> dict[int, int]:
        calls.append(keys)
        await anyio.lowlevel.checkpoint()
        return {k: k * 10 for k in keys}

    loader = pk.BatchLoader(load_many, cache=True, window=1000.0)
    out: list[object] = []

    async def call() -> None:
        try:
            out.append(await loader.load(1))
        except Exception as exc:
            out.append(exc)

    with anyio.CancelScope() as scope:
        async with loader, anyio.create_task_group() as tg:
            tg.start_soon(call)
            await wait_until(lambda: loader.stats.requests == 1)
            scope.cancel()
    assert scope.cancelled_caught
    assert len(out) == 0 or isinstance(out[0], RuntimeError)
    out.clear()
    async with anyio.create_task_group() as tg, loader:
        tg.start_soon(call)
        await wait_until(lambda: loader.stats.requests == 2)
        # leaving sent the open batch at once
    assert out == [10]  # loaded, not the memoized failure
    assert await loader.load(1) == 10  # memoized now
    assert calls[-1] == [1]


@asyncio_only
async def test_a_load_made_after_its_batch_was_cancelled_does_not_hang() -> None:
    """asyncio: once a batch's dispatch was cancelled, a load made before the loader
    leaves (a shielded section) does not join that finished batch: it used to get a
    future nobody would ever resolve."""
    import asyncio

    async def load_many(keys: list[int]) -> dict[int, int]:
        return {k: k * 10 for k in keys}

    loader = pk.BatchLoader(load_many, window=1000.0)
    with anyio.CancelScope() as scope:
        async with loader:
            first = loader.load(1)
            scope.cancel()
            with anyio.CancelScope(shield=True):
                await wait_until(first.done)
                with pytest.raises(RuntimeError, match="closed before this batch ran"):
                    await first
                second = loader.load(2)
                with anyio.fail_after(5):  # a hang guard
                    await asyncio.wait([second])
                assert isinstance(second.exception(), RuntimeError)
    assert scope.cancelled_caught


async def sorts_in_place(keys: list[int]) -> list[str]:
    keys.sort()  # then "aligned" with the sorted list
    await anyio.lowlevel.checkpoint()
    return [f"v{k}" for k in keys]


async def drops_one(keys: list[int]) -> list[str]:
    keys.pop()
    await anyio.lowlevel.checkpoint()
    return [f"v{k}" for k in keys]


async def values_in_place(keys: list[Any]) -> list[Any]:
    for i, key in enumerate(keys):
        keys[i] = f"v{key}"
    await anyio.lowlevel.checkpoint()
    return keys


async def sorts_then_maps(keys: list[int]) -> dict[int, str]:
    keys.sort()
    await anyio.lowlevel.checkpoint()
    return {k: f"v{k}" for k in keys}


async def load_each(loader: pk.BatchLoader[int, str], keys: list[int]) -> list[object]:
    """One task per key; the keys join the batch in the order given on every backend
    (trio runs the tasks of one scheduler pass in any order)."""
    out: list[object] = [None] * len(keys)
    turns = [anyio.Event() for _ in keys]

    async def one(i: int, key: int) -> None:
        await turns[i].wait()
        if i + 1 < len(keys):
            turns[i + 1].set()  # the next one runs after this one has joined
        try:
            out[i] = await loader.load(key)  # joins before its first checkpoint
        except Exception as exc:
            out[i] = exc

    async with anyio.create_task_group() as tg:
        for i, key in enumerate(keys):
            tg.start_soon(one, i, key)
        turns[0].set()
    return out


@pytest.mark.parametrize("load_many", [sorts_in_place, drops_one])
async def test_a_list_result_for_keys_edited_in_place_fails_clearly(load_many: Any) -> None:
    """``load_many`` that sorts (or edits) its keys list and returns a list: every
    caller gets a ValueError saying so, on every path. It used to depend on the path:
    on asyncio (one future per key) the values went to the wrong keys (key 3 got
    "v1") or the loader's task group crashed on an internal ``zip``; elsewhere the
    edited list was used."""
    # one batch of the three keys, however many scheduler passes they take to join
    async with pk.BatchLoader(load_many, max_batch=3, window=60) as loader:
        for out in (await load_each(loader, [3, 1, 2]), await _gather_if_asyncio(loader)):
            assert all(isinstance(o, ValueError) for o in out), out
            assert "changed the list of keys it was given" in str(out[0])
        with pytest.raises(ValueError, match="changed the list of keys it was given"):
            await loader.load_many([3, 1, 2])


@pytest.mark.parametrize("load_many", [values_in_place, sorts_then_maps])
async def test_keys_list_used_in_place_with_an_aligned_or_mapping_result(load_many: Any) -> None:
    """The list load_many gets is its own: overwriting it with the values (and
    returning it), or sorting it and returning a mapping, gives every key its value
    on every path."""
    async with pk.BatchLoader(load_many) as loader:
        assert await load_each(loader, [3, 1, 2]) == ["v3", "v1", "v2"]
        assert await _gather_if_asyncio(loader) == ["v3", "v1", "v2"]
        assert await loader.load_many([3, 1, 2]) == ["v3", "v1", "v2"]


async def _gather_if_asyncio(loader: pk.BatchLoader[int, str]) -> list[object]:
    """asyncio: ``asyncio.gather`` of the futures (the one-future-per-key path)."""
    try:
        import sniffio

        backend = sniffio.current_async_library()
    except Exception:  # pragma: no cover
        backend = "asyncio"
    if backend != "asyncio":
        return await load_each(loader, [3, 1, 2])
    import asyncio

    return list(
        await asyncio.gather(loader.load(3), loader.load(1), loader.load(2), return_exceptions=True)
    )


@pytest.mark.parametrize("entered", [True, False])
@pytest.mark.parametrize("cache", [False, True])
async def test_load_many_loads_a_repeated_key_once_across_its_batches(
    entered: bool, cache: bool
) -> None:
    """``load_many([1, 2, 1])`` with ``max_batch=2`` is one call for ``[1, 2]``: the
    second 1 used to arrive after the first batch was full and opened a second batch,
    so key 1 was loaded twice by one ``load_many`` (documented: duplicates are loaded
    once). The requests still count every key as given."""
    calls: list[list[int]] = []

    async def load_many(keys: list[int]) -> dict[int, int]:
        calls.append(list(keys))
        await anyio.lowlevel.checkpoint()
        return {k: k * 10 for k in keys}

    loader = pk.BatchLoader(load_many, max_batch=2, cache=cache)
    async with contextlib_entered(loader, entered):
        assert await loader.load_many([1, 2, 1, 1, 2]) == [10, 20, 10, 10, 20]
    assert calls == [[1, 2]]
    assert loader.statistics() == pk.BatchStats(requests=5, keys=2, calls=1)
