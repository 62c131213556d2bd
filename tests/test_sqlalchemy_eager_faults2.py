"""eager / eager_get / loader_by_id on model shapes beyond the CRM, and bad input.

Self-referential trees (ordered), many-to-many, composite keys, single-table
inheritance; SQLite and PostgreSQL. Asyncio only (SQLAlchemy's asyncio extension).
"""

from __future__ import annotations

import anyio
import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    ForeignKeyConstraint,
    String,
    Table,
    insert,
    inspect,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, relationship

import parallelkit as pk
from parallelkit.sqlalchemy import (
    NotLoadedError,
    count_queries,
    eager,
    eager_get,
    loader_by_id,
    max_queries,
)

pytest_plugins = ["tests.sqla_fixtures"]
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension


class Base(DeclarativeBase):
    pass


node_tag = Table(
    "pk_f2_node_tag",
    Base.metadata,
    Column("node_id", ForeignKey("pk_f2_node.id"), primary_key=True),
    Column("tag_id", ForeignKey("pk_f2_tag.id"), primary_key=True),
)


class Node(Base):
    __tablename__ = "pk_f2_node"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("pk_f2_node.id"))
    name: Mapped[str] = mapped_column(String(20), default="n")
    parent: Mapped[Node | None] = relationship(back_populates="children", remote_side=[id])
    children: Mapped[list[Node]] = relationship(back_populates="parent", order_by="Node.id.desc()")
    tags: Mapped[list[Tag]] = relationship(
        secondary=node_tag, back_populates="nodes", order_by="Tag.id"
    )


class Tag(Base):
    __tablename__ = "pk_f2_tag"
    id: Mapped[int] = mapped_column(primary_key=True)
    nodes: Mapped[list[Node]] = relationship(
        secondary=node_tag, back_populates="tags", order_by="Node.id"
    )


class Version(Base):  # a composite primary key
    __tablename__ = "pk_f2_version"
    doc: Mapped[int] = mapped_column(primary_key=True)
    rev: Mapped[int] = mapped_column(primary_key=True)
    notes: Mapped[list[Note]] = relationship(back_populates="version", order_by="Note.id")


class Note(Base):
    __tablename__ = "pk_f2_note"
    id: Mapped[int] = mapped_column(primary_key=True)
    doc: Mapped[int] = mapped_column()
    rev: Mapped[int] = mapped_column()
    version: Mapped[Version] = relationship(back_populates="notes")
    __table_args__ = (
        ForeignKeyConstraint(["doc", "rev"], ["pk_f2_version.doc", "pk_f2_version.rev"]),
    )


Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
async def db(any_engine: AsyncEngine) -> Sessions:
    """1 -> (2 -> 4, 3); tags: 1 {1, 2}, 2 {2}; version (1, 1) with notes 1, 2."""
    async with any_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(any_engine, expire_on_commit=False)
    async with sessions() as session:
        root = Node(id=1, name="root")
        two = Node(id=2, parent=root, name="two")
        four = Node(id=4, parent=two, name="four")
        three = Node(id=3, parent=root, name="three")
        t1, t2 = Tag(id=1), Tag(id=2)
        root.tags, two.tags = [t1, t2], [t2]
        version = Version(doc=1, rev=1)
        session.add_all([root, two, three, four, t1, t2, version])
        session.add_all([Note(id=1, version=version), Note(id=2, version=version)])
        await session.commit()
    return sessions


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "model",
    [Node(id=9), inspect(Node), Node.children, Node.__table__],
    ids=["instance", "mapper", "attribute", "table"],
)
def test_eager_refuses_what_is_not_a_mapped_class_with_a_type_error(model: object) -> None:
    # an instance, a Mapper or a relationship attribute each inspect to something with a
    # .mapper: they used to get through and fail in SQLAlchemy with an AttributeError
    with pytest.raises(TypeError, match="model must be a mapped class"):
        eager(model, "children")


