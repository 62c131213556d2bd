"""Tasks for ``tests/test_taskiq_faults6.py``, on the broker of :func:`tasks.build`.

Workers import ``tests.taskiq_helpers.worker6:broker``; the test calls :func:`build`
with the same queue for producer-side handles. The tasks return values whose
return annotation pydantic cannot parse into, and raise exception groups.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from . import tasks
from .errors import CompanyNotFound

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup  # type: ignore[import-not-found,unused-ignore]


class Company:
    """A plain class: pydantic builds no schema for it (``-> Company | None``)."""

    def __init__(self, company_id: int) -> None:
        self.company_id = company_id


def group_of(x: int) -> ExceptionGroup:
    """What ``grouped`` raises for ``x`` (and what ``pk.map`` raises locally)."""

    class Local(Exception):  # a type the producer cannot import: Taskiq's stand-in
        pass

    inner = ExceptionGroup("inner", [KeyError(x), Local(f"local {x}")])
    return ExceptionGroup(f"item {x}", [ValueError(f"bad {x}"), CompanyNotFound(x), inner])


@dataclass(frozen=True)
class Tasks6:
    base: tasks.Tasks
    maybe_company: Any
    companies: Any
    grouped: Any


def build(url: str, queue: str, *, consumer: str | None = None) -> Tasks6:
    base = tasks.build(url, queue, consumer=consumer)

    @base.broker.task(task_name="pk_tests6.maybe_company")
    async def maybe_company(x: int) -> Company | None:
        """Found nothing: ``None``, a result the worker stores fine."""
        return None

    @base.broker.task(task_name="pk_tests6.companies")
    async def companies(x: int) -> list[Company]:
        """Found nothing: ``[]``."""
        return []

    @base.broker.task(task_name="pk_tests6.grouped", retry_on_error=False)
    async def grouped(x: int) -> int:
        """Fail as a task group of the task's own does: an exception group."""
        raise group_of(x)

    return Tasks6(base, maybe_company, companies, grouped)


def from_environment() -> Tasks6:
    return build(
        os.environ["PK_TASKIQ_URL"],
        os.environ["PK_TASKIQ_QUEUE"],
        consumer=os.environ.get("PK_TASKIQ_CONSUMER"),
    )
