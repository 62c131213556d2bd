"""parallel(), the session guards and loader_by_id on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from examples.crm import Company, Contact, Conversation
from sqlalchemy import Engine, Integer, String, create_engine, event, func, select, text
from sqlalchemy.exc import InvalidRequestError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, StaticPool

import parallelkit as pk
from parallelkit._core.limiter import SupportsLimit
from parallelkit.sqlalchemy import (
    GuardedAsyncSession,
    LimitedAsyncSession,
    NotLoadedError,
    SessionInUseError,
    count_queries,
    default_limit,
    eager,
    guard_sessions,
    loader_by_id,
    parallel,
    pool_limiter,
)

pytest_plugins = ["tests.sqla_fixtures"]
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's asyncio extension (AsyncEngine / AsyncSession) runs on asyncio only:
    # it bridges to the sync ORM with greenlets driven by the asyncio loop, not trio.
    return "asyncio"


# ---------------------------------------------------------------------------- parallel
async def test_results_in_order_each_in_its_own_session(crm_engine: AsyncEngine) -> None:
    factory = async_sessionmaker(crm_engine)
    seen: list[AsyncSession] = []

    def fetch(cid: int):  # type: ignore[no-untyped-def]
        async def fn(session: AsyncSession) -> int:
            seen.append(session)
            await anyio.sleep(0.01 * (3 - cid))  # finish in reverse order
            conversation = await session.get_one(Conversation, cid)
            return conversation.id

        return fn

    assert await parallel(factory, fetch(1), fetch(2), fetch(3)) == [1, 2, 3]
    assert len({id(s) for s in seen}) == 3
    assert all(not s.in_transaction() for s in seen)  # each closed when its fn returned
    assert await parallel(factory) == []


async def test_the_seed_webhook_pieces_at_once(crm_engine: AsyncEngine) -> None:
    factory = async_sessionmaker(crm_engine, expire_on_commit=False)
    company, n_open, contacts = await parallel(
        factory,
        lambda s: s.get(Company, 1),
        lambda s: s.scalar(text("SELECT count(*) FROM conversations WHERE status = 'open'")),
        lambda s: s.scalars(select(Contact).where(Contact.company_id == 1)),
    )
    assert company is not None
    assert company.id == 1
    assert n_open > 0
    assert len(contacts.all()) == 10


async def test_fail_fast_raises_the_original_and_cancels_the_rest() -> None:
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=NullPool)
    factory = async_sessionmaker(engine)
    error = KeyError("boom")
    finished: list[str] = []

    async def fails(session: AsyncSession) -> None:
        await session.execute(text("SELECT 1"))
        raise error

    async def slow(session: AsyncSession) -> None:
        await anyio.sleep(5)
        finished.append("slow")

    with pytest.raises(KeyError) as info:
        await parallel(factory, slow, fails)
    assert info.value is error
    assert finished == []
    outcomes = await parallel(factory, fails, lambda s: s.scalar(text("SELECT 7")), settle=True)
    assert [o.ok for o in outcomes] == [False, True]
    assert outcomes[0].error is error
    assert outcomes[1].value == 7
    await engine.dispose()


async def test_arguments_are_validated() -> None:
    factory = async_sessionmaker(create_async_engine("sqlite+aiosqlite://"))
    with pytest.raises(TypeError, match="session_factory must be callable"):
        await parallel(object())  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"fns\[1\] must be an async function"):
        await parallel(factory, lambda s: s.scalar(text("SELECT 1")), 3)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="limit"):
        await parallel(factory, lambda s: s.scalar(text("SELECT 1")), limit=0)


async def test_limit_defaults_to_the_pool_size_and_bounds_open_sessions() -> None:
    queued = create_async_engine(
        "sqlite+aiosqlite://", poolclass=AsyncAdaptedQueuePool, pool_size=2
    )
    assert default_limit(async_sessionmaker(queued)) == 2
    assert (
        default_limit(
            async_sessionmaker(create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool))
        )
        == 1
    )
    assert (
        default_limit(
            async_sessionmaker(create_async_engine("sqlite+aiosqlite://", poolclass=NullPool))
        )
        is None
    )
    assert default_limit(queued) == 2  # the engine itself, not only a factory
    with pytest.raises(TypeError, match=r"pool_limiter\(\) needs an engine"):
        default_limit(lambda: None)

    running = peak = 0

    async def probe(session: AsyncSession) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1

    await parallel(async_sessionmaker(queued), *[probe] * 6)
    assert peak == 2
    await parallel(async_sessionmaker(queued), *[probe] * 6, limit=pk.Limiter(concurrency=3))
    assert peak == 3
    # two calls at once share the engine's bound (before: pool size per call, 4 here)
    peak = 0
    await pk.gather(
        parallel(async_sessionmaker(queued), *[probe] * 4),
        parallel(async_sessionmaker(queued), *[probe] * 4),
    )
    assert peak == 2
    await queued.dispose()


@pytest.mark.postgres
async def test_parallel_really_overlaps_on_postgresql(pg_engine: AsyncEngine) -> None:
    factory = async_sessionmaker(pg_engine)
    sleep = 0.2

    async def pg_sleep(session: AsyncSession) -> float:
        await session.execute(text(f"SELECT pg_sleep({sleep})"))
        return sleep

    # open the pool's connections first, so the timing is about the queries
    await parallel(factory, *[lambda s: s.execute(text("SELECT 1"))] * 3)
    started = anyio.current_time()
    await parallel(factory, pg_sleep)
    one = anyio.current_time() - started
    started = anyio.current_time()
    assert await parallel(factory, pg_sleep, pg_sleep, pg_sleep) == [sleep] * 3
    three = anyio.current_time() - started
    assert one >= sleep
    # sequential would be ~3x one; overlapped is ~1x (generous bound for a busy machine)
    assert three < 2 * one, (one, three)


# ---------------------------------------------------------------------------- shared sessions
async def test_sharing_a_plain_session_between_tasks_says_what_to_do(
    any_engine: AsyncEngine,
) -> None:
    guard_sessions(True)  # the pytest plugin turns it on for the test session anyway
    factory = async_sessionmaker(any_engine)
    async with factory() as session:

        async def query(n: int) -> int:
            result = await session.execute(text(f"SELECT {n}"))
            return int(result.scalar_one())

        with count_queries(any_engine) as counter:
            # what users write (return_exceptions: wait for the first query too)
            first, error = await asyncio.gather(query(1), query(2), return_exceptions=True)
        assert first == 1
        assert isinstance(error, SessionInUseError)
        assert isinstance(error, pk.ParallelkitError)
        assert (error.method, error.busy_with) == ("execute", "execute")
        assert "parallel(session_factory" in str(error)
        # raised before the second statement reached the database
        assert [q for q in counter.statements if "SELECT" in q] == ["SELECT 1"]
        # one task after another is fine, including from different tasks
        assert await query(3) == 3
        assert await pk.gather(query(4), limit=1) == [4]
        assert await pk.gather(query(5), query(6), limit=1) == [5, 6]


async def test_the_guard_sees_orm_reads_flushes_and_commits(crm_engine: AsyncEngine) -> None:
    factory = async_sessionmaker(crm_engine, expire_on_commit=False)
    now = datetime.now(timezone.utc)
    async with factory() as session:
        read, read_too = await pk.gather(
            session.get(Company, 1), session.scalars(select(Contact)), settle=True
        )
        assert read.ok
        assert isinstance(read_too.error, SessionInUseError)

        async def add_and_flush() -> None:
            session.add(Company(name="flushed", domain="flushed.example", created_at=now))
            await session.flush()

        read, flush = await pk.gather(
            session.scalar(select(func.count(Company.id))), add_and_flush(), settle=True
        )
        assert read.ok
        assert isinstance(flush.error, SessionInUseError)
        assert (flush.error.method, flush.error.busy_with) == ("flush", "execute")
        assert len(session.new) == 1  # refused before it flushed anything
        session.expunge_all()

        read, commit = await pk.gather(
            session.scalar(select(func.count(Company.id))), session.commit(), settle=True
        )
        assert read.ok
        assert isinstance(commit.error, SessionInUseError)
        assert (commit.error.method, commit.error.busy_with) == ("commit", "execute")
        # the refused commit left the transaction open; the session still works
        assert session.in_transaction()
        await session.rollback()
        assert await session.scalar(select(func.count()).where(Company.name == "flushed")) == 0


async def test_guard_sessions_turns_the_check_off_and_on(any_engine: AsyncEngine) -> None:
    factory = async_sessionmaker(any_engine)

    async def share() -> list[object]:
        async with factory() as session:

            async def query(n: int) -> int:
                return int((await session.execute(text(f"SELECT {n}"))).scalar_one())

            return list(await asyncio.gather(query(1), query(2), return_exceptions=True))

    assert guard_sessions(False) is True
    try:
        assert guard_sessions(False) is False  # idempotent
        # off: SQLAlchemy's own behaviour again, depending on timing either its
        # "concurrent operations are not permitted" or the driver queueing the queries
        for result in await share():
            assert not isinstance(result, SessionInUseError)
            assert result in (1, 2) or isinstance(result, InvalidRequestError), result
    finally:
        assert guard_sessions(True) is False
    assert guard_sessions(True) is True
    first, second = await share()
    assert first == 1
    assert isinstance(second, SessionInUseError)


async def test_sync_only_use_never_pays_for_the_statement_checks(
    sync_engine: Engine, any_engine: AsyncEngine
) -> None:
    from parallelkit.sqlalchemy import _sessions as _sqla_sessions

    guard_sessions(False)
    assert guard_sessions(True) is False
    # armed, but a do_orm_execute listener (an ORMExecuteState per statement) is
    # only added once an AsyncSession is used: sync code cannot share one across tasks
    with Session(sync_engine) as session:
        assert session.execute(text("SELECT 1")).scalar_one() == 1
        session.commit()
    assert not _sqla_sessions._checking
    async with async_sessionmaker(any_engine)() as session:
        assert (await session.execute(text("SELECT 2"))).scalar_one() == 2
    assert _sqla_sessions._checking


def test_the_guard_leaves_sync_sessions_in_threads_alone(sync_engine: Engine) -> None:
    # a sync Session used by a thread that is still alive, then by another thread:
    # a greenlet-based check without the asyncio-only test would call that sharing
    with Session(sync_engine) as session:
        used, release = threading.Event(), threading.Event()

        def first() -> None:
            session.execute(text("SELECT 1"))
            used.set()
            release.wait(10)

        thread = threading.Thread(target=first)
        thread.start()
        try:
            assert used.wait(10)
            assert session.execute(text("SELECT 2")).scalar_one() == 2
        finally:
            release.set()
            thread.join()


async def test_sharing_a_guarded_session_between_tasks_says_what_to_do(
    any_engine: AsyncEngine,
) -> None:
    factory = async_sessionmaker(any_engine, class_=GuardedAsyncSession)
    async with factory() as session:

        async def query(n: int) -> int:
            result = await session.execute(text(f"SELECT {n}"))
            return int(result.scalar_one())

        first, second = await pk.gather(query(1), query(2), settle=True)
        assert first.value == 1
        error = second.error
        assert isinstance(error, SessionInUseError)
        assert isinstance(error, pk.ParallelkitError)
        assert (error.method, error.busy_with) == ("execute", "execute")
        assert "parallel(session_factory" in str(error)
        # the session is still usable afterwards, from one task at a time
        assert await query(3) == 3
        assert [await query(4), await query(5)] == [4, 5]
        assert await pk.gather(query(6), limit=1) == [6]  # another task, not overlapping


async def test_parallel_with_guarded_sessions_is_fine(crm_engine: AsyncEngine) -> None:
    factory = async_sessionmaker(crm_engine, class_=GuardedAsyncSession)
    results = await parallel(
        factory, *[lambda s, i=i: s.scalar(text(f"SELECT {i}")) for i in range(4)]
    )
    assert results == [0, 1, 2, 3]


# ---------------------------------------------------------------------------- loader_by_id
async def test_loader_by_id_turns_500_concurrent_loads_into_one_query(
    crm_engine: AsyncEngine,
) -> None:
    factory = async_sessionmaker(crm_engine)
    ids = list(range(1, 501))
    options = eager(Conversation, "contact")
    async with (
        loader_by_id(factory, Conversation, options=options) as conversations,
        count_queries(crm_engine) as counter,
    ):
        loaded = await pk.gather(*(conversations.load(i) for i in ids))
    assert counter.count == 1, counter.statements
    assert [c.id for c in loaded if c is not None] == ids
    assert all(c is not None and c.contact.id == c.contact_id for c in loaded)
    assert conversations.stats.calls == 1
    with pytest.raises(NotLoadedError):
        _ = loaded[0].contact.company  # type: ignore[union-attr]


async def test_loader_by_id_missing_keys_duplicates_and_splitting(crm_engine: AsyncEngine) -> None:
    factory = async_sessionmaker(crm_engine)
    async with (
        loader_by_id(factory, Company, max_batch=4) as companies,
        count_queries(crm_engine) as counter,
    ):
        found = await pk.gather(*(companies.load(i) for i in [1, 2, 2, 3, 999, 4, 5, 6]))
    assert [c.id if c else None for c in found] == [1, 2, 2, 3, None, 4, 5, 6]
    assert counter.count == 2  # 7 distinct keys, at most 4 per query


class _Base(DeclarativeBase):
    pass


class Membership(_Base):
    __tablename__ = "memberships"
    team: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[int] = mapped_column(Integer, primary_key=True)
    role: Mapped[str] = mapped_column(String(20))


async def test_loader_by_id_with_a_composite_key() -> None:
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
    factory = async_sessionmaker(engine)
    async with engine.begin() as conn:
        await conn.run_sync(_Base.metadata.create_all)
    async with factory() as session:
        session.add_all(
            [Membership(team=t, user=u, role=f"r{t}{u}") for t in (1, 2) for u in (1, 2)]
        )
        await session.commit()
    async with loader_by_id(factory, Membership) as members:
        found = await pk.gather(members.load((1, 2)), members.load((2, 1)), members.load((9, 9)))
    assert [m.role if m else None for m in found] == ["r12", "r21", None]
    with pytest.raises(TypeError, match="mapped class"):
        loader_by_id(factory, object)
    with pytest.raises(TypeError, match="session_factory"):
        loader_by_id(None, Membership)  # type: ignore[arg-type]
    await engine.dispose()


# ---------------------------------------------------------------------------- pool_limiter
def test_one_pool_limiter_per_engine_sized_from_its_pool() -> None:
    queued = create_async_engine(
        "sqlite+aiosqlite://", poolclass=AsyncAdaptedQueuePool, pool_size=3
    )
    factory = async_sessionmaker(queued)
    limiter = pool_limiter(queued)
    assert limiter is pool_limiter(factory) is pool_limiter(queued.sync_engine)
    assert limiter is pool_limiter(factory())  # a session
    assert limiter.concurrency == 3
    assert isinstance(limiter, SupportsLimit)
    static = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
    assert pool_limiter(static).concurrency == 1
    assert pool_limiter(create_engine("sqlite://", poolclass=NullPool)).concurrency is None
    assert repr(limiter) == "PoolLimiter(concurrency=3, running=0, waiting=0)"
    for bad in (None, "sqlite://", lambda: None):
        with pytest.raises(TypeError, match=r"pool_limiter\(\) needs an engine"):
            pool_limiter(bad)


class Checkouts:
    """Connections checked out of the pool right now, and the most at once."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.now = self.peak = 0
        event.listen(engine.sync_engine, "checkout", self.out)
        event.listen(engine.sync_engine, "checkin", self.back)

    def out(self, *_: object) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def back(self, *_: object) -> None:
        self.now -= 1


