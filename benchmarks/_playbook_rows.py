"""The five rows of the playbook's table, each measured side by side and checked.

Each row function takes the open CRM database (the start-up row needs none) and a
:class:`~benchmarks._measure.Plan`, and returns what it measured: every variant's
timings, statements and correctness, the row's calibration, its model bound (computed
from the durations) and its CPU bound (the event loop's CPU time for a hand-written
form, latency off). Every truth a result is checked against is computed without
parallelkit.

Here: :func:`measure`, which runs the rows asked for, and the rows of start-up and
of latency (server start-up, the 4 webhook queries, the payment). The two rows of
bulk work on the pool are in :mod:`benchmarks._playbook_bulk`; the table as the
playbook claims it, and the plans, in :mod:`benchmarks._playbook_table` (imported
from here too).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from unittest import mock

from examples.crm import payment, startup, webhook
from examples.crm.clients import StripeClient, WebhookClient
from examples.crm.db import Database, open_database
from examples.crm.models import AutomationRule, Company, Contact, Conversation
from examples.crm.seed import SeedSizes
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from ._measure import Measure, Plan, calibrate, compare, cpu_bound
from ._playbook_bulk import detection, enrollments
from ._playbook_table import FULL, HAND, PLAYBOOK, QUICK, sequential_seconds
from ._registry import report_progress

__all__ = ["FULL", "HAND", "PLAYBOOK", "QUICK", "measure"]


@contextlib.contextmanager
def _recording_startup(log: list[tuple[str, str]]) -> Iterator[None]:
    """Record when each simulated service of ``examples.crm.startup`` starts and is ready."""
    # the start-up model lives in examples/crm/startup.py (shared with the example and
    # the docs); its services all go through its one simulation helper
    real = startup._simulate

    async def recorded(name: str, scale: float) -> str:
        log.append((name, "start"))
        try:
            return await real(name, scale)
        finally:
            log.append((name, "ready"))

    with mock.patch.object(startup, "_simulate", recorded):
        yield


async def _start_by_hand(scale: float) -> None:
    """Each service starts once the services it needs are ready: asyncio Events, by hand."""
    ready = {name: asyncio.Event() for name in startup.SEED_DURATIONS}

    async def start(name: str) -> None:
        for dependency in startup.DEPENDS.get(name, ()):
            await ready[dependency].wait()
        await startup._simulate(name, scale)
        ready[name].set()

    await asyncio.gather(*(start(name) for name in startup.SEED_DURATIONS))


def _started_in_order(log: list[tuple[str, str]]) -> bool:
    """Every service started once and became ready, none before its dependencies were ready."""
    where = {event: i for i, event in enumerate(log)}
    names = set(startup.SEED_DURATIONS)
    if len(log) != 2 * len(names) or {n for n, _ in log} != names:
        return False
    return all(
        where[(name, "start")] > where[(dep, "ready")]
        for name, deps in startup.DEPENDS.items()
        for dep in deps
    )


async def _startup(plan: Plan) -> dict[str, Any]:
    report_progress("server start-up")
    scale = plan.scales["Server startup"]
    log: list[tuple[str, str]] = []

    async def orchestrated() -> None:
        orch = startup.build_orchestrator(scale, port=0)  # the http part simulated too
        async with orch.start():
            pass

    async def check(_name: str, _value: Any) -> bool:
        return _started_in_order(log)

    async def reset() -> None:
        log.clear()

    with _recording_startup(log):
        measured = await compare(
            {
                "before": lambda: startup.start_sequential(scale),
                "after": lambda: startup.start_seed_phases(scale),
                "parallelkit": orchestrated,
                HAND: lambda: _start_by_hand(scale),
            },
            plan,
            check,
            reset=reset,
        )
    chain = " + ".join(
        f"{n} {d * 1000:g}" for n, d in startup.SEED_DURATIONS.items() if d * 1000 >= 1
    )
    return {
        "measured": measured,
        "model_bound": startup.critical_path(scale),
        "bound_note": (
            "the critical path of examples/crm/startup.py's model (the longest chain of "
            "durations through each service's real dependencies)"
        ),
        "model": f"the playbook's start-up log, simulated: {chain} ms (sequential total "
        f"{sum(startup.SEED_DURATIONS.values()) * 1000:,.0f} ms); dependencies: "
        + ", ".join(f"{k} needs {', '.join(v)}" for k, v in startup.DEPENDS.items()),
    }


async def _four_queries(db: Database, plan: Plan) -> dict[str, Any]:
    report_progress("4 DB queries (webhook)")
    assert db.summary is not None
    conversation_id = db.summary.conversation_ids[len(db.summary.conversation_ids) // 2]
    async with db.sessions() as session:  # the truth, in one plain query
        truth = (
            await session.execute(
                select(Conversation.id, Contact.id, Contact.company_id, AutomationRule.id)
                .join(Contact, Conversation.contact_id == Contact.id)
                .join(AutomationRule, AutomationRule.company_id == Contact.company_id)
                .where(Conversation.id == conversation_id)
                .order_by(AutomationRule.id)
            )
        ).all()
    expected = (truth[0][0], truth[0][1], truth[0][2], [row[3] for row in truth])

    def loading(fn: Callable[[Any, int], Awaitable[Any]]) -> Measure:
        async def go() -> Any:
            async with db.sessions() as session:
                ctx = await fn(session, conversation_id)
                return (ctx.conversation.id, ctx.contact.id, ctx.company.id, ctx.rules)

        return go

    async def check(_name: str, value: Any) -> bool:
        *ids, rules = value
        return (*ids, sorted(r.id for r in rules)) == expected

    async def eager_joined(session: Any, cid: int) -> Any:
        from parallelkit.sqlalchemy import eager

        options = eager(
            Conversation,
            "contact.company.automation_rules",
            strategies={"contact.company.automation_rules": "joined"},
        )
        stmt = select(Conversation).where(Conversation.id == cid).options(*options)
        conversation = (await session.scalars(stmt)).unique().one()
        contact = conversation.contact
        rules = list(contact.company.automation_rules)
        return webhook.WebhookContext(conversation, contact, contact.company, rules)

    async def hand_written(session: Any, cid: int) -> Any:  # eager_get's statement, by hand
        stmt = (
            select(Conversation)
            .where(Conversation.id == cid)
            .options(
                joinedload(Conversation.contact, innerjoin=True)
                .joinedload(Contact.company, innerjoin=True)
                .joinedload(Company.automation_rules)
            )
        )
        conversation = (await session.scalars(stmt)).unique().one()
        contact = conversation.contact
        rules = list(contact.company.automation_rules)
        return webhook.WebhookContext(conversation, contact, contact.company, rules)

    async def hand_tuned(session: Any, cid: int) -> Any:  # hand-written: join + selectin
        stmt = (
            select(Conversation)
            .where(Conversation.id == cid)
            .options(
                joinedload(Conversation.contact, innerjoin=True)
                .joinedload(Contact.company, innerjoin=True)
                .selectinload(Company.automation_rules)
            )
        )
        conversation = (await session.scalars(stmt)).one()
        contact = conversation.contact
        rules = list(contact.company.automation_rules)
        return webhook.WebhookContext(conversation, contact, contact.company, rules)

    playbook_before = sequential_seconds(plan, "4 DB queries")
    sequential = loading(webhook.load_webhook_context_sequential)
    calibration = await calibrate(db, sequential, share=1.0, target=playbook_before)
    try:
        measured = await compare(
            {
                "before": sequential,
                "after": loading(webhook.load_webhook_context_one_join),
                "parallelkit": loading(webhook.load_webhook_context),
                HAND: loading(hand_written),  # the same one statement as parallelkit's
                "eager, rules joined": loading(eager_joined),
            },
            plan,
            check,
            db=db,
        )
        cpu = await cpu_bound(
            {
                "one joined statement": loading(webhook.load_webhook_context_one_join),
                "one statement, inner joins": loading(hand_written),
                "join + selectin": loading(hand_tuned),
            },
            plan,
            db,
        )
    finally:
        db.latency.seconds = 0.0
    return {
        "measured": measured,
        "calibration": calibration,
        "cpu_bound": cpu,
        "model_bound": calibration["round_trip_ms"] / 1000,
        "bound_note": "one round trip: the whole graph in one statement",
    }


async def _payment(db: Database, plan: Plan) -> dict[str, Any]:
    report_progress("payment processing")
    scale = plan.scales["Payment processing"]
    charge_s, webhook_s = 0.500 * scale, 0.200 * scale
    stripe, hooks = StripeClient(latency=charge_s), WebhookClient(latency=webhook_s)
    ids = itertools.count()

    def paying(fn: Callable[..., Awaitable[Any]], tag: str, s: Any = stripe, h: Any = hooks) -> Any:
        async def go() -> str:
            pid = f"{tag}-{os.getpid()}-{next(ids)}"
            await fn(pid, 1999, stripe=s, webhooks=h, sessions=db.sessions)
            return pid

        return go

    why_wrong: dict[str, set[str]] = {}

    async def check(name: str, pid: str) -> bool:
        """The row carries this payment's charge id, and one webhook announced that charge
        after it was made; what was wrong is kept for the report's sentence."""
        async with db.sessions() as session:
            row = await session.scalar(
                select(payment.Payment).where(payment.Payment.payment_id == pid)
            )
        charges = {c.id: c for c in stripe.charges}
        sent = [d for d in hooks.deliveries if d.payload.get("payment_id") == pid]
        found = set()
        if row is None:
            found.add("no row")
        elif row.stripe_charge_id not in charges:
            found.add("no charge id in the row")
        announced = charges.get(str(sent[0].payload.get("charge_id"))) if len(sent) == 1 else None
        if announced is None:
            found.add("no webhook announcing a charge id")
        elif sent[0].started_at < announced.finished_at:
            found.add("a webhook announcing a charge before it existed")
        elif row is not None and row.stripe_charge_id != announced.id:
            found.add("the row and the webhook name different charges")
        why_wrong.setdefault(name, set()).update(found)
        return not found

    async def by_hand(pid: str, amount: int, *, stripe: Any, webhooks: Any, sessions: Any) -> None:
        charge = await stripe.create_charge(amount=amount, currency="usd", source=pid)
        await asyncio.gather(
            payment._insert(sessions, pid, amount, charge.id),
            webhooks.post(payment.WEBHOOK_URL, {"payment_id": pid, "charge_id": charge.id}),
        )

    playbook_before = sequential_seconds(plan, "Payment processing")
    instant = StripeClient(latency=0), WebhookClient(latency=0)
    calibration = await calibrate(  # the insert's round trip: the rest of the 800 ms
        db,
        paying(payment.process_payment_sequential, "calibration", *instant),
        share=1.0,
        target=playbook_before,
        fixed=charge_s + webhook_s,
    )
    try:
        measured = await compare(
            {
                "before": paying(payment.process_payment_sequential, "before"),
                "after": paying(payment.process_payment_seed_gather, "after"),
                "parallelkit": paying(payment.process_payment, "parallelkit"),
                HAND: paying(by_hand, "hand"),
            },
            plan,
            check,
            db=db,
        )
        cpu = await cpu_bound(
            {"charge, then gather(insert, webhook)": paying(by_hand, "bound", *instant)}, plan, db
        )
    finally:
        db.latency.seconds = 0.0
    insert_s = calibration["round_trip_ms"] / 1000
    return {
        "measured": measured,
        "calibration": calibration,
        "cpu_bound": cpu,
        "model_bound": charge_s + max(insert_s, webhook_s),
        "bound_note": "charge + max(insert, webhook): the insert needs charge.id",
        "why_wrong": {name: sorted(found) for name, found in why_wrong.items() if found},
    }


