"""End-to-end tests of the CRM database scenarios (webhook, payment, bulk, cache).

Each runs on SQLite and, with the ``postgres`` marker, on PostgreSQL, and checks
results *and* the statements sent (``parallelkit.sqlalchemy.count_queries``).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from examples.crm import bulk, cache, payment, webhook
from examples.crm.clients import StripeClient, WebhookClient, WebhookDelivery
from examples.crm.db import Database
from examples.crm.models import Cadence, Contact, Conversation, Enrollment
from examples.crm.seed import EPOCH, SeedSizes
from sqlalchemy import delete, func, or_, select

from parallelkit.sqlalchemy import NotLoadedError, count_queries, max_queries

from .crm_fixtures import DATABASES, SIZES, CountingSessions, EngineStatements, crm_database

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """SQLAlchemy's asyncio extension (AsyncSession, aiosqlite, asyncpg) runs on asyncio
    only, so these tests override conftest's asyncio + trio parametrization."""
    return "asyncio"


@pytest.fixture(params=DATABASES)
async def db(request: pytest.FixtureRequest) -> Any:
    async with crm_database(request, request.param) as database:
        yield database


# -- 3 webhook --------------------------------------------------------------------------------
async def test_webhook_loads_the_graph_in_two_statements(db: Database) -> None:
    assert db.summary is not None
    cid = db.summary.conversation_ids[17]
    results = {}
    counts = {}
    for fn in (
        webhook.load_webhook_context_sequential,
        webhook.load_webhook_context_one_join,
        webhook.load_webhook_context,
    ):
        async with db.sessions() as session, count_queries(db.engine) as counter:
            ctx = await fn(session, cid)
        counts[fn.__name__] = counter.count
        results[fn.__name__] = (
            ctx.conversation.id,
            ctx.contact.id,
            ctx.company.id,
            tuple(r.id for r in ctx.rules),
        )
    assert counts == {
        "load_webhook_context_sequential": 4,
        "load_webhook_context_one_join": 1,
        "load_webhook_context": 1,
    }
    assert len(set(results.values())) == 1  # all three load the same graph
    _, contact_id, company_id, rule_ids = results["load_webhook_context"]
    async with db.sessions() as session:
        contact = await session.get_one(Contact, contact_id)
        assert contact.company_id == company_id
    assert len(rule_ids) == SIZES.rules_per_company


async def test_webhook_guard_and_not_loaded(db: Database) -> None:
    assert db.summary is not None
    cid = db.summary.conversation_ids[3]
    async with db.sessions() as session, max_queries(db.engine, 1):
        ctx = await webhook.load_webhook_context(session, cid)
    async with db.sessions() as session, max_queries(db.engine, 1):
        actions = await webhook.process_webhook(
            session, {"conversation_id": cid, "event": ctx.rules[0].trigger}
        )
    with pytest.raises(NotLoadedError, match=r"Contact\.conversations"):
        _ = ctx.contact.conversations  # not asked for: an error, not a hidden query
    enabled = [r for r in ctx.rules if r.enabled and r.trigger == ctx.rules[0].trigger]
    assert actions == [f"{r.action}:{ctx.contact.email}" for r in enabled]


# -- 4 payment --------------------------------------------------------------------------------
def _clients() -> tuple[StripeClient, WebhookClient]:
    return StripeClient(latency=0.02), WebhookClient(latency=0.01)


async def _payment_row(db: Database, pid: str) -> payment.Payment | None:
    async with db.sessions() as session:
        return await session.scalar(
            select(payment.Payment).where(payment.Payment.payment_id == pid)
        )


class WitnessHooks(WebhookClient):
    """A webhook receiver that notes how many charges existed when each POST was made."""

    def __init__(self, stripe: StripeClient) -> None:
        super().__init__(latency=0.01)
        self.stripe = stripe
        self.charges_known: list[int] = []

    async def post(self, url: str, payload: dict[str, Any]) -> WebhookDelivery:
        self.charges_known.append(len(self.stripe.charges))
        return await super().post(url, payload)