async def test_requests_share_the_engine_bound_and_hold_no_slot_between_db_work(
    small_pool: AsyncEngine,
) -> None:
    sessions = async_sessionmaker(small_pool, class_=LimitedAsyncSession)
    checkouts = Checkouts(small_pool)
    slots = pool_limiter(small_pool)
    requests, items = 8, 5
    parked, everyone_parked, resume = 0, anyio.Event(), anyio.Event()
    held_while_parked: list[int] = []

    async def item(i: int) -> int:
        nonlocal parked
        async with sessions() as session:
            first = int((await session.execute(text(f"SELECT {i}"))).scalar_one())
            await session.commit()  # the connection goes back: so does the slot
            parked += 1  # now a non-database await (an HTTP call, say)
            if parked == requests * items:
                held_while_parked.append(slots.statistics().running)
                held_while_parked.append(checkouts.now)
                everyone_parked.set()
            await resume.wait()
            second = int((await session.execute(text(f"SELECT {i}"))).scalar_one())
        return first + second

    async def request(r: int) -> list[int]:
        return await pk.map(item, range(r * items, (r + 1) * items), limit=10)  # per request

    async def release() -> None:
        await everyone_parked.wait()
        resume.set()

    with anyio.fail_after(60):  # a failure-safe, not a timing assertion
        async with anyio.create_task_group() as tg:
            tg.start_soon(release)
            results = await pk.gather(*(request(r) for r in range(requests)))
    assert [x for r in results for x in r] == [2 * i for i in range(requests * items)]
    assert held_while_parked == [0, 0]  # 40 items in a non-database await: no slot, no connection
    assert checkouts.peak <= 2  # the pool alone would have allowed 12
    assert slots.statistics().running == 0