async def measure(
    plan: Plan, database: str | None = None, rows: tuple[str, ...] = tuple(PLAYBOOK)
) -> dict[str, Any]:
    """Measure ``rows`` of the playbook's table (all by default) on ``database`` (SQLite)."""
    details: dict[str, Any] = {}
    if "Server startup" in rows:
        started = time.perf_counter()
        details["Server startup"] = await _startup(plan)
        details["Server startup"]["seconds"] = round(time.perf_counter() - started, 2)
    db_rows = {
        "100 cadence enrollments": enrollments,
        "4 DB queries": _four_queries,
        "Payment processing": _payment,
        "50 company detection": detection,
    }
    backend = "sqlite"
    if any(r in db_rows for r in rows):
        report_progress("writing the CRM seed data")
        schema = f"pk_bench_{os.getpid()}" if database else None
        sizes = SeedSizes(companies=50, contacts_per_company=10, conversations_per_contact=1)
        async with open_database(database, seed_sizes=sizes, schema=schema) as db:
            backend = db.engine.dialect.name
            for name, fn in db_rows.items():
                if name in rows:
                    started = time.perf_counter()
                    details[name] = await fn(db, plan)
                    details[name]["seconds"] = round(time.perf_counter() - started, 2)
    return {
        "details": details,
        "database": "SQLite (aiosqlite, WAL)" if backend == "sqlite" else backend,
    }