async def test_seed_single_gather_is_a_race(db: Database) -> None:
    stripe = StripeClient(latency=0.02)
    hooks = WitnessHooks(stripe)
    charge, _row, delivery = await payment.process_payment_seed_gather(
        "p-race", 1999, stripe=stripe, webhooks=hooks, sessions=db.sessions
    )
    stored = await _payment_row(db, "p-race")
    assert stored is not None
    assert stored.stripe_charge_id is None  # the insert could not know charge.id
    assert charge.id.startswith("ch_")
    assert delivery.payload["charge_id"] is None
    assert hooks.charges_known == [0]  # announced while no charge existed yet

    # and when the charge fails, the row and the webhook are already out
    stripe.fail_next = 1
    with pytest.raises(ConnectionError):
        await payment.process_payment_seed_gather(
            "p-race-failed", 1999, stripe=stripe, webhooks=hooks, sessions=db.sessions
        )
    assert await _payment_row(db, "p-race-failed") is not None
    assert any(d.payload["payment_id"] == "p-race-failed" for d in hooks.deliveries)


async def test_payment_flow_waits_for_the_charge_and_overlaps_the_rest(db: Database) -> None:
    stripe = StripeClient(latency=0.02)
    hooks = WitnessHooks(stripe)
    async with count_queries(db.engine) as counter:
        result = await payment.process_payment(
            "p-flow", 1999, stripe=stripe, webhooks=hooks, sessions=db.sessions
        )
    assert counter.count == 1  # the INSERT (its RETURNING included)
    charge = result.get(payment.charge).unwrap()
    assert result.get(payment.record).unwrap().stripe_charge_id == charge.id
    stored = await _payment_row(db, "p-flow")
    assert stored is not None
    assert stored.stripe_charge_id == charge.id
    assert result.get(payment.notify).unwrap().payload["charge_id"] == charge.id
    assert hooks.charges_known == [1]  # announced once the charge existed
    tl = result.timeline
    assert tl["record"].start >= tl["charge"].end
    assert tl["notify"].start >= tl["charge"].end
    # record and notify overlap: both had started before either finished
    assert max(tl["record"].start, tl["notify"].start) < min(tl["record"].end, tl["notify"].end)


async def test_payment_flow_retries_the_charge_and_records_nothing_on_failure(
    db: Database,
) -> None:
    stripe, hooks = _clients()
    stripe.fail_next = 1  # one transient failure: retried
    result = await payment.process_payment(
        "p-retry", 500, stripe=stripe, webhooks=hooks, sessions=db.sessions
    )
    row, charged = result.get(payment.record).unwrap(), result.get(payment.charge).unwrap()
    assert row.stripe_charge_id == charged.id
    stripe.fail_next = 3  # every attempt fails: nothing recorded, nothing announced
    with pytest.raises(ConnectionError):
        await payment.process_payment(
            "p-down", 500, stripe=stripe, webhooks=hooks, sessions=db.sessions
        )
    assert await _payment_row(db, "p-down") is None
    assert not any(d.payload["payment_id"] == "p-down" for d in hooks.deliveries)


async def test_payment_flow_keeps_the_row_when_the_webhook_fails_at_once(db: Database) -> None:
    """The card is charged; the webhook fails while the INSERT is under way. Fail-fast,
    the failure cancelled the INSERT: a charged card with no row (the payment recipe
    calls this the mistake; the example ran it so). Settled, the row is stored and
    the webhook's error is raised, as itself."""
    reached = anyio.Event()

    class FailingHooks(WebhookClient):
        async def post(self, url: str, payload: dict[str, Any]) -> WebhookDelivery:
            await reached.wait()  # the INSERT has begun
            raise ConnectionError("webhook receiver down")

    def sessions() -> Any:
        session = db.sessions()

        class Entered:
            async def __aenter__(self) -> Any:
                reached.set()
                await anyio.lowlevel.checkpoint()  # the webhook fails here, the INSERT to come
                return await session.__aenter__()

            async def __aexit__(self, *exc: object) -> Any:
                return await session.__aexit__(*exc)

        return Entered()

    with pytest.raises(ConnectionError, match="webhook receiver down"):
        await payment.process_payment(
            "p-hook-down", 1999, stripe=StripeClient(latency=0), webhooks=FailingHooks(),
            sessions=sessions,
        )  # fmt: skip
    stored = await _payment_row(db, "p-hook-down")
    assert stored is not None
    assert stored.stripe_charge_id is not None