async def test_slots_are_reentrant_per_task() -> None:
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)  # one slot
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)

    async def nested(i: int) -> int:
        async with sessions() as outer, sessions() as inner:  # two sessions, one task
            a = (await outer.execute(text(f"SELECT {i}"))).scalar_one()
            b = (await inner.execute(text(f"SELECT {i}"))).scalar_one()
            return int(a + b)

    with anyio.fail_after(30):
        assert await pk.map(nested, range(4), limit=pool_limiter(engine)) == [0, 2, 4, 6]
        assert await pk.map(nested, range(4), limit=4) == [0, 2, 4, 6]
    assert pool_limiter(engine).statistics().running == 0
    await engine.dispose()


async def test_a_session_in_a_slot_holding_task_takes_and_gives_back_without_a_frame() -> None:
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)  # one slot
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)
    slots = pool_limiter(engine)
    with anyio.fail_after(30):
        async with slots, sessions() as session:  # the service's block
            # the first call takes the task's slot re-entrantly: the method's own coroutine
            call = session.execute(text("SELECT 1"))
            assert call.cr_code is AsyncSession.execute.__code__  # type: ignore[attr-defined]
            assert (await call).scalar_one() == 1
            assert slots.statistics().running == 1  # one slot, taken twice by one task
            later = session.scalar(text("SELECT 2"))  # in the transaction: no frame either
            assert later.cr_code is AsyncSession.scalar.__code__  # type: ignore[attr-defined]
            assert await later == 2
            await session.commit()  # gives the session's turn back, the block's stays
            assert slots.statistics().running == 1
            with pytest.raises(OperationalError):  # a first call that fails: taken all the same
                await session.execute(text("SELECT * FROM no_such_table"))
        assert slots.statistics().running == 0  # close and the block gave everything back
        # a session that outlives the block: its own turn still holds the slot until commit
        session = sessions()
        async with slots:
            await session.execute(text("SELECT 3"))
        assert slots.statistics().running == 1
        await session.commit()
        assert slots.statistics().running == 0
        # no block: the first call waits for a slot of its own (the slow path)
        call = session.execute(text("SELECT 4"))
        assert call.cr_code is not AsyncSession.execute.__code__  # type: ignore[attr-defined]
        assert (await call).scalar_one() == 4
        assert slots.statistics().running == 1
        await session.close()
        assert slots.statistics().running == 0
    await engine.dispose()


