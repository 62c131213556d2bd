"""Deterministic seed data for the CRM schema.

``build(...)`` makes the object graph in memory (same arguments, same data: a
seeded :class:`random.Random`, a fixed clock); :func:`seed` / :func:`seed_sync` add
it to a session and commit. Sizes multiply: ``companies=10,
contacts_per_company=10, conversations_per_contact=5`` is 500 conversations.

Example:
    ```python
    async with session_factory() as session:
        summary = await seed(session, companies=10, contacts_per_company=10,
                             conversations_per_contact=5)
    summary.conversation_ids[:3]   # [1, 2, 3] on a fresh database
    ```
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from .models import (
    AutomationRule,
    Cadence,
    Company,
    CompanySettings,
    Contact,
    Conversation,
    Enrollment,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

__all__ = ["EPOCH", "SeedSizes", "SeedSummary", "build", "seed", "seed_sync"]

#: The fixed "now" of the seed data (timestamps are EPOCH minus a seeded offset).
EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)

TRIGGERS = ("conversation.created", "conversation.closed", "message.received", "contact.idle")
ACTIONS = ("assign_owner", "send_template", "tag", "notify_slack", "enroll_cadence")
STATUSES = ("open", "pending", "closed")
CHANNELS = ("email", "chat", "whatsapp", "phone")


@dataclass(frozen=True, slots=True)
class SeedSizes:
    """How much data :func:`build` makes (every count is per parent)."""

    companies: int = 10
    contacts_per_company: int = 10
    conversations_per_contact: int = 5
    rules_per_company: int = 3
    cadences_per_company: int = 2
    seed: int = 39739

    def __post_init__(self) -> None:
        for name in (
            "companies",
            "contacts_per_company",
            "conversations_per_contact",
            "rules_per_company",
            "cadences_per_company",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                msg = f"{name} must be an int >= 0, got {value!r}"
                raise ValueError(msg)

    @property
    def conversations(self) -> int:
        """Total conversations this size makes."""
        return self.companies * self.contacts_per_company * self.conversations_per_contact


@dataclass(frozen=True, slots=True)
class SeedSummary:
    """What :func:`seed` inserted: counts and the primary keys, in insertion order."""

    company_ids: list[int]
    contact_ids: list[int]
    conversation_ids: list[int]
    rule_count: int
    cadence_count: int
    enrollment_count: int


def build(sizes: SeedSizes | None = None, **counts: int) -> list[Company]:
    """Build the CRM object graph in memory, deterministically.

    Args:
        sizes: a :class:`SeedSizes`; or pass its fields as keyword arguments.

    Returns:
        The companies, with contacts, conversations, rules, cadences, enrollments
        and (for every other company) settings attached.
    """
    sizes = sizes or SeedSizes(**counts)
    rng = random.Random(sizes.seed)
    companies: list[Company] = []
    for c in range(sizes.companies):
        created = EPOCH - timedelta(days=rng.randint(30, 900))
        company = Company(
            name=f"Company {c:04d}",
            domain=f"company{c:04d}.example",
            plan=rng.choice(("free", "pro", "enterprise")),
            created_at=created,
            last_activity_at=EPOCH - timedelta(days=rng.randint(0, 60)) if c % 5 else None,
        )
        if c % 2 == 0:
            company.settings = CompanySettings(
                timezone=rng.choice(("UTC", "Europe/Paris", "America/Sao_Paulo")),
                webhook_url=f"https://hooks.company{c:04d}.example/crm",
            )
        company.automation_rules = [
            AutomationRule(trigger=rng.choice(TRIGGERS), action=rng.choice(ACTIONS), enabled=r != 2)
            for r in range(sizes.rules_per_company)
        ]
        company.cadences = [
            Cadence(name=f"Re-engage {k}", inactive_days=14 + 7 * k)
            for k in range(sizes.cadences_per_company)
        ]
        for p in range(sizes.contacts_per_company):
            contact = Contact(
                email=f"person{p:04d}@company{c:04d}.example",
                name=f"Person {c:04d}-{p:04d}",
                created_at=created + timedelta(days=rng.randint(0, 29)),
                last_contacted_at=EPOCH - timedelta(days=rng.randint(0, 90)) if p % 3 else None,
            )
            company.contacts.append(contact)
            contact.conversations = []  # loaded (if empty), so a summary needs no lazy load
            for v in range(sizes.conversations_per_contact):
                opened = EPOCH - timedelta(hours=rng.randint(1, 24 * 60))
                contact.conversations.append(
                    Conversation(
                        status=rng.choice(STATUSES),
                        channel=rng.choice(CHANNELS),
                        subject=f"Question {v} from person {p} at company {c}",
                        created_at=opened,
                        updated_at=opened + timedelta(minutes=rng.randint(0, 600)),
                    )
                )
            if company.cadences and p % 2 == 0:
                contact.enrollments.append(
                    Enrollment(
                        cadence=company.cadences[p % len(company.cadences)], enrolled_at=EPOCH
                    )
                )
        companies.append(company)
    return companies


def _counts(companies: list[Company]) -> tuple[int, int, int]:
    """Count rules, cadences and enrollments (before the flush: no lazy loads)."""
    contacts = [p for c in companies for p in c.contacts]
    return (
        sum(len(c.automation_rules) for c in companies),
        sum(len(c.cadences) for c in companies),
        sum(len(p.enrollments) for p in contacts),
    )


def _summary(companies: list[Company], counts: tuple[int, int, int]) -> SeedSummary:
    contacts = [p for c in companies for p in c.contacts]
    return SeedSummary(
        company_ids=[c.id for c in companies],
        contact_ids=[p.id for p in contacts],
        conversation_ids=[v.id for p in contacts for v in p.conversations],
        rule_count=counts[0],
        cadence_count=counts[1],
        enrollment_count=counts[2],
    )


async def seed(session: AsyncSession, sizes: SeedSizes | None = None, **counts: int) -> SeedSummary:
    """Insert :func:`build`'s graph through an ``AsyncSession`` and commit.

    Args:
        session: the session to add to (it is committed).
        sizes: a :class:`SeedSizes`; or pass its fields as keyword arguments.

    Returns:
        A :class:`SeedSummary` with the new primary keys.
    """
    companies = build(sizes, **counts)
    totals = _counts(companies)
    session.add_all(companies)
    await session.flush()
    summary = _summary(companies, totals)
    await session.commit()
    return summary


def seed_sync(session: Session, sizes: SeedSizes | None = None, **counts: int) -> SeedSummary:
    """Like :func:`seed`, for a synchronous ``Session``."""
    companies = build(sizes, **counts)
    totals = _counts(companies)
    session.add_all(companies)
    session.flush()
    summary = _summary(companies, totals)
    session.commit()
    return summary
