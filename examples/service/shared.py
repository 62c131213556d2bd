"""What the three variants share: settings, the database, the fakes, the JSON they answer.

Everything here is identical for every variant on purpose: the same schema and
seed data (:mod:`examples.crm`), the same per-item SQL, the same simulated
external calls and the same response bodies. The variants differ only in how
they load (N+1 vs hand-written vs :func:`parallelkit.sqlalchemy.eager`), cache
(naive dict vs ``TTLCache`` + single flight vs :class:`parallelkit.SWRCache`)
and fan out (unbounded ``gather`` vs ``gather`` + a process-wide semaphore vs
:func:`parallelkit.map`).

Nothing in this module imports parallelkit: the ordinary and expert servers run
without it (importing :mod:`parallelkit.sqlalchemy` changes no global state; its
session guard is opt-in and stays off in every server here).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path
from pydantic import BaseModel, Field
from sqlalchemy import Row, event, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.pool import QueuePool
from starlette.types import ASGIApp, Receive, Scope, Send

from examples.crm.db import drop_schema, make_engine
from examples.crm.db import open_database as open_crm_database
from examples.crm.models import (
    AutomationRule,
    Cadence,
    Company,
    Contact,
    Conversation,
    Enrollment,
)
from examples.crm.payment import Payment
from examples.crm.seed import EPOCH, SeedSizes

from .errors import JsonInt

__all__ = [
    "MAX_INT",
    "NO_CADENCE",
    "SEED_SIZES",
    "VARIANTS",
    "Clients",
    "PaymentIn",
    "RowId",
    "ServiceDatabase",
    "Settings",
    "StatementCounter",
    "WebhookBatch",
    "CountRequests",
    "add_debug_routes",
    "as_utc",
    "conversation_view",
    "enrollment_response",
    "find_inactive",
    "inactive_cutoff",
    "is_inactive",
    "log_failed_items",
    "open_database",
    "payment_response",
    "record_payment",
    "open_conversations",
    "record_enrollments",
    "webhook_result",
    "webhook_results",
]

#: 20 companies x 20 contacts x 5 conversations = 2,000 conversations (issue 18's size).
SEED_SIZES = SeedSizes(companies=20, contacts_per_company=20, conversations_per_contact=5)
VARIANTS = ("ordinary", "expert", "parallelkit")
WEBHOOK_URL = "https://hooks.example.com/payments"
#: The 404 detail of an enrollment for a company that does not exist or has no cadence.
NO_CADENCE = "company not found or without a cadence"
#: The largest value of an ``integer`` column (ids, amounts): a larger one in a request is
#: a 422 naming the field, not a driver error (``value out of int32 range``) and a 500.
MAX_INT = 2**31 - 1
#: A row id in a path (``/conversations/{conversation_id}``): a positive ``integer``.
RowId = Annotated[int, Path(ge=1, le=MAX_INT)]
_NAME = re.compile(r"[a-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class Settings:
    """How one server process runs.

    Attributes:
        variant: ``"ordinary"``, ``"expert"`` or ``"parallelkit"``.
        name: this server's name: its PostgreSQL schema (``svc_<name>``), its
            SQLite directory and its Redis namespace, so several servers share
            one database server without sharing rows.
        database: a SQLAlchemy URL; ``None``: a SQLite file in a new temporary
            directory (aiosqlite).
        redis: a Redis URL; used by the parallelkit variant when ``store="redis"``.
        store: ``"memory"`` or ``"redis"``: where the parallelkit variant's
            cache keeps its entries.
        pool_size: connections in the engine's pool (no overflow).
        seed_sizes: the seed data (default: 2,000 conversations).
        charge_latency, notify_latency, mail_latency: seconds each simulated
            external call takes (payment provider, webhook receiver, mailer).
        fresh, stale: the cache windows (``fresh`` is the TTL of the caches
            without stale-while-revalidate).
    """

    variant: str = "parallelkit"
    name: str = ""
    database: str | None = None
    redis: str | None = None
    store: str = "memory"
    pool_size: int = 10
    seed_sizes: SeedSizes = SEED_SIZES
    charge_latency: float = 0.005
    notify_latency: float = 0.002
    mail_latency: float = 0.001
    fresh: float = 30.0
    stale: float = 300.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            msg = f"variant must be one of {VARIANTS}, got {self.variant!r}"
            raise ValueError(msg)
        if not _NAME.fullmatch(self.name):
            # it names a PostgreSQL schema, set unquoted in search_path: "svc_repA" would
            # be created but searched as svc_repa ("no schema has been selected to create in")
            msg = f"name must be lowercase letters, digits, '_' or '-', got {self.name!r}"
            raise ValueError(msg)
        if self.store not in ("memory", "redis"):
            msg = f"store must be 'memory' or 'redis', got {self.store!r}"
            raise ValueError(msg)
        if self.store == "redis" and not self.redis:
            msg = "store='redis' needs a Redis URL (redis=...)"
            raise ValueError(msg)
        if isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int):
            msg = f"pool_size must be an int, got {self.pool_size!r}"
            raise TypeError(msg)
        if self.pool_size < 1:
            # 0 is an unbounded pool for SQLAlchemy, a negative size one that never lends
            msg = f"pool_size must be at least 1, got {self.pool_size!r}"
            raise ValueError(msg)

    @property
    def server(self) -> str:
        """The name used for this server's schema / directory / namespace."""
        return self.name or self.variant