async def test_a_slot_holder_fanning_out_lends_its_slot_instead_of_deadlocking() -> None:
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)  # one slot
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)
    slots = pool_limiter(engine)

    async def read(session: AsyncSession) -> int:
        return int((await session.execute(text("SELECT 2"))).scalar_one())

    with anyio.fail_after(30):  # a failure-safe: it used to hang here
        async with sessions() as session:
            await session.execute(text("SELECT 1"))  # a transaction: the one slot is held
            assert await parallel(sessions, read, read, read) == [2, 2, 2]
            assert await parallel(sessions, read, limit=slots) == [2]  # the limiter, given

            async def boom(session: AsyncSession) -> int:
                await read(session)
                raise LookupError("boom")

            # a failure cancels the functions waiting for the lent slot; it comes back
            with pytest.raises(LookupError):
                await parallel(sessions, read, boom, read, read)
            outcomes = await parallel(sessions, boom, read, settle=True)
            assert [o.ok for o in outcomes] == [False, True]
            assert await parallel(sessions, read, read) == [2, 2]
            assert slots.statistics().running == 1  # still the session's
        assert slots.statistics().running == 0
    await engine.dispose()


async def test_every_fan_out_on_the_pool_limiter_lends_a_held_slot() -> None:
    # pk.map / gather / imap / Flow.run with limit=pool_limiter(engine), from a task
    # whose session holds the engine's one slot: each item's session runs on the lent
    # slot (it used to wait for a slot its own caller held: a deadlock)
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)  # one slot
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)
    slots = pool_limiter(engine)

    async def read(i: int) -> int:
        async with sessions() as session:
            return int((await session.execute(text(f"SELECT {i}"))).scalar_one())

    flow = pk.Flow()

    @flow.step
    async def first() -> int:
        return await read(1)

    @flow.step
    async def second() -> int:
        return await read(2)

    with anyio.fail_after(30):  # a failure-safe: it used to hang here
        async with sessions() as session:
            await session.execute(text("SELECT 0"))  # a transaction: the one slot is held
            assert await pk.map(read, range(4), limit=slots) == [0, 1, 2, 3]
            assert await pk.gather(read(5), read(6), limit=slots) == [5, 6]
            async with pk.imap(read, range(3), limit=slots, ordered=True) as results:
                assert [r async for r in results] == [0, 1, 2]
            result = await flow.run(limit=slots)
            assert (result["first"], result["second"]) == (1, 2)
            assert slots.statistics().running == 1  # still the session's
        assert slots.statistics().running == 0
    await engine.dispose()


