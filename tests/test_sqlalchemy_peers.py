"""parallelkit.sqlalchemy.fetch_peers / load: one statement per hop for a whole query's rows.

Counts statements (``count_queries``) to prove the contract: at most one statement
per hop per group (per chunk), for many-to-one, one-to-many and many-to-many,
nested paths, chunking; weak references; nothing for queries without the option.
SQLite (aiosqlite) always, PostgreSQL (asyncpg) under the ``postgres`` marker.
"""

from __future__ import annotations

import gc
import re
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
from examples.crm import AutomationRule, Company, Contact, Conversation
from sqlalchemy import (
    Column,
    Engine,
    ForeignKey,
    ForeignKeyConstraint,
    Select,
    Table,
    inspect,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    WriteOnlyMapped,
    attribute_keyed_dict,
    mapped_column,
    relationship,
    selectinload,
)
from sqlalchemy.orm.exc import DetachedInstanceError

import parallelkit as pk
from parallelkit.sqlalchemy import (
    RelationshipPathError,
    _peers_events,
    _peers_group,
    count_queries,
    eager,
    fetch_peers,
    load,
)

pytest_plugins = ["tests.sqla_fixtures"]
pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK = "contact.company.automation_rules"


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's asyncio extension runs on asyncio only (greenlets driven by its loop)
    return "asyncio"


async def peers(session: AsyncSession, stmt: Select[Any], chunk_size: int = 500) -> list[Any]:
    """The rows of ``stmt`` run with ``fetch_peers()``: one group."""
    return list((await session.scalars(stmt.options(fetch_peers(chunk_size=chunk_size)))).all())


def in_params(statement: str, parameters: Any) -> int:
    """How many values an ``IN (...)`` statement carried."""
    return len(parameters) if "IN (" in statement else 0


def webhook(c: Conversation) -> tuple[int, int, list[int]]:
    """What the webhook reads: contact id, company id, rule ids (plain attribute access)."""
    return (c.contact.id, c.contact.company.id, [r.id for r in c.contact.company.automation_rules])


async def reference(engine: AsyncEngine) -> dict[int, tuple[int, int, list[int]]]:
    """conversation id -> webhook(conversation), loaded with eager()."""
    async with AsyncSession(engine) as session:
        stmt = select(Conversation).options(*eager(Conversation, WEBHOOK))
        return {c.id: webhook(c) for c in (await session.scalars(stmt)).unique()}


# ------------------------------------------------------------------ the contract, async
async def test_one_statement_per_hop_for_the_whole_query(crm_engine: AsyncEngine) -> None:
    expected = await reference(crm_engine)
    async with AsyncSession(crm_engine) as session, count_queries(crm_engine) as counter:
        stmt = select(Conversation).order_by(Conversation.id).options(fetch_peers())
        conversations = (await session.scalars(stmt)).all()
        assert counter.count == 1
        first: list[AutomationRule] = await load(conversations[0], WEBHOOK)
        assert counter.count == 1 + 3  # m2o, m2o, o2m: one statement each for all 500 rows
        seen = {}
        for conversation in conversations:  # the rest send nothing
            rules = await load(conversation, WEBHOOK)
            company = await load(conversation, "contact.company")
            seen[conversation.id] = (
                conversation.contact.id,
                company.id,
                [rule.id for rule in rules],
            )
        assert counter.count == 4, counter.statements
    assert len(conversations) == 500
    assert [r.id for r in first] == expected[conversations[0].id][2]
    assert seen == expected
    assert all(in_params(q.statement, q.parameters) <= 500 for q in counter.queries)


async def test_m2o_o2m_and_nested_hops_each_cost_one_statement(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine) as session:
        companies = await peers(session, select(Company))
        async with count_queries(crm_engine) as counter:
            contacts = await load(companies[0], "contacts")  # one-to-many
        assert counter.count == 1
        assert isinstance(contacts, list)
        assert len(contacts) == 10
        async with count_queries(crm_engine) as counter:
            conversations = await load(companies[3], "contacts.conversations")  # nested, flat list
            back = await load(companies[5], "contacts.conversations.contact")  # m2o: all loaded
        assert counter.count == 1, counter.statements
        assert len(conversations) == 50
        assert len(back) == 50
        assert {c.company_id for c in await load(companies[5], "contacts")} == {companies[5].id}
        async with count_queries(crm_engine) as counter:
            for company in companies:
                assert len(await load(company, "contacts.conversations")) == 50
        assert counter.count == 0


