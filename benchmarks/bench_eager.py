"""Eager loading: the seed's webhook graph for 500 conversations, six ways, side by side.

Workload: 500 webhook payloads (conversation ids); each needs conversation -> contact
-> company -> automation rules. Contenders, all on the same database in one run:

* naive: the seed's handler per payload, four sequential queries (2000 in all);
* per-request joinedload: one query per payload, everything joined (500);
* per-request selectinload: a selectin chain per payload (4 per payload);
* hand-tuned: all payloads at once, JOIN for the many-to-ones + selectin for the
  collection (2 queries), written by hand;
* eager: the same statement with ``eager(Conversation, "contact.company.automation_rules")``;
* loader_by_id: 500 concurrent callers each ``await loader.load(id)`` (batched).

And the price of the session guard (``guard_sessions``, on whenever
``parallelkit.sqlalchemy`` is imported), which runs on every ORM statement: 200
one-row reads, one after another in one session, with the guard on and off,
interleaved in the same rounds.

SQLite (aiosqlite, a temporary file) always; PostgreSQL (asyncpg, a temporary
schema) when ``--database`` is a PostgreSQL URL or the default test server answers.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from examples.crm import AutomationRule, Base, Company, Contact, Conversation, seed, seed_sync
from sqlalchemy import create_engine, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, joinedload, selectinload

import parallelkit as pk
from parallelkit.sqlalchemy import count_queries, eager, guard_sessions, loader_by_id

from ._util import print_targets, table, target

TITLE = "eager(): webhook graph for 500 conversations vs naive, joined, selectin, hand-tuned"

SIZES = {"companies": 10, "contacts_per_company": 10, "conversations_per_contact": 5}
N = 500


# ------------------------------------------------------------------ contenders
def contenders(
    factory: async_sessionmaker[Any],
) -> dict[str, Callable[[list[int]], Awaitable[int]]]:
    """Each takes the payload ids and returns the number of rules it saw (a checksum)."""

    async def naive(ids: list[int]) -> int:
        total = 0
        for cid in ids:  # the seed's processWebhookSlow, one payload after another
            async with factory() as s:
                conversation = await s.get(Conversation, cid)
                assert conversation is not None
                contact = await s.get(Contact, conversation.contact_id)
                assert contact is not None
                company = await s.get(Company, contact.company_id)
                assert company is not None
                stmt = select(AutomationRule).where(AutomationRule.company_id == company.id)
                total += len((await s.scalars(stmt)).all())
        return total

    joined_opts = (
        joinedload(Conversation.contact)
        .joinedload(Contact.company)
        .joinedload(Company.automation_rules),
    )
    selectin_opts = (
        selectinload(Conversation.contact)
        .selectinload(Contact.company)
        .selectinload(Company.automation_rules),
    )

    def per_request(options: tuple[Any, ...]) -> Callable[[list[int]], Awaitable[int]]:
        async def run(ids: list[int]) -> int:
            total = 0
            for cid in ids:
                async with factory() as s:
                    stmt = select(Conversation).where(Conversation.id == cid).options(*options)
                    conversation = (await s.scalars(stmt)).unique().one()
                    total += len(conversation.contact.company.automation_rules)
            return total

        return run

    hand_opts = (
        joinedload(Conversation.contact, innerjoin=True)
        .joinedload(Contact.company, innerjoin=True)
        .selectinload(Company.automation_rules),
    )

    async def all_at_once(ids: list[int], options: tuple[Any, ...]) -> int:
        async with factory() as s:
            stmt = select(Conversation).where(Conversation.id.in_(ids)).options(*options)
            conversations = (await s.scalars(stmt)).all()
            return sum(len(c.contact.company.automation_rules) for c in conversations)

    async def hand_tuned(ids: list[int]) -> int:
        return await all_at_once(ids, hand_opts)

    async def auto(ids: list[int]) -> int:
        return await all_at_once(ids, eager(Conversation, "contact.company.automation_rules"))

    async def batched(ids: list[int]) -> int:
        options = eager(Conversation, "contact.company.automation_rules")
        async with loader_by_id(factory, Conversation, options=options) as conversations:

            async def handle(cid: int) -> int:  # one "request"
                conversation = await conversations.load(cid)
                assert conversation is not None
                return len(conversation.contact.company.automation_rules)

            return sum(await pk.gather(*(handle(cid) for cid in ids)))

    async def reads(ids: list[int]) -> int:  # one statement per id: the guard's worst case
        async with factory() as s:
            total = 0
            for cid in ids[:READS]:
                stmt = select(Conversation.contact_id).where(Conversation.id == cid)
                total += await s.scalar(stmt) or 0
            return total

    async def reads_unguarded(ids: list[int]) -> int:
        was_on = guard_sessions(False)
        try:
            return await reads(ids)
        finally:
            guard_sessions(was_on)

    return {
        "naive (4 round trips each)": naive,
        "per-request joinedload": per_request(joined_opts),
        "per-request selectinload": per_request(selectin_opts),
        "hand-tuned JOIN + selectin": hand_tuned,
        "eager(...) auto": auto,
        "loader_by_id, 500 callers": batched,
        GUARD_ON: reads,
        GUARD_OFF: reads_unguarded,
    }


READS = 200
GUARD_ON, GUARD_OFF = f"{READS} one-row reads, guard on", f"{READS} one-row reads, guard off"


SLOW = {"naive (4 round trips each)", "per-request joinedload", "per-request selectinload"}


async def measure(engine: AsyncEngine, quick: bool) -> dict[str, dict[str, float]]:
    factory = async_sessionmaker(engine, expire_on_commit=False)
    runs = contenders(factory)
    ids = list(range(1, N + 1))
    out: dict[str, dict[str, float]] = {}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    checksums: dict[bool, int] = {}  # the graph loaders agree, and so do the two read loops
    for name, fn in runs.items():  # warm-up: statement caches, pool; count queries
        async with count_queries(engine) as counter:
            seen = await fn(ids)
        expected = checksums.setdefault(name in (GUARD_ON, GUARD_OFF), seen)
        assert seen == expected, (name, seen, expected)
        out[name] = {"queries": counter.count}
    fast_repeat, slow_repeat = (15, 1) if quick else (41, 3)
    for round_ in range(fast_repeat):  # interleaved rounds: noise hits everyone alike
        for name, fn in runs.items():
            if name in SLOW and round_ >= slow_repeat:
                continue
            started = time.perf_counter()
            await fn(ids)
            samples[name].append(time.perf_counter() - started)
    for name, values in samples.items():
        out[name]["ms"] = statistics.median(values) * 1000
        out[name]["repeat"] = len(values)
    return out


# ------------------------------------------------------------------ databases
def sqlite_engine(tmp: Path) -> AsyncEngine:
    path = tmp / "crm.sqlite3"
    sync = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(sync)
    with Session(sync) as session:
        seed_sync(session, **SIZES)
    sync.dispose()
    return create_async_engine(f"sqlite+aiosqlite:///{path}")


def pg_url(database: str | None) -> str | None:
    if database and database.startswith("postgres"):
        scheme, rest = database.split("://", 1)
        return f"postgresql+asyncpg://{rest}" if "+" not in scheme else database
    return None  # no server unless --database names one (the main job is SQLite only)


async def run_pg(url: str, quick: bool) -> dict[str, dict[str, float]]:
    schema = f"pk_bench_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(url)
    async with admin.begin() as conn:
        await conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    engine = create_async_engine(url, connect_args={"server_settings": {"search_path": schema}})
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with async_sessionmaker(engine)() as session:
            await seed(session, **SIZES)
        return await measure(engine, quick)
    finally:
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.dispose()


async def run_sqlite(quick: bool) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        engine = sqlite_engine(Path(tmp))
        try:
            return await measure(engine, quick)
        finally:
            await engine.dispose()


def targets_for(db: str, r: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    auto, hand = r["eager(...) auto"], r["hand-tuned JOIN + selectin"]
    naive = r["naive (4 round trips each)"]
    return [
        target(f"{db}: eager queries", auto["queries"], 2),
        target(f"{db}: eager ms / hand-tuned ms", auto["ms"] / hand["ms"], 1.2),
        target(f"{db}: naive ms / eager ms", naive["ms"] / auto["ms"], 50, below=False),
        target(f"{db}: loader_by_id queries", r["loader_by_id, 500 callers"]["queries"], 2),
        target(f"{db}: session guard on / off", r[GUARD_ON]["ms"] / r[GUARD_OFF]["ms"], 1.05),
    ]


def run(*, quick: bool, database: str | None) -> dict[str, Any]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    results["sqlite"] = asyncio.run(run_sqlite(quick))
    url = pg_url(database)
    if url is not None:
        try:
            results["postgresql"] = asyncio.run(run_pg(url, quick))
        except OSError as exc:  # a server that answered the probe but refused us
            print(f"PostgreSQL skipped: {exc}")
    else:
        print("PostgreSQL not run: no --database given")
    names = list(results["sqlite"])
    headers = ["contender"] + [f"{db} {col}" for db in results for col in ("queries", "ms")]
    rows = [
        [name]
        + [v for db in results for v in (results[db][name]["queries"], results[db][name]["ms"])]
        for name in names
    ]
    print(table(headers, rows))
    targets = [t for db, r in results.items() for t in targets_for(db, r)]
    print_targets(targets)
    return {"conversations": N, "results": results, "targets": targets}
