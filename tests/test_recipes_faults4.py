"""The recipe pages taken as a service author takes them: pasted, then changed.

Each test runs a page's own Python block (``page_namespace`` executes it as pasted,
without its closing ``anyio.run(main)``), then does what a user does next: swaps a
dependency for a failing, slow or lossy one, runs it twice, changes the sizes, and
checks a claim of the page's prose. Pages: docs/recipes/payment-flow.md,
bulk-enrollment.md, conversation-cache.md, webhook-eager.md, and the comparisons
of docs/coming-from/.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sys
import types
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

from .virtual_time import run_virtual

DOCS = Path(__file__).resolve().parent.parent / "docs"
BACKENDS = ["asyncio", "trio"]
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_modules = itertools.count()
_RUN = re.compile(r"^(anyio\.run\(main\)|asyncio\.run\(main\(\)\))\s*$", re.M)


def page_namespace(page: str, index: int, edits: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the ``index``-th Python block of ``docs/<page>`` as pasted, minus its final
    ``anyio.run(main)``, and return its globals (functions look names up there, so a
    test replaces a dependency by assigning to the returned dict). ``edits``: the
    text a user changes (each must be found once), e.g. the database URL."""
    code = _FENCE.findall((DOCS / page).read_text(encoding="utf-8"))[index]
    for old, new in (edits or {}).items():
        assert code.count(old) == 1, f"{page} block {index}: {old!r} not found once"
        code = code.replace(old, new)
    code, runs = _RUN.subn("", code)
    assert runs == 1, f"{page} block {index} must end with one anyio.run(main)"
    # a real module (SQLAlchemy resolves ``Mapped[...]`` annotations through it)
    module = types.ModuleType(f"_recipe_{next(_modules)}")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, f"{page}#{index}", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module.__dict__


