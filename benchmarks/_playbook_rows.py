"""The five rows of the playbook's table, each measured side by side and checked.

Each row function takes the open CRM database (the start-up row needs none) and a
:class:`~benchmarks._measure.Plan`, and returns what it measured: every variant's
timings, statements and correctness, the row's calibration, its model bound (computed
from the durations) and its CPU bound (the event loop's CPU time for a hand-written
form, latency off). Every truth a result is checked against is computed here without
parallelkit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any
from unittest import mock

from examples.crm import bulk, payment, startup, webhook
from examples.crm.clients import StripeClient, WebhookClient
from examples.crm.db import POOL_SIZE, Database, open_database
from examples.crm.models import (
    AutomationRule,
    Cadence,
    Company,
    Contact,
    Conversation,
    Enrollment,
)
from examples.crm.seed import EPOCH, SeedSizes
from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import joinedload

from ._measure import Check, Measure, Plan, Reset, calibrate, compare, cpu_bound
from ._registry import report_progress

#: The playbook's own numbers (ms): sequential ("before") and parallel ("after") as claimed.
PLAYBOOK: dict[str, tuple[int, int]] = {
    "Server startup": (2000, 700),
    "100 cadence enrollments": (5000, 150),
    "4 DB queries": (400, 50),
    "Payment processing": (800, 500),
    "50 company detection": (25000, 5000),
}

#: The extra variant every row has: the same work written by hand in asyncio (no
#: parallelkit), run in the same conditions: what parallelkit's own cost is measured against.
HAND = "hand-written asyncio"

#: The main job's plan: each row's sequential code takes 0.2 to 1.4 s, a simulated round
#: trip stays at 2.5 ms or more (a statement alone costs about 1 ms of this machine's
#: time, more on a busy one), two runs of each parallel variant, one of the rest.
#: ``--full`` runs every row at the playbook's own durations (scale 1), five times.
QUICK = Plan(
    scales={
        "Server startup": 0.1,
        "100 cadence enrollments": 0.2,
        "4 DB queries": 0.5,
        "Payment processing": 0.25,
        "50 company detection": 0.04,
    },
    repeat=2,
    before_runs=1,
    floor_runs=1,
)
FULL = Plan(scales=dict.fromkeys(PLAYBOOK, 1.0), repeat=5, before_runs=3, floor_runs=5)


async def _gather_bounded(fn: Callable[[int], Awaitable[Any]], items: Sequence[int]) -> list[Any]:
    """The hand-written form, no parallelkit: ``asyncio.gather`` and a pool-sized Semaphore."""
    sem = asyncio.Semaphore(POOL_SIZE)

    async def one(item: int) -> Any:
        async with sem:
            return await fn(item)

    return list(await asyncio.gather(*(one(i) for i in items)))


async def _bulk_row(
    db: Database,
    plan: Plan,
    variants: dict[str, Measure],
    check: Check,
    reset: Reset,
    *,
    calibration: dict[str, Any],
    items: int,
    one: str,
) -> dict[str, Any]:
    """Measure a row of bulk work on the pool: its variants, its CPU bound (the
    hand-written form, latency off) and the pool's floor, ``ceil(items / pool size)``
    waves of one item's round trips."""
    try:
        measured = await compare(variants, plan, check, db=db, reset=reset)
        cpu = await cpu_bound({"gather + Semaphore": variants[HAND]}, plan, db, reset)
    finally:
        db.latency.seconds = 0.0
        await reset()
    per_item = (measured["before"]["statements"] or 0) / items
    return {
        "measured": measured,
        "calibration": calibration,
        "cpu_bound": cpu,
        "model_bound": math.ceil(items / POOL_SIZE)
        * per_item
        * calibration["round_trip_ms"]
        / 1000,
        "bound_note": (
            f"ceil({items} / {POOL_SIZE} pooled connections) x the {per_item:g} round trips of "
            f"one {one}"
        ),
    }


def _sequential_seconds(plan: Plan, row: str) -> float:
    """The playbook's sequential time for ``row``, at the plan's time scale for it."""
    return PLAYBOOK[row][0] / 1000 * plan.scales[row]


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


