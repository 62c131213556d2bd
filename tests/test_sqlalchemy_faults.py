"""parallelkit.sqlalchemy fault paths: bad keys in loader_by_id, a reused max_queries, bad fns."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, Uuid, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import parallelkit as pk
from parallelkit.sqlalchemy import (
    TooManyQueries,
    count_queries,
    loader_by_id,
    max_queries,
    parallel,
)

pytest_plugins = ["tests.sqla_fixtures"]
pytestmark = pytest.mark.anyio

KEY = uuid.UUID("8f0c6f5e-4c1a-4b7e-9a55-0c2b6f0d9a11")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "pk_fault_item"
    id: Mapped[int] = mapped_column(primary_key=True)


class Token(Base):
    __tablename__ = "pk_fault_token"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)


class Pair(Base):
    __tablename__ = "pk_fault_pair"
    a: Mapped[int] = mapped_column(primary_key=True)
    b: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture
async def db(any_engine: AsyncEngine) -> async_sessionmaker:  # type: ignore[type-arg]
    async with any_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(any_engine)
    async with sessions() as session:
        session.add_all([Item(id=1), Item(id=2), Token(id=KEY), Pair(a=1, b=2)])
        await session.commit()
    return sessions


# ---------------------------------------------------------------------------- loader_by_id
async def test_a_key_of_the_wrong_type_fails_its_callers_only(
    db: async_sessionmaker,  # type: ignore[type-arg]
    any_engine: AsyncEngine,
) -> None:
    async with loader_by_id(db, Item) as items:
        with count_queries(any_engine) as counter:
            good, bad, missing = await pk.gather(
                items.load(1), items.load("2"), items.load(3), settle=True
            )
    # PostgreSQL refused "2" for the whole batch; SQLite found row 2 and answered None
    assert good.ok
    assert good.value.id == 1
    assert isinstance(bad.error, TypeError)
    assert "loader_by_id(Item): id must be int, got str '2'" in str(bad.error)
    assert missing.ok
    assert missing.value is None
    assert counter.count == 1  # one batch, the bad key not sent


async def test_a_uuid_key_given_as_str_is_refused_not_answered_none(
    db: async_sessionmaker,  # type: ignore[type-arg]
) -> None:
    async with loader_by_id(db, Token) as tokens:
        right, wrong = await pk.gather(tokens.load(KEY), tokens.load(str(KEY)), settle=True)
    assert right.ok
    assert right.value.id == KEY
    assert isinstance(wrong.error, TypeError)
    assert "id must be UUID, got str" in str(wrong.error)


async def test_composite_keys_are_checked_per_key(
    db: async_sessionmaker,  # type: ignore[type-arg]
) -> None:
    async with loader_by_id(db, Pair) as pairs:
        found, scalar, short, wrong = await pk.gather(
            pairs.load((1, 2)), pairs.load(1), pairs.load((1,)), pairs.load((1, "2")), settle=True
        )
    assert found.ok
    assert (found.value.a, found.value.b) == (1, 2)
    assert "a key is a tuple of 2 values (a, b), got int 1" in str(scalar.error)
    assert "got tuple (1,)" in str(short.error)
    assert "b must be int, got str '2'" in str(wrong.error)


async def test_only_bad_keys_send_no_query(
    db: async_sessionmaker,  # type: ignore[type-arg]
    any_engine: AsyncEngine,
) -> None:
    async with loader_by_id(db, Item) as items:
        with count_queries(any_engine) as counter:
            (outcome,) = await pk.gather(items.load((1,)), settle=True)
    assert isinstance(outcome.error, TypeError)
    assert counter.count == 0


async def test_numbers_and_none_are_still_keys(
    db: async_sessionmaker,  # type: ignore[type-arg]
) -> None:
    async with loader_by_id(db, Item) as items:
        two, none = await pk.gather(items.load(2.0), items.load(None))
    assert two is not None
    assert two.id == 2
    assert none is None


# ---------------------------------------------------------------------------- max_queries
@pytest.fixture
def memory() -> Iterator[Engine]:
    engine = create_engine("sqlite://")
    yield engine
    engine.dispose()  # closes the connection (Python 3.13 warns about one left open)


def test_a_reused_guard_gives_each_block_the_whole_budget(memory: Engine) -> None:
    guard = max_queries(memory, 1)
    for _ in range(3):
        with guard as counter, Session(memory) as session:
            session.execute(text("select 1"))
        assert counter.count == 1
        assert guard.counter is counter
    too_many = pytest.raises(TooManyQueries, match="expected at most 1 queries, 2 were sent")
    with too_many, guard, Session(memory) as session:
        session.execute(text("select 1"))
        session.execute(text("select 2"))


def test_a_guard_active_twice_at_once_still_says_so(memory: Engine) -> None:
    guard = max_queries(memory, 1)
    with guard, pytest.raises(RuntimeError, match="already active"):
        guard.__enter__()


# ---------------------------------------------------------------------------- parallel
async def test_a_function_that_is_not_async_is_named(
    db: async_sessionmaker,  # type: ignore[type-arg]
) -> None:
    async def fine(session: object) -> int:
        return 1

    with pytest.raises(TypeError, match=r"fns\[1\] must be an async function of the session"):
        await parallel(db, fine, lambda session: 2)  # type: ignore[arg-type, return-value]


async def test_a_sync_session_factory_is_named() -> None:
    with pytest.raises(TypeError, match="session_factory must return an AsyncSession"):
        await parallel(sessionmaker(), lambda session: session.execute(text("select 1")))
