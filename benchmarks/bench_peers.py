"""Peer loading: 500 conversations x 3 hops, when the path is only known in the loop.

Workload: every conversation of the seeded CRM (10 companies x 10 contacts x 5
conversations = 500), and for each one its ``contact.company.automation_rules``
(many-to-one, many-to-one, one-to-many). Contenders, same database, one run,
interleaved rounds, each in a fresh ``AsyncSession``:

* ``fetch_peers()`` + ``await load(conversation, path)`` per row;
* ``fetch_peers()`` + plain attribute access inside ``AsyncSession.run_sync``;
* ``eager(Conversation, path)``: the path known up front (the lower bound in
  statements: 2);
* naive lazy loading: plain attribute access inside ``run_sync`` without the
  option (SQLAlchemy's lazy loader: one statement per distinct related object);
* ``awaitable_attrs``: ``await obj.awaitable_attrs.contact`` and so on, hop by hop
  (the CRM models do not mix in ``AsyncAttrs``; its ``awaitable_attrs`` property is
  applied to them directly: the very code ``obj.awaitable_attrs.x`` runs).

Every contender returns the rule ids per conversation; ``correct`` compares every
run's answer with the truth computed in plain SQL (:func:`expected`: no ORM, no
parallelkit), and a wrong answer fails the run. Statements are counted with a plain
SQLAlchemy event, not with parallelkit.

And the price of the ``do_orm_execute`` listener that ``fetch_peers()`` registers
process-wide on first use: 200 one-row reads (a query without the option) with the
listener registered and removed, interleaved; and one 500-row query with and
without ``fetch_peers()`` (what recording the group costs).

SQLite (aiosqlite, a temporary file) always; PostgreSQL (asyncpg, a temporary
schema) only when ``--database`` is a PostgreSQL URL.

Rounds: 31 (the lazy and ``awaitable_attrs`` contenders, 7) and 200 reads with
``--full``; the main job times 6 rounds (3), 50 reads (:data:`QUICK`).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from examples.crm import Conversation
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from parallelkit.sqlalchemy import _peers_events, eager, fetch_peers, load

from ._util import EngineStatements, print_targets, run_async, table, target
from .bench_eager import pg_url, seeded_pg, sqlite_engine

TITLE = "fetch_peers + load: 500 conversations x 3 hops vs eager, lazy loading, awaitable_attrs"

PATH = "contact.company.automation_rules"
N = 500
READS = 200
Answer = list[list[int]]


@dataclass(frozen=True, slots=True)
class Sizes:
    """Timed rounds (all contenders; the slow ones), one-row reads, fast-path calls."""

    repeat: int
    slow_repeat: int
    reads: int
    calls: int


FULL = Sizes(repeat=31, slow_repeat=7, reads=READS, calls=20_000)
QUICK = Sizes(repeat=6, slow_repeat=3, reads=50, calls=10_000)

PEERS_LOAD = "fetch_peers + load()"
PEERS_SYNC = "fetch_peers + attribute access (run_sync)"
EAGER = "eager(...) (path known up front)"
LAZY = "naive lazy loading (run_sync)"
AWAITABLE = "awaitable_attrs, hop by hop"
LISTENER_ON, LISTENER_OFF = "one-row reads, listener on", "one-row reads, listener off"
QUERY_PEERS, QUERY_PLAIN = "500-row query with fetch_peers()", "500-row query without"
SLOW = {LAZY, AWAITABLE}


def rule_ids(conversation: Any) -> list[int]:
    return [rule.id for rule in conversation.contact.company.automation_rules]


def awaitable(obj: object) -> Any:
    return AsyncAttrs.awaitable_attrs.__get__(obj)  # what `obj.awaitable_attrs` returns


# ------------------------------------------------------------------ contenders
def contenders(engine: AsyncEngine, n_reads: int) -> dict[str, Callable[[], Awaitable[Any]]]:
    everything = select(Conversation).order_by(Conversation.id)

    async def peers_load() -> Answer:
        async with AsyncSession(engine) as session:
            rows = (await session.scalars(everything.options(fetch_peers()))).all()
            return [[rule.id for rule in await load(c, PATH)] for c in rows]

    async def peers_sync() -> Answer:
        async with AsyncSession(engine) as session:
            rows = (await session.scalars(everything.options(fetch_peers()))).all()
            return await session.run_sync(lambda _: [rule_ids(c) for c in rows])

    async def eager_loaded() -> Answer:
        async with AsyncSession(engine) as session:
            rows = (await session.scalars(everything.options(*eager(Conversation, PATH)))).all()
            return [rule_ids(c) for c in rows]

    async def lazy() -> Answer:
        async with AsyncSession(engine) as session:
            rows = (await session.scalars(everything)).all()
            return await session.run_sync(lambda _: [rule_ids(c) for c in rows])

    async def awaitable_attrs() -> Answer:
        async with AsyncSession(engine) as session:
            out = []
            for c in (await session.scalars(everything)).all():
                contact = await awaitable(c).contact
                company = await awaitable(contact).company
                out.append([rule.id for rule in await awaitable(company).automation_rules])
            return out

    async def reads() -> int:  # one statement per id: the listener's fast path
        async with AsyncSession(engine) as session:
            total = 0
            for cid in range(1, n_reads + 1):
                row = await session.scalar(select(Conversation).where(Conversation.id == cid))
                total += row.contact_id if row is not None else 0
            return total

    async def reads_without_listener() -> int:
        with listener_removed():
            return await reads()

    async def query(options: tuple[Any, ...]) -> int:
        async with AsyncSession(engine) as session:
            return len((await session.scalars(everything.options(*options))).all())

    async def query_peers() -> int:
        return await query((fetch_peers(),))

    async def query_plain() -> int:
        return await query(())

    return {
        PEERS_LOAD: peers_load,
        PEERS_SYNC: peers_sync,
        EAGER: eager_loaded,
        LAZY: lazy,
        AWAITABLE: awaitable_attrs,
        LISTENER_ON: reads,
        LISTENER_OFF: reads_without_listener,
        QUERY_PEERS: query_peers,
        QUERY_PLAIN: query_plain,
    }


@contextlib.contextmanager
def listener_removed() -> Any:
    """Take the fetch_peers listener off ``Session`` for the block (measurement only)."""
    fn = _peers_events._on_execute
    event.remove(Session, "do_orm_execute", fn)
    try:
        yield
    finally:
        event.listen(Session, "do_orm_execute", fn)


async def expected(engine: AsyncEngine, n_reads: int) -> dict[str, Any]:
    """Each contender's right answer, from plain SQL (no ORM, no loader option, no
    parallelkit): the rule ids of each conversation, the one-row reads' sum of
    contact ids, the 500-row query's row count."""
    async with engine.connect() as conn:
        ids = list((await conn.execute(text("SELECT id FROM conversations ORDER BY id"))).scalars())
        pairs = (
            await conn.execute(
                text(
                    "SELECT c.id, r.id FROM conversations AS c "
                    "JOIN contacts AS p ON p.id = c.contact_id "
                    "JOIN automation_rules AS r ON r.company_id = p.company_id ORDER BY c.id, r.id"
                )
            )
        ).all()
        reads = (
            await conn.execute(
                text("SELECT coalesce(sum(contact_id), 0) FROM conversations WHERE id <= :n"),
                {"n": n_reads},
            )
        ).scalar_one()
    rules: dict[int, list[int]] = {cid: [] for cid in ids}
    for cid, rid in pairs:
        rules[cid].append(rid)
    answer = [rules[cid] for cid in ids]
    return {
        **dict.fromkeys((PEERS_LOAD, PEERS_SYNC, EAGER, LAZY, AWAITABLE), answer),
        **dict.fromkeys((LISTENER_ON, LISTENER_OFF), int(reads)),
        **dict.fromkeys((QUERY_PEERS, QUERY_PLAIN), len(ids)),
    }