# -- 5 bulk -----------------------------------------------------------------------------------
async def _cadence(db: Database, company_id: int, index: int = 1) -> int:
    async with db.sessions() as session:
        ids = list(
            await session.scalars(
                select(Cadence.id).where(Cadence.company_id == company_id).order_by(Cadence.id)
            )
        )
    return ids[index]


async def _enrollments(db: Database, cadence_id: int) -> set[int]:
    async with db.sessions() as session:
        return set(
            await session.scalars(
                select(Enrollment.contact_id).where(Enrollment.cadence_id == cadence_id)
            )
        )


async def test_enroll_100_contacts_bounded_with_every_outcome(db: Database) -> None:
    assert db.summary is not None
    cadence_id = await _cadence(db, db.summary.company_ids[0])
    contacts = db.summary.contact_ids[:100]
    sessions = CountingSessions(db.sessions)
    async with count_queries(db.engine) as counter:
        outcomes = await bulk.enroll_contacts(sessions, cadence_id, contacts, limit=7)
    assert len(outcomes) == 100
    assert all(o.ok for o in outcomes)
    assert counter.count == 200  # look up + insert per contact
    assert sessions.peak <= 7  # one session per task, never more than the limit
    assert sessions.total == 100
    assert await _enrollments(db, cadence_id) == set(contacts)

    # idempotent: a second run only looks up (100 statements) and adds nothing
    async with count_queries(db.engine) as counter:
        again = await bulk.enroll_contacts(db.sessions, cadence_id, contacts, limit=7)
    assert counter.count == 100
    assert [o.unwrap() for o in again] == [o.unwrap() for o in outcomes]


async def test_enroll_retries_transient_errors(db: Database) -> None:
    assert db.summary is not None
    cadence_id = await _cadence(db, db.summary.company_ids[1])
    contacts = db.summary.contact_ids[:20]
    sessions = CountingSessions(db.sessions, fail_first=3)
    outcomes = await bulk.enroll_contacts(sessions, cadence_id, contacts, limit=5)
    assert all(o.ok for o in outcomes)
    assert sessions.total == 23  # 3 failed attempts were retried
    assert await _enrollments(db, cadence_id) == set(contacts)


async def test_set_based_enrollment_is_two_statements(db: Database) -> None:
    assert db.summary is not None
    cadence_id = await _cadence(db, db.summary.company_ids[2])
    contacts = db.summary.contact_ids[:100]
    async with count_queries(db.engine) as counter:
        added = await bulk.enroll_bulk(db.sessions, cadence_id, contacts)
    assert (added, counter.count) == (100, 2)
    assert await _enrollments(db, cadence_id) == set(contacts)


async def _expected_inactive(db: Database, company_id: int) -> int:
    """What detect_and_enroll_inactive should enroll, computed independently."""
    cadence_id = await _cadence(db, company_id, 0)
    cutoff = EPOCH - timedelta(days=21)
    async with db.sessions() as session:
        enrolled = set(
            await session.scalars(
                select(Enrollment.contact_id).where(Enrollment.cadence_id == cadence_id)
            )
        )
        inactive = set(
            await session.scalars(
                select(Contact.id).where(
                    Contact.company_id == company_id,
                    or_(Contact.last_contacted_at.is_(None), Contact.last_contacted_at < cutoff),
                )
            )
        )
    return min(len(inactive - enrolled), 100)


async def test_detect_50_companies_bounded_settled_and_counted(db: Database) -> None:
    assert db.summary is not None
    companies = db.summary.company_ids[:50]
    expected = {c: await _expected_inactive(db, c) for c in companies}
    sessions = CountingSessions(db.sessions)
    async with count_queries(db.engine) as counter:
        report = await bulk.detect_all(sessions, companies, limit=5)
    assert report.failed == {}
    assert report.enrolled_by_company == expected
    assert report.enrolled == sum(expected.values()) > 0
    with_inactive = sum(1 for n in expected.values() if n)
    assert counter.count == 2 * len(companies) + with_inactive  # 3 statements, 2 if none
    assert sessions.peak <= 5
    # a second run finds nobody new: 2 statements per company
    async with count_queries(db.engine) as counter:
        again = await bulk.detect_all(db.sessions, companies, limit=5)
    assert again.enrolled == 0
    assert counter.count == 2 * len(companies)