# -- payment-flow.md ---------------------------------------------------------------------
def payment_recipe() -> dict[str, Any]:
    return page_namespace("recipes/payment-flow.md", 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_charge_whose_response_was_lost_is_retried_without_charging_twice(
    backend: str,
) -> None:
    """The step retries ``ConnectionError``: a connection reset *after* the API made
    the charge must not charge the card a second time (an idempotency key)."""
    ns = payment_recipe()
    create_charge = ns["create_charge"]
    calls = 0

    async def lossy(amount: int, idempotency_key: str) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        charge: dict[str, Any] = await create_charge(amount, idempotency_key=idempotency_key)
        if calls == 1:
            raise ConnectionError("connection reset by peer (the card was charged)")
        return charge

    ns["create_charge"] = lossy

    async def main() -> Any:
        return await ns["flow"].run(payment_id="p7", amount=1999)

    result = run_virtual(main, backend)
    assert calls == 2
    assert len(ns["charges"]) == 1  # one charge made, however many attempts
    assert result["record"]["stripe_charge_id"] == result["charge"]["id"] == "ch_1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_charge_that_hangs_is_timed_out_and_retried_with_the_same_key(backend: str) -> None:
    ns = payment_recipe()
    create_charge = ns["create_charge"]
    keys: list[str] = []

    async def hangs_once(amount: int, idempotency_key: str) -> dict[str, Any]:
        keys.append(idempotency_key)
        charge: dict[str, Any] = await create_charge(amount, idempotency_key=idempotency_key)
        if len(keys) == 1:
            await anyio.sleep_forever()  # charged, then the API went silent
        return charge

    ns["create_charge"] = hangs_once

    async def main() -> Any:
        return await ns["flow"].run(payment_id="p8", amount=500)

    result = run_virtual(main, backend)
    assert keys == ["payment-p8", "payment-p8"]
    assert len(ns["charges"]) == 1
    assert ns["payments"]["p8"]["stripe_charge_id"] == result["charge"]["id"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_charge_that_keeps_failing_runs_nothing_downstream(backend: str) -> None:
    """'If the charge fails (after its retries), nothing downstream runs: no row, no
    webhook. The original exception is raised (never an ExceptionGroup)'."""
    ns = payment_recipe()
    raised: list[ConnectionError] = []

    async def down(amount: int, idempotency_key: str) -> dict[str, Any]:
        await anyio.sleep(0.05)
        raised.append(ConnectionError("payments API unreachable"))
        raise raised[-1]

    ns["create_charge"] = down

    async def main() -> BaseException:
        with pytest.raises(ConnectionError) as info:
            await ns["flow"].run(payment_id="p3", amount=1999)
        return info.value

    error = run_virtual(main, backend)
    assert len(raised) == 3
    assert error is raised[-1]
    assert ns["payments"] == {}
    assert ns["webhooks"] == []

    async def settled() -> Any:
        return await ns["flow"].run(payment_id="p3", amount=1999, settle=True)

    outcomes = run_virtual(settled, backend)
    assert isinstance(outcomes.get("charge").error, ConnectionError)
    assert isinstance(outcomes.get("record").error, pk.DependencyFailed)
    assert isinstance(outcomes.get("notify").error, pk.DependencyFailed)
    assert ns["payments"] == {}
    assert ns["webhooks"] == []


def failing_webhook(ns: dict[str, Any]) -> Callable[[dict[str, Any]], Awaitable[None]]:
    async def refused(payload: dict[str, Any]) -> None:
        raise RuntimeError("webhook endpoint answered 500")

    return refused


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_webhook_cancels_the_insert_in_fail_fast_mode(backend: str) -> None:
    """The page's warning: fail-fast, a webhook failing at once cancels the INSERT."""
    ns = payment_recipe()
    ns["post_webhook"] = failing_webhook(ns)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="500"):
            await ns["flow"].run(payment_id="p4", amount=1999)

    run_virtual(main, backend)
    assert len(ns["charges"]) == 1
    assert ns["payments"] == {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_settle_keeps_the_row_when_the_webhook_fails(backend: str) -> None:
    """The page's first fix: ``settle=True``, then raise in the order that matters."""
    ns = payment_recipe()
    ns["post_webhook"] = failing_webhook(ns)

    async def main() -> Any:
        return await ns["flow"].run(payment_id="p5", amount=1999, settle=True)

    outcomes = run_virtual(main, backend)
    row = outcomes.get(ns["record"]).unwrap()
    assert row == {"payment_id": "p5", "stripe_charge_id": outcomes.get("charge").value["id"]}
    with pytest.raises(RuntimeError, match="500"):
        outcomes.get(ns["notify"]).unwrap()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_critical_path_printed_by_the_payment_recipe(backend: str) -> None:
    """The comment says ``['charge', 'notify']``: the webhook (200 ms) is slower than
    the insert (100 ms)."""
    ns = payment_recipe()

    async def main() -> list[str]:
        result = await ns["flow"].run(payment_id="p6", amount=1999)
        return [span.name for span in result.timeline.critical_path()]

    assert run_virtual(main, backend) == ["charge", "notify"]


# -- a library defect found by the recipes: a worker task cancelled natively ---------------
@pytest.mark.parametrize("settle", [False, True])
@pytest.mark.parametrize("limit", [None, 1])
def test_map_never_returns_a_hole_when_a_worker_task_is_cancelled_natively(
    limit: int | None, settle: bool
) -> None:
    """An item whose task gets ``task.cancel()`` from code it calls (a driver that
    cancels ``asyncio.current_task()`` on a lost connection, a watchdog holding the
    task) while nobody cancelled the caller."""

    async def item(i: int) -> int:
        if i == 1:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)
        return i

    async def main() -> list[Any] | BaseException:
        try:
            return await pk.map(item, [0, 1, 2], limit=limit, settle=settle)
        except asyncio.CancelledError as exc:  # raising is fine; a hole is not
            return exc

    results = asyncio.run(main())
    if isinstance(results, list):
        assert None not in results, results


# -- bulk-enrollment.md ------------------------------------------------------------------
def bulk_recipe(tmp_path: Path) -> dict[str, Any]:
    """The page's module, on a database file of this test (the page's own engine is
    left unused, as a service's test would do)."""
    from sqlalchemy import event
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from parallelkit.sqlalchemy import LimitedAsyncSession

    ns = page_namespace("recipes/bulk-enrollment.md", 0)
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path}/crm.db", pool_size=10, max_overflow=0
    )
    event.listen(engine.sync_engine, "connect", ns["_wal"])
    ns["engine"] = engine
    ns["sessions"] = async_sessionmaker(engine, class_=LimitedAsyncSession, expire_on_commit=False)
    return ns


