"""Adversarial review of the one-call raise guard and of ``eager`` returning one ``Load``
per root (commit 5987330): each test passes on the code before that commit.

The one-call guard is chosen when a statement's rows are about to be read into a session
holding no object yet; objects can still reach the session before the rows are read
(a result consumed after another query, a server-side cursor read in partitions with
queries in between, a ``load`` listener). Those objects must end as before: what they had
loaded kept, every other relationship raising ``NotLoadedError`` (no query), no extra
``refresh`` event. The merged ``Load`` must give the same SQL, the same messages and no
compiled-cache mix-up between different ``eager()`` calls.
"""

from __future__ import annotations

import gc
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from examples.crm import Company, Contact, Conversation
from sqlalchemy import Engine, ForeignKey, String, create_engine, event, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    aliased,
    mapped_column,
    relationship,
    selectinload,
    with_polymorphic,
)
from sqlalchemy.pool import StaticPool

from parallelkit.sqlalchemy import NotLoadedError, count_queries, eager

pytest_plugins = ["tests.sqla_fixtures"]

CONTACT_KEYS = ("company", "conversations", "enrollments")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension runs on asyncio only


def assert_guarded(obj: Any, loaded: set[str], engine: Any, root: str | None = None) -> None:
    """Every relationship of ``obj``: in ``loaded`` -> its value, no query; else
    NotLoadedError, no query."""
    keys = sorted(inspect(obj).mapper.relationships.keys())
    with count_queries(engine) as counter:
        for key in keys:
            if key in loaded:
                assert key in obj.__dict__, (obj, key)
                getattr(obj, key)
            else:
                with pytest.raises(NotLoadedError) as info:
                    getattr(obj, key)
                if root is not None:
                    assert info.value.root == root
    assert counter.count == 0, (obj, keys)


# ------------------------------------------------------------------- the defect found
def test_a_fully_loaded_object_held_before_the_rows_are_read_gets_no_refresh_event(
    sync_engine: Engine,
) -> None:
    """The result is read after another query put contact 2, fully loaded, in the session.
    SQLAlchemy leaves such an object alone (nothing unloaded, no eager loader): no
    ``refresh`` event. The one-call guard's ``populators["eager"]`` entry made it
    partially populate it: a ``refresh`` event with no attributes."""
    events: list[tuple[int, set[str] | None]] = []

    def on_refresh(target: Contact, context: object, attrs: Any) -> None:
        events.append((target.id, None if attrs is None else set(attrs)))

    event.listen(Contact, "refresh", on_refresh)
    try:
        with Session(sync_engine) as session:
            stmt = select(Contact).where(Contact.id <= 4).order_by(Contact.id)
            result = session.scalars(stmt.options(*eager(Contact)))  # rows not read yet
            held = session.get_one(Contact, 2)
            for key in CONTACT_KEYS:
                getattr(held, key)
            rows = result.all()
            assert rows[1] is held
            assert events == []
            assert_guarded(held, set(CONTACT_KEYS), sync_engine)
            for row in (rows[0], rows[2], rows[3]):
                assert_guarded(row, set(), sync_engine, "Contact")
    finally:
        event.remove(Contact, "refresh", on_refresh)


# ------------------------------------------------- objects the session got meanwhile
@pytest.mark.parametrize(
    "touched", [(), ("company",), ("conversations",), ("enrollments",), ("company", "enrollments")]
)
def test_a_result_read_after_another_query_guards_what_that_query_left_unloaded(
    sync_engine: Engine, touched: tuple[str, ...]
) -> None:
    with Session(sync_engine) as session:
        stmt = select(Contact).where(Contact.id <= 3).order_by(Contact.id)
        result = session.scalars(stmt.options(*eager(Contact, "company")))
        held = session.get_one(Contact, 2)
        for key in touched:
            getattr(held, key)
        session.expire(held, ["email"])  # a column to reload too
        rows = result.all()
        assert rows[1] is held
        assert held.email
        assert_guarded(held, {"company", *touched}, sync_engine, "Contact")
        for row in (rows[0], rows[2]):
            assert_guarded(row, {"company"}, sync_engine, "Contact")


