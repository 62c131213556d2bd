"""Scenario 5 - bulk work: enroll 100 contacts; detect-and-enroll inactive contacts per company.

The playbook fans out with ``Promise.all(companies.map(...))``: every task at once
(50 - or 50,000), all queued on a connection pool of ten, and the first failure
throws away every other company's result. Here:

* ``pk.map(fn, items, limit=pool_size, settle=True, retry=...)`` runs at most
  ``limit`` tasks at once (no more than the pool has connections, so none waits
  for one or times out), keeps one :class:`~parallelkit.Outcome` per item, and
  retries transient errors (a locked SQLite file, a dropped connection);
* every task opens **its own session** (``async with sessions() as session``):
  an ``AsyncSession`` serves one task at a time;
* a failure is reported with its company, and the other companies' work stands.

Example:
    ```python
    report = await detect_all(db.sessions, company_ids, limit=10)
    report.enrolled, report.failed        # (412, {17: NoCadenceError(...)})
    ```
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import exists, insert, or_, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

import parallelkit as pk

from .models import Cadence, Contact, Enrollment
from .seed import EPOCH

__all__ = [
    "TRANSIENT",
    "DetectionReport",
    "NoCadenceError",
    "detect_all",
    "detect_all_seed_gather",
    "detect_all_sequential",
    "detect_and_enroll_inactive",
    "enroll_bulk",
    "enroll_contacts",
    "enroll_one",
    "enroll_seed_gather",
    "enroll_sequential",
]

Sessions = Callable[[], AsyncSession]

#: What is worth retrying: a busy SQLite file, a dropped or refused connection.
TRANSIENT = pk.Retry(attempts=3, backoff=0.05, on=(OperationalError, ConnectionError))


class NoCadenceError(LookupError):
    """The company has no cadence to enroll contacts into."""


# -- 100 enrollments ------------------------------------------------------------------------
async def enroll_one(sessions: Sessions, cadence_id: int, contact_id: int) -> int:
    """Enroll one contact (idempotent): look for an enrollment, insert if none. 2 statements."""
    async with sessions() as session:
        existing = await session.scalar(
            select(Enrollment.id).where(
                Enrollment.cadence_id == cadence_id, Enrollment.contact_id == contact_id
            )
        )
        if existing is not None:
            return existing
        enrollment = Enrollment(cadence_id=cadence_id, contact_id=contact_id, enrolled_at=EPOCH)
        session.add(enrollment)
        await session.commit()
        return enrollment.id


async def enroll_sequential(
    sessions: Sessions, cadence_id: int, contact_ids: Sequence[int]
) -> list[int]:
    """The playbook's "before": one enrollment after another."""
    return [await enroll_one(sessions, cadence_id, c) for c in contact_ids]


async def enroll_seed_gather(
    sessions: Sessions, cadence_id: int, contact_ids: Sequence[int]
) -> list[int]:
    """The playbook's "after": ``Promise.all`` over every contact, unbounded, fail-fast."""
    return list(await asyncio.gather(*(enroll_one(sessions, cadence_id, c) for c in contact_ids)))


async def enroll_contacts(
    sessions: Sessions,
    cadence_id: int,
    contact_ids: Sequence[int],
    *,
    limit: int | pk.Limiter = 10,
    retry: pk.Retry | None = TRANSIENT,
) -> list[pk.Outcome[int]]:
    """parallelkit: bounded by the pool, every outcome kept, transient errors retried."""

    async def enroll(contact_id: int) -> int:
        return await enroll_one(sessions, cadence_id, contact_id)

    return await pk.map(enroll, contact_ids, limit=limit, retry=retry, settle=True)


