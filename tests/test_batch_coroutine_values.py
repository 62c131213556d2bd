"""``load_many`` that returns coroutines as its values (``[fetch(k) for k in keys]``,
an ``await`` forgotten): every caller gets a ``TypeError`` that says so, and no
coroutine is left behind to warn "never awaited"."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Awaitable
from typing import Any

import pytest

import parallelkit as pk

from .virtual_time import run_virtual

BACKENDS = ["asyncio", "trio"]


async def fetch(key: int) -> str:
    return f"contact {key}"


async def as_list(keys: list[int]) -> list[Any]:
    return [fetch(k) for k in keys]  # the mistake: coroutines, not values


async def as_dict(keys: list[int]) -> dict[int, Any]:
    return {k: fetch(k) for k in keys}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("load_many", [as_list, as_dict], ids=["list", "dict"])
@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
def test_coroutines_as_values_are_a_clear_error_for_every_caller(
    backend: str, load_many: Any, entered: bool
) -> None:
    loader: pk.BatchLoader[int, str] = pk.BatchLoader(load_many)

    async def main() -> list[pk.Outcome[str]]:
        calls: list[Awaitable[str]] = [loader.load(k) for k in (1, 2, 3)]
        if entered:
            async with loader:
                return await pk.gather(*calls, settle=True)
        return await pk.gather(*calls, settle=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcomes = run_virtual(main, backend)
        gc.collect()
    errors = [o.error for o in outcomes]
    assert all(isinstance(e, TypeError) for e in errors), errors
    assert all("forget to await" in str(e) for e in errors)
    assert loader.statistics().calls == 1
    never_awaited = [w for w in caught if "never awaited" in str(w.message)]
    assert never_awaited == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_that_are_not_coroutines_still_load(backend: str) -> None:
    async def load_many(keys: list[int]) -> list[object]:
        return [None if k == 1 else f"contact {k}" for k in keys]  # a first value of None

    loader: pk.BatchLoader[int, object] = pk.BatchLoader(load_many)

    async def main() -> list[object]:
        return await pk.gather(*(loader.load(k) for k in (1, 2)))

    assert run_virtual(main, backend) == [None, "contact 2"]