def test_a_load_listener_that_queries_meets_rows_of_its_own_entity(sync_engine: Engine) -> None:
    held: list[Any] = []

    def on_load(target: Conversation, context: object) -> None:
        if target.id == 1:
            session = inspect(target).session
            assert session is not None
            other = session.get_one(Conversation, 2)
            held.append(other)
            _ = other.contact  # a plain lazy load: loaded

    event.listen(Conversation, "load", on_load)
    try:
        with Session(sync_engine) as session:
            stmt = select(Conversation).where(Conversation.id <= 3).order_by(Conversation.id)
            rows = session.scalars(stmt.options(*eager(Conversation))).all()
            assert rows[1] is held[0]
            assert_guarded(rows[0], set(), sync_engine, "Conversation")
            assert_guarded(rows[1], {"contact"}, sync_engine)
            assert_guarded(rows[2], set(), sync_engine, "Conversation")
    finally:
        event.remove(Conversation, "load", on_load)


@pytest.mark.anyio
async def test_a_streamed_result_read_in_partitions_with_queries_in_between(
    crm_engine: AsyncEngine,
) -> None:
    """A server-side cursor (PostgreSQL) reads the rows chunk by chunk, without
    ``yield_per`` on the statement: objects loaded between two chunks are held."""
    sessions = async_sessionmaker(crm_engine, expire_on_commit=False)
    stmt = select(Contact).where(Contact.id <= 12).order_by(Contact.id)
    async with sessions() as session:
        result = await session.stream_scalars(stmt.options(*eager(Contact, "company")))
        parts = result.partitions(4)
        rows = list(await parts.__anext__())
        later = select(Contact).where(Contact.id.in_([7, 8]))
        got = (await session.scalars(later.options(selectinload(Contact.conversations)))).all()
        async for part in parts:
            rows.extend(part)
        assert [row.id for row in rows] == list(range(1, 13))
        for row in rows:
            loaded = {"company"} | ({"conversations"} if row in got else set())
            assert_guarded(row, loaded, crm_engine.sync_engine, "Contact")


def test_objects_collected_from_the_identity_map_then_a_fresh_statement(
    sync_engine: Engine,
) -> None:
    with Session(sync_engine) as session:
        rows = session.scalars(select(Contact).where(Contact.id <= 3).options(*eager(Contact)))
        del rows
        gc.collect()
        assert len(session.identity_map) == 0
        again = session.scalars(
            select(Contact).where(Contact.id <= 3).options(*eager(Contact, "conversations"))
        ).all()
        for row in again:
            assert_guarded(row, {"conversations"}, sync_engine, "Contact")


def test_expunge_then_re_add_keeps_the_first_guard(sync_engine: Engine) -> None:
    with Session(sync_engine) as session:
        (first,) = session.scalars(
            select(Contact).where(Contact.id == 1).options(*eager(Contact, "company"))
        )
        session.expunge(first)
        (second,) = session.scalars(
            select(Contact).where(Contact.id == 1).options(*eager(Contact, "enrollments"))
        )
        assert second is not first
        assert_guarded(second, {"enrollments"}, sync_engine, "Contact")
        session.expunge(second)
        session.add(first)
        assert_guarded(first, {"company"}, sync_engine, "Contact")


# ------------------------------------------------ execution options and session APIs
def test_session_get_with_options_for_update_and_populate_existing(sync_engine: Engine) -> None:
    with Session(sync_engine) as session:
        got = session.get_one(Contact, 3, options=eager(Contact, "company"), with_for_update=True)
        assert_guarded(got, {"company"}, sync_engine, "Contact")
    with Session(sync_engine) as session:
        held = session.get_one(Contact, 3)
        _ = held.conversations
        again = session.get_one(
            Contact, 3, options=eager(Contact, "enrollments"), populate_existing=True
        )
        assert again is held
        assert_guarded(held, {"enrollments"}, sync_engine, "Contact")


@pytest.mark.parametrize("where", ["statement", "session"])
def test_execution_options_on_the_statement_or_the_session(sync_engine: Engine, where: str) -> None:
    opts = {"populate_existing": True, "yield_per": 5}
    with Session(sync_engine) as session:
        held = session.get_one(Contact, 2)
        _ = held.conversations
        stmt = select(Contact).where(Contact.id <= 12).order_by(Contact.id)
        stmt = stmt.options(*eager(Contact, "company.contacts"))
        if where == "statement":
            rows = list(session.scalars(stmt.execution_options(**opts)))
        else:
            rows = list(session.scalars(stmt, execution_options=opts))
        assert rows[1] is held
        for row in rows:
            assert_guarded(row, {"company"}, sync_engine, "Contact")
            assert_guarded(row.company, {"contacts"}, sync_engine, "Contact")


