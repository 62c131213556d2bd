"""eager(raise_others=True): what the NotLoadedError guard costs per row, and that the
cheaper guard keeps every behaviour (issue 18, "CPU per request vs the expert").

Costs are counted, not timed: Python calls (``sys.setprofile``), deterministic.
"""

from __future__ import annotations

import gc
import inspect
import pickle
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from examples.crm import AutomationRule, Company, Contact, Conversation
from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session, defer, joinedload

from parallelkit.sqlalchemy import NotLoadedError, count_queries, eager

pytest_plugins = ["tests.sqla_fixtures"]

WEBHOOK = "contact.company.automation_rules"
HAND = (
    joinedload(Conversation.contact, innerjoin=True)
    .joinedload(Contact.company, innerjoin=True)
    .selectinload(Company.automation_rules),
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension runs on asyncio only


def python_calls(fn: Callable[[], object]) -> int:
    """The Python function calls ``fn()`` makes (C functions not counted)."""
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event == "call":
            count += 1

    gc.collect()  # no finalizer of an earlier test's objects runs meanwhile
    gc.disable()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        gc.enable()
    return count


def load_contacts(engine: Engine, n: int, options: tuple[Any, ...]) -> Callable[[], object]:
    def load() -> object:
        with Session(engine) as session:  # a fresh session: a request's
            stmt = select(Contact).where(Contact.id <= n).options(*options)
            return session.scalars(stmt).all()

    return load


def test_the_guard_costs_at_most_one_call_per_object_not_one_per_relationship(
    sync_engine: Engine,
) -> None:
    """A contact has three relationships (company, conversations, enrollments): the
    guard put a raise callable on each, one Python call per relationship and row
    (SQLAlchemy's lazy loader row processor). One call per row now installs all three."""
    guarded = eager(Contact)
    plain = eager(Contact, raise_others=False)
    for options in (guarded, plain):
        load_contacts(sync_engine, 5, options)()  # compiled and cached

    def extra_per_row(options: tuple[Any, ...]) -> float:
        few = python_calls(load_contacts(sync_engine, 10, options))
        many = python_calls(load_contacts(sync_engine, 40, options))
        return (many - few) / 30

    assert extra_per_row(guarded) - extra_per_row(plain) <= 1.0


def test_eager_is_one_option_and_the_statement_is_the_hand_written_one() -> None:
    """eager's options were one ``Load`` per level, each repeating the levels above it:
    SQLAlchemy computed the cache key of each at every execution (and again for the
    selectin statement). One ``Load`` holds each element once; the SQL is unchanged."""
    options = eager(Conversation, WEBHOOK)
    assert len(options) == 1
    for raise_others in (True, False):
        built = eager(Conversation, WEBHOOK, raise_others=raise_others)
        assert str(select(Conversation).options(*built)) == str(select(Conversation).options(*HAND))
    tree = eager(Conversation, WEBHOOK, "contact.company.settings", "contact.enrollments")
    assert len(tree) == 1
    elements = tree[0].context  # type: ignore[attr-defined]
    assert len(elements) == len({id(e) for e in elements})


def test_a_fresh_session_raises_at_every_level_and_keeps_what_it_loaded(
    sync_engine: Engine,
) -> None:
    with Session(sync_engine) as session, count_queries(sync_engine) as counter:
        rows = session.scalars(
            select(Conversation).where(Conversation.id <= 30).options(*eager(Conversation, WEBHOOK))
        ).all()
        for row in rows:
            assert row.contact.company.automation_rules  # loaded
            for obj, attr, path in (
                (row.contact, "conversations", "contact.conversations"),
                (row.contact, "enrollments", "contact.enrollments"),
                (row.contact.company, "contacts", "contact.company.contacts"),
                (row.contact.company, "settings", "contact.company.settings"),
                (row.contact.company.automation_rules[0], "company", WEBHOOK + ".company"),
            ):
                with pytest.raises(NotLoadedError) as info:
                    getattr(obj, attr)
                assert info.value.path == path
                assert info.value.root == "Conversation"
    assert counter.count == 2


def test_other_per_object_loaders_of_the_same_rows_are_kept(sync_engine: Engine) -> None:
    """A deferred column puts a loader of its own on each row before the guard's."""
    with Session(sync_engine) as session:
        stmt = select(Contact).where(Contact.id <= 3)
        rows = session.scalars(stmt.options(defer(Contact.email), *eager(Contact))).all()
        for row in rows:
            assert "email" not in row.__dict__
            assert "@" in row.email  # loads (one query), not NotLoadedError
            with pytest.raises(NotLoadedError):
                _ = row.conversations


@pytest.mark.parametrize("loaded_first", ["conversations", "enrollments", "company"])
def test_an_object_the_session_held_keeps_what_it_had_and_raises_on_the_rest(
    sync_engine: Engine, loaded_first: str
) -> None:
    """SQLAlchemy installs a loader on an object it already held only for what that
    object has not loaded: whichever relationship it had loaded, the others raise."""
    rest = {"conversations", "enrollments", "company"} - {loaded_first}
    with Session(sync_engine) as session:
        held = session.get_one(Contact, 7)
        before = getattr(held, loaded_first)  # a plain lazy load
        (row,) = session.scalars(select(Contact).where(Contact.id == 7).options(*eager(Contact)))
        assert row is held
        assert getattr(row, loaded_first) is before
        for attr in rest:
            with pytest.raises(NotLoadedError) as info:
                getattr(row, attr)
            assert info.value.attribute == f"Contact.{attr}"


def test_populate_existing_resets_what_it_does_not_load(sync_engine: Engine) -> None:
    with Session(sync_engine) as session:
        held = session.get_one(Contact, 7)
        assert held.conversations
        stmt = select(Contact).where(Contact.id == 7).options(*eager(Contact, "company"))
        session.scalars(stmt.execution_options(populate_existing=True)).all()
        assert held.company.name
        with pytest.raises(NotLoadedError):
            _ = held.conversations


def test_yield_per_rows_are_guarded_too(sync_engine: Engine) -> None:
    with Session(sync_engine) as session:
        stmt = select(Contact).where(Contact.id <= 12).options(*eager(Contact, "company.contacts"))
        seen = 0
        for row in session.scalars(stmt.execution_options(yield_per=5)):
            seen += 1
            assert row.company.contacts
            with pytest.raises(NotLoadedError):
                _ = row.enrollments
            with pytest.raises(NotLoadedError):
                _ = row.company.cadences
        assert seen == 12


def test_a_pickled_row_keeps_the_guard(sync_engine: Engine) -> None:
    with Session(sync_engine) as session:
        (row,) = session.scalars(
            select(Conversation)
            .where(Conversation.id == 1)
            .options(*eager(Conversation, "contact"))
        )
    copy = pickle.loads(pickle.dumps(row))
    assert copy.contact.id == row.contact.id
    with pytest.raises(NotLoadedError) as info:
        _ = copy.contact.enrollments
    assert info.value.path == "contact.enrollments"


def rules_of(rows: Iterator[Conversation]) -> list[AutomationRule]:
    return [rule for row in rows for rule in row.contact.company.automation_rules]


@pytest.mark.anyio
async def test_async_sessions_raise_before_any_io(crm_engine: AsyncEngine) -> None:
    sessions = async_sessionmaker(crm_engine, expire_on_commit=False)
    stmt = select(Conversation).where(Conversation.id <= 25).options(*eager(Conversation, WEBHOOK))
    async with sessions() as session:
        rows = (await session.scalars(stmt)).all()
        assert rules_of(iter(rows))
        async with count_queries(crm_engine) as counter:
            for row in rows:
                with pytest.raises(NotLoadedError):
                    _ = row.contact.conversations
                with pytest.raises(NotLoadedError):
                    _ = row.contact.company.settings
                with pytest.raises(NotLoadedError):
                    _ = row.contact.company.automation_rules[0].company
        assert counter.count == 0
        # a second statement of the same session (objects held): the same guard
        again = (await session.scalars(stmt)).all()
        assert again == rows
        with pytest.raises(NotLoadedError):
            _ = again[0].contact.conversations


def test_the_private_names_the_one_call_guard_relies_on_are_there() -> None:
    """Fails loudly on a SQLAlchemy release that moved them (each relationship would then
    install its own callable again: the guard costs as before, it still works)."""
    from sqlalchemy.orm import strategies
    from sqlalchemy.orm.context import QueryContext

    lazy_attribute = getattr(strategies, "_LoadLazyAttribute", None)
    lazy_attribute = lazy_attribute or strategies.LoadLazyAttribute  # type: ignore[attr-defined]
    assert list(inspect.signature(lazy_attribute).parameters) == [
        "key",
        "initiating_strategy",
        "loadopt",
        "extra_criteria",
    ]
    for name in ("populate_existing", "refresh_state", "yield_per", "runid", "partials"):
        assert name in QueryContext.__slots__, name
    assert hasattr(QueryContext.default_load_options, "_is_user_refresh")
    option = eager(Conversation, WEBHOOK)[0]
    assert type(option).__name__ == "Load"
    assert {"context", "path", "additional_source_entities"} <= set(type(option).__slots__)
    assert callable(option._generate)  # type: ignore[attr-defined]


@pytest.mark.parametrize("touched", [(), ("company",), ("conversations",), ("enrollments",)])
def test_a_row_the_session_got_meanwhile_is_guarded_on_what_it_had_not_loaded(
    sync_engine: Engine, touched: tuple[str, ...]
) -> None:
    """A ``load`` listener that queries the session while the rows come in (SQLAlchemy
    advises against it) makes a later row of the same statement an object the session
    already held. Its relationships that were not loaded still raise."""
    from sqlalchemy import event, inspect

    order = sorted(inspect(Contact).relationships.keys())
    held: list[Contact] = []  # the identity map is weak: keep it

    def fetch_the_next(target: Contact, context: object) -> None:
        if target.id == 1:
            session = inspect(target).session
            assert session is not None
            other = session.get_one(Contact, 2)
            held.append(other)
            for key in touched:
                _ = getattr(other, key)  # loaded

    event.listen(Contact, "load", fetch_the_next)
    try:
        with Session(sync_engine) as session:
            stmt = select(Contact).where(Contact.id <= 2).order_by(Contact.id)
            first, second = session.scalars(stmt.options(*eager(Contact))).all()
            assert held == [second]
            for key in order:
                with pytest.raises(NotLoadedError):
                    getattr(first, key)
                if key in touched:
                    assert getattr(second, key) is not None  # what it had, kept
                else:
                    with pytest.raises(NotLoadedError):
                        getattr(second, key)
    finally:
        event.remove(Contact, "load", fetch_the_next)
