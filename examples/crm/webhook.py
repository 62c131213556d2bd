"""Scenario 3 - the webhook: conversation → contact → company → automation rules.

The playbook's slow version walks the chain with four dependent queries (each needs
the previous row's foreign key, so nothing can overlap: the fix is fewer round
trips, not parallelism). Its fast version asks for everything in one statement.

Here :func:`parallelkit.sqlalchemy.eager_get` names the graph once and loads
one conversation with it in **1 statement**: the many-to-one hops
(conversation → contact → company) are inner joins (the foreign keys are
``NOT NULL``), and for a single root the rules collection is joined too (its
rows are the rules themselves). For many conversations at once,
``WEBHOOK_GRAPH`` loads the rules with one ``selectin`` query instead (2
statements whatever the number of rows, no row multiplication). Touching any
relationship that was not named raises
:class:`~parallelkit.sqlalchemy.NotLoadedError` instead of a hidden N+1 query.
Guard it in tests with ``max_queries(engine, 1)``.

Example:
    ```python
    async with db.sessions() as session:
        ctx = await load_webhook_context(session, conversation_id)
    [rule.action for rule in ctx.rules]
    ```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload

from parallelkit.sqlalchemy import eager, eager_get

from .models import AutomationRule, Company, Contact, Conversation

__all__ = [
    "WEBHOOK_GRAPH",
    "WEBHOOK_PATH",
    "WebhookContext",
    "load_webhook_context",
    "load_webhook_context_one_join",
    "load_webhook_context_sequential",
    "process_webhook",
]

#: What a webhook needs, named once (checked against the mappers at import time).
WEBHOOK_PATH = "contact.company.automation_rules"
#: The loader options for many conversations at once (2 statements).
WEBHOOK_GRAPH = eager(Conversation, WEBHOOK_PATH)


@dataclass(frozen=True, slots=True)
class WebhookContext:
    """Everything the automation engine needs for one incoming webhook."""

    conversation: Conversation
    contact: Contact
    company: Company
    rules: list[AutomationRule]


async def load_webhook_context_sequential(
    session: AsyncSession, conversation_id: int
) -> WebhookContext:
    """The playbook's "before": four dependent queries (4 round trips)."""
    conversation = await session.get_one(Conversation, conversation_id)
    contact = await session.get_one(Contact, conversation.contact_id)
    company = await session.get_one(Company, contact.company_id)
    rules = await session.scalars(
        select(AutomationRule)
        .where(AutomationRule.company_id == company.id)
        .order_by(AutomationRule.id)
    )
    return WebhookContext(conversation, contact, company, list(rules))


async def load_webhook_context_one_join(
    session: AsyncSession, conversation_id: int
) -> WebhookContext:
    """The playbook's "after": one statement, every hop joined (rows multiply by the rules)."""
    stmt = (
        select(Conversation)
        .where(Conversation.id == conversation_id)
        .options(
            joinedload(Conversation.contact)
            .joinedload(Contact.company)
            .joinedload(Company.automation_rules)
        )
    )
    conversation = (await session.scalars(stmt)).unique().one()
    contact = conversation.contact
    company = contact.company
    return WebhookContext(conversation, contact, company, list(company.automation_rules))


async def load_webhook_context(session: AsyncSession, conversation_id: int) -> WebhookContext:
    """parallelkit: ``eager_get`` - one root, so every hop joined: 1 statement."""
    conversation = await eager_get(session, Conversation, conversation_id, WEBHOOK_PATH)
    if conversation is None:
        msg = f"no conversation {conversation_id}"
        raise LookupError(msg)
    contact = conversation.contact
    company = contact.company
    return WebhookContext(conversation, contact, company, list(company.automation_rules))


async def process_webhook(session: AsyncSession, payload: dict[str, Any]) -> list[str]:
    """Handle a ``{"conversation_id": ..., "event": ...}`` webhook: the actions to run."""
    ctx = await load_webhook_context(session, int(payload["conversation_id"]))
    event = payload.get("event", "message.received")
    return [
        f"{rule.action}:{ctx.contact.email}"
        for rule in ctx.rules
        if rule.enabled and rule.trigger == event
    ]
