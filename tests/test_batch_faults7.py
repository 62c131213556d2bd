"""BatchLoader: a recursive load_many waiting on its own batch, values that are a
BaseException but not an Exception, StopIteration, and a bytes-like result."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import parallelkit as pk

from .batch_helpers import entered_or_not, get, load_or_many, owned

pytestmark = pytest.mark.anyio


class Interrupt(BaseException):
    """A BaseException that is not an Exception (as a CancelledError is on asyncio)."""


# ------------------------------------------------ a load_many waiting on its own batch
@entered_or_not
@load_or_many
@pytest.mark.parametrize("nested", ["load", "load_many"])
async def test_a_nested_load_of_a_key_of_the_running_batch_raises_instead_of_hanging(
    entered: bool, how: str, nested: str
) -> None:
    """With ``cache=True`` the memo joins a key to its batch in flight: a ``load_many``
    that loads (through the same loader) a key of its own batch waited for itself
    forever, and on a loader not entered the caller's timeout could not break it (the
    batch runs shielded). It now raises a RuntimeError naming the key."""
    nested_errors: list[BaseException] = []

    async def tree(keys: list[int]) -> dict[int, int]:
        if 2 in keys:
            try:
                with anyio.fail_after(30):  # a hang guard, not a timing assertion
                    await get(loader, nested, 1)  # 1 is in this very batch
            except BaseException as exc:
                nested_errors.append(exc)
                raise
        return {k: k * 10 for k in keys}

    loader: pk.BatchLoader[int, int] = pk.BatchLoader(tree, cache=True)
    errors: list[BaseException] = []

    async def one(key: int) -> None:
        try:
            await loader.load(key)
        except RuntimeError as exc:
            errors.append(exc)

    async with owned(loader, entered):
        if how == "load":
            async with anyio.create_task_group() as tg:  # one batch of [1, 2]
                tg.start_soon(one, 1)
                tg.start_soon(one, 2)
        else:
            with pytest.raises(RuntimeError) as info:
                await loader.load_many([1, 2])
            errors.append(info.value)
        assert [type(e) for e in nested_errors] == [RuntimeError]
        assert "load_many is waiting on its own batch: key 1 " in str(nested_errors[0])
        assert errors
        assert all(e is nested_errors[0] for e in errors)  # load_many's error, as raised
        # nothing of that batch is memoized: the loader still works
        assert await loader.load_many([1, 3]) == [10, 30]


@entered_or_not
@load_or_many
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
async def test_a_tree_loader_loading_other_keys_through_itself_works(
    entered: bool, how: str, cache: bool
) -> None:
    """A nested load of a key NOT in the running batch goes in a new batch, memo or
    not (a parent loading its child through the same loader)."""
    calls: list[list[int]] = []

    async def tree(keys: list[int]) -> dict[int, int]:
        calls.append(list(keys))
        values = {}
        for k in keys:
            values[k] = k + (await get(loader, how, k - 1) if k > 0 else 0)
        return values

    loader: pk.BatchLoader[int, int] = pk.BatchLoader(tree, cache=cache)
    async with owned(loader, entered):
        with anyio.fail_after(30):  # a hang guard, not a timing assertion
            assert await get(loader, how, 3) == 3 + 2 + 1
    assert calls == [[3], [2], [1], [0]]


@entered_or_not
@load_or_many
async def test_without_cache_a_nested_load_of_a_key_of_the_running_batch_loads_it_again(
    entered: bool, how: str
) -> None:
    """``cache=False``: the running batch takes no key, so the nested load of one of its
    keys is a new batch (loaded again), never a wait on itself."""
    calls: list[list[int]] = []

    async def tree(keys: list[int]) -> dict[int, int]:
        calls.append(list(keys))
        values = {k: k * 10 for k in keys}
        if 2 in keys:
            with anyio.fail_after(30):  # a hang guard, not a timing assertion
                values[2] += await get(loader, how, 1)
        return values

    loader: pk.BatchLoader[int, int] = pk.BatchLoader(tree)
    async with owned(loader, entered):
        assert await loader.load_many([1, 2]) == [10, 30]
    assert calls == [[1, 2], [1]]


# ---------------------------------------- a BaseException (not an Exception) as a value
@entered_or_not
@load_or_many
@pytest.mark.parametrize("as_list", [False, True], ids=["mapping", "list"])
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
async def test_a_base_exception_value_is_a_type_error_for_that_key(
    entered: bool, how: str, as_list: bool, cache: bool
) -> None:
    """An ``Exception`` value is raised for its key; a BaseException that is not one (a
    CancelledError from ``gather(return_exceptions=True)``) was handed to the caller
    as its value. It is now a TypeError for that key only, never memoized."""
    odd = Interrupt("from gather")
    calls: list[list[int]] = []

    async def src(keys: list[int]) -> Any:
        calls.append(list(keys))
        values = [odd if k == 2 else k * 10 for k in keys]
        return values if as_list else dict(zip(keys, values, strict=True))

    loader: pk.BatchLoader[int, int] = pk.BatchLoader(src, cache=cache)
    async with owned(loader, entered):
        with pytest.raises(TypeError, match=r"Interrupt.*key 2: it is not raised") as info:
            await get(loader, how, 2)
        assert info.value.__cause__ is odd
        assert await get(loader, how, 1) == 10  # the other keys are fine
        with pytest.raises(TypeError, match="Interrupt"):
            await get(loader, how, 2)  # not memoized: loaded again
    assert len(calls) == 3


# --------------------------------------------------------------------- StopIteration
@entered_or_not
@load_or_many
@pytest.mark.parametrize("where", ["value", "raised"])
async def test_stop_iteration_gives_the_same_clear_error_on_every_path(
    entered: bool, how: str, where: str
) -> None:
    """A StopIteration (a value, or raised by ``load_many``) cannot be raised from a
    coroutine: the coroutine paths gave Python's "coroutine raised StopIteration".
    Every path now gives the future path's message, with the StopIteration reachable."""
    stop = StopIteration("no more rows")

    async def src(keys: list[int]) -> dict[int, Any]:
        if where == "raised":
            raise stop
        return dict.fromkeys(keys, stop)

    loader: pk.BatchLoader[int, int] = pk.BatchLoader(src)
    async with owned(loader, entered):
        with pytest.raises(RuntimeError, match="load_many gave a StopIteration") as info:
            await get(loader, how, 1)
    cause = info.value.__cause__
    while cause is not None and cause is not stop:
        cause = cause.__cause__
    assert cause is stop


