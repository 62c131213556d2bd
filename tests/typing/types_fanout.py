"""Checked by `mypy --strict tests/typing` (not run): the fan-out API's inferred types."""

from __future__ import annotations

from typing_extensions import assert_type

import parallelkit as pk


async def fetch(x: int) -> str:
    return str(x)


async def check() -> None:
    assert_type(await pk.gather(fetch(1), fetch(2)), list[str])
    assert_type(await pk.gather(fetch(1), settle=True), list[pk.Outcome[str]])
    assert_type(await pk.map(fetch, [1, 2], limit=2), list[str])
    assert_type(await pk.map(fetch, [1, 2], settle=True), list[pk.Outcome[str]])
    outcome = (await pk.map(fetch, [1], settle=True))[0]
    assert_type(outcome.unwrap(), str)
    assert_type(outcome.ok, bool)
    async with pk.imap(fetch, range(3), limit=2) as results:
        async for item in results:
            assert_type(item, str)
    async with pk.imap(fetch, range(3), limit=2, settle=True) as outcomes:
        async for each in outcomes:
            assert_type(each, pk.Outcome[str])
    limiter = pk.Limiter(concurrency=3, rate=10)
    assert_type(await pk.map(fetch, [1], limit=limiter, retry=pk.Retry(attempts=2)), list[str])
