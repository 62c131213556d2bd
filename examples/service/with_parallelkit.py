"""Variant (c): the endpoints with parallelkit, the way its docs recommend.

* start-up: an :class:`~parallelkit.Orchestrator` of services (database, Redis,
  the conversation cache, the external clients), run by the app's lifespan
  (:func:`parallelkit.asgi.lifespan`); each service's value reaches the handlers
  through the lifespan state (``request.state.<service>``), behind one typed
  dependency per service;
* loading: :func:`parallelkit.sqlalchemy.eager` names the graph a request needs
  (joined many-to-one hops, one ``selectin`` per collection; anything else raises
  :class:`~parallelkit.sqlalchemy.NotLoadedError` instead of a hidden query);
* caching: :class:`parallelkit.SWRCache` (fresh / stale windows, single-flight
  misses, one background refresh per key) on a ``MemoryStore`` or, to share it
  between replicas, a :class:`parallelkit.redis.RedisStore`;
* fan-out: :func:`parallelkit.map` with ``limit=`` the pool size and
  ``settle=True`` (every item's outcome kept, failures listed);
* the payment: a :class:`parallelkit.Flow` (record and notify wait for the
  charge, and overlap each other).

The places that will change when parallelkit grows (a process-wide database
limit from the engine's pool, typed dependencies for orchestrator services, a
cache decorated at import time with a store bound at start-up) are each one
function below: ``db_limit``, the ``Depends`` aliases and ``conversations``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy import select

import parallelkit as pk
from examples.crm.models import Conversation
from parallelkit.asgi import lifespan
from parallelkit.sqlalchemy import eager

from .shared import (
    NO_CADENCE,
    Clients,
    EnrollmentIn,
    PaymentIn,
    ServiceDatabase,
    Settings,
    StatementCounter,
    WebhookBatch,
    add_debug_routes,
    conversation_view,
    enrollment_response,
    find_inactive,
    open_conversations,
    open_database,
    payment_response,
    record_enrollments,
    record_payment,
    webhook_results,
)

__all__ = ["PAYMENT", "VIEW_GRAPH", "WEBHOOK_GRAPH", "build_orchestrator", "create_app"]

#: What the webhook needs, named once: 2 statements for any batch.
WEBHOOK_GRAPH = eager(Conversation, "contact.company.automation_rules")
#: What the conversation read needs: 1 statement (two joined hops).
VIEW_GRAPH = eager(Conversation, "contact.company")

ConversationLookup = pk.CachedFunction[[int], "dict[str, Any] | None"]


# -- the payment: charge, then (record || notify) --------------------------------------------------
PAYMENT = pk.Flow(name="payment")


@PAYMENT.step
async def charge(payment: PaymentIn, clients: Clients) -> str:
    """Charge the card: the charge id exists only afterwards."""
    return await clients.charge(payment.payment_id, payment.amount)


@PAYMENT.step
async def record(charge: str, payment: PaymentIn, db: ServiceDatabase) -> None:
    """Insert the payment with its charge id (waits for ``charge``)."""
    async with db.sessions() as session:
        await record_payment(session, payment, charge)


@PAYMENT.step
async def notify(charge: str, payment: PaymentIn, clients: Clients) -> None:
    """Tell the merchant's webhook (waits for ``charge``, overlaps ``record``)."""
    await clients.notify(payment.payment_id, charge)


# -- start-up: the services ------------------------------------------------------------------------
def build_orchestrator(settings: Settings, counter: StatementCounter) -> pk.Orchestrator:
    """The server's services; ``lifespan(build_orchestrator(...))`` starts them."""
    orch = pk.Orchestrator(name="crm service", output="logging")

    @orch.service
    async def db() -> AsyncIterator[ServiceDatabase]:
        async with open_database(settings, counter) as database:
            yield database

    @orch.service
    async def redis() -> AsyncIterator[Any]:
        if settings.store != "redis":
            yield None
            return
        from redis.asyncio import Redis

        client = Redis.from_url(settings.redis)
        try:
            await client.ping()
            yield client
        finally:
            await client.aclose()

    @orch.service
    async def conversations(db: ServiceDatabase, redis: Any) -> AsyncIterator[ConversationLookup]:
        store: pk.Store = pk.MemoryStore(10_000)
        if redis is not None:
            from parallelkit.redis import RedisStore

            store = RedisStore(redis, namespace=f"svc-{settings.server}")
            await store.clear()
        cache = pk.SWRCache(fresh=settings.fresh, stale=settings.stale, store=store)

        @cache.cached
        async def get_conversation(conversation_id: int) -> dict[str, Any] | None:
            async with db.sessions() as session:
                row = await session.get(Conversation, conversation_id, options=VIEW_GRAPH)
                if row is None:
                    return None
                return conversation_view(row, row.contact, row.contact.company)

        async with cache:  # owns the background refreshes
            yield get_conversation

    @orch.service
    async def clients() -> Clients:
        return Clients.of(settings)

    return orch