async def test_a_waiter_cancelled_as_the_lent_slot_comes_back_passes_it_on() -> None:
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)  # one slot
    slots = pool_limiter(engine)
    holder = await slots.acquire()  # this task holds the one slot and lends it
    lent = slots.for_fanout()
    assert lent is not slots
    a_in, a_go, c_in = anyio.Event(), anyio.Event(), anyio.Event()
    b_scope = anyio.CancelScope()

    async def a() -> None:
        async with lent:
            a_in.set()
            await a_go.wait()
            b_scope.cancel()  # b is cancelled, then woken with the slot, before it runs

    async def b() -> None:
        with b_scope:
            async with lent:
                raise AssertionError("b was cancelled")  # pragma: no cover

    async def c() -> None:
        async with lent:
            c_in.set()

    with anyio.fail_after(30):  # a failure-safe: c used to wait forever
        async with anyio.create_task_group() as tg:
            tg.start_soon(a)
            await a_in.wait()
            tg.start_soon(b)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(c)
            await anyio.wait_all_tasks_blocked()
            a_go.set()
            await c_in.wait()
    slots.release(holder)
    assert slots.statistics().running == 0
    await engine.dispose()


async def test_requests_waiting_for_their_fan_out_share_the_bound(
    small_pool: AsyncEngine,
) -> None:
    # every slot held by a request that then waits for its own parallel(): each lends
    sessions = async_sessionmaker(small_pool, class_=LimitedAsyncSession)
    slots = pool_limiter(small_pool)
    running = peak = 0
    holding, both_hold = 0, anyio.Event()

    async def read(session: AsyncSession) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await anyio.lowlevel.checkpoint()
            return int((await session.execute(text("SELECT 1"))).scalar_one())
        finally:
            running -= 1

    async def request() -> list[int]:
        nonlocal holding
        async with sessions() as session:
            await session.execute(text("SELECT 0"))
            holding += 1
            if holding == 2:
                both_hold.set()
            await both_hold.wait()  # both slots held by requests
            return await parallel(sessions, read, read, read)

    with anyio.fail_after(30):  # a failure-safe: it used to hang here
        results = await pk.gather(request(), request(), request())
    assert results == [[1, 1, 1]] * 3
    assert peak <= 2  # the functions never ran on more than the engine's slots
    assert slots.statistics().running == 0


