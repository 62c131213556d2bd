"""What a call raises, as (type, message): compared between ``pk.map`` and
``parallelkit.taskiq.map`` by the argument-check tests."""

from __future__ import annotations

from typing import Any

import pytest


def failure(make: Any) -> tuple[type[BaseException], str]:
    """The type and message of what ``make()`` raises (``pytest.fail`` if nothing)."""
    try:
        make()
    except Exception as exc:  # (compared, whatever it is)
        return type(exc), str(exc)
    pytest.fail("no error")


async def afailure(make: Any) -> tuple[type[BaseException], str]:
    """The type and message of what ``await make()`` raises."""
    try:
        await make()
    except Exception as exc:  # (compared, whatever it is)
        return type(exc), str(exc)
    pytest.fail("no error")
