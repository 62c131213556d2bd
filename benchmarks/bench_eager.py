"""Eager loading: the seed's webhook graph (conversation -> contact -> company -> rules).

Three comparisons, each like for like, all on the same database in one run,
interleaved and repeated:

* **per request**: 500 requests one after another, each loading *one*
  conversation's graph. parallelkit (``eager`` in a ``select``; ``eager_get``)
  against the seed's four sequential queries and two hand-written SQLAlchemy
  versions (one statement, every hop joined; joins + ``selectinload``). The
  floor is the faster of the two hand-written ones, measured in the same round.
* **one request, 500 conversations**: ``eager`` against the hand-tuned
  ``joinedload(innerjoin) + selectinload`` chain (the floor).
* **across requests**: 500 concurrent requests, each wanting one conversation.
  Batching them is a different design (it trades latency for statements), so it
  is its own section: ``loader_by_id`` against a hand-written batcher (ids
  collected in one event-loop tick, one ``IN`` query; no parallelkit) as the
  floor, and unbatched per-request loading for reference.

Every contender returns the number of automation rules it saw; the expected
number is computed independently with one plain SQL statement, and each row's
``correct`` is that comparison. And the price of the session guard
(``guard_sessions``, opt-in): 200 one-row reads with it on and off, interleaved.

Sizes: 500 requests and conversations, 200 reads, 21 rounds with ``--full``; the
main job measures the same contenders and checks on 20 requests, 60 conversations,
50 reads, 3 rounds (:data:`QUICK`), to stay within its share of the minute.

SQLite (aiosqlite, a temporary file) always; PostgreSQL (asyncpg, a temporary
schema) only when ``--database`` is a PostgreSQL URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from examples.crm import AutomationRule, Base, Company, Contact, Conversation, seed, seed_sync
from sqlalchemy import bindparam, create_engine, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, joinedload

from parallelkit.sqlalchemy import eager, eager_get, guard_sessions, loader_by_id

from ._util import EngineStatements, print_targets, run_async, table, target

TITLE = "eager(): the webhook graph per request, per batch and across requests, vs hand-written"

SIZES = {"companies": 10, "contacts_per_company": 10, "conversations_per_contact": 5}
N = 500
READS = 200


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much each section does, and the timed rounds after the warm-up."""

    requests: int  # per request: requests one after another
    n: int  # one request, across requests: conversations
    reads: int  # session guard: one-row reads
    repeat: int
    unbatched_every_round: bool  # else timed in the first fifth of the rounds, like naive


FULL = Sizes(requests=N, n=N, reads=READS, repeat=21, unbatched_every_round=True)
QUICK = Sizes(requests=20, n=60, reads=50, repeat=3, unbatched_every_round=False)
WEBHOOK = "contact.company.automation_rules"

Run = Callable[[list[int]], Awaitable[int]]


# ------------------------------------------------------------------ contenders
def per_request(factory: async_sessionmaker[Any]) -> dict[str, Run]:
    """One conversation per request, requests one after another."""

    async def naive(ids: list[int]) -> int:  # the seed's processWebhookSlow
        total = 0
        for cid in ids:
            async with factory() as s:
                conversation = await s.get_one(Conversation, cid)
                contact = await s.get_one(Contact, conversation.contact_id)
                company = await s.get_one(Company, contact.company_id)
                stmt = select(AutomationRule).where(AutomationRule.company_id == company.id)
                total += len((await s.scalars(stmt)).all())
        return total

    def by_select(*options: Any) -> Run:
        async def run(ids: list[int]) -> int:
            total = 0
            for cid in ids:
                async with factory() as s:
                    stmt = select(Conversation).where(Conversation.id == cid).options(*options)
                    conversation = (await s.scalars(stmt)).unique().one()
                    total += len(conversation.contact.company.automation_rules)
            return total

        return run

    async def by_eager_get(ids: list[int]) -> int:
        total = 0
        for cid in ids:
            async with factory() as s:
                conversation = await eager_get(s, Conversation, cid, WEBHOOK)
                assert conversation is not None
                total += len(conversation.contact.company.automation_rules)
        return total

    all_joined = (
        joinedload(Conversation.contact, innerjoin=True)
        .joinedload(Contact.company, innerjoin=True)
        .joinedload(Company.automation_rules),
    )
    joined_selectin = (
        joinedload(Conversation.contact, innerjoin=True)
        .joinedload(Contact.company, innerjoin=True)
        .selectinload(Company.automation_rules),
    )
    return {
        "naive: 4 round trips": naive,
        HAND_ONE: by_select(*all_joined),
        HAND_TWO: by_select(*joined_selectin),
        "eager(...) in a select": by_select(*eager(Conversation, WEBHOOK)),
        EAGER_GET: by_eager_get,
    }