async def test_a_session_never_closed_gives_its_slot_back_when_collected(
    tmp_path: Path,
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}", pool_size=2)
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)
    slots = pool_limiter(engine)
    forgotten: list[AsyncSession] = []

    async def forgetful() -> None:
        session = sessions()
        await session.execute(text("SELECT 1"))  # a transaction, never closed
        forgotten.append(session)

    async def careful() -> int:
        async with sessions() as session:
            return int((await session.execute(text("SELECT 2"))).scalar_one())

    async with anyio.create_task_group() as tg:  # two tasks: two slots, all there are
        tg.start_soon(forgetful)
        tg.start_soon(forgetful)
    assert slots.statistics().running == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLAlchemy's own "non-checked-in connection"
        forgotten.clear()
        gc.collect()
    for _ in range(3):
        await anyio.lowlevel.checkpoint()  # the slots come back on the loop
    assert slots.statistics().running == 0
    with anyio.fail_after(30):  # a failure-safe: the next session used to wait forever
        assert await pk.gather(careful(), careful()) == [2, 2]
    await engine.dispose()


async def test_limited_and_guarded_sessions_compose() -> None:
    class Both(GuardedAsyncSession, LimitedAsyncSession):
        pass

    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
    async with async_sessionmaker(engine, class_=Both)() as session:
        assert (await session.execute(text("SELECT 5"))).scalar_one() == 5
        assert pool_limiter(engine).statistics().running == 1  # in a transaction
        first, second = await pk.gather(
            session.execute(text("SELECT 1")), session.execute(text("SELECT 2")), settle=True
        )
        assert first.ok
        assert isinstance(second.error, SessionInUseError)
        await session.commit()
        assert pool_limiter(engine).statistics().running == 0
    await engine.dispose()


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda f: parallel(f, limit=0), ValueError, "limit must be >= 1"),
        (lambda f: parallel(f, limit=1.5), TypeError, "limit must be"),
        (lambda f: parallel(f, settle=1), TypeError, "settle must be a bool"),
        (lambda f: parallel(f, 3), TypeError, r"fns\[0\] must be an async function"),
        (lambda f: parallel(3), TypeError, "session_factory must be callable"),
    ],
)
async def test_parallel_rejects_bad_arguments(
    call: Any, error: type[Exception], message: str
) -> None:
    factory = async_sessionmaker(create_async_engine("sqlite+aiosqlite://"))
    with pytest.raises(error, match=message):
        await call(factory)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_batch": 0}, ValueError, "max_batch must be >= 1"),
        ({"max_batch": 2.0}, TypeError, "max_batch must be an int"),
        ({"max_batch": True}, TypeError, "max_batch must be an int"),
        ({"cache": "yes"}, TypeError, "cache must be a bool"),
        ({"options": "company"}, TypeError, "options must be a sequence of loader options"),
        ({"options": None}, TypeError, "options must be a sequence of loader options"),
        ({"options": ["company"]}, TypeError, r"options\[0\] must be a loader option"),
    ],
)
def test_loader_by_id_rejects_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    factory = async_sessionmaker(create_async_engine("sqlite+aiosqlite://"))
    with pytest.raises(error, match=message):
        loader_by_id(factory, Membership, **kwargs)


