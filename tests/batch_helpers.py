"""What the BatchLoader fault tests share: both ways of owning a loader, both ways of
loading a key."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

import parallelkit as pk

entered_or_not = pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
load_or_many = pytest.mark.parametrize("how", ["load", "load_many"])


def owned(loader: pk.BatchLoader[Any, Any], entered: bool) -> Any:
    """``async with owned(loader, entered)``: the loader entered, or used unentered."""
    return loader if entered else contextlib.nullcontext(loader)


async def get(loader: pk.BatchLoader[Any, Any], how: str, key: Any) -> Any:
    """``key``'s value, by ``load`` or by a ``load_many`` of one key."""
    if how == "load":
        return await loader.load(key)
    (value,) = await loader.load_many([key])
    return value