# -- the database ----------------------------------------------------------------------------------
class StatementCounter:
    """Counts the server's SQL statements and finished requests (``GET /debug/stats``).

    ``statements``: every statement the engine sends (``before_cursor_execute``;
    BEGIN/COMMIT are not counted). ``requests`` / ``active``: requests finished /
    running, counted by :class:`CountRequests` (``/health`` and ``/debug/*`` excluded).
    ``checked_out`` / ``slots``: the pool's connections in use and, in the parallelkit
    variant, its pool limiter's slots held and waited for: all 0 at rest, after any load
    or fault (a leak shows here).
    """

    __slots__ = ("active", "count", "engine", "limiter", "requests", "store")

    def __init__(self) -> None:
        self.count = 0
        self.requests = 0
        self.active = 0
        self.engine: AsyncEngine | None = None
        #: anything with ``statistics().running`` / ``.waiting`` (a pool limiter)
        self.limiter: Any = None
        #: a cache store with a dataclass ``statistics()`` (a RedisStore), or None
        self.store: Any = None

    def attach(self, engine: AsyncEngine) -> None:
        """Listen on ``engine``."""
        self.engine = engine

        def counted(*_: Any) -> None:
            self.count += 1

        event.listen(engine.sync_engine, "before_cursor_execute", counted)

    def at_rest(self) -> dict[str, Any]:
        """``checked_out`` connections; ``slots``: ``{"running", "waiting"}`` or ``None``;
        ``store``: the cache store's statistics (timeouts, degraded reads...) or ``None``."""
        pool = self.engine.sync_engine.pool if self.engine is not None else None
        checked_out = pool.checkedout() if isinstance(pool, QueuePool) else 0
        slots = None
        if self.limiter is not None:
            stats = self.limiter.statistics()
            slots = {"running": stats.running, "waiting": stats.waiting}
        store = None if self.store is None else asdict(self.store.statistics())
        return {"checked_out": checked_out, "slots": slots, "store": store}