async def measure(engine: AsyncEngine, sizes: Sizes) -> dict[str, dict[str, Any]]:
    truth = await expected(engine, sizes.reads)
    fetch_peers()  # the listener is registered from here on, for every contender alike
    runs = contenders(engine, sizes.reads)
    out: dict[str, dict[str, Any]] = {}
    for name, fn in runs.items():  # warm-up: statement caches, pool; count statements
        with EngineStatements(engine) as counter:  # a plain event: not parallelkit's
            answer = await fn()
        out[name] = {"queries": counter.count, "correct": answer == truth[name]}
    fast_repeat, slow_repeat = sizes.repeat, sizes.slow_repeat
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(fast_repeat):  # interleaved rounds: noise hits everyone alike
        for name, fn in runs.items():
            if name in SLOW and round_ >= slow_repeat:
                continue
            started = time.perf_counter()
            answer = await fn()
            samples[name].append(time.perf_counter() - started)
            if answer != truth[name]:  # every timed run checked, not only the first
                out[name]["correct"] = False
    for name, values in samples.items():
        out[name]["ms"] = statistics.median(values) * 1000
        out[name]["min_ms"] = min(values) * 1000
        out[name]["max_ms"] = max(values) * 1000
        out[name]["repeat"] = len(values)
    for a, b in (
        (PEERS_LOAD, EAGER),
        (LAZY, PEERS_LOAD),
        (AWAITABLE, PEERS_LOAD),
        (LISTENER_ON, LISTENER_OFF),
        (QUERY_PEERS, QUERY_PLAIN),
    ):
        pairs = zip(samples[a], samples[b], strict=False)  # same rounds: a paired ratio
        out[a][f"/ {b}"] = statistics.median(x / y for x, y in pairs)
    out[LISTENER_ON]["reads"] = out[LISTENER_OFF]["reads"] = sizes.reads
    out[LISTENER_ON]["fast_path_us"] = await fast_path_cost(engine, sizes.calls)
    return out