async def enroll_bulk(sessions: Sessions, cadence_id: int, contact_ids: Sequence[int]) -> int:
    """The set-based floor: one SELECT for who is enrolled, one multi-row INSERT. 2 statements."""
    async with sessions() as session:
        enrolled = set(
            await session.scalars(
                select(Enrollment.contact_id).where(
                    Enrollment.cadence_id == cadence_id, Enrollment.contact_id.in_(contact_ids)
                )
            )
        )
        new = [c for c in dict.fromkeys(contact_ids) if c not in enrolled]
        if new:  # one multi-row INSERT (an executemany), not one INSERT per object
            await session.execute(
                insert(Enrollment),
                [{"cadence_id": cadence_id, "contact_id": c, "enrolled_at": EPOCH} for c in new],
            )
            await session.commit()
        return len(new)


# -- detect-and-enroll inactive contacts, per company ----------------------------------------
async def detect_and_enroll_inactive(
    sessions: Sessions,
    company_id: int,
    *,
    inactive_days: int = 21,
    limit: int = 100,
    now: datetime = EPOCH,
) -> int:
    """Enroll up to ``limit`` contacts not contacted for ``inactive_days`` into the company's
    first cadence. 3 statements (2 when nobody is inactive), one session, one commit.

    Raises:
        NoCadenceError: the company has no cadence.
    """
    async with sessions() as session:
        cadence_id = await session.scalar(
            select(Cadence.id).where(Cadence.company_id == company_id).order_by(Cadence.id).limit(1)
        )
        if cadence_id is None:
            msg = f"company {company_id} has no cadence to enroll into"
            raise NoCadenceError(msg)
        cutoff = now - timedelta(days=inactive_days)
        already = exists().where(
            Enrollment.contact_id == Contact.id, Enrollment.cadence_id == cadence_id
        )
        inactive = list(
            await session.scalars(
                select(Contact.id)
                .where(Contact.company_id == company_id)
                .where(or_(Contact.last_contacted_at.is_(None), Contact.last_contacted_at < cutoff))
                .where(~already)
                .order_by(Contact.id)
                .limit(limit)
            )
        )
        if inactive:
            await session.execute(
                insert(Enrollment),
                [{"cadence_id": cadence_id, "contact_id": c, "enrolled_at": now} for c in inactive],
            )
            await session.commit()
        return len(inactive)


@dataclass(frozen=True, slots=True)
class DetectionReport:
    """What one detector run did: per-company counts, and every failure with its company."""

    enrolled_by_company: dict[int, int]
    failed: dict[int, BaseException] = field(default_factory=dict)

    @property
    def enrolled(self) -> int:
        """Contacts enrolled across all companies that succeeded."""
        return sum(self.enrolled_by_company.values())


async def detect_all_sequential(sessions: Sessions, company_ids: Sequence[int]) -> int:
    """The playbook's "before": one company after another."""
    return sum([await detect_and_enroll_inactive(sessions, c) for c in company_ids])


async def detect_all_seed_gather(sessions: Sessions, company_ids: Sequence[int]) -> int:
    """The playbook's "after": every company at once; one failure loses every result."""
    counts = await asyncio.gather(*(detect_and_enroll_inactive(sessions, c) for c in company_ids))
    return sum(counts)


async def detect_all(
    sessions: Sessions,
    company_ids: Sequence[int],
    *,
    limit: int | pk.Limiter = 10,
    retry: pk.Retry | None = TRANSIENT,
    timeout: float | None = 60,
) -> DetectionReport:
    """parallelkit: ``pk.map(limit=..., settle=True, retry=...)``, one session per company."""

    async def detect(company_id: int) -> int:
        return await detect_and_enroll_inactive(sessions, company_id)

    outcomes = await pk.map(
        detect, company_ids, limit=limit, retry=retry, timeout=timeout, settle=True
    )
    done: dict[int, int] = {}
    failed: dict[int, BaseException] = {}
    for company_id, outcome in zip(company_ids, outcomes, strict=True):
        if outcome.error is None:
            done[company_id] = outcome.unwrap()
        else:
            failed[company_id] = outcome.error
    return DetectionReport(done, failed)