async def _enrollments(db: Database, plan: Plan) -> dict[str, Any]:
    report_progress("100 cadence enrollments")
    assert db.summary is not None
    async with db.sessions() as session:
        cadence_id = await session.scalar(
            select(Cadence.id).order_by(Cadence.id).limit(1).offset(1)
        )
    assert cadence_id is not None
    contacts = db.summary.contact_ids[:100]

    async def reset() -> None:
        async with db.sessions() as session:
            await session.execute(delete(Enrollment).where(Enrollment.cadence_id == cadence_id))
            await session.commit()

    async def check(name: str, value: Any) -> bool:
        async with db.sessions() as session:
            rows = list(
                await session.scalars(
                    select(Enrollment.contact_id).where(Enrollment.cadence_id == cadence_id)
                )
            )
        if name == "parallelkit" and not all(o.ok for o in value):
            return False
        return sorted(rows) == sorted(contacts)  # each contact enrolled, exactly once

    enroll = functools.partial(bulk.enroll_one, db.sessions, cadence_id)
    playbook_before = _sequential_seconds(plan, "100 cadence enrollments")
    calibration = await calibrate(
        db,
        lambda: bulk.enroll_sequential(db.sessions, cadence_id, contacts[:10]),
        share=0.1,
        target=playbook_before,
        reset=reset,
    )
    variants: dict[str, Measure] = {
        "before": lambda: bulk.enroll_sequential(db.sessions, cadence_id, contacts),
        "after": lambda: bulk.enroll_seed_gather(db.sessions, cadence_id, contacts),
        "parallelkit": lambda: bulk.enroll_contacts(
            db.sessions, cadence_id, contacts, limit=POOL_SIZE
        ),
        HAND: lambda: _gather_bounded(enroll, contacts),
        "set-based (2 statements)": lambda: bulk.enroll_bulk(db.sessions, cadence_id, contacts),
    }
    return await _bulk_row(
        db,
        plan,
        variants,
        check,
        reset,
        calibration=calibration,
        items=len(contacts),
        one="enrollment (look up, insert)",
    )


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

    playbook_before = _sequential_seconds(plan, "4 DB queries")
    sequential = loading(webhook.load_webhook_context_sequential)
    calibration = await calibrate(db, sequential, share=1.0, target=playbook_before)
    try:
        measured = await compare(
            {
                "before": sequential,
                "after": loading(webhook.load_webhook_context_one_join),
                "parallelkit": loading(webhook.load_webhook_context),
                HAND: loading(hand_tuned),
                "eager, rules joined": loading(eager_joined),
            },
            plan,
            check,
            db=db,
        )
        cpu = await cpu_bound(
            {
                "one joined statement": loading(webhook.load_webhook_context_one_join),
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

    async def check(_name: str, pid: str) -> bool:
        """The row carries a real charge id, and the webhook announced that charge after it."""
        async with db.sessions() as session:
            row = await session.scalar(
                select(payment.Payment).where(payment.Payment.payment_id == pid)
            )
        charges = {c.id: c for c in stripe.charges}
        if row is None or row.stripe_charge_id not in charges:
            return False
        charge = charges[row.stripe_charge_id]
        sent = [d for d in hooks.deliveries if d.payload.get("payment_id") == pid]
        return len(sent) == 1 and (
            sent[0].payload.get("charge_id") == charge.id
            and sent[0].started_at >= charge.finished_at
        )

    async def by_hand(pid: str, amount: int, *, stripe: Any, webhooks: Any, sessions: Any) -> None:
        charge = await stripe.create_charge(amount=amount, currency="usd", source=pid)
        await asyncio.gather(
            payment._insert(sessions, pid, amount, charge.id),
            webhooks.post(payment.WEBHOOK_URL, {"payment_id": pid, "charge_id": charge.id}),
        )

    playbook_before = _sequential_seconds(plan, "Payment processing")
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
    }


async def _expected_detection(db: Database, companies: list[int]) -> dict[int, int]:
    """What detect-and-enroll must enroll per company, computed here in plain SQL."""
    cutoff = EPOCH - timedelta(days=21)
    inactive_since = or_(Contact.last_contacted_at.is_(None), Contact.last_contacted_at < cutoff)
    expected = {}
    async with db.sessions() as session:
        for company_id in companies:
            cadence_id = await session.scalar(
                select(func.min(Cadence.id)).where(Cadence.company_id == company_id)
            )
            enrolled = set(
                await session.scalars(
                    select(Enrollment.contact_id).where(Enrollment.cadence_id == cadence_id)
                )
            )
            inactive = set(
                await session.scalars(
                    select(Contact.id).where(Contact.company_id == company_id, inactive_since)
                )
            )
            expected[company_id] = min(len(inactive - enrolled), 100)
    return expected


async def _detection(db: Database, plan: Plan) -> dict[str, Any]:
    report_progress("50 company detection")
    assert db.summary is not None
    companies = db.summary.company_ids[:50]
    async with db.sessions() as session:
        baseline = await session.scalar(select(func.max(Enrollment.id))) or 0
    expected = await _expected_detection(db, companies)

    async def reset() -> None:
        async with db.sessions() as session:
            await session.execute(delete(Enrollment).where(Enrollment.id > baseline))
            await session.commit()

    async def check(name: str, value: Any) -> bool:
        async with db.sessions() as session:
            rows = (
                await session.execute(
                    select(Cadence.company_id, Enrollment.contact_id)
                    .join(Cadence, Enrollment.cadence_id == Cadence.id)
                    .where(Enrollment.id > baseline)
                )
            ).all()
        per_company = dict.fromkeys(companies, 0)
        for company_id, _contact in rows:
            per_company[company_id] = per_company.get(company_id, 0) + 1
        if name == "parallelkit" and value.failed:
            return False
        return per_company == expected

    detect = functools.partial(bulk.detect_and_enroll_inactive, db.sessions)
    playbook_before = _sequential_seconds(plan, "50 company detection")
    calibration = await calibrate(
        db,
        lambda: bulk.detect_all_sequential(db.sessions, companies[:5]),
        share=0.1,
        target=playbook_before,
        reset=reset,
    )
    variants: dict[str, Measure] = {
        "before": lambda: bulk.detect_all_sequential(db.sessions, companies),
        "after": lambda: bulk.detect_all_seed_gather(db.sessions, companies),
        "parallelkit": lambda: bulk.detect_all(db.sessions, companies, limit=POOL_SIZE),
        HAND: lambda: _gather_bounded(detect, companies),
    }
    row = await _bulk_row(
        db,
        plan,
        variants,
        check,
        reset,
        calibration=calibration,
        items=len(companies),
        one="company",
    )
    return {**row, "enrolled": sum(expected.values())}


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
        "100 cadence enrollments": _enrollments,
        "4 DB queries": _four_queries,
        "Payment processing": _payment,
        "50 company detection": _detection,
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