async def test_detect_reports_each_failure_and_keeps_the_rest(db: Database) -> None:
    assert db.summary is not None
    companies = db.summary.company_ids[:50]
    broken = companies[10]
    async with db.sessions() as session:
        cadences = select(Cadence.id).where(Cadence.company_id == broken)
        await session.execute(delete(Enrollment).where(Enrollment.cadence_id.in_(cadences)))
        await session.execute(delete(Cadence).where(Cadence.company_id == broken))
        await session.commit()

    # the seed's gather: one failing company throws every result away
    before = len(asyncio.all_tasks())
    with pytest.raises(bulk.NoCadenceError):
        await bulk.detect_all_seed_gather(db.sessions, companies)
    # ... and leaves its other tasks running, still writing: wait them out, or they
    # would hold SQLite's write lock against the run below
    while len(asyncio.all_tasks()) > before:
        await asyncio.sleep(0.01)

    expected = {c: await _expected_inactive(db, c) for c in companies if c != broken}
    report = await bulk.detect_all(db.sessions, companies, limit=10, retry=None)
    assert list(report.failed) == [broken]
    assert isinstance(report.failed[broken], bulk.NoCadenceError)
    assert set(report.enrolled_by_company) == set(expected)


@pytest.mark.slow
@pytest.mark.timeout(900)  # 15,000 statements: minutes when every core is busy
@pytest.mark.parametrize("kind", DATABASES)
async def test_detect_5000_companies(request: pytest.FixtureRequest, kind: str) -> None:
    sizes = SeedSizes(
        companies=5000,
        contacts_per_company=1,
        conversations_per_contact=1,
        rules_per_company=1,
        cadences_per_company=1,
    )
    async with crm_database(request, kind, sizes) as big:
        assert big.summary is not None
        sessions = CountingSessions(big.sessions)
        report = await bulk.detect_all(sessions, big.summary.company_ids, limit=10)
        assert report.failed == {}
        assert len(report.enrolled_by_company) == 5000
        assert sessions.peak <= 10
        async with big.sessions() as session:
            total = await session.scalar(select(func.count()).select_from(Enrollment))
        assert total == report.enrolled + big.summary.enrollment_count


# -- 6 cache ----------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_cache_no_db_call_while_fresh_one_refresh_when_stale(db: Database) -> None:
    assert db.summary is not None
    cid = db.summary.conversation_ids[5]
    clock = FakeClock()
    swr, get_conversation = cache.conversation_lookups(
        db.sessions, fresh=30, stale=300, clock=clock
    )
    async with swr:
        async with count_queries(db.engine) as counter:
            first = await get_conversation(cid)
        assert counter.count == 1
        assert first is not None
        assert first.id == cid

        async with count_queries(db.engine) as counter:
            for _ in range(100):
                assert await get_conversation(cid) == first
        assert counter.count == 0  # fresh: no database call at all

        async with db.sessions() as session:  # the row changes behind the cache
            row = await session.get_one(Conversation, cid)
            row.subject = "changed"
            await session.commit()
        clock.now += 60  # stale now
        with EngineStatements(db.engine) as sent:  # every statement, background ones too
            stale = [await get_conversation(cid) for _ in range(20)]
            assert all(v == first for v in stale)  # served at once, the old value
            with anyio.fail_after(60):  # a bound for a hang, not a timing
                while (refreshed := await get_conversation(cid)) == first:
                    await anyio.sleep(0.01)  # stale hits while the one refresh runs
        assert refreshed is not None
        assert refreshed.subject == "changed"
        assert swr.stats.refreshes == 1  # one refresh for every stale hit
        assert sent.count == 1  # ... and one statement

        # concurrent misses of a new key share one load
        other = db.summary.conversation_ids[6]
        with EngineStatements(db.engine) as sent:
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(get_conversation, other)
        assert sent.count == 1
    assert (swr.stats.loads, swr.stats.refreshes) == (2, 1)