@pytest.mark.parametrize("value", [1, None, "on"])
def test_guard_sessions_takes_a_bool(value: object) -> None:
    with pytest.raises(TypeError, match="enabled must be a bool"):
        guard_sessions(value)  # type: ignore[arg-type]


async def test_a_task_waiting_for_a_pool_slot_parks_two_frames_deep() -> None:
    """``async with pool_limiter(engine):`` waiting for a slot: the waiting task's
    await chain is ``__aenter__`` -> ``acquire_slot`` -> a bare asyncio future (every
    frame in it is resumed when the slot is handed over; ``acquire``,
    ``Limiter.acquire`` and an anyio Event added four more)."""
    slots = pool_limiter(create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool))
    chain: list[str] = []

    async def waiter() -> None:
        async with slots:
            pass

    async with anyio.create_task_group() as tg, slots:  # held: the waiter waits
        tg.start_soon(waiter, name="slot waiter")
        while slots.statistics().waiting < 1:
            await anyio.lowlevel.checkpoint()
        (task,) = (t for t in asyncio.all_tasks() if t.get_name() == "slot waiter")
        awaited: Any = task.get_coro()
        while hasattr(awaited, "cr_await"):
            chain.append(awaited.cr_code.co_name)
            awaited = awaited.cr_await
        assert type(awaited).__name__ == "FutureIter"  # the future itself: no frame below
    assert chain[-3:] == ["waiter", "__aenter__", "acquire_slot"], chain