# ------------------------------------------------------------- a bytes-like result
@entered_or_not
@load_or_many
@pytest.mark.parametrize(
    "result", [bytearray(b"abc"), b"abc", "abc", memoryview(b"abc")], ids=lambda r: type(r).__name__
)
async def test_a_bytes_or_str_result_is_not_a_list_of_values(
    entered: bool, how: str, result: Any
) -> None:
    """A ``bytearray`` of the right length was taken as a list of ints, one per key. A
    bytes-like or str result is refused, with a TypeError naming its type."""

    async def src(keys: list[int]) -> Any:
        return result

    loader: pk.BatchLoader[int, int] = pk.BatchLoader(src)
    errors: list[BaseException] = []

    async def one(key: int) -> None:
        try:
            await loader.load(key)
        except TypeError as exc:
            errors.append(exc)

    async with owned(loader, entered):
        with anyio.fail_after(30):  # a hang guard, not a timing assertion
            if how == "load":
                async with anyio.create_task_group() as tg:  # one batch of three keys
                    for key in (1, 2, 3):
                        tg.start_soon(one, key)
            else:
                try:
                    await loader.load_many([1, 2, 3])
                except TypeError as exc:
                    errors.append(exc)
    assert len(errors) == (3 if how == "load" else 1)
    for error in errors:
        assert type(result).__name__ in str(error)
        assert "aligned with the keys" in str(error)
