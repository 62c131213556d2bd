"""Variant (c): the endpoints with parallelkit, the way its docs recommend.

* start-up: an :class:`~parallelkit.Orchestrator` of services (database, Redis,
  the conversation cache, the external clients), run by the app's lifespan
  (:func:`parallelkit.asgi.lifespan`); handlers get each service's value, typed,
  through :func:`parallelkit.asgi.service` (``async def`` dependencies: no
  thread-pool hop), or, on the two endpoints that answer in about 0.1 ms (the
  cached read, the payment), through :func:`parallelkit.asgi.running_from`,
  which costs under 1 us where FastAPI's resolution of a dependency costs 15-25 us;
* the database bound: sessions of class
  :class:`~parallelkit.sqlalchemy.LimitedAsyncSession` share the engine's
  process-wide :func:`~parallelkit.sqlalchemy.pool_limiter` (sized to the pool),
  holding a slot only while they hold a connection, so all requests together
  never queue more work on the pool than it has connections, and an item's
  e-mail holds no slot; each block that only talks to the database takes the
  slot first (``async with db.slots, db.sessions()``), so a queued request has
  built nothing yet while it waits;
* loading: :func:`parallelkit.sqlalchemy.eager` names the graph a batch needs
  (joined many-to-one hops, one ``selectin`` for the rules: 2 statements for any
  batch), :func:`~parallelkit.sqlalchemy.eager_get` one row's graph in one
  statement; anything else raises
  :class:`~parallelkit.sqlalchemy.NotLoadedError` instead of a hidden query;
* caching: :class:`parallelkit.SWRCache` (fresh / stale windows, single-flight
  misses, one background refresh per key) on a ``MemoryStore`` or, to share it
  between replicas, an entered :class:`parallelkit.redis.RedisStore` (its near
  cache serves hot keys without a Redis round trip);
* fan-out: :func:`parallelkit.map` with ``settle=True`` (every item's outcome
  kept, failures listed);
* the payment: a :class:`parallelkit.Flow` (record and notify wait for the
  charge, and overlap each other), run with ``settle=True``: once the card is
  charged, a failed webhook does not cancel the insert (as in the other variants);
* errors: :class:`~parallelkit.sqlalchemy.RequestGuard` makes the real error the
  one that escapes (a ``NotLoadedError`` rather than pydantic's
  ``ResponseValidationError``). The session guard
  (:func:`~parallelkit.sqlalchemy.guard_sessions`) is opt-in and stays off in
  this production server; the pytest plugin turns it on in tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

import parallelkit as pk
from examples.crm.models import Conversation
from parallelkit.asgi import lifespan, running_from, service
from parallelkit.sqlalchemy import (
    LimitedAsyncSession,
    PoolLimiter,
    RequestGuard,
    eager,
    eager_get,
    pool_limiter,
)

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

__all__ = ["PAYMENT", "VIEW_PATH", "WEBHOOK_GRAPH", "build_orchestrator", "create_app"]

#: What the webhook needs, named once: 2 statements for any batch.
WEBHOOK_GRAPH = eager(Conversation, "contact.company.automation_rules")
#: What the conversation read needs: 1 statement (``eager_get``: two joined hops).
VIEW_PATH = "contact.company"


@dataclass(frozen=True, slots=True)
class Database(ServiceDatabase):
    """The engine, its session factory and its :func:`~parallelkit.sqlalchemy.pool_limiter`.

    A handler's unit of database work is written ``async with db.slots,
    db.sessions() as session:``: it waits for a slot of the pool *before* it builds
    anything, as a hand-written semaphore does, so a request queued behind a busy
    pool keeps no session (nor the rows it is about to add) alive meanwhile. The
    sessions' own slot (``LimitedAsyncSession``) is re-entrant: inside the block
    it costs a dictionary lookup; without the block it still bounds the pool.
    """

    slots: PoolLimiter


ConversationLookup = pk.CachedFunction[[int], "dict[str, Any] | None"]
#: Entries kept in memory: every conversation (2,000) fits, as in the expert's TTLCache.
CACHE_SIZE = 10_000


# -- the payment: charge, then (record || notify) --------------------------------------------------
PAYMENT = pk.Flow(name="payment")


@PAYMENT.step
async def charge(payment: PaymentIn, clients: Clients) -> str:
    """Charge the card: the charge id exists only afterwards."""
    return await clients.charge(payment.payment_id, payment.amount)


@PAYMENT.step
async def record(charge: str, payment: PaymentIn, db: Database) -> None:
    """Insert the payment with its charge id (waits for ``charge``)."""
    async with db.slots, db.sessions() as session:
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
    async def db() -> AsyncIterator[Database]:
        async with open_database(settings, counter) as database:
            # the one call: every session of the process shares the engine's pool bound
            sessions = async_sessionmaker(
                database.engine, class_=LimitedAsyncSession, expire_on_commit=False
            )
            slots = pool_limiter(database.engine)  # what those sessions share
            counter.limiter = slots  # GET /debug/stats: its slots, 0 at rest
            yield Database(database.engine, sessions, database.pool_size, database.created, slots)

    @orch.service
    async def redis() -> AsyncIterator[Any]:
        url = settings.redis  # set whenever store="redis" (Settings checks)
        if settings.store != "redis" or url is None:
            yield None
            return
        from redis.asyncio import Redis

        client = Redis.from_url(url)
        try:
            await client.ping()
            yield client
        finally:
            await client.aclose()

    @orch.service
    async def conversations(db: Database, redis: Any) -> AsyncIterator[ConversationLookup]:
        store: pk.Store = pk.MemoryStore(CACHE_SIZE)
        near: AbstractAsyncContextManager[Any] = nullcontext()
        if redis is not None:
            from parallelkit.redis import RedisStore

            # entered (below), it keeps a near cache: a hot key's hit costs no round trip
            store = RedisStore(redis, namespace=settings.namespace, near_maxsize=CACHE_SIZE)
            near = store
            counter.store = store  # GET /debug/stats: its errors, timeouts, near hits
            if db.created:  # a replica joining a shared namespace keeps its entries
                await store.clear()
        # jitter: the 2,000 conversations loaded together are refreshed apart, not in one burst
        cache = pk.SWRCache(fresh=settings.fresh, stale=settings.stale, store=store, jitter=0.1)

        @cache.cached
        async def get_conversation(conversation_id: int) -> dict[str, Any] | None:
            async with db.slots, db.sessions() as session:
                row = await eager_get(session, Conversation, conversation_id, VIEW_PATH)
                if row is None:
                    return None
                return conversation_view(row, row.contact, row.contact.company)

        async with near, cache:  # the store's invalidation listener, the cache's refreshes
            yield get_conversation

    @orch.service
    async def clients() -> Clients:
        return Clients.of(settings)

    return orch


# -- typed access to the services from handlers ----------------------------------------------------
Db = Annotated[Database, service("db")]
ExternalClients = Annotated[Clients, service("clients")]


def create_app(settings: Settings) -> FastAPI:
    """The parallelkit variant's app: its lifespan runs :func:`build_orchestrator`."""
    counter = StatementCounter()
    app = FastAPI(
        title="CRM service (parallelkit)", lifespan=lifespan(build_orchestrator(settings, counter))
    )
    add_debug_routes(app, counter, "parallelkit")
    refuse_bad_input(app)  # a 422 naming the field whatever it held, a 413 for a huge body
    app.add_middleware(RequestGuard)  # the real error first (no engine: nothing counted)

    @app.post("/webhooks/batch")
    async def webhook_batch(batch: WebhookBatch, db: Db) -> dict[str, Any]:
        ids = {e.conversation_id for e in batch.events}
        async with db.slots, db.sessions() as session:
            rows = await session.scalars(
                select(Conversation).where(Conversation.id.in_(ids)).options(*WEBHOOK_GRAPH)
            )
            by_id = {c.id: c for c in rows}
        missing = sorted(ids - by_id.keys())
        if missing:
            raise HTTPException(404, {"missing": missing})
        return webhook_results(batch, by_id)

    @app.get("/conversations/{conversation_id}")
    async def read_conversation(conversation_id: RowId, request: Request) -> dict[str, Any]:
        # a hit answers from memory in well under 0.1 ms: a FastAPI dependency (its
        # resolution costs 15-25 us per request) would be a fifth of it; this lookup is < 1 us
        conversations: ConversationLookup = running_from(request).get("conversations")
        view = await conversations(conversation_id)
        if view is None:
            raise HTTPException(404, "conversation not found")
        return view

    @app.patch("/conversations/{conversation_id}")
    async def change_conversation(
        conversation_id: RowId, change: ConversationIn, request: Request
    ) -> dict[str, Any]:
        services = running_from(request)
        db: Database = services.get("db", Database)
        conversations: ConversationLookup = services.get("conversations")
        async with db.slots, db.sessions() as session:
            found = await update_conversation(session, conversation_id, change)
        if not found:
            raise HTTPException(404, "conversation not found")
        # committed, then invalidated: in every replica sharing the RedisStore (pub/sub),
        # and a load that started before it never stores the old row after it
        await conversations.invalidate(conversation_id)
        view = await conversations(conversation_id)
        if view is None:  # deleted meanwhile
            raise HTTPException(404, "conversation not found")
        return view

    @app.post("/companies/{company_id}/enrollments")
    async def enroll_inactive(
        company_id: RowId, body: EnrollmentIn, db: Db, clients: ExternalClients
    ) -> dict[str, Any]:
        async with db.slots, db.sessions() as session:
            cadence_id, inactive = await find_inactive(session, company_id, body.inactive_days)
        if cadence_id is None:
            raise HTTPException(404, NO_CADENCE)

        async def enroll(contact: Any) -> int:
            async with db.slots, db.sessions() as own:  # one session per task
                open_count = await open_conversations(own, contact.id)
            await clients.mail(contact.email, f"re-engage:{open_count}")
            return int(contact.id)

        # the pool is bounded by the sessions (pool_limiter); `limit` bounds this call's tasks
        outcomes = await pk.map(enroll, inactive, limit=db.pool_size, settle=True)
        enrolled = [o.unwrap() for o in outcomes if o.ok]
        errors = [(c.id, o.error) for c, o in zip(inactive, outcomes, strict=True) if o.error]
        failed = [i for i, _ in errors]
        log_failed_items(company_id, len(inactive), errors)
        async with db.slots, db.sessions() as session:
            await record_enrollments(session, cadence_id, enrolled)
        return enrollment_response(company_id, cadence_id, enrolled, failed)

    @app.post("/payments")
    async def pay(payment: PaymentIn, request: Request) -> dict[str, Any]:
        services = running_from(request)  # the cheap typed lookup, as in read_conversation
        db, clients = services.get("db", Database), services.get("clients", Clients)
        # settle: once the card is charged, a failed webhook must not cancel the insert (a
        # charge with no payment row); every step runs to its end, then the first error in
        # step order escapes as itself (the row's 409 before the webhook's error)
        outcomes = await PAYMENT.run(payment=payment, clients=clients, db=db, settle=True)
        charge_id = outcomes.get(charge).unwrap()  # declined: nothing else ran
        outcomes.get(record).unwrap()
        outcomes.get(notify).unwrap()
        return payment_response(payment, charge_id)

    return app
