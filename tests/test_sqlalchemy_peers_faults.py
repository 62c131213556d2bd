"""Fault paths of peer loading (fetch_peers / load) and loader_by_id, on SQLite and PostgreSQL.

* a peer load cancelled between two chunk statements: what was set is complete, the
  rest is loaded later, nothing half-populated is served;
* the connection killed (``pg_terminate_backend``) under a hop: the driver's real
  error, and after a rollback the same group loads right;
* a rollback between the first load and the peers' access;
* loader_by_id: a key no row can have (``2**70``, NaN, ``Decimal("2.5")``, an int
  out of PostgreSQL's ``integer``) is answered ``None`` without failing the batch.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import anyio
import pytest
from examples.crm import Contact, Conversation
from sqlalchemy import event, select, text
from sqlalchemy.exc import DBAPIError, PendingRollbackError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import parallelkit as pk
from parallelkit.sqlalchemy import count_queries, fetch_peers, load, loader_by_id

pytest_plugins = ["tests.sqla_fixtures"]
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's asyncio extension runs on asyncio only (greenlets driven by its loop)
    return "asyncio"


def on_statement(engine: AsyncEngine, fn: Any) -> Any:
    """Call ``fn(statement)`` before each statement ``engine`` sends; returns the remover."""

    def before(*args: Any) -> None:
        fn(args[2])

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    return lambda: event.remove(engine.sync_engine, "before_cursor_execute", before)


CONVERSATION_COMPANY = select(Conversation.id, Contact.company_id).join(Conversation.contact)


# ------------------------------------------------------------------ peer loading
async def test_a_peer_load_cancelled_between_chunks(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine) as session:
        stmt = select(Contact).order_by(Contact.id).options(fetch_peers(chunk_size=10))
        contacts = (await session.scalars(stmt)).all()  # 100 contacts: 10 chunks
        hops: list[str] = []
        with anyio.CancelScope() as scope:

            def cancel_at_third(statement: str) -> None:
                if "JOIN" in statement:
                    hops.append(statement)
                    if len(hops) == 3:
                        scope.cancel()  # the client went away during the third chunk

            remove = on_statement(crm_engine, cancel_at_third)
            try:
                await load(contacts[0], "conversations")
            finally:
                remove()
        assert scope.cancelled_caught
        loaded = [c for c in contacts if "conversations" in c.__dict__]
        assert len(loaded) == 20  # the two chunks that finished, each collection whole
        assert {len(c.__dict__["conversations"]) for c in loaded} == {5}
        with pytest.raises(PendingRollbackError):  # the session says it failed
            await load(contacts[50], "conversations")
        await session.rollback()
        async with count_queries(crm_engine) as counter:
            lengths = [len(await load(c, "conversations")) for c in contacts]
        assert lengths == [5] * 100
        assert counter.count == 10  # expired by the rollback: the whole group, by chunks


@pytest.mark.postgres
@pytest.mark.parametrize("crm_engine", ["postgres"], indirect=True)
async def test_the_connection_killed_under_a_hop(crm_engine: AsyncEngine) -> None:
    from sqlalchemy.util import await_

    admin = AsyncSession(crm_engine)
    try:
        async with AsyncSession(crm_engine) as session:
            pid = (await session.execute(text("select pg_backend_pid()"))).scalar_one()
            stmt = select(Conversation).order_by(Conversation.id).options(fetch_peers())
            conversations = (await session.scalars(stmt)).all()
            await admin.execute(text("select 1"))  # connected before the hop

            def kill(statement: str) -> None:
                if statement.lstrip().startswith("SELECT contacts"):
                    await_(admin.execute(text("select pg_terminate_backend(:p)"), {"p": pid}))

            remove = on_statement(crm_engine, kill)
            try:
                with pytest.raises(DBAPIError) as info:
                    await load(conversations[0], "contact.company")
            finally:
                remove()
            assert info.value.connection_invalidated
            assert not any("contact" in c.__dict__ for c in conversations)
            await session.rollback()
            async with count_queries(crm_engine) as counter:
                companies = {(await load(c, "contact.company")).id for c in conversations}
            assert companies == set(range(1, 11))
            assert counter.count == 2  # contacts, companies: the group survived
    finally:
        await admin.close()


async def test_a_rollback_between_the_first_load_and_the_peers(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine) as session:
        stmt = select(Conversation).order_by(Conversation.id).options(fetch_peers())
        conversations = (await session.scalars(stmt)).all()
        want = {row[0]: row[1] for row in await session.execute(CONVERSATION_COMPANY)}
        ids = [c.id for c in conversations]
        await load(conversations[0], "contact")
        await session.rollback()  # expires everything, the foreign keys too
        async with count_queries(crm_engine) as counter:
            companies = [(await load(c, "contact.company")).id for c in conversations]
        assert counter.count == 2
        assert companies == [want[i] for i in ids]


async def test_the_class_instead_of_an_instance_is_named() -> None:
    with pytest.raises(TypeError, match="got the class Conversation: pass one of its instances"):
        await load(Conversation, "contact")


# ------------------------------------------------------------------ loader_by_id
class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "pk_peer_fault_item"
    id: Mapped[int] = mapped_column(primary_key=True)


class Pair(Base):
    __tablename__ = "pk_peer_fault_pair"
    a: Mapped[int] = mapped_column(primary_key=True)
    b: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture
async def db(any_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    async with any_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(any_engine)
    async with sessions() as session:
        session.add_all([Item(id=1), Item(id=2), Pair(a=1, b=2)])
        await session.commit()
    return sessions


async def test_a_key_no_row_can_have_fails_no_other_caller(
    db: async_sessionmaker[AsyncSession],
) -> None:
    # each of these made the driver fail the whole batch (every caller) on SQLite or asyncpg
    impossible = [2**70, -(2**63) - 1, 2**40, math.nan, math.inf, Decimal("2.5"), Decimal("NaN")]
    async with loader_by_id(db, Item) as items, count_queries(db) as counter:
        one, two, *rest = await pk.gather(
            items.load(1), items.load(Decimal(2)), *(items.load(key) for key in impossible)
        )
    assert one is not None
    assert one.id == 1
    assert two is not None  # an integral Decimal is the int it equals
    assert two.id == 2
    assert rest == [None] * len(impossible)
    assert counter.count == 1
    async with loader_by_id(db, Pair) as pairs:
        pair, none = await pk.gather(pairs.load((1, 2)), pairs.load((1, 2**70)))
    assert pair is not None
    assert (pair.a, pair.b) == (1, 2)
    assert none is None
