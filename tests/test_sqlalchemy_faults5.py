"""parallelkit.sqlalchemy, fifth fault review: shapes and sizes the earlier rounds missed.

* a NOT NULL many-to-one whose target is an inheritance *subclass* reached through a
  foreign key to the base table: an inner join dropped the rows pointing at another
  class (a lazy load gives ``None``);
* ``eager_get`` on a cached object with a custom ``collection_class``;
* ``load()`` with an empty path segment;
* ``loader_by_id`` with a ``max_batch`` past PostgreSQL's bound-parameter limit.

SQLite and PostgreSQL; asyncio only (SQLAlchemy's asyncio extension).
"""

from __future__ import annotations

import contextvars
import copy
import pickle
from collections.abc import Iterator

import pytest
from sqlalchemy import ForeignKey, String, create_engine, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.orm.collections import collection

from parallelkit.sqlalchemy import (
    NotLoadedError,
    RelationshipPathError,
    SessionInUseError,
    TooManyQueries,
    count_queries,
    eager,
    eager_get,
    fetch_peers,
    load,
    loader_by_id,
    max_queries,
)

pytest_plugins = ["tests.sqla_fixtures"]
pytestmark = pytest.mark.anyio

Sessions = async_sessionmaker


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension


class Base(DeclarativeBase):
    pass


class Person(Base):  # joined-table inheritance
    __tablename__ = "pk_f5_person"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "person"}


class Manager(Person):
    __tablename__ = "pk_f5_manager"
    id: Mapped[int] = mapped_column(ForeignKey("pk_f5_person.id"), primary_key=True)
    __mapper_args__ = {"polymorphic_identity": "manager"}


class Task(Base):
    __tablename__ = "pk_f5_task"
    id: Mapped[int] = mapped_column(primary_key=True)
    # NOT NULL, a real FOREIGN KEY to the *base* table; the relationship targets a subclass
    owner_id: Mapped[int] = mapped_column(ForeignKey("pk_f5_person.id"))
    owner: Mapped[Manager] = relationship()


class Note(Base):
    __tablename__ = "pk_f5_note"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("pk_f5_person.id"))
    author: Mapped[Person] = relationship()


class Bag:
    """A custom collection class: neither a list, a set nor a dict."""

    def __init__(self) -> None:
        self.items: list[Item] = []

    @collection.appender
    def append(self, item: Item) -> None:
        self.items.append(item)

    @collection.remover
    def remove(self, item: Item) -> None:
        self.items.remove(item)

    @collection.iterator
    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)


class Box(Base):
    __tablename__ = "pk_f5_box"
    id: Mapped[int] = mapped_column(primary_key=True)
    items = relationship("Item", back_populates="box", collection_class=Bag)


class Item(Base):
    __tablename__ = "pk_f5_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    box_id: Mapped[int] = mapped_column(ForeignKey("pk_f5_box.id"))
    box: Mapped[Box] = relationship(back_populates="items")


class Version(Base):  # a composite primary key
    __tablename__ = "pk_f5_version"
    doc: Mapped[int] = mapped_column(primary_key=True)
    rev: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture
async def db(any_engine: AsyncEngine) -> Sessions:
    async with any_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(any_engine, expire_on_commit=False)
    async with sessions() as session:
        session.add_all([Person(id=1), Manager(id=2)])
        await session.flush()
        session.add_all([Task(id=1, owner_id=1), Task(id=2, owner_id=2)])
        session.add(Box(id=1))
        await session.flush()
        session.add_all([Item(id=1, box_id=1), Item(id=2, box_id=1)])
        await session.commit()
    return sessions


# ------------------------------------------------------------ inner join to a subclass
async def test_a_subclass_target_is_joined_outer_and_keeps_every_row(db: Sessions) -> None:
    async with db() as session:  # what a lazy load gives: task 1's owner is no Manager
        tasks = (await session.scalars(select(Task).order_by(Task.id))).all()
        owners = [await session.run_sync(lambda _, t=t: t.owner) for t in tasks]
        assert [o.id if o else None for o in owners] == [None, 2]
    async with db() as session:
        stmt = select(Task).order_by(Task.id).options(*eager(Task, "owner"))
        tasks = (await session.scalars(stmt)).all()
        assert [t.id for t in tasks] == [1, 2]  # the inner join dropped task 1
        assert [t.owner.id if t.owner else None for t in tasks] == [None, 2]
    async with db() as session:
        task = await eager_get(session, Task, 1, "owner")
        assert task is not None  # the row exists
        assert task.owner is None


def test_the_base_class_target_is_still_an_inner_join() -> None:
    text = str(select(Note).options(*eager(Note, "author")).compile())
    assert "LEFT OUTER JOIN" not in text
    assert "JOIN pk_f5_person" in text
    text = str(select(Task).options(*eager(Task, "owner")).compile())
    assert "LEFT OUTER JOIN" in text


# ------------------------------------------------------------ custom collection classes
async def test_eager_get_of_a_cached_object_with_a_custom_collection(
    db: Sessions, any_engine: AsyncEngine
) -> None:
    async with db() as session:
        box = await eager_get(session, Box, 1, "items.box")
        assert box is not None
        assert [item.id for item in box.items] == [1, 2]
        async with count_queries(any_engine) as counter:
            again = await eager_get(session, Box, 1, "items.box")  # raised NoInspectionAvailable
        assert again is box
        assert counter.count == 0  # the cached graph is complete: no statement
        item = box.items.items[0]
        session.expire(item)  # now a path object needs a refresh: one statement fills it in
        async with count_queries(any_engine) as counter:
            again = await eager_get(session, Box, 1, "items.box")
        assert again is box
        assert counter.count == 1
        assert [i.box.id for i in again.items] == [1, 1]