class CollectorTime:
    """CPU time the server spends in Python's cyclic garbage collector, and its full
    collections (``GET /debug/stats``). Counted from :meth:`start`, which only a server
    process calls (``python -m examples.service``): a test's process is left alone."""

    __slots__ = ("_began", "full", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._began = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.process_time()
        else:
            self.seconds += time.process_time() - self._began
            self.full += info["generation"] == 2


COLLECTOR = CollectorTime()


class CountRequests:
    """A pure ASGI middleware counting requests (for the benchmark's per-request numbers)."""

    def __init__(self, app: ASGIApp, counter: StatementCounter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(("/debug/", "/health")):
            await self.app(scope, receive, send)
            return
        self.counter.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter.active -= 1
            self.counter.requests += 1


@dataclass(frozen=True, slots=True)
class ServiceDatabase:
    """The server's engine and session factory."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    pool_size: int


@asynccontextmanager
async def open_database(
    settings: Settings, counter: StatementCounter | None = None
) -> AsyncIterator[ServiceDatabase]:
    """Create this server's own schema, seed it, count its statements, clean up on exit.

    Every server gets private rows (a PostgreSQL schema ``svc_<name>`` or a SQLite
    file of its own), so writes in one server never change another's answers.
    """
    schema = f"svc_{settings.server}".replace("-", "_") if settings.database else None
    with tempfile.TemporaryDirectory(prefix="parallelkit-svc-") as directory:
        # an explicit SQLite URL: None would follow $DATABASE_URL
        url = settings.database or f"sqlite+aiosqlite:///{os.path.join(directory, 'crm.db')}"
        if schema:  # a server killed earlier may have left its schema behind
            leftover = make_engine(url, schema=schema)
            try:
                await drop_schema(leftover, schema=schema)
            finally:
                await leftover.dispose()
        sizes, pool = settings.seed_sizes, settings.pool_size
        async with open_crm_database(url, seed_sizes=sizes, pool_size=pool, schema=schema) as db:
            if counter is not None:
                counter.attach(db.engine)
            yield ServiceDatabase(db.engine, db.sessions, pool)


# -- the simulated outside world -------------------------------------------------------------------
@dataclass(slots=True)
class Clients:
    """The external APIs: a payment provider, a webhook receiver, a mailer (all simulated).

    Each call is one ``await`` of the configured latency, like a network call;
    the charge id is derived from the payment id so every variant answers the same.
    """

    charge_latency: float = 0.005
    notify_latency: float = 0.002
    mail_latency: float = 0.001
    sent: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, settings: Settings) -> Clients:
        return cls(settings.charge_latency, settings.notify_latency, settings.mail_latency)

    async def charge(self, payment_id: str, amount: int) -> str:
        """Charge the card; returns the provider's charge id."""
        await asyncio.sleep(self.charge_latency)
        return f"ch_{payment_id}"

    async def notify(self, payment_id: str, charge_id: str) -> None:
        """POST ``payment.succeeded`` to the merchant's webhook."""
        await asyncio.sleep(self.notify_latency)

    async def mail(self, email: str, template: str) -> None:
        """Send one e-mail (the cadence's first message)."""
        await asyncio.sleep(self.mail_latency)


# -- requests --------------------------------------------------------------------------------------
class WebhookEvent(BaseModel):
    conversation_id: JsonInt = Field(ge=1, le=MAX_INT)
    event: str = "message.received"


class WebhookBatch(BaseModel):
    events: list[WebhookEvent] = Field(max_length=500)


class EnrollmentIn(BaseModel):
    inactive_days: JsonInt = Field(default=21, ge=0, le=3650)


class PaymentIn(BaseModel):
    # no control characters: PostgreSQL refuses a NUL in text (a 500 after the charge)
    payment_id: str = Field(min_length=1, max_length=60, pattern=r"^[^\x00-\x1f\x7f]+$")
    amount: JsonInt = Field(gt=0, le=MAX_INT)


# -- answers: the same bytes from every variant ----------------------------------------------------
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


# -- the per-item SQL every variant runs identically -----------------------------------------------
async def find_inactive(
    session: AsyncSession, company_id: int, inactive_days: int
) -> tuple[int | None, Sequence[Row[tuple[int, str]]]]:
    """The company's first cadence and its inactive contacts ``(id, email)``: 2 statements."""
    cutoff = inactive_cutoff(inactive_days)
    cadence_id = await session.scalar(
        select(Cadence.id).where(Cadence.company_id == company_id).order_by(Cadence.id).limit(1)
    )
    inactive = (
        await session.execute(
            select(Contact.id, Contact.email)
            .where(Contact.company_id == company_id)
            .where(or_(Contact.last_contacted_at.is_(None), Contact.last_contacted_at < cutoff))
            .order_by(Contact.id)
        )
    ).all()
    return cadence_id, inactive


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


async def open_conversations(session: AsyncSession, contact_id: int) -> int:
    """What the cadence's first e-mail needs to know: the contact's open conversations."""
    count = await session.scalar(
        select(func.count())
        .select_from(Conversation)
        .where(Conversation.contact_id == contact_id, Conversation.status == "open")
    )
    return int(count or 0)


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


async def record_enrollments(
    session: AsyncSession, cadence_id: int, contact_ids: Sequence[int]
) -> None:
    """Enroll (or re-enroll) the contacts: one ``INSERT .. ON CONFLICT DO UPDATE``, a commit.

    Idempotent, and a write every time, so a long benchmark keeps writing.
    """
    if not contact_ids:
        return
    if session.bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    rows = [{"cadence_id": cadence_id, "contact_id": c, "enrolled_at": EPOCH} for c in contact_ids]
    stmt = insert(Enrollment).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Enrollment.contact_id, Enrollment.cadence_id],
        set_={"enrolled_at": stmt.excluded.enrolled_at},
    )
    await session.execute(stmt)
    await session.commit()


async def record_payment(session: AsyncSession, payment: PaymentIn, charge_id: str) -> None:
    """Insert the payment row with its charge id, and commit.

    Raises:
        HTTPException: 409, the payment id is recorded already (a client's retry).
    """
    session.add(
        Payment(payment_id=payment.payment_id, amount=payment.amount, stripe_charge_id=charge_id)
    )
    try:
        await session.commit()
    except IntegrityError as exc:  # payment_id is unique: the only constraint an insert can break
        msg = f"payment {payment.payment_id!r} is already recorded"
        raise HTTPException(409, msg) from exc


# -- routes every server has -----------------------------------------------------------------------
def add_debug_routes(app: FastAPI, counter: StatementCounter, variant: str) -> None:
    """``GET /health`` (200 once started), ``GET /debug/stats`` (statements, requests so far,
    connections checked out and pool slots held: see :class:`StatementCounter`)."""
    app.add_middleware(CountRequests, counter=counter)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "variant": variant}

    @app.get("/debug/stats")
    async def stats() -> dict[str, Any]:
        return {
            "gc_seconds": COLLECTOR.seconds,
            "gc_full": COLLECTOR.full,
            "statements": counter.count,
            "requests": counter.requests,
            "active": counter.active,
            **counter.at_rest(),
            "pid": os.getpid(),
            "variant": variant,
        }
