"""More tasks for ``tests/test_taskiq_faults2.py``, on the broker of :func:`tasks.build`.

Workers import ``tests.taskiq_helpers.worker2:broker``; the test calls :func:`build`
with the same queue for producer-side handles. The exception type is imported by
the test process too, so Taskiq finds it there and calls its constructor itself.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from . import tasks


class Rejected(Exception):
    """Its ``args`` are not its constructor's arguments: ``Rejected(5).args`` is
    ``(5, "rejected")``, and ``Rejected(5, "rejected")`` is a ``TypeError``."""

    def __init__(self, company_id: int) -> None:
        super().__init__(company_id, "rejected")
        self.company_id = company_id


@dataclass(frozen=True)
class Tasks2:
    base: tasks.Tasks
    reject: Any
    measure: Any


def build(url: str, queue: str, *, consumer: str | None = None) -> Tasks2:
    base = tasks.build(url, queue, consumer=consumer)

    @base.broker.task(task_name="pk_tests2.reject", retry_on_error=False)
    async def reject(x: int) -> int:
        raise Rejected(x)

    @base.broker.task(task_name="pk_tests2.measure")
    async def measure(x: float) -> list[float]:
        """Floats that are not finite, as numeric work returns them."""
        return [x, x * math.inf, x * math.inf - x * math.inf]

    return Tasks2(base, reject, measure)


def from_environment() -> Tasks2:
    return build(
        os.environ["PK_TASKIQ_URL"],
        os.environ["PK_TASKIQ_QUEUE"],
        consumer=os.environ.get("PK_TASKIQ_CONSUMER"),
    )