# ------------------------------------------------------------ load(): an empty segment
@pytest.mark.parametrize("path", ["", "items.", ".items", "items..box"])
async def test_load_names_an_empty_path_segment(db: Sessions, path: str) -> None:
    async with db() as session:
        box = await session.get(Box, 1)
        assert box is not None
        with pytest.raises(RelationshipPathError) as caught:
            await load(box, path)
        message = str(caught.value)
        # was only "Box. is not a relationship" (or "Item. ..."): which segment, and why?
        assert "the path has an empty segment" in message, message
        assert repr(path) in message


# ------------------------------------------------------------ past the bound-parameter cap
BIG = 33_000  # past asyncpg's 32,767 bound parameters in one statement


async def test_loader_by_id_splits_a_batch_past_the_parameter_cap(
    db: Sessions, any_engine: AsyncEngine
) -> None:
    async with db() as session:
        session.add(Version(doc=7, rev=3))
        await session.commit()
    keys = [*range(10, 10 + BIG), 2]
    async with loader_by_id(db, Person, max_batch=40_000) as people:
        with count_queries(any_engine) as counter:
            found = await people.load_many(keys)  # one batch: was an InterfaceError for all
    assert found[-1] is not None
    assert found[-1].id == 2
    assert all(row is None for row in found[:-1])
    assert counter.count == 2  # 33,001 keys: two statements (SQLite's default cap is 32,766)
    pairs = [*((doc, doc) for doc in range(10, 10 + 9_000)), (7, 3)]
    async with loader_by_id(db, Version, max_batch=10_000) as versions:
        # PostgreSQL: 18,002 parameters (under the cap), but a row-value IN list that long
        # ran out of stack ("stack depth limit exceeded")
        found = await versions.load_many(pairs)
    assert found[-1] is not None
    assert (found[-1].doc, found[-1].rev) == (7, 3)
    assert all(row is None for row in found[:-1])


async def test_a_peer_group_past_the_parameter_cap_loads(
    db: Sessions, any_engine: AsyncEngine
) -> None:
    async with any_engine.begin() as conn:
        await conn.execute(insert(Box), [{"id": i} for i in range(10, 10 + BIG)])
    async with db() as session:  # SELECT item, box.id ... JOIN ... WHERE box.id IN (...)
        stmt = select(Box).order_by(Box.id).options(fetch_peers(chunk_size=40_000))
        boxes = (await session.scalars(stmt)).all()
        with count_queries(any_engine) as counter:
            first = await load(boxes[0], "items")  # was an InterfaceError on PostgreSQL
        assert [item.id for item in first] == [1, 2]
        assert counter.count == 2  # 33,001 peers: two statements
        assert boxes[-1].items.items == []  # the second statement's peers: loaded, empty


# ------------------------------------------------------------ errors survive pickle and copy
async def test_the_errors_survive_pickle_and_copy(db: Sessions, any_engine: AsyncEngine) -> None:
    # a worker process or a Taskiq worker sends its error back pickled; copy.copy(error)
    # calls the class the same way: each raised TypeError (the message as the only arg)
    errors: list[Exception] = [SessionInUseError("execute", "commit")]
    async with db() as session:
        task = (await session.scalars(select(Task).where(Task.id == 2).options(*eager(Task)))).one()
        with pytest.raises(NotLoadedError) as not_loaded:
            _ = task.owner
        errors.append(not_loaded.value)
        with pytest.raises(RelationshipPathError) as bad_path:
            await load(task, "ownr")
        errors.append(bad_path.value)
        with pytest.raises(TooManyQueries) as too_many:
            async with max_queries(any_engine, 0):
                await session.get(Box, 1)
        errors.append(too_many.value)
    for error in errors:
        for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
            assert type(clone) is type(error)
            assert str(clone) == str(error)
            assert vars(clone) == vars(error)


# ------------------------------------------------------------ a shared guard left elsewhere
def test_a_shared_guard_left_in_another_context_leaves_other_blocks_counting() -> None:
    """One module-level guard, two concurrent requests: A leaves its block in another
    context (a ``def`` dependency's teardown in a worker thread). That stopped the block
    entered *last*, B's: B's budget then passed silently, whatever B sent."""
    engine = create_engine("sqlite://")
    guard = max_queries(engine, 1)
    a_enter, a_exit = contextvars.copy_context(), contextvars.copy_context()
    a_enter.run(guard.__enter__)  # request A's first step
    over = pytest.raises(TooManyQueries, match="expected at most 1 queries, 3 were sent")
    with over, guard as counter:  # request B
        with pytest.raises(RuntimeError, match="left in another context"):
            a_exit.run(guard.__exit__, None, None, None)  # A's teardown step
        with engine.connect() as conn:
            for i in range(3):
                conn.execute(text(f"SELECT {i}"))
    assert counter.count == 3
    # alone, a block left in another context is still stopped (nothing keeps counting)
    alone = max_queries(engine, 1)
    a_enter, a_exit = contextvars.copy_context(), contextvars.copy_context()
    counter = a_enter.run(alone.__enter__)
    with pytest.raises(RuntimeError, match="left in another context"):
        a_exit.run(alone.__exit__, None, None, None)
    assert not counter._listening
    engine.dispose()