async def test_an_empty_many_to_one_and_one_to_one(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine) as session:
        companies = await peers(session, select(Company).order_by(Company.id))
        async with count_queries(crm_engine) as counter:
            settings = [await load(company, "settings") for company in companies]
            timezones = [await load(company, "settings.company") for company in companies]
        assert counter.count == 1  # settings.company is the company itself: in the session
    with_settings = [s for s in settings if s is not None]
    assert 0 < len(with_settings) < len(companies)  # the seed gives every other company settings
    assert [t is not None for t in timezones] == [s is not None for s in settings]


async def test_chunks_bound_the_statement_size(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine) as session:
        contacts = await peers(session, select(Contact).order_by(Contact.id), chunk_size=7)
        async with count_queries(crm_engine) as counter:
            for contact in contacts:
                assert len(await load(contact, "conversations.contact")) == 5
    # 100 contacts in chunks of 7 -> 15 statements; conversations.contact: in the session
    assert counter.count == 15, counter.statements
    sizes = [in_params(q.statement, q.parameters) for q in counter.queries]
    assert max(sizes) == 7
    assert sum(sizes) == 100


async def test_chunks_of_a_many_to_one_count_distinct_targets(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine) as session:
        stmt = select(Conversation).where(Conversation.id <= 50)
        conversations = await peers(session, stmt, chunk_size=7)
        async with count_queries(crm_engine) as counter:
            for conversation in conversations:
                await load(conversation, "contact.company")
    # a many-to-one asks for the distinct targets: 10 contacts -> 2 statements; 1 company -> 1
    assert counter.count == 2 + 1, counter.statements
    sizes = [in_params(q.statement, q.parameters) for q in counter.queries]
    assert sizes == [7, 3, 1]


async def test_without_fetch_peers_it_loads_for_one_instance(crm_engine: AsyncEngine) -> None:
    # strong references: the collector freeing earlier tests' instances during this
    # one must not shrink the registry under the comparison below
    held = list(_peers_group.REGISTRY)
    baseline = len(held)
    async with AsyncSession(crm_engine) as session:
        conversations = (
            await session.scalars(select(Conversation).order_by(Conversation.id).limit(10))
        ).all()
        async with count_queries(crm_engine) as counter:
            rules = await load(conversations[0], WEBHOOK)  # no MissingGreenlet
        assert counter.count == 3
        assert len(rules) == 3
        assert "contact" not in inspect(conversations[1]).dict  # only the one instance
        assert all(inspect(c) not in _peers_group.REGISTRY for c in conversations)
    assert len(_peers_group.REGISTRY) == baseline


async def test_a_query_without_the_option_creates_no_peer_state(crm_engine: AsyncEngine) -> None:
    fetch_peers()  # the listener is installed from here on
    assert _peers_events.installed()
    held = list(_peers_group.REGISTRY)  # (as above: only this test can change its size)
    baseline = len(held)
    made: list[object] = []
    original = _peers_group.PeerGroup.__init__

    def spy(self: _peers_group.PeerGroup, *args: Any) -> None:
        made.append(self)
        original(self, *args)

    async with AsyncSession(crm_engine) as session:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_peers_group.PeerGroup, "__init__", spy)
            result = await session.execute(select(Conversation).limit(20))
            rows = result.scalars().all()
            await session.run_sync(lambda _: [c.contact for c in rows])  # plain lazy loads
    assert made == []
    assert len(_peers_group.REGISTRY) == baseline