def test_refresh_and_reload_after_commit_keep_the_guard(sync_engine: Engine) -> None:
    with Session(sync_engine) as session:
        stmt = select(Contact).where(Contact.id <= 3).order_by(Contact.id)
        rows = session.scalars(stmt.options(*eager(Contact, "company"))).all()
        session.refresh(rows[0])
        session.commit()  # expires all
        assert [row.email for row in rows]
        for row in rows:
            assert_guarded(row, set(row.__dict__) & {"company"}, sync_engine, "Contact")


def test_legacy_query_and_tuples_of_entities(sync_engine: Engine) -> None:
    with Session(sync_engine) as session:
        rows = session.query(Contact).filter(Contact.id <= 3).options(*eager(Contact)).all()
        for row in rows:
            assert_guarded(row, set(), sync_engine, "Contact")
    with Session(sync_engine) as session:
        stmt = (
            select(Conversation, Company)
            .join(Conversation.contact)
            .join(Contact.company)
            .where(Conversation.id <= 6)
            .options(*eager(Conversation, "contact"), *eager(Company, "settings"))
        )
        for conversation, company in session.execute(stmt):
            assert_guarded(conversation, {"contact"}, sync_engine, "Conversation")
            assert_guarded(company, {"settings"}, sync_engine, "Company")


def test_pickled_rows_of_a_fresh_session(sync_engine: Engine) -> None:
    with Session(sync_engine) as session:
        rows = session.scalars(
            select(Contact).where(Contact.id <= 3).options(*eager(Contact, "company"))
        ).all()
    for copy in pickle.loads(pickle.dumps(rows)):
        assert copy.company.id
        for key in ("conversations", "enrollments"):
            with pytest.raises(NotLoadedError) as info:
                getattr(copy, key)
            assert (info.value.root, info.value.path) == ("Contact", key)


# ------------------------------------------ merged options: SQL, messages, the cache
class Base(DeclarativeBase):
    pass


class Org(Base):
    __tablename__ = "review_org"
    id: Mapped[int] = mapped_column(primary_key=True)
    people: Mapped[list[Person]] = relationship(back_populates="org", foreign_keys="Person.org_id")


class Person(Base):
    __tablename__ = "review_person"
    id: Mapped[int] = mapped_column(primary_key=True)
    type: Mapped[str] = mapped_column(String(20))
    org_id: Mapped[int] = mapped_column(ForeignKey("review_org.id"))
    org: Mapped[Org] = relationship(back_populates="people", foreign_keys=[org_id])
    manager_id: Mapped[int | None] = mapped_column(ForeignKey("review_person.id"))
    manager: Mapped[Person | None] = relationship(remote_side=[id], back_populates="underlings")
    underlings: Mapped[list[Person]] = relationship(back_populates="manager")
    __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "person"}


class Boss(Person):  # joined-table
    __tablename__ = "review_boss"
    id: Mapped[int] = mapped_column(ForeignKey("review_person.id"), primary_key=True)
    reports: Mapped[list[Report]] = relationship(back_populates="boss")
    __mapper_args__ = {"polymorphic_identity": "boss"}


class Vip(Person):  # single-table
    lounge_id: Mapped[int | None] = mapped_column(ForeignKey("review_org.id"))
    lounge: Mapped[Org | None] = relationship(foreign_keys=[lounge_id])
    __mapper_args__ = {"polymorphic_identity": "vip"}


class Report(Base):
    __tablename__ = "review_report"
    id: Mapped[int] = mapped_column(primary_key=True)
    boss_id: Mapped[int] = mapped_column(ForeignKey("review_boss.id"))
    boss: Mapped[Boss] = relationship(back_populates="reports")