async def enrollment_rows(ns: dict[str, Any]) -> list[tuple[int, int]]:
    from sqlalchemy import select

    enrollment = ns["Enrollment"]
    async with ns["sessions"]() as session:
        rows = await session.execute(select(enrollment.cadence_id, enrollment.contact_id))
        return [tuple(row) for row in rows]


async def create_and_seed(ns: dict[str, Any], companies: int = 50) -> None:
    async with ns["engine"].begin() as conn:
        await conn.run_sync(ns["Base"].metadata.create_all)
    await ns["seed"](companies)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_daily_detector_run_twice_enrolls_nobody_twice(tmp_path: Path) -> None:
    """The scheduler runs the detector every day: the second run must not enroll the
    contacts of the first again (the page's version before the fix: 392 rows)."""
    ns = bulk_recipe(tmp_path)
    try:
        await create_and_seed(ns)
        companies = list(range(1, 51))
        first = await ns["run_detector"](companies)
        second = await ns["run_detector"](companies)
        rows = await enrollment_rows(ns)
    finally:
        await ns["engine"].dispose()
    assert sum(o.value for o in first if o.ok) == 196
    assert [i + 1 for i, o in enumerate(second) if not o.ok] == [17]  # no IntegrityError
    assert sum(o.value for o in second if o.ok) == 0
    assert len(rows) == len(set(rows)) == 196


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_commit_whose_reply_is_lost_is_retried_without_duplicates(tmp_path: Path) -> None:
    """``retry=`` retries ``OperationalError``: a connection dropping after the COMMIT
    went through (the reply lost) runs that company again; it must enroll nobody twice
    and must not fail on the unique constraint."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    ns = bulk_recipe(tmp_path)
    lost: list[int] = []

    class ReplyLost(Session):
        """The first commit goes through, then its connection drops."""

    def reply_lost(_session: Session) -> None:
        if not lost:
            lost.append(1)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    event.listen(ReplyLost, "after_commit", reply_lost)
    try:
        await create_and_seed(ns)
        ns["sessions"].configure(sync_session_class=ReplyLost)
        outcomes = await ns["run_detector"](list(range(1, 51)))
        rows = await enrollment_rows(ns)
    finally:
        await ns["engine"].dispose()
    assert lost == [1]
    failed = [i + 1 for i, o in enumerate(outcomes) if not o.ok]
    assert failed == [17]
    assert len(rows) == len(set(rows)) == 196


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_five_hundred_companies_never_hold_more_connections_than_the_pool(
    tmp_path: Path,
) -> None:
    """'scales to 5,000 companies unchanged: still at most the pool size of sessions
    holding a connection' (500 here: the same shape, and no pool timeout)."""
    from sqlalchemy import event

    ns = bulk_recipe(tmp_path)
    out = peak = 0

    def checkout(*_: Any) -> None:
        nonlocal out, peak
        out += 1
        peak = max(peak, out)

    def checkin(*_: Any) -> None:
        nonlocal out
        out -= 1

    try:
        await create_and_seed(ns, 500)
        event.listen(ns["engine"].sync_engine, "checkout", checkout)
        event.listen(ns["engine"].sync_engine, "checkin", checkin)
        outcomes = await ns["run_detector"](list(range(1, 501)))
    finally:
        await ns["engine"].dispose()
    assert [i + 1 for i, o in enumerate(outcomes) if not o.ok] == [17]
    assert sum(o.value for o in outcomes if o.ok) == 499 * 4
    assert 1 <= peak <= 10