HAND_ONE, HAND_TWO = "hand: all joined (1 stmt)", "hand: joined + selectin (2 stmts)"
EAGER_GET = "eager_get (1 stmt)"


def one_request(factory: async_sessionmaker[Any]) -> dict[str, Run]:
    """All the conversations (500 with ``--full``) in one request."""

    def run(*options: Any) -> Run:
        async def go(ids: list[int]) -> int:
            async with factory() as s:
                stmt = select(Conversation).where(Conversation.id.in_(ids)).options(*options)
                conversations = (await s.scalars(stmt)).all()
                return sum(len(c.contact.company.automation_rules) for c in conversations)

        return go

    hand = (
        joinedload(Conversation.contact, innerjoin=True)
        .joinedload(Contact.company, innerjoin=True)
        .selectinload(Company.automation_rules),
    )
    return {HAND_BATCH: run(*hand), "eager(...) auto": run(*eager(Conversation, WEBHOOK))}


HAND_BATCH = "hand-tuned joinedload + selectinload"


def across_requests(factory: async_sessionmaker[Any]) -> dict[str, Run]:
    """One concurrent request per conversation (500 with ``--full``)."""
    hand = (
        joinedload(Conversation.contact, innerjoin=True)
        .joinedload(Contact.company, innerjoin=True)
        .selectinload(Company.automation_rules),
    )

    async def unbatched(ids: list[int]) -> int:
        async def handle(cid: int) -> int:
            async with factory() as s:
                stmt = select(Conversation).where(Conversation.id == cid).options(*hand)
                conversation = (await s.scalars(stmt)).one()
                return len(conversation.contact.company.automation_rules)

        return sum(await asyncio.gather(*(handle(cid) for cid in ids)))

    async def hand_batched(ids: list[int]) -> int:  # a DataLoader written by hand
        pending: dict[int, asyncio.Future[Conversation]] = {}
        loop = asyncio.get_running_loop()

        async def flush() -> None:
            batch = dict(pending)
            pending.clear()
            async with factory() as s:
                stmt = select(Conversation).where(Conversation.id.in_(list(batch)))
                for row in (await s.scalars(stmt.options(*hand))).all():
                    batch.pop(row.id).set_result(row)

        async def load(cid: int) -> Conversation:
            if not pending:
                loop.call_soon(lambda: flushes.append(loop.create_task(flush())))
            future = pending.setdefault(cid, loop.create_future())
            return await future

        flushes: list[asyncio.Task[None]] = []

        async def handle(cid: int) -> int:
            return len((await load(cid)).contact.company.automation_rules)

        counts = await asyncio.gather(*(handle(cid) for cid in ids))
        await asyncio.gather(*flushes)
        return sum(counts)

    async def batched(ids: list[int]) -> int:
        options = eager(Conversation, WEBHOOK)
        async with loader_by_id(factory, Conversation, options=options) as conversations:

            async def handle(cid: int) -> int:
                conversation = await conversations.load(cid)
                assert conversation is not None
                return len(conversation.contact.company.automation_rules)

            return sum(await asyncio.gather(*(handle(cid) for cid in ids)))

    return {
        UNBATCHED: unbatched,
        HAND_BATCHER: hand_batched,
        "loader_by_id": batched,
    }


HAND_BATCHER, UNBATCHED = "hand-written batcher", "unbatched: one select each"


def guard(factory: async_sessionmaker[Any]) -> dict[str, Run]:
    async def reads(ids: list[int]) -> int:  # one statement per id: the guard's worst case
        async with factory() as s:
            total = 0
            for cid in ids:
                stmt = select(Conversation.contact_id).where(Conversation.id == cid)
                total += await s.scalar(stmt) or 0
            return total

    def with_guard(on: bool) -> Run:
        async def run(ids: list[int]) -> int:
            was_on = guard_sessions(on)
            try:
                return await reads(ids)
            finally:
                guard_sessions(was_on)

        return run

    return {GUARD_ON: with_guard(True), GUARD_OFF: with_guard(False)}