def test_loader_by_id_refuses_an_instance_as_model() -> None:
    with pytest.raises(TypeError, match="model must be a mapped class"):
        loader_by_id(async_sessionmaker(), Node(id=9))  # type: ignore[arg-type]


async def test_eager_get_refuses_an_instance_as_model(db: Sessions) -> None:
    async with db() as session:
        with pytest.raises(TypeError, match="model must be a mapped class"):
            await eager_get(session, Node(id=9), 1, "children")  # type: ignore[arg-type]


@pytest.mark.parametrize("path", [None, b"children", {"children"}, 3])
def test_eager_refuses_paths_of_the_wrong_type(path: object) -> None:
    with pytest.raises(TypeError, match="dotted strings or nested dicts"):
        eager(Node, path)  # type: ignore[arg-type]


def test_a_typo_below_the_root_names_the_segment_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"Node\.tgs is not a relationship") as info:
        eager(Node, "children.tgs")
    assert "'children.tgs'" in str(info.value)
    assert "Node's relationships are: children, parent, tags" in str(info.value)


# ---------------------------------------------------------------------------- loader_by_id
async def test_loader_by_id_takes_a_joined_collection_option(
    db: Sessions, any_engine: AsyncEngine
) -> None:
    # SQLAlchemy refuses a joined collection without .unique(): the whole batch used to
    # fail ("The unique() method must be invoked on this Result")
    options = [
        eager(Node, "children", strategies={"children": "joined"}),
        (joinedload(Node.children),),
    ]
    for option in options:
        async with loader_by_id(db, Node, options=option) as nodes:
            with anyio.fail_after(10), count_queries(any_engine) as counter:
                found = await pk.gather(*(nodes.load(i) for i in (1, 2, 3, 99)))
        assert counter.count == 1
        assert [None if n is None else [c.id for c in n.children] for n in found] == [
            [3, 2],
            [4],
            [],
            None,
        ]


async def test_loader_by_id_with_a_composite_key_and_eager(db: Sessions) -> None:
    async with loader_by_id(db, Version, options=eager(Version, "notes")) as versions:
        one, missing = await pk.gather(versions.load((1, 1)), versions.load((1, 2)))
    assert missing is None
    assert one is not None
    assert [n.id for n in one.notes] == [1, 2]


# ---------------------------------------------------------------------------- eager_get
async def test_eager_get_reloads_an_expired_object_at_the_end_of_a_path(
    db: Sessions, any_engine: AsyncEngine
) -> None:
    # every relationship on the path is loaded, but the object it reaches was expired
    # (session.expire, a server-side default after a flush): returning the cached graph
    # made the first read of it a refresh, a MissingGreenlet in async code
    async with db() as session:
        node = await eager_get(session, Node, 2, "parent")
        assert node is not None
        assert node.parent is not None
        session.expire(node.parent)
        async with count_queries(any_engine) as counter:
            again = await eager_get(session, Node, 2, "parent")
        assert again is node
        assert counter.count == 1
        assert node.parent.name == "root"  # no I/O: read without a greenlet

        root = await eager_get(session, Node, 1, "children")
        assert root is not None
        session.expire(root.children[0], ["name"])
        again = await eager_get(session, Node, 1, "children")
        assert again is root
        assert [c.name for c in root.children] == ["three", "two"]


async def test_eager_get_keeps_a_cached_graph_that_is_fully_loaded(
    db: Sessions, any_engine: AsyncEngine
) -> None:
    async with db() as session:
        root = await eager_get(session, Node, 1, "children.children", "tags")
        async with count_queries(any_engine) as counter:
            again = await eager_get(session, Node, 1, "children.children", "tags")
        assert again is root
        assert counter.count == 0


async def test_eager_get_fills_in_what_an_earlier_eager_query_guarded(
    db: Sessions, any_engine: AsyncEngine
) -> None:
    async with db() as session:
        stmt = select(Node).where(Node.id == 2).options(*eager(Node, "tags"))
        two = (await session.scalars(stmt)).one()
        with pytest.raises(NotLoadedError):
            _ = two.children
        async with count_queries(any_engine) as counter:
            root = await eager_get(session, Node, 1, "children.children")
        assert counter.count == 1
        assert root is not None
        assert [[g.id for g in c.children] for c in root.children] == [[], [4]]
        assert [t.id for t in two.tags] == [2]  # what the earlier query loaded is kept


