"""parallelkit.sqlalchemy under faults (round 8): a fan-out that can only deadlock,
odd models for ``eager`` / ``eager_get``, odd ids for ``loader_by_id``, query budgets
nested and concurrent, engines disposed and re-used, sessions closed mid-``parallel``,
cancellation at every await of ``eager_get``.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import Enum, ForeignKey, Numeric, String, inspect, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.pool import StaticPool
from sqlalchemy.util import greenlet_spawn

import parallelkit as pk
from parallelkit.sqlalchemy import (
    LimitedAsyncSession,
    count_queries,
    eager,
    eager_get,
    loader_by_id,
    parallel,
    pool_limiter,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore:unclosed database:ResourceWarning"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension


# ---------------------------------------------------------------- a fan-out that can only deadlock
Make = Callable[..., AsyncEngine]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def make_engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    """Engines on SQLite (a file: a real pool) and on PostgreSQL, disposed afterwards.
    (The PostgreSQL cases only ``SELECT``: no table of theirs to clean up.)"""
    made: list[AsyncEngine] = []
    url = (
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )

    def make(**kwargs: Any) -> AsyncEngine:
        made.append(create_async_engine(url, **kwargs))
        return made[-1]

    yield make
    for engine in made:
        await engine.dispose()


@pytest.fixture
def one_connection(make_engine: Make) -> AsyncEngine:
    """A pool of exactly one connection: pool_size=1, max_overflow=0."""
    # pool_timeout: the old behaviour was to wait this long, then the pool's TimeoutError
    return make_engine(pool_size=1, max_overflow=0, pool_timeout=2)


async def _never(session: LimitedAsyncSession) -> int:
    msg = "parallel() ran a function: the fan-out should have been refused at the call"
    raise AssertionError(msg)


def _assert_all_back(engine: AsyncEngine) -> None:
    slots = pool_limiter(engine)
    stats = slots.statistics()
    assert (stats.running, stats.waiting) == (0, 0), slots
    assert not slots._held, slots._held
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("limit", ["default", "limiter", "int"])
async def test_parallel_from_the_only_connection_fails_at_once(
    one_connection: AsyncEngine, limit: str
) -> None:
    # the task's transaction holds the pool's only connection (and the limiter's only
    # slot) and waits for sessions that need another: before, they waited pool_timeout
    # (the lent slot) or forever (a plain limit: a slot of their own); now refused at once
    sessions = async_sessionmaker(one_connection, class_=LimitedAsyncSession)
    kwargs: dict[str, object] = {
        "default": {},
        "limiter": {"limit": pool_limiter(one_connection)},
        "int": {"limit": 4},
    }[limit]
    with anyio.fail_after(30):
        async with sessions() as session:
            await session.execute(text("SELECT 1"))
            with pytest.raises(sa_exc.TimeoutError) as caught:
                await parallel(sessions, _never, _never, **kwargs)  # type: ignore[call-overload]
            message = str(caught.value).lower()
            assert "deadlock" in message
            assert "commit" in message
            assert "max_overflow" in message
            # the caller's own work goes on
            assert (await session.execute(text("SELECT 2"))).scalar() == 2
    _assert_all_back(one_connection)


async def test_parallel_after_commit_on_the_only_connection_runs(
    one_connection: AsyncEngine,
) -> None:
    # the fix the message names: commit first, and the fan-out runs
    sessions = async_sessionmaker(one_connection, class_=LimitedAsyncSession)

    async def one(session: LimitedAsyncSession) -> int:
        return int((await session.execute(text("SELECT 1"))).scalar_one())

    with anyio.fail_after(30):
        async with sessions() as session:
            await session.execute(text("SELECT 1"))
            await session.commit()
            assert await parallel(sessions, one, one) == [1, 1]
            assert await parallel(sessions, one, limit=3) == [1]
    _assert_all_back(one_connection)


async def test_parallel_with_overflow_from_a_transaction_runs(make_engine: Make) -> None:
    # one connection of overflow: the lent slot's session gets it (no refusal)
    engine = make_engine(pool_size=1, max_overflow=1)
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)

    async def one(session: LimitedAsyncSession) -> int:
        return int((await session.execute(text("SELECT 1"))).scalar_one())

    with anyio.fail_after(30):
        async with sessions() as session:
            await session.execute(text("SELECT 1"))
            assert await parallel(sessions, one, one, one) == [1, 1, 1]
    _assert_all_back(engine)


async def test_parallel_holding_a_slot_but_no_connection_runs(one_connection: AsyncEngine) -> None:
    # ``async with pool_limiter(engine)`` holds the only slot but no connection: the
    # lent slot's session can take the connection, nothing to refuse
    sessions = async_sessionmaker(one_connection, class_=LimitedAsyncSession)

    async def one(session: LimitedAsyncSession) -> int:
        return int((await session.execute(text("SELECT 1"))).scalar_one())

    with anyio.fail_after(30):
        async with pool_limiter(one_connection):
            assert await parallel(sessions, one, one) == [1, 1]
    _assert_all_back(one_connection)


async def test_parallel_with_a_plain_limit_from_the_only_slot_fails_at_once(
    make_engine: Make,
) -> None:
    # room in the pool, but one slot: with a limit that does not lend, every function's
    # LimitedAsyncSession waits for the slot its caller holds until they end: before,
    # a hang with no timeout at all
    engine = make_engine(pool_size=1, max_overflow=5)
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)

    async def one(session: LimitedAsyncSession) -> int:
        return int((await session.execute(text("SELECT 1"))).scalar_one())

    with anyio.fail_after(30):
        async with sessions() as session:
            await session.execute(text("SELECT 1"))
            with pytest.raises(sa_exc.TimeoutError, match="limit=pool_limiter"):
                await parallel(sessions, _never, limit=4)
            # the fix the message names: lend the slot (the default)
            assert await parallel(sessions, one, one) == [1, 1]
    _assert_all_back(engine)


async def test_nested_parallel_holding_the_last_connections_fails_at_once(
    make_engine: Make,
) -> None:
    # the caller holds the pool's connection, its function the overflow one: a nested
    # parallel() from that function can only wait (both wait for it); before, its
    # functions ran and waited pool_timeout for a third connection
    engine = make_engine(pool_size=1, max_overflow=1, pool_timeout=2)
    sessions = async_sessionmaker(engine, class_=LimitedAsyncSession)

    async def outer(session: LimitedAsyncSession) -> str:
        await session.execute(text("SELECT 1"))  # the overflow connection
        with pytest.raises(sa_exc.TimeoutError, match="callers waiting for it"):
            await parallel(sessions, _never)
        await session.commit()
        return "refused"

    with anyio.fail_after(30):
        async with sessions() as session:
            await session.execute(text("SELECT 1"))  # the pool's connection
            assert await parallel(sessions, outer) == ["refused"]
    _assert_all_back(engine)


@pytest.mark.parametrize("fanout", ["gather", "map"])
async def test_a_worker_session_on_the_lent_slot_fails_at_once(
    one_connection: AsyncEngine, fanout: str
) -> None:
    # pk.gather / pk.map with limit=pool_limiter(engine) lend the caller's slot too; an
    # item's session needs a second connection that only the waiting caller can give
    # back: before, the pool's TimeoutError after pool_timeout; now at its first statement
    sessions = async_sessionmaker(one_connection, class_=LimitedAsyncSession)
    slots = pool_limiter(one_connection)

    async def item(i: int) -> int:
        async with sessions() as session:
            return int((await session.execute(text(f"SELECT {i}"))).scalar_one())

    async def quiet(i: int) -> int:
        async with sessions() as session:
            await session.flush()  # nothing to flush: no connection
            return i

    with anyio.fail_after(30):
        async with sessions() as session:
            await session.execute(text("SELECT 1"))
            # an item that needs no connection is not refused
            assert await pk.gather(quiet(3), limit=slots) == [3]
            with pytest.raises(sa_exc.TimeoutError, match="would deadlock"):
                if fanout == "gather":
                    await pk.gather(item(1), item(2), limit=slots)
                else:
                    await pk.map(item, [1, 2], limit=slots)
            await session.commit()
            # committed: the same fan-out runs
            assert await pk.gather(item(1), item(2), limit=slots) == [1, 2]
    _assert_all_back(one_connection)


async def test_the_deadlock_check_counts_the_pool_a_connection_came_from(
    tmp_path: Path,
) -> None:
    # engine.dispose() while a transaction holds a connection: that one belongs to the
    # old pool, the new pool has its one connection free, so the fan-out is not refused;
    # once the new pool's connection is held too, it is. (SQLite only: asyncpg warns
    # about the old pool's connection, which SQLAlchemy never closes, not ours.)
    one_connection = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'disposed.sqlite3'}", pool_size=1, max_overflow=0
    )
    sessions = async_sessionmaker(one_connection, class_=LimitedAsyncSession)

    async def one(session: LimitedAsyncSession) -> int:
        return int((await session.execute(text("SELECT 1"))).scalar_one())

    with anyio.fail_after(30):
        old_pool = one_connection.sync_engine.pool
        async with sessions() as old:
            await old.execute(text("SELECT 1"))
            await one_connection.dispose()
            assert await parallel(sessions, one) == [1]
            async with sessions() as new:  # re-entrant: the same task's slot
                await new.execute(text("SELECT 1"))
                with pytest.raises(sa_exc.TimeoutError, match="would deadlock"):
                    await parallel(sessions, _never)
    _assert_all_back(one_connection)
    await greenlet_spawn(old_pool.dispose)  # the old pool's connection, checked in since
    await one_connection.dispose()


# ---------------------------------------------------------------- joined inheritance and eager_get
class Base(DeclarativeBase):
    pass


class Dept(Base):
    __tablename__ = "pk8_dept"
    id: Mapped[int] = mapped_column(primary_key=True)
    staff: Mapped[list[Employee]] = relationship(back_populates="dept", order_by="Employee.id")


class Employee(Base):
    __tablename__ = "pk8_employee"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    dept_id: Mapped[int | None] = mapped_column(ForeignKey("pk8_dept.id"))
    dept: Mapped[Dept | None] = relationship(back_populates="staff")
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Engineer(Employee):
    __tablename__ = "pk8_engineer"
    id: Mapped[int] = mapped_column(ForeignKey("pk8_employee.id"), primary_key=True)
    level: Mapped[int] = mapped_column(default=1)  # a column of the subclass's own table
    __mapper_args__ = {"polymorphic_identity": "engineer"}


@pytest.fixture
async def staff() -> AsyncIterator[async_sessionmaker[Any]]:
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as session:
        dept = Dept(id=1)
        session.add_all([dept, Employee(id=1, dept=dept), Engineer(id=2, dept=dept, level=3)])
        await session.commit()
    yield sessions
    await engine.dispose()


async def test_eager_get_of_a_loaded_polymorphic_graph_sends_nothing(
    staff: async_sessionmaker[Any],
) -> None:
    # loaded through its base, an Engineer keeps its own table's columns expired (a
    # later read loads them): no eager_get statement loads them either, so they must not
    # count as "not loaded": before, every eager_get of the graph sent a statement again
    engine = staff.kw["bind"]
    async with staff() as session:
        dept = await eager_get(session, Dept, 1, "staff.dept")
        assert dept is not None
        engineer = dept.staff[1]
        assert isinstance(engineer, Engineer)
        assert "level" in inspect(engineer).expired_attributes  # SQLAlchemy's doing
        async with count_queries(engine) as counter:
            again = await eager_get(session, Dept, 1, "staff.dept")
            root = await eager_get(session, Employee, 2, "dept")  # cached as an Engineer
        assert again is dept
        assert root is engineer
        assert counter.count == 0, counter.statements
        # a column the statement does load, expired: a statement, as before
        session.expire(engineer, ["dept_id"])
        async with count_queries(engine) as counter:
            assert await eager_get(session, Dept, 1, "staff.dept") is dept
        assert counter.count == 1
        assert "dept_id" not in inspect(engineer).unloaded


async def test_eager_through_joined_inheritance_loads_every_class(
    staff: async_sessionmaker[Any],
) -> None:
    engine = staff.kw["bind"]
    async with staff() as session, count_queries(engine) as counter:
        rows = (await session.scalars(select(Dept).options(*eager(Dept, "staff.dept")))).all()
        assert [type(e).__name__ for e in rows[0].staff] == ["Employee", "Engineer"]
        assert all(e.dept is rows[0] for e in rows[0].staff)
    assert counter.count == 2


# ---------------------------------------------------------------- loader_by_id: other spellings
class Color(enum.Enum):
    RED = "r"
    BLUE = "b"


class Paint(Base):
    __tablename__ = "pk8_paint"
    color: Mapped[Color] = mapped_column(Enum(Color), primary_key=True)


class Price(Base):
    __tablename__ = "pk8_price"
    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2), primary_key=True)


@pytest.fixture
async def keyed() -> AsyncIterator[async_sessionmaker[Any]]:
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as session:
        session.add_all([Paint(color=Color.RED), Price(amount=Decimal("1.10"))])
        await session.commit()
    yield sessions
    await engine.dispose()


async def test_loader_by_id_answers_an_enum_name_as_session_get_does(
    keyed: async_sessionmaker[Any],
) -> None:
    # documented: "an Enum column also takes its members' names"; session.get(Paint,
    # "RED") finds the row, and the batch's query did too, but it came back keyed by
    # the member: before, the caller got None
    async with keyed() as session:
        assert await session.get(Paint, "RED") is not None
    engine = keyed.kw["bind"]
    async with loader_by_id(keyed, Paint) as paints, count_queries(engine) as counter:
        by_member, by_name, missing = await asyncio.gather(
            paints.load(Color.RED), paints.load("RED"), paints.load("BLUE")
        )
    assert by_member is not None
    assert by_name is not None
    assert by_name.color is Color.RED
    assert missing is None
    assert counter.count == 1


async def test_loader_by_id_answers_a_float_for_a_numeric_key(
    keyed: async_sessionmaker[Any],
) -> None:
    # the row is found by 1.1 and comes back as Decimal("1.10"), which is not == 1.1
    async with loader_by_id(keyed, Price) as prices:
        as_float, as_decimal, other = await asyncio.gather(
            prices.load(1.1), prices.load(Decimal("1.1")), prices.load(2.5)
        )
    assert as_float is not None
    assert as_float is as_decimal
    assert other is None
