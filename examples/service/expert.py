"""Variant (b): the endpoints hand-tuned by an expert, without parallelkit.

What someone who knows SQLAlchemy and asyncio well writes by hand:

* ``joinedload`` / ``selectinload`` chains, one ``IN`` query for a whole batch;
* a ``cachetools.TTLCache`` with per-key single flight (one ``asyncio.Lock`` per
  key being loaded, dropped when the load is done);
* one process-wide ``asyncio.Semaphore`` sized to the pool, held around the
  database work only (not around the e-mail each item sends afterwards), so all
  requests together never queue more work on the pool than it has connections;
* the payment's insert and webhook overlapped once the charge id exists.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from cachetools import TTLCache
from fastapi import FastAPI, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from examples.crm.models import Company, Contact, Conversation

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
    find_inactive,
    log_failed_items,
    open_conversations,
    open_database,
    payment_response,
    record_enrollments,
    record_payment,
    update_conversation,
    webhook_results,
)

__all__ = ["create_app"]

_WEBHOOK_OPTIONS = (
    joinedload(Conversation.contact, innerjoin=True)
    .joinedload(Contact.company, innerjoin=True)
    .selectinload(Company.automation_rules),
)
_VIEW_OPTIONS = (
    joinedload(Conversation.contact, innerjoin=True).joinedload(Contact.company, innerjoin=True),
)


class State:
    """Everything the handlers need, built once in the lifespan."""

    def __init__(self, db: ServiceDatabase, settings: Settings) -> None:
        self.db = db
        self.clients = Clients.of(settings)
        self.db_slots = asyncio.Semaphore(db.pool_size)  # process-wide, = the pool
        self.cache: TTLCache[int, dict[str, Any] | None] = TTLCache(10_000, settings.fresh)
        self.loading: dict[int, asyncio.Lock] = {}
        # updates committed so far: a load that saw one commit meanwhile may hold the old
        # row, so it is answered but not cached (else it outlives the update's invalidation)
        self.updates = 0


def create_app(settings: Settings) -> FastAPI:
    """The expert variant's app."""
    counter = StatementCounter()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_database(settings, counter) as db:
            app.state.s = State(db, settings)
            yield

    app = FastAPI(title="CRM service (expert)", lifespan=lifespan)
    add_debug_routes(app, counter, "expert")
    refuse_bad_input(app)  # a 422 naming the field whatever it held, a 413 for a huge body

    @app.post("/webhooks/batch")
    async def webhook_batch(batch: WebhookBatch, request: Request) -> dict[str, Any]:
        s: State = request.app.state.s
        ids = {e.conversation_id for e in batch.events}
        async with s.db_slots, s.db.sessions() as session:
            rows = await session.scalars(
                select(Conversation).where(Conversation.id.in_(ids)).options(*_WEBHOOK_OPTIONS)
            )
            by_id = {c.id: c for c in rows.unique()}
        missing = sorted(ids - by_id.keys())
        if missing:
            raise HTTPException(404, {"missing": missing})
        return webhook_results(batch, by_id)

    async def load_view(s: State, conversation_id: int) -> dict[str, Any] | None:
        async with s.db_slots, s.db.sessions() as session:
            conversation = await session.get(Conversation, conversation_id, options=_VIEW_OPTIONS)
            if conversation is None:
                return None
            return conversation_view(
                conversation, conversation.contact, conversation.contact.company
            )

    @app.get("/conversations/{conversation_id}")
    async def read_conversation(conversation_id: RowId, request: Request) -> dict[str, Any]:
        s: State = request.app.state.s
        try:
            view = s.cache[conversation_id]
        except KeyError:
            lock = s.loading.get(conversation_id)
            if lock is None:
                lock = s.loading[conversation_id] = asyncio.Lock()
            try:
                async with lock:  # single flight: the first loads, the others find it cached
                    try:
                        view = s.cache[conversation_id]
                    except KeyError:
                        updates = s.updates
                        view = await load_view(s, conversation_id)
                        if s.updates == updates:
                            s.cache[conversation_id] = view
            finally:
                if not lock.locked() and s.loading.get(conversation_id) is lock:
                    del s.loading[conversation_id]
        if view is None:
            raise HTTPException(404, "conversation not found")
        return view

    @app.patch("/conversations/{conversation_id}")
    async def change_conversation(
        conversation_id: RowId, change: ConversationIn, request: Request
    ) -> dict[str, Any]:
        s: State = request.app.state.s
        async with s.db_slots, s.db.sessions() as session:
            found = await update_conversation(session, conversation_id, change)
        if not found:
            raise HTTPException(404, "conversation not found")
        s.updates += 1  # a load running now is not cached (it may hold the old row)
        s.cache.pop(conversation_id, None)  # this process's copy; other replicas keep theirs
        return await read_conversation(conversation_id, request)

    @app.post("/companies/{company_id}/enrollments")
    async def enroll_inactive(
        company_id: RowId, body: EnrollmentIn, request: Request
    ) -> dict[str, Any]:
        s: State = request.app.state.s
        async with s.db_slots, s.db.sessions() as session:
            cadence_id, inactive = await find_inactive(session, company_id, body.inactive_days)
        if cadence_id is None:
            raise HTTPException(404, NO_CADENCE)

        async def enroll(contact_id: int, email: str) -> int:
            async with s.db_slots, s.db.sessions() as session:  # the pool's slots, DB work only
                open_count = await open_conversations(session, contact_id)
            await s.clients.mail(email, f"re-engage:{open_count}")
            return contact_id

        results = await asyncio.gather(*(enroll(i, e) for i, e in inactive), return_exceptions=True)
        enrolled = [r for r in results if isinstance(r, int)]
        errors = [
            (i, r) for (i, _), r in zip(inactive, results, strict=True) if not isinstance(r, int)
        ]
        failed = [i for i, _ in errors]
        log_failed_items(company_id, len(inactive), errors)
        async with s.db_slots, s.db.sessions() as session:
            await record_enrollments(session, cadence_id, enrolled)
        return enrollment_response(company_id, cadence_id, enrolled, failed)

    @app.post("/payments")
    async def pay(payment: PaymentIn, request: Request) -> dict[str, Any]:
        s: State = request.app.state.s
        charge_id = await s.clients.charge(payment.payment_id, payment.amount)

        async def record() -> None:
            async with s.db_slots, s.db.sessions() as session:
                await record_payment(session, payment, charge_id)

        # both run to their end (the card is charged: a failed webhook must not lose the
        # row), then the first error in step order: the row's 409 before the webhook's error
        outcomes = await asyncio.gather(
            record(), s.clients.notify(payment.payment_id, charge_id), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return payment_response(payment, charge_id)

    return app