GUARD_ON, GUARD_OFF = "one-row reads, guard on", "one-row reads, guard off"


# ------------------------------------------------------------------ measuring
async def expected(engine: AsyncEngine, ids: dict[str, list[int]]) -> dict[str, int]:
    """Each section's right answer for its ids, from plain SQL (no ORM, no loader options)."""
    rules = text(
        "SELECT count(*) FROM conversations AS c JOIN contacts AS p ON p.id = c.contact_id "
        "JOIN automation_rules AS r ON r.company_id = p.company_id WHERE c.id IN :ids"
    ).bindparams(bindparam("ids", expanding=True))
    contacts = text("SELECT sum(contact_id) FROM conversations WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True)
    )
    async with engine.connect() as conn:
        return {
            section: int(
                (
                    await conn.execute(
                        contacts if section == "session guard" else rules, {"ids": xs}
                    )
                ).scalar_one()
            )
            for section, xs in ids.items()
        }


SECTIONS = ("per request", "one request", "across requests", "session guard")


async def measure(engine: AsyncEngine, sizes: Sizes) -> dict[str, dict[str, dict[str, Any]]]:
    factory = async_sessionmaker(engine, expire_on_commit=False)
    sections = {
        "per request": per_request(factory),
        "one request": one_request(factory),
        "across requests": across_requests(factory),
        "session guard": guard(factory),
    }
    ids = {
        "per request": list(range(1, sizes.requests + 1)),
        "one request": list(range(1, sizes.n + 1)),
        "across requests": list(range(1, sizes.n + 1)),
        "session guard": list(range(1, sizes.reads + 1)),
    }
    answers = await expected(engine, ids)
    out: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in sections}
    samples: dict[tuple[str, str], list[float]] = {}
    for section, runs in sections.items():  # warm-up: caches, pool; statements; correctness
        for name, fn in runs.items():
            with EngineStatements(engine) as counter:  # a plain event: not parallelkit's
                seen = await fn(ids[section])
            out[section][name] = {"queries": counter.count, "correct": seen == answers[section]}
            samples[section, name] = []
    repeat = sizes.repeat
    # references no target reads: timed in the first fifth of the rounds only
    slow = {("per request", "naive: 4 round trips")}
    if not sizes.unbatched_every_round:
        slow.add(("across requests", UNBATCHED))
    for round_ in range(repeat):  # interleaved rounds: noise hits everyone alike
        for section, runs in sections.items():
            # every other round in reverse: no contender always runs first after the
            # previous section (a pool or a server still busy with its work)
            contenders = list(runs.items())
            for name, fn in contenders[:: -1 if round_ % 2 else 1]:
                if (section, name) in slow and round_ >= max(1, repeat // 5):
                    continue
                started = time.perf_counter()
                seen = await fn(ids[section])
                samples[section, name].append(time.perf_counter() - started)
                if seen != answers[section]:  # every timed run checked, not only the first
                    out[section][name]["correct"] = False
    for (section, name), values in samples.items():
        row = out[section][name]
        row["ms"] = statistics.median(values) * 1000
        row["min_ms"], row["max_ms"] = min(values) * 1000, max(values) * 1000
        row["repeat"] = len(values)
    return out


# ------------------------------------------------------------------ databases
def sqlite_engine(tmp: Path) -> AsyncEngine:
    """The seeded CRM in a SQLite file under ``tmp`` (shared with bench_peers)."""
    path = tmp / "crm.sqlite3"
    sync = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(sync)
    with Session(sync) as session:
        seed_sync(session, **SIZES)
    sync.dispose()
    return create_async_engine(f"sqlite+aiosqlite:///{path}")


async def run_sqlite(sizes: Sizes) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        engine = sqlite_engine(Path(tmp))
        try:
            return await measure(engine, sizes)
        finally:
            await engine.dispose()


@contextlib.asynccontextmanager
async def seeded_pg(url: str) -> AsyncIterator[AsyncEngine]:
    """The seeded CRM on PostgreSQL, in a schema of its own, dropped afterwards."""
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
        yield engine
    finally:
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.dispose()


async def run_pg(url: str, sizes: Sizes) -> dict[str, Any]:
    async with seeded_pg(url) as engine:
        return await measure(engine, sizes)


def pg_url(database: str | None) -> str | None:
    """PostgreSQL only when asked for with ``--database postgresql://...``."""
    if not database or not database.startswith("postgres"):
        return None
    scheme, rest = database.split("://", 1)
    return f"postgresql+asyncpg://{rest}" if "+" not in scheme else database


def wrong_for(db: str, r: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Every contender whose answer differed from plain SQL's: a wrong result fails the run."""
    return [
        f"{db}: {section}: {name} gave a wrong answer"
        for section, rows in r.items()
        for name, row in rows.items()
        if not row["correct"]
    ]


def targets_for(
    db: str, r: dict[str, dict[str, dict[str, Any]]], requests: int = N
) -> list[dict[str, Any]]:
    per, one, across = r["per request"], r["one request"], r["across requests"]
    floor = min(per[HAND_ONE]["ms"], per[HAND_TWO]["ms"])
    guard_rows = r["session guard"]
    correct = all(row["correct"] for section in r.values() for row in section.values())
    return [
        target(f"{db}: every contender's answer is correct", float(correct), 1, below=False),
        target(f"{db}: eager_get statements per request", per[EAGER_GET]["queries"] / requests, 1),
        target(
            f"{db}: per request, eager_get / hand-written floor", per[EAGER_GET]["ms"] / floor, 1.2
        ),
        target(f"{db}: one request, eager statements", one["eager(...) auto"]["queries"], 2),
        target(
            f"{db}: one request, eager / hand-tuned",
            one["eager(...) auto"]["ms"] / one[HAND_BATCH]["ms"],
            1.2,
        ),
        # one batch for all the concurrent requests: as many statements as the
        # hand-written batcher's one batch (an IN query per hop the graph needs: 2)
        target(
            f"{db}: across requests, loader_by_id statements / hand-written batcher's",
            across["loader_by_id"]["queries"] / across[HAND_BATCHER]["queries"],
            1,
        ),
        target(
            f"{db}: across requests, loader_by_id / hand-written batcher",
            across["loader_by_id"]["ms"] / across[HAND_BATCHER]["ms"],
            1.2,
        ),
        target(
            f"{db}: session guard on / off",
            guard_rows[GUARD_ON]["ms"] / guard_rows[GUARD_OFF]["ms"],
            1.05,
        ),
    ]


def run(*, quick: bool, database: str | None) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    results: dict[str, Any] = {"sqlite": run_async(run_sqlite(sizes))}
    url = pg_url(database)
    if url is not None:
        results["postgresql"] = run_async(run_pg(url, sizes))
    else:
        print("PostgreSQL: not asked for (--database postgresql://...)")
    print(
        f"per request: {sizes.requests} requests one after another; one request: "
        f"{sizes.n} conversations; across requests: {sizes.n} concurrent requests; session "
        f"guard: {sizes.reads} one-row reads. Median of {sizes.repeat} interleaved rounds (each "
        "section's contenders in reverse order every other round) after a warm-up (the naive "
        "reference"
        + ("" if sizes.unbatched_every_round else " and the unbatched one")
        + ": the first fifth of them)"
        + (
            f"; quick sizes (--full: {FULL.requests} requests, {FULL.n} conversations, "
            f"{FULL.reads} reads, {FULL.repeat} rounds)"
            if quick
            else ""
        )
        + "."
    )
    headers = ["section", "contender"] + [
        f"{db} {col}" for db in results for col in ("stmts", "ms", "ok")
    ]
    rows = []
    for section in SECTIONS:
        for name in results["sqlite"][section]:
            row: list[Any] = [section, name]
            for db in results:
                cell = results[db][section][name]
                row += [cell["queries"], cell["ms"], "yes" if cell["correct"] else "NO"]
            rows.append(row)
    print(table(headers, rows))
    print(
        "floors: per request, the faster of the two hand-written selects; one request, the "
        "hand-tuned joinedload + selectinload chain; across requests, a hand-written batcher "
        "(ids gathered in one loop tick, one IN query). None uses parallelkit."
    )
    targets = [t for db, r in results.items() for t in targets_for(db, r, sizes.requests)]
    print_targets(targets)
    wrong = [w for db, r in results.items() for w in wrong_for(db, r)]
    return {
        "wrong": wrong,
        "requests": sizes.requests,
        "conversations": sizes.n,
        "reads": sizes.reads,
        "rounds": sizes.repeat,
        "results": results,
        "targets": targets,
    }