@pytest.fixture
def people() -> Iterator[Engine]:
    engine = create_engine("sqlite://", poolclass=StaticPool)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        org = Org(id=1)
        boss = Boss(id=2, org=org, reports=[Report(id=1)])
        session.add_all(
            [
                org,
                boss,
                Person(id=1, org=org, manager=boss),
                Vip(id=3, org=org, manager=boss, lounge=org),
            ]
        )
        session.commit()
    yield engine
    engine.dispose()


def messages(engine: Engine, root: Any, paths: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """(class, id, key, loaded | (root, path, hint)) for every relationship of every row."""
    out: list[tuple[Any, ...]] = []
    with Session(engine) as session:
        stmt = select(root).order_by(root.id).options(*eager(root, *paths))
        for row in session.scalars(stmt):
            out.extend(
                (type(row).__name__, row.id, key, outcome(row, key))
                for key in sorted(inspect(row).mapper.relationships.keys())
            )
    return out


def outcome(row: Any, key: str) -> Any:
    try:
        getattr(row, key)
    except NotLoadedError as error:
        return (error.root, error.path, error.hint)
    return "loaded"


def test_subclass_and_aliased_roots_name_their_root(people: Engine) -> None:
    vip = messages(people, Vip, ("org", "manager"))
    assert ("Vip", 3, "underlings", ("Vip", "underlings", None)) in vip
    assert ("Vip", 3, "lounge", ("Vip", "lounge", None)) in vip
    with Session(people) as session:
        (row,) = session.scalars(select(Vip).options(*eager(Vip, "manager")))
        assert row.manager is not None
        with pytest.raises(NotLoadedError) as info:
            _ = row.manager.org
        assert (info.value.root, info.value.path) == ("Vip", "manager.org")
    boss = messages(people, Boss, ("reports",))
    assert ("Boss", 2, "org", ("Boss", "org", None)) in boss
    everyone = messages(people, Person, ("org",))
    hint = "selectin_polymorphic(Person, [Boss]), selectinload(Boss.reports)"
    assert ("Boss", 2, "reports", ("Person", "reports", hint)) in everyone
    alias = aliased(Person)
    assert ("Vip", 3, "manager", ("Person", "manager", None)) in messages(people, alias, ("org",))
    poly = with_polymorphic(Person, [Boss])
    assert ("Boss", 2, "underlings", ("Person", "underlings", None)) in messages(
        people, poly, ("org",)
    )


def test_one_statement_shape_with_different_eager_calls_never_shares_a_plan(
    people: Engine,
) -> None:
    """Run each eager() variant twice in turn on one engine (a shared compiled cache):
    each keeps its own SQL and messages, as on an engine of its own."""
    variants: list[tuple[Any, tuple[str, ...]]] = [
        (Person, ("org",)),
        (Person, ("manager",)),
        (Person, ("org", "manager")),
        (Person, ("manager.org",)),
        (Person, ("underlings",)),
        (Person, ()),
        (Boss, ("org",)),
        (Vip, ("org",)),
        (Boss, ("reports",)),
    ]
    alone: dict[int, list[tuple[Any, ...]]] = {}
    for index, (root, paths) in enumerate(variants):
        engine = create_engine("sqlite://", poolclass=StaticPool)
        engine.pool = people.pool  # the same data, an empty compiled cache
        alone[index] = messages(engine, root, paths)
    for _ in range(2):
        for index, (root, paths) in enumerate(variants):
            assert messages(people, root, paths) == alone[index], (root, paths)
    keys = set()
    for root, paths in variants:
        key = select(root).options(*eager(root, *paths))._generate_cache_key()
        assert key is not None
        keys.add(key.key)
    assert len(keys) == len(variants)


@pytest.mark.parametrize("position", ["before", "after"])
def test_user_options_around_eager(people: Engine, position: str) -> None:
    mine = (selectinload(Person.underlings), selectinload(Boss.reports))
    built = eager(Person, "org")
    options = (*mine, *built) if position == "before" else (*built, *mine)
    with Session(people) as session, count_queries(people) as counter:
        rows = session.scalars(select(Person).order_by(Person.id).options(*options)).all()
        for row in rows:
            assert row.org.id == 1
            assert isinstance(row.underlings, list)
            if isinstance(row, Boss):
                assert row.reports
            with pytest.raises(NotLoadedError):
                _ = row.manager
    assert counter.count == 3  # persons + org joined, underlings, reports