# -- typed access to the services from handlers (async def: FastAPI runs a plain `def`
# dependency in a worker thread, ~0.2 ms of CPU per request) ---------------------------
async def _db(request: Request) -> ServiceDatabase:
    db: ServiceDatabase = request.state.db
    return db


async def _clients(request: Request) -> Clients:
    clients: Clients = request.state.clients
    return clients


async def _conversations(request: Request) -> ConversationLookup:
    lookup: ConversationLookup = request.state.conversations
    return lookup


Db = Annotated[ServiceDatabase, Depends(_db)]
ExternalClients = Annotated[Clients, Depends(_clients)]
Conversations = Annotated[ConversationLookup, Depends(_conversations)]


def db_limit(db: ServiceDatabase) -> int | pk.Limiter:
    """The bound for a fan-out's database work: the pool size, as the docs recommend."""
    return db.pool_size


def create_app(settings: Settings) -> FastAPI:
    """The parallelkit variant's app: its lifespan runs :func:`build_orchestrator`."""
    counter = StatementCounter()
    app = FastAPI(
        title="CRM service (parallelkit)", lifespan=lifespan(build_orchestrator(settings, counter))
    )
    add_debug_routes(app, counter, "parallelkit")

    @app.post("/webhooks/batch")
    async def webhook_batch(batch: WebhookBatch, db: Db) -> dict[str, Any]:
        ids = {e.conversation_id for e in batch.events}
        async with db.sessions() as session:
            rows = await session.scalars(
                select(Conversation).where(Conversation.id.in_(ids)).options(*WEBHOOK_GRAPH)
            )
            by_id = {c.id: c for c in rows}
        missing = sorted(ids - by_id.keys())
        if missing:
            raise HTTPException(404, {"missing": missing})
        return webhook_results(batch, by_id)

    @app.get("/conversations/{conversation_id}")
    async def read_conversation(
        conversation_id: int, conversations: Conversations
    ) -> dict[str, Any]:
        view = await conversations(conversation_id)
        if view is None:
            raise HTTPException(404, "conversation not found")
        return view

    @app.post("/companies/{company_id}/enrollments")
    async def enroll_inactive(
        company_id: int, body: EnrollmentIn, db: Db, clients: ExternalClients
    ) -> dict[str, Any]:
        async with db.sessions() as session:
            cadence_id, inactive = await find_inactive(session, company_id, body.inactive_days)
        if cadence_id is None:
            raise HTTPException(404, NO_CADENCE)

        async def enroll(contact: Any) -> int:
            async with db.sessions() as own:  # one session per task
                open_count = await open_conversations(own, contact.id)
            await clients.mail(contact.email, f"re-engage:{open_count}")
            return int(contact.id)

        outcomes = await pk.map(enroll, inactive, limit=db_limit(db), settle=True)
        enrolled = [o.value for o in outcomes if o.ok]
        failed = [c.id for c, o in zip(inactive, outcomes, strict=True) if not o.ok]
        async with db.sessions() as session:
            await record_enrollments(session, cadence_id, enrolled)
        return enrollment_response(company_id, cadence_id, enrolled, failed)

    @app.post("/payments")
    async def pay(payment: PaymentIn, db: Db, clients: ExternalClients) -> dict[str, Any]:
        result = await PAYMENT.run(payment=payment, clients=clients, db=db)
        return payment_response(payment, result["charge"])

    return app
