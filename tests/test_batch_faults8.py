"""BatchLoader fault review, eighth round: ``load_many`` calls of two (or more)
batches waiting on each other."""

from __future__ import annotations

import anyio
import pytest

import parallelkit as pk

from .batch_helpers import entered_or_not, get, load_or_many, owned

pytestmark = pytest.mark.anyio


class AllRunning:
    """Lets ``n`` load_many calls go on only once all of them are running."""

    def __init__(self, n: int) -> None:
        self.n, self.running, self.event = n, 0, anyio.Event()

    async def wait(self) -> None:
        self.running += 1
        if self.running == self.n:
            self.event.set()
        with anyio.fail_after(30):  # a hang guard, not a timing assertion
            await self.event.wait()


async def load_each(loader: pk.BatchLoader[int, int], keys: list[int]) -> list[BaseException]:
    """Load each key in a task of its own; the RuntimeErrors they get, in key order."""
    errors: dict[int, BaseException] = {}

    async def one(key: int) -> None:
        try:
            await loader.load(key)
        except RuntimeError as exc:
            errors[key] = exc

    with anyio.fail_after(60):  # a hang guard, not a timing assertion
        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(one, key)
    return [errors[k] for k in sorted(errors)]


@entered_or_not
@load_or_many
async def test_two_batches_waiting_on_each_other_fail_instead_of_hanging(
    entered: bool, how: str
) -> None:
    """Batch [1]'s load_many loads key 2, in batch [2], whose load_many loads key 1
    (``cache=True`` joins a key to its batch in flight). Each waited for the other for
    ever: the self-wait check saw only the batches the waiting task itself was loading.
    The load that closes the cycle now raises a RuntimeError saying so; raised through
    its load_many, it fails that batch, so the other load_many gets it too: both
    callers get that one error, nothing hangs, and nothing of it is memoized."""
    nested: list[BaseException] = []
    gate = AllRunning(2)
    cycle = True

    async def tree(keys: list[int]) -> dict[int, int]:
        if cycle:
            await gate.wait()
            other = 2 if keys == [1] else 1
            try:
                with anyio.fail_after(30):  # a hang guard, not a timing assertion
                    await get(loader, how, other)
            except BaseException as exc:
                nested.append(exc)
                raise
        return {k: k * 10 for k in keys}

    loader: pk.BatchLoader[int, int] = pk.BatchLoader(tree, cache=True, max_batch=1)
    async with owned(loader, entered):
        errors = await load_each(loader, [1, 2])
        assert len(errors) == 2
        assert errors[0] is errors[1]
        assert "load_many calls are waiting on each other" in str(errors[0])
        assert [type(e) for e in nested] == [RuntimeError, RuntimeError]
        assert all(e is errors[0] for e in nested)
        cycle = False
        assert await loader.load_many([1, 2]) == [10, 20]  # loaded anew


@entered_or_not
@load_or_many
async def test_a_cycle_through_three_batches_is_seen(entered: bool, how: str) -> None:
    """[1] waits for [2], [2] for [3], [3] for [1]: the load closing the cycle raises."""
    gate = AllRunning(3)
    following = {1: 2, 2: 3, 3: 1}

    async def tree(keys: list[int]) -> dict[int, int]:
        await gate.wait()
        with anyio.fail_after(30):  # a hang guard, not a timing assertion
            await get(loader, how, following[keys[0]])
        return {k: k for k in keys}

    loader: pk.BatchLoader[int, int] = pk.BatchLoader(tree, cache=True, max_batch=1)
    async with owned(loader, entered):
        errors = await load_each(loader, [1, 2, 3])
    assert len(errors) == 3
    assert all(e is errors[0] for e in errors)
    assert "load_many calls are waiting on each other" in str(errors[0])


@entered_or_not
async def test_a_cycle_across_two_loaders_is_seen(entered: bool) -> None:
    """Contacts' load_many loads a company, whose load_many loads that contact: two
    memoizing loaders waiting on each other fail the same way."""
    gate = AllRunning(2)

    async def contacts_many(keys: list[int]) -> dict[int, int]:
        await gate.wait()
        with anyio.fail_after(30):  # a hang guard, not a timing assertion
            await companies.load(keys[0])
        return {k: k for k in keys}

    async def companies_many(keys: list[int]) -> dict[int, int]:
        await gate.wait()
        with anyio.fail_after(30):  # a hang guard, not a timing assertion
            await contacts.load(keys[0])
        return {k: k for k in keys}

    contacts: pk.BatchLoader[int, int] = pk.BatchLoader(contacts_many, cache=True)
    companies: pk.BatchLoader[int, int] = pk.BatchLoader(companies_many, cache=True)
    errors: list[BaseException] = []

    async def one(loader: pk.BatchLoader[int, int]) -> None:
        try:
            await loader.load(7)
        except RuntimeError as exc:
            errors.append(exc)

    async with owned(contacts, entered), owned(companies, entered):
        with anyio.fail_after(60):  # a hang guard, not a timing assertion
            async with anyio.create_task_group() as tg:
                tg.start_soon(one, contacts)
                tg.start_soon(one, companies)
    assert len(errors) == 2
    assert errors[0] is errors[1]
    assert "load_many calls are waiting on each other" in str(errors[0])


@entered_or_not
@load_or_many
async def test_batches_waiting_on_each_other_without_a_cycle_still_work(
    entered: bool, how: str
) -> None:
    """No false alarm: [1] and [2] both wait for [3] while it runs (and [3] loads a new
    key, 4), and [2] waits for [1]; every caller gets its value."""
    gate = AllRunning(3)
    needs = {1: [3], 2: [3, 1], 3: [4], 4: []}
    calls: list[list[int]] = []

    async def tree(keys: list[int]) -> dict[int, int]:
        calls.append(list(keys))
        if keys[0] != 4:
            await gate.wait()
        total = keys[0]
        with anyio.fail_after(30):  # a hang guard, not a timing assertion
            for other in needs[keys[0]]:
                total += await get(loader, how, other)
        return {keys[0]: total}

    loader: pk.BatchLoader[int, int] = pk.BatchLoader(tree, cache=True, max_batch=1)
    async with owned(loader, entered):
        values: dict[int, int] = {}

        async def one(key: int) -> None:
            values[key] = await loader.load(key)

        with anyio.fail_after(60):  # a hang guard, not a timing assertion
            async with anyio.create_task_group() as tg:
                for key in (1, 2, 3):
                    tg.start_soon(one, key)
    assert values == {1: 8, 2: 17, 3: 7}
    assert sorted(calls) == [[1], [2], [3], [4]]
