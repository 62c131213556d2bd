"""BatchLoader fault paths, second round: a bad key joining an open batch, a mapping
result whose lookup raises, an asyncio-native cancellation of the caller that runs a
batch of a loader not entered."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

from .test_batch_faults import asyncio_only, wait_until

pytestmark = pytest.mark.anyio


def entered_or_not(loader: pk.BatchLoader[Any, Any], entered: bool) -> Any:
    return loader if entered else contextlib.nullcontext(loader)


async def times_ten(keys: list[Any]) -> dict[Any, Any]:
    await anyio.lowlevel.checkpoint()
    return {k: k * 10 for k in keys}


@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
async def test_an_unhashable_key_joining_an_open_batch_names_the_key(entered: bool) -> None:
    """``load([2])`` while a batch is open raises the TypeError that names the key, as
    it does when no batch is open, and counts no request. It used to raise Python's
    bare "unhashable type: 'list'" (and, on trio or not entered, to count a request
    that was never made)."""
    loader = pk.BatchLoader(times_ten, window=3600, max_batch=2)  # sent when full
    got: list[int] = []

    async def first() -> None:
        got.append(await loader.load(1))

    async with entered_or_not(loader, entered), anyio.create_task_group() as tg:
        tg.start_soon(first)
        await wait_until(lambda: loader.stats.requests == 1)  # key 1's batch is open
        try:
            await loader.load([2])  # type: ignore[arg-type]
        except TypeError as exc:
            error: TypeError | None = exc
        else:  # pragma: no cover - the failure asserted below
            error = None
        requests = loader.stats.requests
        got.append(await loader.load(3))  # fills the batch: it is sent (checked after)
    assert str(error) == "key must be hashable, got list [2]"
    assert requests == 1
    assert sorted(got) == [10, 30]
    assert loader.stats == pk.BatchStats(requests=2, keys=2, calls=1)


class Rows(Mapping[int, int]):
    """A mapping result whose lookup runs code that can fail (a lazy, remote or
    decoding mapping): key 2 cannot be read."""

    def __init__(self, keys: list[int]) -> None:
        self._keys = keys

    def __getitem__(self, key: int) -> int:
        if key == 2:
            msg = "row 2 is corrupt"
            raise ValueError(msg)
        if key not in self._keys:
            raise KeyError(key)
        return key * 10

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


async def rows(keys: list[int]) -> Rows:
    await anyio.lowlevel.checkpoint()
    return Rows([k for k in keys if k != 4])  # no row for key 4


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
async def test_a_mapping_result_whose_lookup_raises_fails_only_that_key(
    entered: bool, cache: bool
) -> None:
    """A mapping result that raises when a key is looked up fails that key's callers
    with that error; the other keys get their values and nobody hangs. It used to
    raise inside the batch's bookkeeping: on asyncio the callers after that key were
    never resolved and the error crashed the loader's task group; with ``cache=True``
    no caller of the batch was ever woken."""
    loader = pk.BatchLoader(rows, cache=cache)
    out: dict[int, object] = {}

    async def one(key: int) -> None:
        try:
            out[key] = await loader.load(key)
        except Exception as exc:
            out[key] = exc

    with anyio.fail_after(5):  # a hang guard
        async with entered_or_not(loader, entered):
            async with anyio.create_task_group() as tg:
                for key in (1, 2, 3, 4):
                    tg.start_soon(one, key)
            with pytest.raises(ValueError, match="row 2 is corrupt"):
                await loader.load_many([3, 2])
    assert (out[1], out[3]) == (10, 30)
    assert isinstance(out[2], ValueError)
    assert str(out[2]) == "row 2 is corrupt"
    assert isinstance(out[4], KeyError)
    assert "no value for key 4" in str(out[4])
    if cache:  # the failed key is not memoized, the values are
        assert await loader.load_many([1, 3]) == [10, 30]
        with pytest.raises(ValueError, match="row 2 is corrupt"):
            await loader.load(2)
        assert loader.stats.keys == 6  # 1, 2, 3, 4, then 2 twice: a failure is not memoized


@asyncio_only
@pytest.mark.parametrize("when", ["in-call", "in-window"])
@pytest.mark.parametrize(
    "how",
    [
        "task.cancel",
        pytest.param(
            "asyncio.timeout",
            marks=pytest.mark.skipif(
                sys.version_info < (3, 11), reason="asyncio.timeout: Python 3.11+"
            ),
        ),
    ],
)
async def test_asyncio_native_cancellation_of_the_leader_does_not_fail_the_followers(
    when: str, how: str
) -> None:
    """Not entered, the caller that opens a batch runs it, shielded. On asyncio,
    ``task.cancel()`` (``asyncio.timeout``, ``wait_for``, a server cancelling a
    handler whose client left) goes through anyio's shield: it used to cut the
    batch short, in its window or in the ``load_many`` call, and every caller that
    had joined it got "BatchLoader was closed before this batch ran/finished". The
    batch now goes on for them; the leader's cancellation takes effect once the
    batch call has returned."""
    calls: list[list[int]] = []
    gate = anyio.Event()

    async def load_many(keys: list[int]) -> dict[int, int]:
        calls.append(list(keys))
        await gate.wait()
        return {k: k * 10 for k in keys}

    # the window never ends here: the batch is sent when its third key joins
    loader = pk.BatchLoader(load_many, window=3600, max_batch=3)
    leader_went_on = False
    timed_out = False

    async def leader() -> None:
        nonlocal leader_went_on, timed_out
        if how == "asyncio.timeout":
            try:
                async with asyncio.timeout(None) as deadline:
                    leader_deadline.append(deadline)
                    await loader.load(1)
                    leader_went_on = True
            except TimeoutError:
                timed_out = True
        else:
            await loader.load(1)
            leader_went_on = True

    leader_deadline: list[asyncio.Timeout] = []

    def cancel_leader() -> None:
        if how == "asyncio.timeout":
            leader_deadline[0].reschedule(asyncio.get_running_loop().time())
        else:
            task.cancel()

    got: list[int] = []
    task = asyncio.ensure_future(leader())
    await wait_until(lambda: loader.stats.requests == 1)  # the leader opened the batch
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _append(got, loader.load(2)))
        await wait_until(lambda: loader.stats.requests == 2)
        if when == "in-window":
            cancel_leader()
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
        tg.start_soon(lambda: _append(got, loader.load(3)))  # fills the batch: sent
        await wait_until(lambda: calls)
        if when == "in-call":
            cancel_leader()
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
        assert not task.done()  # the leader waits for the batch it runs
        gate.set()
    with anyio.fail_after(5):  # a hang guard
        await asyncio.wait([task])
    assert calls == [[1, 2, 3]]
    assert sorted(got) == [20, 30]  # the followers got their values
    assert not leader_went_on  # the leader's cancellation took effect after the call
    if how == "asyncio.timeout":
        assert timed_out  # as asyncio.timeout raises it: TimeoutError
    else:
        assert task.cancelled()
    assert loader.stats.calls == 1


async def _append(out: list[int], load: Any) -> None:
    out.append(await load)


@pytest.mark.parametrize("keys", ["abc", b"abc"], ids=["str", "bytes"])
async def test_load_many_of_a_string_is_refused_not_loaded_per_character(keys: object) -> None:
    calls: list[list[object]] = []

    async def load_many(ks: list[object]) -> list[object]:
        calls.append(ks)
        return ks

    async with pk.BatchLoader(load_many) as loader:
        with pytest.raises(TypeError, match="load_many\\(\\[key\\]\\)"):
            await loader.load_many(keys)  # type: ignore[arg-type]
    assert calls == []
    assert loader.statistics().requests == 0