# ------------------------------------------------------------------ sync paths
def test_sync_session_plain_attribute_access_loads_for_all_peers(sync_engine: Engine) -> None:
    with Session(sync_engine) as session, count_queries(sync_engine) as counter:
        conversations = session.scalars(select(Conversation).options(fetch_peers())).all()
        names = [c.contact.company.name for c in conversations]
        rules = [len(c.contact.company.automation_rules) for c in conversations]
        assert counter.count == 1 + 3, counter.statements
    with Session(sync_engine) as session:
        eager_rows = session.scalars(
            select(Conversation).options(*eager(Conversation, WEBHOOK))
        ).unique()
        by_id = {c.id: c for c in eager_rows}
        assert names == [by_id[c.id].contact.company.name for c in conversations]
        assert rules == [len(by_id[c.id].contact.company.automation_rules) for c in conversations]


def test_sync_session_collection_access(sync_engine: Engine) -> None:
    with Session(sync_engine) as session, count_queries(sync_engine) as counter:
        companies = session.scalars(select(Company).options(fetch_peers())).all()
        totals = [sum(len(c.conversations) for c in company.contacts) for company in companies]
    assert totals == [50] * 10
    assert counter.count == 1 + 2, counter.statements


async def test_run_sync_plain_attribute_access(crm_engine: AsyncEngine) -> None:
    expected = await reference(crm_engine)
    async with AsyncSession(crm_engine) as session:
        conversations = await peers(session, select(Conversation))

        def walk(_: Session) -> dict[int, tuple[int, int, list[int]]]:
            return {c.id: webhook(c) for c in conversations}

        async with count_queries(crm_engine) as counter:
            seen = await session.run_sync(walk)
        assert counter.count == 3, counter.statements
    assert seen == expected


def test_the_querys_own_eager_loads_still_work(sync_engine: Engine) -> None:
    """selectinload in a fetch_peers query: as usual; the rows are peers all the same."""
    with Session(sync_engine) as session, count_queries(sync_engine) as counter:
        stmt = (
            select(Contact)
            .where(Contact.id <= 3)
            .options(fetch_peers(), selectinload(Contact.conversations))
        )
        contacts = session.scalars(stmt).all()
        assert counter.count == 2
        assert [c.conversations[0].contact is c for c in contacts] == [True] * 3
        assert counter.count == 2  # many-to-one back to an object in the session: no SQL
        companies = [c.company for c in contacts]  # the contacts are peers: one statement
        assert counter.count == 3
    assert len(set(companies)) == 1


# ------------------------------------------------------------------ garbage collection
async def test_peers_are_weak_references(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine) as session:
        contacts = await peers(session, select(Contact).where(Contact.id <= 50))
        group = _peers_group.REGISTRY[inspect(contacts[0])]
        group_ref = weakref.ref(group)
        del group
        kept = contacts[:10]
        dropped = weakref.ref(contacts[-1])
        del contacts
        gc.collect()
        assert dropped() is None  # the group did not keep it alive
        async with count_queries(crm_engine) as counter:
            found = [await load(c, "conversations") for c in kept]
        assert counter.count == 1
        (query,) = counter.queries
        assert in_params(query.statement, query.parameters) == 10  # only the live peers
        assert [{v.contact_id for v in f} for f in found] == [{c.id} for c in kept]
        del kept, found, query
        session.expunge_all()
    gc.collect()
    assert group_ref() is None  # no instance left: the group is gone too (no leak)


def test_registry_entries_leave_with_their_instances(sync_engine: Engine) -> None:
    gc.collect()
    held = list(_peers_group.REGISTRY)  # what is there stays: only this test's entries move
    baseline = len(held)
    with Session(sync_engine) as session:
        contacts = session.scalars(select(Contact).options(fetch_peers())).all()
        _ = [c.company for c in contacts]
        assert len(_peers_group.REGISTRY) == baseline + 100 + 10  # contacts + their companies
        del contacts, _
        session.expunge_all()
    gc.collect()
    assert len(_peers_group.REGISTRY) == baseline


# ------------------------------------------------------------------ partial, expired, detached
async def test_only_what_is_missing_is_loaded(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine) as session:
        contacts = await peers(session, select(Contact).where(Contact.id <= 20))
        again = select(Contact).where(Contact.id == contacts[0].id)
        await session.scalars(again.options(selectinload(Contact.conversations)))  # fills one in
        assert "conversations" in inspect(contacts[0]).dict
        async with count_queries(crm_engine) as counter:
            await load(contacts[-1], "conversations")
        (query,) = counter.queries
        assert in_params(query.statement, query.parameters) == 19  # one had it already


