"""Variant (a): the endpoints the way an ordinary FastAPI developer writes them.

Nothing wrong at first sight, and every answer is right:

* a session per request from a ``Depends`` generator; related rows fetched one
  at a time as the code walks to them (``session.get`` per object: the N+1
  pattern, softened only by the identity map);
* a module-level ``dict`` as a cache with a TTL: no bound, no single flight
  (concurrent misses of one key all query);
* ``asyncio.gather`` over every item at once, each item in its own session
  (so they all queue on the pool);
* the payment done step after step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from examples.crm.models import AutomationRule, Cadence, Company, Contact, Conversation

from .errors import refuse_bad_input
from .shared import (
    NO_CADENCE,
    Clients,
    ConversationIn,
    EnrollmentIn,
    PaymentIn,
    RowId,
    ServiceDatabase,
    Settings,
    StatementCounter,
    WebhookBatch,
    add_debug_routes,
    conversation_view,
    enrollment_response,
    inactive_cutoff,
    is_inactive,
    open_conversations,
    open_database,
    payment_response,
    record_enrollments,
    record_payment,
    update_conversation,
    webhook_result,
)

__all__ = ["create_app"]


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A session per request (closed after the response)."""
    db: ServiceDatabase = request.app.state.db
    async with db.sessions() as session:
        yield session


Session = Annotated[AsyncSession, Depends(get_session)]


def create_app(settings: Settings) -> FastAPI:
    """The ordinary variant's app (``settings.variant`` is not looked at)."""
    counter = StatementCounter()
    cache: dict[int, tuple[float, dict[str, Any]]] = {}  # a naive cache: no bound, no dedupe
    updates = [0]  # updates committed: a read that overlapped one does not cache its row

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_database(settings, counter) as db:
            app.state.db = db
            app.state.clients = Clients.of(settings)
            yield

    app = FastAPI(title="CRM service (ordinary)", lifespan=lifespan)
    add_debug_routes(app, counter, "ordinary")
    refuse_bad_input(app)  # a 422 naming the field whatever it held, a 413 for a huge body

    @app.post("/webhooks/batch")
    async def webhook_batch(batch: WebhookBatch, session: Session) -> dict[str, Any]:
        results, missing = [], []
        for item in batch.events:
            conversation = await session.get(Conversation, item.conversation_id)
            if conversation is None:
                missing.append(item.conversation_id)
                continue
            contact = await session.get(Contact, conversation.contact_id)
            company = await session.get(Company, contact.company_id) if contact else None
            assert contact is not None
            assert company is not None
            rules = await session.scalars(
                select(AutomationRule).where(AutomationRule.company_id == company.id)
            )
            results.append(webhook_result(item.event, conversation, contact, company, rules))
        if missing:
            raise HTTPException(404, {"missing": sorted(set(missing))})
        return {"results": results}

    @app.get("/conversations/{conversation_id}")
    async def read_conversation(conversation_id: RowId, session: Session) -> dict[str, Any]:
        hit = cache.get(conversation_id)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        seen = updates[0]
        conversation = await session.get(Conversation, conversation_id)
        if conversation is None:
            raise HTTPException(404, "conversation not found")
        contact = await session.get(Contact, conversation.contact_id)
        company = await session.get(Company, contact.company_id) if contact else None
        assert contact is not None
        assert company is not None
        view = conversation_view(conversation, contact, company)
        if updates[0] == seen:  # else it may be the row from before the update: not kept
            cache[conversation_id] = (time.monotonic() + settings.fresh, view)
        return view

    @app.patch("/conversations/{conversation_id}")
    async def change_conversation(
        conversation_id: RowId, change: ConversationIn, session: Session
    ) -> dict[str, Any]:
        if not await update_conversation(session, conversation_id, change):
            raise HTTPException(404, "conversation not found")
        updates[0] += 1
        cache.pop(conversation_id, None)  # this process's copy; other replicas keep theirs
        return await read_conversation(conversation_id, session)

    @app.post("/companies/{company_id}/enrollments")
    async def enroll_inactive(
        company_id: RowId, body: EnrollmentIn, request: Request
    ) -> dict[str, Any]:
        db: ServiceDatabase = request.app.state.db
        clients: Clients = request.app.state.clients
        async with db.sessions() as session:  # closed before the fan-out needs connections
            company = await session.get(Company, company_id)
            if company is None:
                raise HTTPException(404, NO_CADENCE)
            cadences = (
                await session.scalars(select(Cadence).where(Cadence.company_id == company_id))
            ).all()
            contacts = (
                await session.scalars(select(Contact).where(Contact.company_id == company_id))
            ).all()
        if not cadences:
            raise HTTPException(404, NO_CADENCE)
        cadence_id = min(c.id for c in cadences)
        cutoff = inactive_cutoff(body.inactive_days)
        inactive = [c for c in contacts if is_inactive(c, cutoff)]

        async def enroll(contact: Contact) -> int:
            async with db.sessions() as own:
                open_count = await open_conversations(own, contact.id)
            await clients.mail(contact.email, f"re-engage:{open_count}")
            return contact.id

        enrolled = await asyncio.gather(*(enroll(c) for c in inactive))
        async with db.sessions() as session:
            await record_enrollments(session, cadence_id, enrolled)
        return enrollment_response(company_id, cadence_id, enrolled)

    @app.post("/payments")
    async def pay(payment: PaymentIn, session: Session, request: Request) -> dict[str, Any]:
        clients: Clients = request.app.state.clients
        charge_id = await clients.charge(payment.payment_id, payment.amount)
        await record_payment(session, payment, charge_id)
        await clients.notify(payment.payment_id, charge_id)
        return payment_response(payment, charge_id)

    return app
