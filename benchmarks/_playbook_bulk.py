"""The playbook's two rows of bulk work on the connection pool, measured and checked.

``100 cadence enrollments`` and ``50 company detection`` are the same shape: one
unit of work per item, each a few round trips, run on a pool of ``POOL_SIZE``
connections. They share their hand-written form (``asyncio.gather`` and a
pool-sized Semaphore) and their lower bound (``ceil(items / pool size)`` waves of
one item's round trips); the truth each is checked against is computed here in
plain SQL, without parallelkit. The other rows are in
:mod:`benchmarks._playbook_rows`, which runs them all.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

from examples.crm import bulk
from examples.crm.db import POOL_SIZE, Database
from examples.crm.models import Cadence, Contact, Enrollment
from examples.crm.seed import EPOCH
from sqlalchemy import delete, func, or_, select

from ._measure import Check, Measure, Plan, Reset, calibrate, compare, cpu_bound
from ._playbook_table import HAND, sequential_seconds
from ._registry import report_progress

__all__ = ["detection", "enrollments"]


async def _gather_bounded(fn: Callable[[int], Awaitable[Any]], items: Sequence[int]) -> list[Any]:
    """The hand-written form, no parallelkit: ``asyncio.gather`` and a pool-sized Semaphore."""
    sem = asyncio.Semaphore(POOL_SIZE)

    async def one(item: int) -> Any:
        async with sem:
            return await fn(item)

    return list(await asyncio.gather(*(one(i) for i in items)))


async def _bulk_row(
    db: Database,
    plan: Plan,
    variants: dict[str, Measure],
    check: Check,
    reset: Reset,
    *,
    calibration: dict[str, Any],
    items: int,
    one: str,
) -> dict[str, Any]:
    """Measure a row of bulk work on the pool: its variants, its CPU bound (the
    hand-written form, latency off) and the pool's floor, ``ceil(items / pool size)``
    waves of one item's round trips."""
    try:
        measured = await compare(variants, plan, check, db=db, reset=reset)
        cpu = await cpu_bound({"gather + Semaphore": variants[HAND]}, plan, db, reset)
    finally:
        db.latency.seconds = 0.0
        await reset()
    per_item = (measured["before"]["statements"] or 0) / items
    return {
        "measured": measured,
        "calibration": calibration,
        "cpu_bound": cpu,
        "model_bound": math.ceil(items / POOL_SIZE)
        * per_item
        * calibration["round_trip_ms"]
        / 1000,
        "bound_note": (
            f"ceil({items} / {POOL_SIZE} pooled connections) x the {per_item:g} round trips of "
            f"one {one}"
        ),
    }


async def enrollments(db: Database, plan: Plan) -> dict[str, Any]:
    report_progress("100 cadence enrollments")
    assert db.summary is not None
    async with db.sessions() as session:
        cadence_id = await session.scalar(
            select(Cadence.id).order_by(Cadence.id).limit(1).offset(1)
        )
    assert cadence_id is not None
    contacts = db.summary.contact_ids[:100]

    async def reset() -> None:
        async with db.sessions() as session:
            await session.execute(delete(Enrollment).where(Enrollment.cadence_id == cadence_id))
            await session.commit()

    async def check(name: str, value: Any) -> bool:
        async with db.sessions() as session:
            rows = list(
                await session.scalars(
                    select(Enrollment.contact_id).where(Enrollment.cadence_id == cadence_id)
                )
            )
        if name == "parallelkit" and not all(o.ok for o in value):
            return False
        return sorted(rows) == sorted(contacts)  # each contact enrolled, exactly once

    enroll = functools.partial(bulk.enroll_one, db.sessions, cadence_id)
    playbook_before = sequential_seconds(plan, "100 cadence enrollments")
    calibration = await calibrate(
        db,
        lambda: bulk.enroll_sequential(db.sessions, cadence_id, contacts[:10]),
        share=0.1,
        target=playbook_before,
        reset=reset,
    )
    variants: dict[str, Measure] = {
        "before": lambda: bulk.enroll_sequential(db.sessions, cadence_id, contacts),
        "after": lambda: bulk.enroll_seed_gather(db.sessions, cadence_id, contacts),
        "parallelkit": lambda: bulk.enroll_contacts(
            db.sessions, cadence_id, contacts, limit=POOL_SIZE
        ),
        HAND: lambda: _gather_bounded(enroll, contacts),
        "set-based (2 statements)": lambda: bulk.enroll_bulk(db.sessions, cadence_id, contacts),
    }
    return await _bulk_row(
        db,
        plan,
        variants,
        check,
        reset,
        calibration=calibration,
        items=len(contacts),
        one="enrollment (look up, insert)",
    )


async def _expected_detection(db: Database, companies: list[int]) -> dict[int, int]:
    """What detect-and-enroll must enroll per company, computed here in plain SQL."""
    cutoff = EPOCH - timedelta(days=21)
    inactive_since = or_(Contact.last_contacted_at.is_(None), Contact.last_contacted_at < cutoff)
    expected = {}
    async with db.sessions() as session:
        for company_id in companies:
            cadence_id = await session.scalar(
                select(func.min(Cadence.id)).where(Cadence.company_id == company_id)
            )
            enrolled = set(
                await session.scalars(
                    select(Enrollment.contact_id).where(Enrollment.cadence_id == cadence_id)
                )
            )
            inactive = set(
                await session.scalars(
                    select(Contact.id).where(Contact.company_id == company_id, inactive_since)
                )
            )
            expected[company_id] = min(len(inactive - enrolled), 100)
    return expected


async def detection(db: Database, plan: Plan) -> dict[str, Any]:
    report_progress("50 company detection")
    assert db.summary is not None
    companies = db.summary.company_ids[:50]
    async with db.sessions() as session:
        baseline = await session.scalar(select(func.max(Enrollment.id))) or 0
    expected = await _expected_detection(db, companies)

    async def reset() -> None:
        async with db.sessions() as session:
            await session.execute(delete(Enrollment).where(Enrollment.id > baseline))
            await session.commit()

    async def check(name: str, value: Any) -> bool:
        async with db.sessions() as session:
            rows = (
                await session.execute(
                    select(Cadence.company_id, Enrollment.contact_id)
                    .join(Cadence, Enrollment.cadence_id == Cadence.id)
                    .where(Enrollment.id > baseline)
                )
            ).all()
        per_company = dict.fromkeys(companies, 0)
        for company_id, _contact in rows:
            per_company[company_id] = per_company.get(company_id, 0) + 1
        if name == "parallelkit" and value.failed:
            return False
        return per_company == expected

    detect = functools.partial(bulk.detect_and_enroll_inactive, db.sessions)
    playbook_before = sequential_seconds(plan, "50 company detection")
    calibration = await calibrate(
        db,
        lambda: bulk.detect_all_sequential(db.sessions, companies[:5]),
        share=0.1,
        target=playbook_before,
        reset=reset,
    )
    variants: dict[str, Measure] = {
        "before": lambda: bulk.detect_all_sequential(db.sessions, companies),
        "after": lambda: bulk.detect_all_seed_gather(db.sessions, companies),
        "parallelkit": lambda: bulk.detect_all(db.sessions, companies, limit=POOL_SIZE),
        HAND: lambda: _gather_bounded(detect, companies),
    }
    row = await _bulk_row(
        db,
        plan,
        variants,
        check,
        reset,
        calibration=calibration,
        items=len(companies),
        one="company",
    )
    return {**row, "enrolled": sum(expected.values())}