async def test_many_to_ones_in_the_session_need_no_statement(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine) as session:
        conversations = await peers(session, select(Conversation).where(Conversation.id <= 20))
        held = await session.get(Contact, conversations[0].contact_id)  # in the session now
        async with count_queries(crm_engine) as counter:
            contacts = [await load(c, "contact") for c in conversations]
        (query,) = counter.queries
        # conversations 1-5 share contact 1: set from the session; 2, 3, 4 are asked for once
        assert in_params(query.statement, query.parameters) == 3
    assert [c.id for c in contacts] == [c.contact_id for c in conversations]
    assert contacts[0] is held


async def test_expired_peers_are_reloaded_together(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine) as session:
        conversations = await peers(session, select(Conversation).where(Conversation.id <= 30))
        await load(conversations[0], "contact")
        session.expire_all()
        async with count_queries(crm_engine) as counter:
            contacts = [await load(c, "contact.company") for c in conversations]
        assert counter.count == 2
        assert len({c.id for c in contacts}) == 1


async def test_a_detached_instance(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine, expire_on_commit=False) as session:
        conversations = await peers(session, select(Conversation).where(Conversation.id <= 5))
        company = await load(conversations[0], "contact.company")
    assert await load(conversations[1], "contact.company") is company  # loaded: no session needed
    with pytest.raises(DetachedInstanceError, match="not bound to a session"):
        await load(conversations[1], "contact.conversations")


async def test_get_with_fetch_peers_makes_a_group_of_one(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine) as session:
        company = await session.get(Company, 1, options=[fetch_peers()])
        assert company is not None
        contacts = await load(company, "contacts")
        async with count_queries(crm_engine) as counter:
            for contact in contacts:
                assert len(await load(contact, "conversations")) == 5
        assert counter.count == 1  # the contacts reached are peers of each other


# ------------------------------------------------------------------ errors and arguments
async def test_a_bad_path_names_model_and_attribute(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine) as session:
        conversation = (await session.scalars(select(Conversation).limit(1))).one()
        async with count_queries(crm_engine) as counter:
            with pytest.raises(RelationshipPathError) as info:
                await load(conversation, "contact.compny.automation_rules")
            with pytest.raises(RelationshipPathError, match=r"Contact\.email is a column"):
                await load(conversation, "contact.email")
            with pytest.raises(RelationshipPathError, match=r"Conversation\. is not"):
                await load(conversation, "")
        assert counter.count == 0  # checked before any I/O
    error = info.value
    assert error.attribute == "Contact.compny"
    assert error.path == "contact.compny.automation_rules"
    assert error.relationships == ("company", "conversations", "enrollments")
    assert "Contact's relationships are: company, conversations, enrollments" in str(error)
    assert isinstance(error, pk.ParallelkitError)
    assert isinstance(error, ValueError)