# -- conversation-cache.md ---------------------------------------------------------------
def cache_recipe() -> dict[str, Any]:
    return page_namespace("recipes/conversation-cache.md", 0)


async def until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(30):  # a hang guard only
        while not condition():
            await anyio.sleep(0.001)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_database_going_away_keeps_the_stale_conversation_in_service(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What the page now says: while stale, a failing refresh keeps the stale value in
    service, is logged once with its key (the default ``on_error``) and backs off; a
    miss's failure reaches its callers and is not cached."""
    ns = cache_recipe()
    clock, cache, get = ns["clock"], ns["cache"], ns["get_conversation"]
    select = ns["select_conversation"]
    attempts = 0

    async def database_down(conversation_id: int) -> Any:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("could not connect to server")

    async def main() -> None:
        async with cache:
            first = await get(42)
            ns["select_conversation"] = database_down
            clock.now += 60  # stale
            for _ in range(100):
                assert await get(42) == first  # served at once, the database is down
            await until(lambda: cache.statistics().refresh_errors == 1)
            for _ in range(100):  # backing off: the failing database is not hit again
                assert await get(42) == first
            await anyio.sleep(0.01)
            assert attempts == 1

            waiters: list[BaseException] = []

            async def miss() -> None:
                with pytest.raises(ConnectionError) as info:
                    await get(7)
                waiters.append(info.value)

            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(miss)
            assert attempts == 2
            assert len({id(e) for e in waiters}) == 1

            ns["select_conversation"] = select  # the database is back
            assert await get(7) is None  # the failure was not cached

    with caplog.at_level("WARNING", logger="parallelkit"):
        anyio.run(main, backend=backend)
    logged = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(logged) == 1
    assert "42" in logged[0].getMessage()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_conversation_looked_up_before_it_exists_is_none_until_invalidated(
    backend: str,
) -> None:
    """``None`` is a value (``cache_none=True``): a lookup that raced the row's
    creation keeps answering ``None`` until the writer invalidates the key."""
    ns = cache_recipe()
    clock, cache, get, table = ns["clock"], ns["cache"], ns["get_conversation"], ns["table"]

    async def main() -> None:
        async with cache:
            assert await get(99) is None  # not there yet
            table[99] = "open"  # the row is created
            clock.now += 10
            assert await get(99) is None  # still fresh: no query
            await get.invalidate(99)  # what the writer does after its INSERT
            view = await get(99)
            assert view is not None
            assert view.status == "open"

    run_virtual(main, backend)


# -- webhook-eager.md ----------------------------------------------------------------------
async def webhook_recipe(companies: int = 1, conversations_each: int = 2) -> dict[str, Any]:
    """The page's module on its in-memory engine, with ``companies`` companies of 3
    rules and ``conversations_each`` conversations (ids from 42) each."""
    ns = page_namespace("recipes/webhook-eager.md", 0)
    async with ns["engine"].begin() as conn:
        await conn.run_sync(ns["Base"].metadata.create_all)
    company, contact, conversation, rule = (
        ns[name] for name in ("Company", "Contact", "Conversation", "AutomationRule")
    )
    next_id = itertools.count(42)
    async with ns["sessions"]() as session:
        for c in range(companies):
            acme = company(
                name=f"Acme {c}",
                automation_rules=[
                    rule(trigger="message.received", action=f"assign_owner_{c}"),
                    rule(trigger="message.received", action="tag"),
                    rule(trigger="conversation.closed", action="send_template"),
                ],
            )
            ana = contact(email=f"ana{c}@acme.example", company=acme)
            session.add_all(
                conversation(id=next(next_id), contact=ana) for _ in range(conversations_each)
            )
        await session.commit()
    return ns


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_webhook_for_a_deleted_conversation_runs_nothing_in_one_statement() -> None:
    """A provider retries webhooks for conversations deleted since: the page's
    handler crashed with ``AttributeError: 'NoneType' object has no attribute
    'contact'`` (a 500, and the provider retries it for ever)."""
    from parallelkit.sqlalchemy import max_queries

    ns = await webhook_recipe()
    try:
        async with max_queries(ns["engine"], 1):
            actions = await ns["process_webhook"](
                {"conversation_id": 404, "event": "message.received"}
            )
        assert actions == []
    finally:
        await ns["engine"].dispose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_batch_of_webhooks_is_two_statements_whatever_the_number_of_rows() -> None:
    """'a batch of webhooks is **2 statements** whatever the number of rows', and
    every conversation gets its own company's rules (no row multiplication)."""
    from sqlalchemy import select

    from parallelkit.sqlalchemy import max_queries

    ns = await webhook_recipe(companies=20, conversations_each=10)
    conversation = ns["Conversation"]
    try:
        async with ns["sessions"]() as session, max_queries(ns["engine"], 2):
            stmt = select(conversation).where(conversation.id.in_(range(42, 242)))
            batch = (await session.scalars(stmt.options(*ns["WEBHOOK_GRAPH"]))).all()
        assert len(batch) == 200
        for row in batch:
            company = row.contact.company
            actions = [rule.action for rule in company.automation_rules]
            assert actions == [f"assign_owner_{company.name.split()[-1]}", "tag", "send_template"]
    finally:
        await ns["engine"].dispose()


# -- coming-from/dataloader.md: a library defect at a batch boundary -----------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_key_of_one_tick_is_loaded_once_across_full_batches(backend: str) -> None:
    loaded: list[int] = []

    async def contacts_by_id(ids: list[int]) -> dict[int, str]:
        loaded.extend(ids)
        await anyio.sleep(0.001)
        return {i: f"contact {i}" for i in ids}

    async def main() -> list[str]:
        async with pk.BatchLoader(contacts_by_id, max_batch=100) as contacts:
            return await pk.gather(*(contacts.load(i // 2) for i in range(500)))

    results = run_virtual(main, backend)
    assert results[199] == "contact 99"
    assert sorted(loaded) == list(range(250))  # each distinct key once


# -- coming-from/asyncio-gather.md -------------------------------------------------------
def test_a_child_cancelled_error_is_a_result_in_both_and_settle_types_it() -> None:
    """The page: ``return_exceptions=True`` returns a child's ``CancelledError``
    (``isinstance(r, Exception)`` misses it); ``settle=True`` makes it a failed
    ``Outcome``."""

    async def enroll(contact_id: int) -> int:
        await asyncio.sleep(0)
        if contact_id == 1:
            raise asyncio.CancelledError  # nobody cancelled this task
        return contact_id

    async def main() -> tuple[list[Any], list[pk.Outcome[int]]]:
        raw = await asyncio.gather(*(enroll(c) for c in range(3)), return_exceptions=True)
        outcomes = await pk.map(enroll, range(3), settle=True)
        return raw, outcomes

    raw, outcomes = asyncio.run(main())
    assert isinstance(raw[1], asyncio.CancelledError)
    assert not isinstance(raw[1], Exception)
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, asyncio.CancelledError)


def test_fail_fast_leaves_nothing_running_where_gather_leaves_the_others() -> None:
    """'The first failure cancels the rest and waits for them before raising: nothing
    is left running (with plain asyncio.gather, the other tasks keep running).'"""
    running: set[int] = set()

    async def enroll(contact_id: int) -> int:
        running.add(contact_id)
        try:
            if contact_id == 7:
                await asyncio.sleep(0)
                raise ValueError("contact 7 is unsubscribed")
            await asyncio.sleep(3600)
            return contact_id
        finally:
            running.discard(contact_id)

    async def main() -> tuple[set[int], set[int]]:
        with pytest.raises(ValueError, match="contact 7"):
            await pk.map(enroll, range(10), limit=10)
        after_pk = set(running)
        tasks = [asyncio.ensure_future(enroll(c)) for c in range(10)]
        with pytest.raises(ValueError, match="contact 7"):
            await asyncio.gather(*tasks)
        after_gather = set(running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return after_pk, after_gather

    after_pk, after_gather = asyncio.run(main())
    assert after_pk == set()
    assert after_gather == set(range(10)) - {7}


def test_the_shared_limiter_of_the_page_bounds_both_calls_together() -> None:
    """'both share the same 5 slots': two ``pk.map`` calls on one ``pk.Limiter``."""
    ns = page_namespace("coming-from/asyncio-gather.md", 3)
    charge = ns["charge"]
    now = peak = 0

    starts: list[float] = []

    async def counted(i: int) -> int:
        nonlocal now, peak
        starts.append(anyio.current_time())
        now += 1
        peak = max(peak, now)
        try:
            await anyio.sleep(0.5)  # a slow payments API: the 5 slots are the bound
            result: int = await charge(i)
            return result
        finally:
            now -= 1

    ns["charge"] = counted
    run_virtual(ns["main"], "asyncio")
    assert peak == 5
    assert len(starts) == 40
    gaps = [b - a for a, b in itertools.pairwise(sorted(starts))]
    assert min(gaps) >= 1 / 100 - 1e-9  # 100 starts per second, across both calls


@pytest.mark.anyio
async def test_imap_pulls_a_huge_input_only_as_slots_free_up() -> None:
    """'pk.map and pk.imap pull from the iterable only as slots free up'."""
    pulled = done = ahead = 0

    def items() -> Any:
        nonlocal pulled, ahead
        for x in range(10_000):
            pulled += 1
            ahead = max(ahead, pulled - done)
            yield x

    async def square(x: int) -> int:
        nonlocal done
        await anyio.lowlevel.checkpoint()
        done += 1
        return x * x

    total = 0
    async with pk.imap(square, items(), limit=100) as results:
        async for value in results:
            total += value
    assert total == sum(x * x for x in range(10_000))
    assert ahead <= 100 + 2  # limit running, plus a small constant pulled ahead


# -- coming-from/aiometer.md ---------------------------------------------------------------
@pytest.mark.anyio
async def test_aiometer_needs_a_sequence_where_pk_takes_a_generator() -> None:
    aiometer = pytest.importorskip("aiometer")

    async def fetch(company_id: int) -> int:
        await anyio.lowlevel.checkpoint()
        return company_id

    with pytest.raises(TypeError):
        async with aiometer.amap(fetch, (i for i in range(10)), max_at_once=2) as results:
            async for _ in results:  # pragma: no cover
                pass
    async with pk.imap(fetch, (i for i in range(10)), limit=2, ordered=True) as stream:
        assert [r async for r in stream] == list(range(10))


# -- coming-from/cashews.md ----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_with_no_stale_window_is_a_plain_ttl(backend: str) -> None:
    """'``@cache(ttl="30s")`` is ``fresh=30, stale=0``': after 30 s the next call is a
    miss that waits for the load (no stale value served)."""

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    cache = pk.SWRCache(fresh=30, stale=0, clock=clock)
    version = 0

    @cache.cached
    async def get_conversation(conversation_id: int) -> int:
        await anyio.sleep(0.01)
        return version

    async def main() -> None:
        nonlocal version
        async with cache:
            assert await get_conversation(1) == 0
            version = 1
            clock.now += 29.9
            assert await get_conversation(1) == 0  # fresh
            clock.now += 0.2
            assert await get_conversation(1) == 1  # expired: loaded, not stale
        assert cache.statistics().misses == 2

    run_virtual(main, backend)


# -- server-startup.md ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_start_up_takes_the_critical_path_not_the_playbooks_phases(backend: str) -> None:
    """'The playbook's phases take 1.2 x SCALE seconds here, the ideal (the critical
    path, the scheduler) 0.7 x SCALE', and sequential is 2.0 x SCALE."""
    ns = page_namespace("recipes/server-startup.md", 0)
    model, scale = ns["PLAYBOOK"], ns["SCALE"]

    async def main() -> tuple[float, list[str]]:
        async with ns["orch"].start() as running:
            tl = running.timeline
            return tl.total, [span.name for span in tl.critical_path("start")]

    total, chain = run_virtual(main, backend)
    assert chain == ["scheduler"]
    assert total == pytest.approx(0.7 * scale)
    phase_one = max(model["http"][0] + model["socket_io"][0], model["nextjs"][0])
    phase_two = max(model[n][0] for n in ("baileys", "scheduler", "campaign_queue"))
    assert phase_one + phase_two == pytest.approx(1.2)
    assert sum(d for d, _ in model.values()) == pytest.approx(2.0)


@pytest.mark.postgres
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_bulk_recipe_on_postgresql_with_only_the_url_changed(pg_url: str) -> None:
    """'on PostgreSQL change only the URL': the aware datetimes, the unique constraint
    and the day-two run, on a real server (a private schema of this test)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from .sqla_fixtures import drop_pg_schema

    schema = f"pk_recipes4_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(pg_url)
    async with admin.begin() as conn:
        await conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    await admin.dispose()
    ns = page_namespace(
        "recipes/bulk-enrollment.md",
        0,
        {
            'f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/crm.db", pool_size=10, max_overflow=0': (
                f"{pg_url!r}, pool_size=10, max_overflow=0, "
                f"connect_args={{'server_settings': {{'search_path': {schema!r}}}}}"
            )
        },
    )
    try:
        await create_and_seed(ns)
        companies = list(range(1, 51))
        first = await ns["run_detector"](companies)
        second = await ns["run_detector"](companies)
        rows = await enrollment_rows(ns)
    finally:
        await ns["engine"].dispose()
        await drop_pg_schema(pg_url, schema)
    assert [i + 1 for i, o in enumerate(first) if not o.ok] == [17]
    assert [i + 1 for i, o in enumerate(second) if not o.ok] == [17]
    assert sum(o.value for o in first if o.ok) == 196
    assert len(rows) == len(set(rows)) == 196


# -- parallel-reads.md ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_slow_reader_of_the_stream_holds_back_the_reads(backend: str) -> None:
    """'memory stays O(limit), however many paths: they never run more than
    2 * limit items ahead of it' (a consumer that writes each file elsewhere, slowly)."""
    started = consumed = ahead = 0

    async def read(path: str) -> str:
        nonlocal started, ahead
        started += 1
        ahead = max(ahead, started - consumed)
        await anyio.sleep(0.001)
        return f"content of {path}"

    async def main() -> int:
        nonlocal consumed
        async with pk.imap(read, (f"file_{i:05d}.txt" for i in range(2_000)), limit=64) as results:
            async for _ in results:
                consumed += 1
                await anyio.sleep(0.01)  # the slow part: ten times a read
        return consumed

    assert run_virtual(main, backend) == 2_000
    assert ahead <= 2 * 64 + 1


@pytest.mark.redis
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_conversation_cache_on_redis_gives_back_the_snapshot_class(
    redis_url: str,
) -> None:
    """The page's 'pass store=RedisStore(...)': with the default serializer the
    second call (a hit read from Redis) was a ``dict``, not a ``ConversationView``;
    with the class listed, as the page now says, every call gives the snapshot."""
    from redis.asyncio import Redis

    from parallelkit.redis import JSONSerializer, RedisStore

    redis = Redis.from_url(redis_url.rsplit("/", 1)[0] + "/9")
    namespace = f"recipes4-{uuid.uuid4().hex[:8]}"
    try:
        for serializer, expected in [("json", dict), ("typed", "ConversationView")]:
            ns = cache_recipe()
            view = ns["ConversationView"]
            store = RedisStore(
                redis,
                namespace=f"{namespace}-{serializer}",
                serializer="json" if serializer == "json" else JSONSerializer(types=[view]),
            )
            ns["cache"].bind(store)
            async with store, ns["cache"]:
                first = await ns["get_conversation"](42)
                second = await ns["get_conversation"](42)
            assert first == view(42, "open")
            if expected is dict:  # the trap the page warns about
                assert second == {"id": 42, "status": "open"}
            else:
                assert second == first
                assert type(second) is view
    finally:
        async for key in redis.scan_iter(match=f"*{namespace}*"):
            await redis.delete(key)
        await redis.aclose()