@pytest.mark.parametrize("ident", [(1, 1), [1, 1], {"doc": 1, "rev": 1}])
async def test_eager_get_composite_key_spellings(db: Sessions, ident: object) -> None:
    async with db() as session:
        version = await eager_get(session, Version, ident, "notes.version")
        assert version is not None
        assert [n.version is version for n in version.notes] == [True, True]


async def test_eager_get_composite_key_of_the_wrong_size(db: Sessions) -> None:
    async with db() as session:
        with pytest.raises(ValueError, match="must have 2 value"):
            await eager_get(session, Version, 1, "notes")


# ---------------------------------------------------------------------------- shapes
async def test_a_self_referential_tree_keeps_its_order_and_its_guard(
    db: Sessions, any_engine: AsyncEngine
) -> None:
    for one in (False, True):
        async with db() as session:
            stmt = select(Node).where(Node.id == 1)
            stmt = stmt.options(*eager(Node, "children.children", "children.parent", one=one))
            with max_queries(any_engine, 1 if one else 3):
                root = (await session.scalars(stmt)).unique().one()
            assert [c.id for c in root.children] == [3, 2]
            assert [c.parent is root for c in root.children] == [True, True]
            with pytest.raises(NotLoadedError) as info:
                _ = root.parent  # the root's own parent was not asked for
            # the root is reached again as its children's parent: either path loads it
            # (docs/sqlalchemy.md, "raise_others and NotLoadedError")
            assert info.value.path in ("parent", "children.parent.parent")
            with pytest.raises(NotLoadedError) as info:
                _ = root.children[1].children[0].children
            assert info.value.path == "children.children.children"


async def test_many_to_many_both_ways(db: Sessions, any_engine: AsyncEngine) -> None:
    async with db() as session:
        stmt = select(Node).order_by(Node.id).options(*eager(Node, "tags.nodes"))
        with max_queries(any_engine, 3):
            nodes = (await session.scalars(stmt)).all()
        assert [[[m.id for m in t.nodes] for t in n.tags] for n in nodes] == [
            [[1], [1, 2]],
            [[1, 2]],
            [],
            [],
        ]
        assert nodes[2].tags == []  # loaded, empty
        with pytest.raises(NotLoadedError, match=r"eager\(Node, 'tags.nodes.children'"):
            _ = nodes[1].tags[0].nodes[1].children


async def test_stream_with_yield_per_loads_the_paths(db: Sessions, any_engine: AsyncEngine) -> None:
    async with db() as session:
        stmt = select(Node).order_by(Node.id).options(*eager(Node, "children", "parent"))
        async with count_queries(any_engine) as counter:
            result = await session.stream_scalars(stmt.execution_options(yield_per=2))
            rows = [(n.id, [c.id for c in n.children]) async for n in result]
        assert rows == [(1, [3, 2]), (2, [4]), (3, []), (4, [])]
        assert counter.count == 3  # two partitions of roots, one selectin each


async def test_selectin_keeps_a_row_whose_foreign_key_points_nowhere(
    db: Sessions, any_engine: AsyncEngine
) -> None:
    # SQLite enforces foreign keys only with PRAGMA foreign_keys=ON: the inner join of a
    # NOT NULL many-to-one would drop such a row; the documented way round is selectin
    if any_engine.dialect.name != "sqlite":  # PostgreSQL enforces it: no such row
        async with db() as session:
            with pytest.raises(IntegrityError):
                await session.execute(insert(Note).values(id=9, doc=7, rev=7))
        return
    async with db() as session:
        await session.execute(insert(Note).values(id=9, doc=7, rev=7))
        note = await eager_get(session, Note, 9, "version", strategies={"version": "selectin"})
        assert note is not None
        assert note.version is None
