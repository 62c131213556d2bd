"""The answers: the same bytes from every variant (views, results, responses)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from examples.crm.models import AutomationRule, Company, Contact, Conversation
from examples.crm.seed import EPOCH

from .bodies import PaymentIn, WebhookBatch

__all__ = [
    "NO_CADENCE",
    "as_utc",
    "conversation_view",
    "enrollment_response",
    "inactive_cutoff",
    "is_inactive",
    "log_failed_items",
    "payment_response",
    "webhook_result",
    "webhook_results",
]

#: The 404 detail of an enrollment for a company that does not exist or has no cadence.
NO_CADENCE = "company not found or without a cadence"


def as_utc(moment: datetime) -> datetime:
    """SQLite returns naive datetimes (stored as UTC), PostgreSQL aware ones: one form."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def conversation_view(
    conversation: Conversation, contact: Contact, company: Company
) -> dict[str, Any]:
    """The cached read's body: JSON types only (it goes through Redis as JSON too)."""
    return {
        "id": conversation.id,
        "status": conversation.status,
        "channel": conversation.channel,
        "subject": conversation.subject,
        "updated_at": as_utc(conversation.updated_at).isoformat(),
        "contact": {"id": contact.id, "name": contact.name, "email": contact.email},
        "company": {"id": company.id, "name": company.name, "plan": company.plan},
    }


def webhook_result(
    event: str,
    conversation: Conversation,
    contact: Contact,
    company: Company,
    rules: Iterable[AutomationRule],
) -> dict[str, Any]:
    """One event's answer: the actions the automation engine runs."""
    return {
        "conversation_id": conversation.id,
        "company": company.name,
        "actions": [
            f"{rule.action}:{contact.email}"
            for rule in sorted(rules, key=lambda r: r.id)
            if rule.enabled and rule.trigger == event
        ],
    }


def inactive_cutoff(inactive_days: int) -> datetime:
    """Contacts last contacted before this (or never) are inactive."""
    return EPOCH - timedelta(days=inactive_days)


def is_inactive(contact: Contact, cutoff: datetime) -> bool:
    """The Python form of the inactive predicate (the SQL form is in the variants)."""
    last = contact.last_contacted_at
    return last is None or as_utc(last) < cutoff


def enrollment_response(
    company_id: int, cadence_id: int, enrolled: Iterable[int], failed: Iterable[int] = ()
) -> dict[str, Any]:
    return {
        "company_id": company_id,
        "cadence_id": cadence_id,
        "enrolled": sorted(enrolled),
        "failed": sorted(failed),
    }


def payment_response(payment: PaymentIn, charge_id: str) -> dict[str, Any]:
    return {
        "payment_id": payment.payment_id,
        "amount": payment.amount,
        "charge_id": charge_id,
        "status": "succeeded",
    }


def webhook_results(batch: WebhookBatch, by_id: Mapping[int, Conversation]) -> dict[str, Any]:
    """The batch's answer from conversations loaded with contact, company and rules."""
    results = []
    for item in batch.events:
        conversation = by_id[item.conversation_id]
        contact = conversation.contact
        company = contact.company
        rules = company.automation_rules
        results.append(webhook_result(item.event, conversation, contact, company, rules))
    return {"results": results}


def log_failed_items(
    company_id: int, total: int, failures: Sequence[tuple[int, BaseException]]
) -> None:
    """Log an enrollment's failed items: one warning per request, with the first error.

    The fan-out keeps every item's outcome and answers 200 with the failed contacts
    listed, so no server logs their errors: without this an outage of the mailer or
    the database would leave answers with ``failed`` ids and nothing in the log.
    """
    if not failures:
        return
    kinds = sorted({type(error).__name__ for _, error in failures})
    logging.getLogger("examples.service").warning(
        "enrollment of company %d: %d of %d contacts failed (%s): %s",
        company_id,
        len(failures),
        total,
        ", ".join(kinds),
        sorted(contact_id for contact_id, _ in failures),
        exc_info=failures[0][1],
    )