async def fast_path_cost(engine: AsyncEngine, n: int = 20_000) -> dict[str, float]:
    """The listener's own cost per statement, timed on captured ``ORMExecuteState``s.

    One SELECT and one lazy load (plain, not from a group): what every statement of
    a program that never asked for peers pays once ``fetch_peers()`` was used.
    """
    captured: list[Any] = []
    capture = captured.append
    async with AsyncSession(engine) as session:
        sync = session.sync_session
        event.listen(sync, "do_orm_execute", capture)
        try:
            row = await session.scalar(select(Conversation).where(Conversation.id == 1))
            await session.run_sync(lambda _: row.contact if row is not None else None)
        finally:
            event.remove(sync, "do_orm_execute", capture)
    select_state, lazy_state = captured[0], captured[-1]
    assert lazy_state.lazy_loaded_from is not None
    out = {}
    for name, state in (("select", select_state), ("lazy load", lazy_state)):
        assert _peers_events._on_execute(state) is None  # the fast path: SQLAlchemy proceeds
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n):
                _peers_events._on_execute(state)
            timings.append((time.perf_counter() - started) / n * 1e6)
        out[name] = statistics.median(timings)
    return out


# ------------------------------------------------------------------ databases
@contextlib.asynccontextmanager
async def seeded_sqlite() -> AsyncIterator[AsyncEngine]:
    with tempfile.TemporaryDirectory() as tmp:
        engine = sqlite_engine(Path(tmp))
        try:
            yield engine
        finally:
            await engine.dispose()


async def measure_on(
    database: contextlib.AbstractAsyncContextManager[AsyncEngine], sizes: Sizes
) -> dict[str, dict[str, Any]]:
    async with database as engine:
        return await measure(engine, sizes)


def targets_for(db: str, r: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    on = r[LISTENER_ON]
    one_read_us = on["ms"] * 1000 / on.get("reads", READS)
    fast = max(on["fast_path_us"].values())
    return [
        target(
            f"{db}: fetch_peers + load statements (1 query + 3 hops)", r[PEERS_LOAD]["queries"], 4
        ),
        target(f"{db}: fetch_peers + run_sync statements", r[PEERS_SYNC]["queries"], 4),
        target(f"{db}: fetch_peers + load ms / eager ms", r[PEERS_LOAD][f"/ {EAGER}"], 2.0),
        target(
            f"{db}: lazy loading ms / fetch_peers + load ms",
            r[LAZY][f"/ {PEERS_LOAD}"],
            2,
            below=False,
        ),
        target(
            f"{db}: awaitable_attrs ms / fetch_peers + load ms",
            r[AWAITABLE][f"/ {PEERS_LOAD}"],
            2,
            below=False,
        ),
        target(f"{db}: listener fast path, us per statement", fast, 5),
        target(f"{db}: listener fast path / one one-row read", fast / one_read_us, 0.02),
        target(
            f"{db}: every contender correct",
            all(v["correct"] for v in r.values()),
            1,
            below=False,
        ),
    ]


def wrong_for(db: str, r: dict[str, dict[str, Any]]) -> list[str]:
    """Every contender whose answer differed from plain SQL's: a wrong result fails the run."""
    return [f"{db}: {name} gave a wrong answer" for name, v in r.items() if not v["correct"]]


def run(*, quick: bool, database: str | None) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    results: dict[str, dict[str, dict[str, Any]]] = {
        "sqlite": run_async(measure_on(seeded_sqlite(), sizes))
    }
    url = pg_url(database)
    if url is not None:
        try:
            results["postgresql"] = run_async(measure_on(seeded_pg(url), sizes))
        except OSError as exc:  # the server named with --database refused us
            print(f"PostgreSQL skipped: {exc}")
    else:
        print("PostgreSQL: not asked for (--database postgresql://...)")
    print(
        f"median of {sizes.repeat} interleaved rounds after a warm-up ({LAZY} and "
        f"{AWAITABLE}: {sizes.slow_repeat}); {sizes.reads} one-row reads"
        + (
            f" (quick sizes; --full: {FULL.repeat} rounds ({FULL.slow_repeat}), {FULL.reads} reads)"
            if quick
            else ""
        )
    )
    headers = ["contender"] + [
        f"{db} {col}" for db in results for col in ("statements", "ms", "range ms", "correct")
    ]
    rows = [
        [name]
        + [
            v
            for db in results
            for v in (
                results[db][name]["queries"],
                results[db][name]["ms"],
                f"{results[db][name]['min_ms']:.3g}-{results[db][name]['max_ms']:.3g}",
                results[db][name]["correct"],
            )
        ]
        for name in results["sqlite"]
    ]
    print(table(headers, rows))
    targets = [t for db, r in results.items() for t in targets_for(db, r)]
    print_targets(targets)
    chart = {
        "title": "500 conversations x 3 hops (ms, median)",
        "unit": "ms",
        "groups": {
            name: {db: results[db][name]["ms"] for db in results}
            for name in (PEERS_LOAD, PEERS_SYNC, EAGER, LAZY, AWAITABLE)
        },
    }
    return {
        "wrong": [w for db, r in results.items() for w in wrong_for(db, r)],
        "conversations": N,
        "rounds": sizes.repeat,
        "reads": sizes.reads,
        "path": PATH,
        "results": results,
        "targets": targets,
        "chart": chart,
    }
