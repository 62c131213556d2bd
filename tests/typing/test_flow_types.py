"""Checked by `mypy --strict tests/typing` (pytest collects nothing here): Flow's types."""

from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

import parallelkit as pk

flow = pk.Flow(name="payment")


@flow.step
async def charge(payment_id: str) -> int:
    return len(payment_id)


@flow.step(name="record", timeout=5, retry=pk.Retry(attempts=2), limit=pk.Limiter(concurrency=3))
async def record(charge: int) -> str:
    return str(charge)


async def check() -> None:
    assert_type(await charge("p"), int)  # decorators keep the function's signature
    result = await flow.run(payment_id="p1", limit=4)
    assert_type(result, pk.FlowResult)
    assert_type(result.get(charge), int)
    assert_type(result.get(record), str)
    assert_type(result["charge"], Any)
    assert_type(result.get("charge"), Any | None)
    assert_type(result.timeline, pk.Timeline)
    assert_type(result.timeline.total, float)
    assert_type(result.timeline.critical_path(), tuple[pk.Span, ...])
    outcomes = await flow.run(payment_id="p1", settle=True, targets=[record])
    assert_type(outcomes, pk.FlowOutcomes)
    assert_type(outcomes.get(record), pk.Outcome[str])
    assert_type(outcomes["record"], pk.Outcome[Any])