async def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="instance must be a mapped object"):
        await load(object(), "contact")
    with pytest.raises(TypeError, match="path must be a str"):
        await load(Conversation(), ["contact"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        fetch_peers(chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        fetch_peers(chunk_size=True)
    assert repr(fetch_peers(chunk_size=9)) == "fetch_peers(chunk_size=9)"


async def test_a_pending_instance_reads_what_sqlalchemy_gives() -> None:
    conversation = Conversation(subject="new")
    assert await load(conversation, "contact") is None


# ------------------------------------------------------------------ many-to-many & co.
class Base(DeclarativeBase):
    pass


article_tags = Table(
    "peer_article_tags",
    Base.metadata,
    Column("article_id", ForeignKey("peer_articles.id"), primary_key=True),
    Column("tag_id", ForeignKey("peer_tags.id"), primary_key=True),
)


class Author(Base):
    __tablename__ = "peer_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    articles: Mapped[list[Article]] = relationship(back_populates="author", order_by="Article.id")
    notes: WriteOnlyMapped[Article] = relationship(viewonly=True)
    by_title: Mapped[dict[str, Article]] = relationship(  # a dict collection
        collection_class=attribute_keyed_dict("title"), viewonly=True
    )


class Article(Base):
    __tablename__ = "peer_articles"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int | None] = mapped_column(ForeignKey("peer_authors.id"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("peer_articles.id"))
    author: Mapped[Author | None] = relationship(back_populates="articles")
    tags: Mapped[list[Tag]] = relationship(secondary=article_tags, order_by="Tag.name")
    parent: Mapped[Article | None] = relationship(remote_side=[id], back_populates="replies")
    replies: Mapped[list[Article]] = relationship(back_populates="parent", order_by="Article.id")


class Tag(Base):
    __tablename__ = "peer_tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    articles: Mapped[list[Article]] = relationship(secondary=article_tags, viewonly=True)


class Shelf(Base):  # a composite primary key
    __tablename__ = "peer_shelves"
    room: Mapped[str] = mapped_column(primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True)
    books: Mapped[list[Book]] = relationship(back_populates="shelf", order_by="Book.id")


class Book(Base):
    __tablename__ = "peer_books"
    __table_args__ = (
        ForeignKeyConstraint(["room", "number"], ["peer_shelves.room", "peer_shelves.number"]),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    room: Mapped[str]
    number: Mapped[int]
    shelf: Mapped[Shelf] = relationship(back_populates="books")


TAGS = ["async", "db", "orm", "python", "sql"]


def tags_of(article_id: int) -> list[str]:
    return sorted(t for i, t in enumerate(TAGS) if (article_id + i) % 3 == 0)


@pytest.fixture
async def blog(any_engine: AsyncEngine) -> AsyncEngine:
    """6 authors x 5 articles (every 4th one a reply), 5 tags, 3 shelves x 4 books."""
    async with any_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    tags = {name: Tag(id=i + 1, name=name) for i, name in enumerate(TAGS)}
    articles: list[Article] = []
    authors = [Author(id=a, name=f"author {a}") for a in range(1, 7)]
    for author in authors:  # built first, added at the end: 2.0 has no backref cascade
        for n in range(5):
            aid = (author.id - 1) * 5 + n + 1
            article = Article(id=aid, title=f"a{aid}", author=author)
            article.tags = [tags[name] for name in tags_of(aid)]
            if aid % 4 == 0:
                article.parent = articles[-1]
            articles.append(article)
    shelves = [Shelf(room="r", number=s) for s in range(3)]
    for shelf in shelves:
        shelf.books = [Book(id=shelf.number * 10 + b, room="r") for b in range(4)]
    async with AsyncSession(any_engine) as session:
        session.add_all([*authors, Article(id=99, title="anonymous"), *shelves])
        await session.commit()
    return any_engine


async def test_many_to_many_in_one_statement(blog: AsyncEngine) -> None:
    async with AsyncSession(blog) as session:
        articles = await peers(session, select(Article).order_by(Article.id))
        async with count_queries(blog) as counter:
            names = [[t.name for t in await load(a, "tags")] for a in articles]
        assert counter.count == 1, counter.statements
        assert names == [tags_of(a.id) if a.id != 99 else [] for a in articles]
        async with count_queries(blog) as counter:  # and back: tags -> articles (m2m, viewonly)
            back = await load(articles[2], "tags.articles")
        assert counter.count == 1
        assert {a.id for a in back} >= {articles[2].id}


async def test_self_referential_and_nullable(blog: AsyncEngine) -> None:
    async with AsyncSession(blog) as session:
        articles = await peers(session, select(Article).order_by(Article.id))
        async with count_queries(blog) as counter:
            parents = [await load(a, "parent") for a in articles]
            replies = [await load(a, "replies") for a in articles]
            authors = [await load(a, "author") for a in articles]
        # parent: every article is in the session already (no SQL); replies, authors: one each
        assert counter.count == 2, counter.statements
    assert [p.id if p else None for p in parents] == [
        a.id - 1 if a.id % 4 == 0 and a.id != 99 else None for a in articles
    ]
    assert sum(len(r) for r in replies) == sum(p is not None for p in parents)
    assert authors[-1] is None  # the anonymous article: a NULL many-to-one
    async with AsyncSession(blog) as session:  # the parents not in the session: one statement
        replies_only = await peers(session, select(Article).where(Article.parent_id.is_not(None)))
        async with count_queries(blog) as counter:
            found = [await load(a, "parent") for a in replies_only]
        assert counter.count == 1
    assert [p.id for p in found] == [a.parent_id for a in replies_only]


async def test_composite_primary_keys(blog: AsyncEngine) -> None:
    async with AsyncSession(blog) as session:
        shelves = await peers(session, select(Shelf))
        async with count_queries(blog) as counter:
            books = [[b.id for b in await load(s, "books")] for s in shelves]
            again = [await load(s, "books.shelf") for s in shelves]
        assert counter.count == 1  # books.shelf: the shelves are in the session already
    assert sorted(books) == [[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]]
    assert [set(map(id, a)) for a in again] == [{id(s)} for s in shelves]


async def test_dict_collections_give_their_values(blog: AsyncEngine) -> None:
    # an attribute_keyed_dict collection: iterating it gives the keys, not the objects
    async with AsyncSession(blog) as session:
        authors = await peers(session, select(Author).order_by(Author.id))
        async with count_queries(blog) as counter:
            articles = [await load(a, "by_title") for a in authors]
            tags = [await load(a, "by_title.tags") for a in authors]
        assert counter.count == 2, counter.statements  # one per hop for all six authors
        assert [sorted(x.id for x in found) for found in articles] == [
            list(range((a.id - 1) * 5 + 1, a.id * 5 + 1)) for a in authors
        ]
        assert authors[0].by_title == {x.title: x for x in articles[0]}  # still a dict
        assert {t.name for t in tags[0]} == {n for x in articles[0] for n in tags_of(x.id)}
    async with AsyncSession(blog) as session:  # without fetch_peers, and in sync code
        author = await session.get_one(Author, 2)
        assert sorted(x.id for x in await load(author, "by_title")) == [6, 7, 8, 9, 10]
        others = (await session.scalars(select(Author).options(fetch_peers()))).all()
        titles = await session.run_sync(lambda _: [sorted(a.by_title) for a in others])
        assert titles[0] == sorted(f"a{i}" for i in range(1, 6))


async def test_write_only_relationships_are_refused(blog: AsyncEngine) -> None:
    async with AsyncSession(blog) as session:
        author = await session.get(Author, 1)
        with pytest.raises(RelationshipPathError, match=r"Author\.notes is a lazy='write_only'"):
            await load(author, "notes")


async def test_select_of_two_entities_makes_two_groups(blog: AsyncEngine) -> None:
    async with AsyncSession(blog) as session:
        stmt = select(Article, Author).join(Article.author).options(fetch_peers())
        rows = (await session.execute(stmt)).all()
        async with count_queries(blog) as counter:
            for article, author in rows:
                await load(article, "tags")
                await load(author, "articles")
        assert counter.count == 2


# ------------------------------------------------------------------ import, docs
def test_importing_registers_no_listener() -> None:
    code = (
        "from sqlalchemy import event\n"
        "from sqlalchemy.orm import Session\n"
        "import parallelkit.sqlalchemy as pks\n"
        "from parallelkit.sqlalchemy import _peers_events as ev\n"
        "assert not event.contains(Session, 'do_orm_execute', ev._on_execute)\n"
        "assert not ev.installed()\n"
        "pks.fetch_peers()\n"
        "assert event.contains(Session, 'do_orm_execute', ev._on_execute)\n"
        "pks.fetch_peers()\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def doc_blocks() -> list[str]:
    """The page's Python blocks, less those marked ``<!-- fragment -->``."""
    text = (ROOT / "docs" / "peer-loading.md").read_text()
    found = re.findall(
        r"(<!-- fragment -->\n)?```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL
    )
    return [code for fragment, code in found if not fragment]


def test_the_docs_page_has_complete_programs() -> None:
    blocks = doc_blocks()
    assert len(blocks) >= 3
    assert all("anyio.run(main)" in block for block in blocks)


@pytest.mark.parametrize("index", range(len(doc_blocks())))
def test_docs_page_programs_run(index: int, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(doc_blocks()[index])
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr[-3000:]
