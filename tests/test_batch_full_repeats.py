"""A key repeated after the batch it is in filled up (``max_batch``) joins that
batch until it is sent, never a second one: each key of a tick is loaded once."""

from __future__ import annotations

import anyio
import pytest

import parallelkit as pk

from .virtual_time import run_virtual

BACKENDS = ["asyncio", "trio"]


def _loader(loaded: list[list[int]]) -> pk.BatchLoader[int, str]:
    async def contacts_by_id(ids: list[int]) -> dict[int, str]:
        loaded.append(list(ids))
        await anyio.sleep(0.001)
        return {i: f"contact {i}" for i in ids}

    return pk.BatchLoader(contacts_by_id, max_batch=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
def test_a_repeat_of_a_key_whose_batch_filled_up_joins_it(backend: str, entered: bool) -> None:
    loaded: list[list[int]] = []
    loader = _loader(loaded)

    async def main() -> list[str]:
        keys = [1, 2, 2, 1, 3, 4, 3]  # 1, 2 fill the first batch: the 2 and 1 after join it
        if entered:
            async with loader:
                return await pk.gather(*(loader.load(k) for k in keys))
        return await pk.gather(*(loader.load(k) for k in keys))

    assert run_virtual(main, backend) == [f"contact {k}" for k in [1, 2, 2, 1, 3, 4, 3]]
    assert sorted(map(sorted, loaded)) == [[1, 2], [3, 4]]
    stats = loader.statistics()
    assert (stats.requests, stats.keys, stats.calls) == (7, 4, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_many_with_repeats_across_full_batches_loads_each_key_once(backend: str) -> None:
    loaded: list[list[int]] = []
    loader = _loader(loaded)

    async def main() -> tuple[list[str], list[str]]:
        async with loader:
            return await pk.gather(loader.load_many([1, 2, 3]), loader.load_many([3, 2, 1]))

    first, second = run_virtual(main, backend)
    assert first == ["contact 1", "contact 2", "contact 3"]
    assert second == ["contact 3", "contact 2", "contact 1"]
    assert sorted(k for batch in loaded for k in batch) == [1, 2, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_loaded_after_its_full_batch_was_sent_is_loaded_again(backend: str) -> None:
    # cache=False: a new tick's load is a new batch, as for any batch once it is sent
    loaded: list[list[int]] = []
    loader = _loader(loaded)

    async def main() -> str:
        async with loader, anyio.create_task_group() as tg:
            tg.start_soon(loader.load, 1)
            tg.start_soon(loader.load, 2)  # full: sent
            await anyio.sleep(0.0005)  # its load_many is running
            return await loader.load(1)

    assert run_virtual(main, backend) == "contact 1"
    assert sorted(map(sorted, loaded)) == [[1], [1, 2]]
