"""parallelkit.sqlalchemy.eager: path validation, strategy choice, query counts, clear errors."""

from __future__ import annotations

import pytest
from examples.crm import Company, Contact, Conversation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, ForeignKey, and_, create_engine, inspect, select
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    aliased,
    foreign,
    mapped_column,
    relationship,
)

import parallelkit as pk
from parallelkit.sqlalchemy import NotLoadedError, count_queries, eager, eager_get

pytest_plugins = ["tests.sqla_fixtures"]

WEBHOOK = "contact.company.automation_rules"


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's asyncio extension (AsyncEngine / AsyncSession) runs on asyncio only:
    # it bridges to the sync ORM with greenlets driven by the asyncio loop, not trio.
    return "asyncio"


def sql(*options: object) -> str:
    return str(select(Conversation).options(*options).compile())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- validation
def test_unknown_segment_lists_the_relationships_that_exist() -> None:
    with pytest.raises(ValueError, match="compny") as info:
        eager(Conversation, "contact.compny.automation_rules")
    message = str(info.value)
    assert "Contact.compny is not a relationship" in message
    assert "company, conversations, enrollments" in message


def test_unknown_root_segment() -> None:
    with pytest.raises(ValueError, match=r"Conversation's relationships are: contact"):
        eager(Conversation, "contacts")


def test_a_column_is_not_a_relationship() -> None:
    with pytest.raises(ValueError, match=r"Contact.email is a column, not a relationship"):
        eager(Conversation, "contact.email")


@pytest.mark.parametrize("path", ["", "contact.", ".contact", "contact..company", "con tact"])
def test_malformed_paths(path: str) -> None:
    with pytest.raises(ValueError, match="segment"):
        eager(Conversation, path)


def test_bad_path_type_and_unmapped_model() -> None:
    with pytest.raises(TypeError, match="dotted strings or nested dicts"):
        eager(Conversation, 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be a mapped class"):
        eager(object, "x")


def test_strategy_overrides_are_validated() -> None:
    with pytest.raises(ValueError, match="must be one of"):
        eager(Conversation, "contact", strategies={"contact": "lazy"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="not a requested path"):
        eager(Conversation, "contact", strategies={"contact.company": "joined"})


# ---------------------------------------------------------------------------- strategies
def test_many_to_one_with_not_null_fk_is_an_inner_join_collections_are_selectin() -> None:
    text = sql(*eager(Conversation, WEBHOOK))
    assert "JOIN contacts AS contacts_1" in text
    assert "LEFT OUTER JOIN" not in text  # both FKs are NOT NULL
    assert "automation_rules" not in text  # the collection comes from a second SELECT ... IN


class _Base(DeclarativeBase):
    pass


class _Account(_Base):
    __tablename__ = "inner_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str]
    deleted: Mapped[bool] = mapped_column(default=False)
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "account"}


class _Partner(_Account):  # single-table inheritance: the join adds `kind IN ('partner')`
    __mapper_args__ = {"polymorphic_identity": "partner"}


class _Deal(_Base):
    __tablename__ = "inner_deals"
    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("inner_accounts.id"))  # NOT NULL
    legacy_id: Mapped[int]  # NOT NULL, but no FOREIGN KEY: may point at nothing
    account: Mapped[_Account] = relationship()
    live_account: Mapped[_Account | None] = relationship(
        primaryjoin=lambda: and_(_Deal.account_id == _Account.id, _Account.deleted.is_(False)),
        viewonly=True,
    )
    partner: Mapped[_Partner | None] = relationship(viewonly=True)
    legacy: Mapped[_Account | None] = relationship(
        primaryjoin=lambda: foreign(_Deal.legacy_id) == _Account.id, viewonly=True
    )


def test_an_inner_join_never_drops_a_root_row() -> None:
    # NOT NULL is not enough: extra join criteria, a single-table subclass or a
    # foreign() without a constraint can leave a row without a match
    engine = create_engine("sqlite://")
    _Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([_Account(id=1), _Account(id=2, deleted=True), _Partner(id=3)])
        session.add_all([_Deal(id=d, account_id=d, legacy_id=d * 10) for d in (1, 2, 3)])
        session.add(_Deal(id=4, account_id=1, legacy_id=1))
        session.commit()
    with Session(engine) as session:
        text = sql_of(_Deal, eager(_Deal, "account"))
        assert "LEFT OUTER JOIN" not in text  # the plain case is still an inner join
        for path, present in [("live_account", 3), ("partner", 1), ("legacy", 1)]:
            stmt = select(_Deal).order_by(_Deal.id).options(*eager(_Deal, path))
            deals = session.scalars(stmt).all()
            assert [d.id for d in deals] == [1, 2, 3, 4], path
            assert sum(getattr(d, path) is not None for d in deals) == present, path
            session.expunge_all()
    engine.dispose()


def test_one_to_one_is_an_outer_join() -> None:
    text = sql(*eager(Conversation, "contact.company.settings"))
    assert "LEFT OUTER JOIN company_settings" in text


def test_per_path_override() -> None:
    text = sql(*eager(Conversation, WEBHOOK, strategies={WEBHOOK: "joined"}))
    assert "LEFT OUTER JOIN automation_rules" in text
    text = sql(*eager(Conversation, "contact", strategies={"contact": "selectin"}))
    assert "contacts" not in text


def test_dict_and_dotted_paths_are_the_same() -> None:
    dotted = eager(Conversation, WEBHOOK, "contact.company.settings", "contact.enrollments")
    nested = eager(
        Conversation,
        {"contact": {"company": ["automation_rules", {"settings": None}], "enrollments": True}},
    )
    assert sql(*dotted) == sql(*nested)
    assert sql(*eager(Conversation, {"contact.company": "automation_rules"})) == sql(
        *eager(Conversation, WEBHOOK)
    )


def test_an_aliased_root(sync_engine: Engine) -> None:
    alias = aliased(Conversation)
    with Session(sync_engine) as session, count_queries(sync_engine) as counter:
        stmt = select(alias).where(alias.id == 1).options(*eager(alias, WEBHOOK))
        conversation = session.scalars(stmt).one()
        assert len(conversation.contact.company.automation_rules) == 3
        with pytest.raises(NotLoadedError, match=r"Contact\.conversations"):
            _ = conversation.contact.conversations
    assert counter.count == 2


# ---------------------------------------------------------------------------- sync engine
def test_webhook_graph_in_two_queries_and_clear_errors_sync(sync_engine: Engine) -> None:
    with Session(sync_engine) as session, count_queries(sync_engine) as counter:
        conversation = session.get(Conversation, 1, options=eager(Conversation, WEBHOOK))
        assert conversation is not None
        rules = conversation.contact.company.automation_rules
        assert [r.company_id for r in rules] == [conversation.contact.company_id] * 3
        with pytest.raises(NotLoadedError) as info:
            _ = conversation.contact.conversations
    assert counter.count == 2, counter.statements
    error = info.value
    assert error.attribute == "Contact.conversations"
    assert error.path == "contact.conversations"
    assert "eager(Conversation, 'contact.conversations', ...)" in str(error)
    assert isinstance(error, pk.ParallelkitError)
    assert isinstance(error, InvalidRequestError)


def test_every_level_raises_and_names_its_path(sync_engine: Engine) -> None:
    with Session(sync_engine) as session:
        stmt = select(Conversation).limit(3).options(*eager(Conversation, WEBHOOK))
        conversation = session.scalars(stmt).first()
        assert conversation is not None
        company = conversation.contact.company
        cases = [
            (lambda: company.contacts, "Company.contacts", "contact.company.contacts"),
            (lambda: company.settings, "Company.settings", "contact.company.settings"),
            (
                lambda: company.automation_rules[0].company,
                "AutomationRule.company",
                "contact.company.automation_rules.company",
            ),
        ]
        for touch, attribute, path in cases:
            with pytest.raises(NotLoadedError) as info:
                touch()
            assert (info.value.attribute, info.value.path) == (attribute, path)


def test_root_level_raises_too(sync_engine: Engine) -> None:
    with Session(sync_engine) as session:
        company = session.scalars(
            select(Company).limit(1).options(*eager(Company, "automation_rules"))
        ).one()
        assert len(company.automation_rules) == 3
        with pytest.raises(NotLoadedError, match=r"eager\(Company, 'contacts', ...\)"):
            _ = company.contacts


def test_raise_others_false_keeps_lazy_loading(sync_engine: Engine) -> None:
    with Session(sync_engine) as session, count_queries(sync_engine) as counter:
        options = eager(Conversation, "contact", raise_others=False)
        conversation = session.get(Conversation, 1, options=options)
        assert conversation is not None
        assert len(conversation.contact.conversations) == 5  # a lazy load
    assert counter.count == 2


# every relationship path from Conversation up to three levels deep
def _all_paths(depth: int = 3) -> list[str]:
    out: list[str] = []
    frontier = [("", inspect(Conversation))]
    for _ in range(depth):
        nxt = []
        for prefix, mapper in frontier:
            for key, prop in mapper.relationships.items():
                out.append(prefix + key)
                nxt.append((prefix + key + ".", prop.mapper))
        frontier = nxt
    return out


ALL_PATHS = _all_paths()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.sampled_from(ALL_PATHS), min_size=1, max_size=4, unique=True))
def test_requested_paths_are_loaded_in_one_query_per_collection_level(
    sync_engine: Engine, paths: list[str]
) -> None:
    tree: set[str] = set()
    for path in paths:
        parts = path.split(".")
        tree.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    options = eager(Conversation, *paths)
    budget = 1
    for path in tree:
        *parent, last = path.split(".")
        mapper = inspect(Conversation)
        for key in parent:
            mapper = mapper.relationships[key].mapper
        budget += mapper.relationships[last].uselist

    with Session(sync_engine) as session, count_queries(sync_engine) as counter:
        conversations = session.scalars(
            select(Conversation).where(Conversation.id <= 3).options(*options)
        ).all()
        loaded = counter.count
        for path in paths:  # walking a requested path sends nothing and raises nothing
            level: list[object] = list(conversations)
            for key in path.split("."):
                nxt: list[object] = []
                for obj in level:
                    value = getattr(obj, key)
                    nxt.extend(value if isinstance(value, list) else [value] if value else [])
                level = nxt
        assert counter.count == loaded
    assert 1 <= loaded <= budget, counter.statements


# ---------------------------------------------------------------------------- async, both DBs
async def _webhook(engine: AsyncEngine, ids: list[int]) -> list[Conversation]:
    factory = async_sessionmaker(engine, expire_on_commit=False)
    async with factory() as session:
        stmt = (
            select(Conversation)
            .where(Conversation.id.in_(ids))
            .order_by(Conversation.id)
            .options(*eager(Conversation, WEBHOOK))
        )
        return list((await session.scalars(stmt)).all())


@pytest.mark.anyio
@pytest.mark.parametrize("n", [1, 500])
async def test_webhook_graph_loads_in_at_most_two_queries(crm_engine: AsyncEngine, n: int) -> None:
    async with count_queries(crm_engine) as counter:
        conversations = await _webhook(crm_engine, list(range(1, n + 1)))
    assert len(conversations) == n
    assert counter.count <= 2, counter.statements
    # everything asked for is there, without another query
    rules = {r.id for c in conversations for r in c.contact.company.automation_rules}
    assert len(rules) == 3 * len({c.contact.company_id for c in conversations})
    assert counter.count <= 2


@pytest.mark.anyio
async def test_touching_an_unrequested_relationship_raises_the_clear_error(
    crm_engine: AsyncEngine,
) -> None:
    engine = crm_engine
    factory = async_sessionmaker(engine, expire_on_commit=False)
    async with factory() as session:
        conversation = await session.get_one(Conversation, 1, options=eager(Conversation, WEBHOOK))
        for touch, attribute in [
            (lambda: conversation.contact.conversations, "Contact.conversations"),
            (lambda: conversation.contact.company.contacts, "Company.contacts"),
            (lambda: conversation.contact.enrollments, "Contact.enrollments"),
        ]:
            async with count_queries(engine) as counter:
                with pytest.raises(NotLoadedError, match=attribute):
                    touch()
            assert counter.count == 0  # raised before any I/O, not MissingGreenlet


@pytest.mark.anyio
async def test_the_error_names_the_query_that_applied_it_to_an_object_loaded_before(
    crm_engine: AsyncEngine,
) -> None:
    # the contact and its company are in the identity map from earlier, plain queries
    # of the session (their own load paths start at Contact and Company): the error
    # names the eager() of the query that put the guard on them, from its root
    factory = async_sessionmaker(crm_engine, expire_on_commit=False)
    async with factory() as session:
        contact_id = await session.scalar(
            select(Conversation.contact_id).where(Conversation.id == 1)
        )
        earlier = await session.get_one(Contact, contact_id)
        company = await session.get_one(Company, earlier.company_id)
        stmt = select(Conversation).where(Conversation.id == 1)
        conversation = (
            await session.scalars(stmt.options(*eager(Conversation, "contact.company")))
        ).one()
        assert conversation.contact is earlier
        assert conversation.contact.company is company
        cases = [
            (lambda: earlier.conversations, "Contact.conversations", "contact.conversations"),
            (lambda: company.contacts, "Company.contacts", "contact.company.contacts"),
            (lambda: earlier.enrollments, "Contact.enrollments", "contact.enrollments"),
        ]
        for touch, attribute, path in cases:
            with pytest.raises(NotLoadedError) as info:
                touch()
            assert (info.value.attribute, info.value.root, info.value.path) == (
                attribute,
                "Conversation",
                path,
            )
            assert f"eager(Conversation, {path!r}, ...)" in str(info.value)


@pytest.mark.anyio
async def test_contact_side_queries_sit_on_the_right_models(crm_engine: AsyncEngine) -> None:
    factory = async_sessionmaker(crm_engine, expire_on_commit=False)
    async with factory() as session, count_queries(crm_engine) as counter:
        contacts = (
            await session.scalars(
                select(Contact)
                .where(Contact.company_id == 1)
                .options(*eager(Contact, "company", "conversations", "enrollments.cadence"))
            )
        ).all()
    assert len(contacts) == 10
    assert sum(len(c.conversations) for c in contacts) == 50
    assert all(e.cadence.company_id == 1 for c in contacts for e in c.enrollments)
    assert counter.count == 3  # contacts+company JOIN, conversations IN, enrollments+cadence IN
    with pytest.raises(NotLoadedError, match=r"'company.automation_rules'"):
        _ = contacts[0].company.automation_rules
    with pytest.raises(NotLoadedError, match=r"'enrollments.contact'"):
        _ = contacts[0].enrollments[0].contact


# ---------------------------------------------------------------------------- one root
def test_one_root_joins_the_collection_too(sync_engine: Engine) -> None:
    options = eager(Conversation, WEBHOOK, one=True)
    assert "LEFT OUTER JOIN automation_rules" in sql(*options)
    with Session(sync_engine) as session, count_queries(sync_engine) as counter:
        stmt = select(Conversation).where(Conversation.id == 7).options(*options)
        conversation = session.scalars(stmt).unique().one()
        assert len(conversation.contact.company.automation_rules) == 3
        with pytest.raises(NotLoadedError, match=r"'contact.conversations'"):
            _ = conversation.contact.conversations
    assert counter.count == 1, counter.statements


def test_one_root_joins_one_chain_of_collections_never_siblings(sync_engine: Engine) -> None:
    # contacts and automation_rules are siblings: joining both multiplies their rows
    options = eager(Company, "contacts.conversations", "automation_rules", one=True)
    text = sql_of(Company, options)
    assert "LEFT OUTER JOIN contacts" in text
    assert "LEFT OUTER JOIN conversations" in text  # the chain below the first collection
    assert "automation_rules" not in text  # the sibling: its own SELECT ... IN
    with Session(sync_engine) as session, count_queries(sync_engine) as counter:
        company = (
            session.scalars(select(Company).where(Company.id == 2).options(*options)).unique().one()
        )
        assert sum(len(c.conversations) for c in company.contacts) == 50
        assert len(company.automation_rules) == 3
    assert counter.count == 2, counter.statements


def test_many_roots_keep_selectin_for_collections() -> None:
    assert "automation_rules" not in sql(*eager(Conversation, WEBHOOK))
    assert "automation_rules" not in sql(*eager(Conversation, WEBHOOK, one=False))


def sql_of(model: object, options: tuple[object, ...]) -> str:
    return str(select(model).options(*options).compile())  # type: ignore[call-overload]


# ---------------------------------------------------------------------------- eager_get
async def _plain_then_eager_get(engine: AsyncEngine) -> tuple[Conversation, int]:
    factory = async_sessionmaker(engine, expire_on_commit=False)
    async with factory() as session:
        cached = await session.get_one(Conversation, 3)  # in the identity map, nothing loaded
        # what users write, and what SQLAlchemy does: the options are ignored for a cached row
        same = await session.get_one(Conversation, 3, options=eager(Conversation, WEBHOOK))
        assert same is cached
        assert "contact" in inspect(same).unloaded
        async with count_queries(engine) as counter:
            conversation = await eager_get(session, Conversation, 3, WEBHOOK)
        assert conversation is cached
        return conversation, counter.count


@pytest.mark.anyio
async def test_eager_get_loads_what_an_identity_map_copy_lacks(crm_engine: AsyncEngine) -> None:
    conversation, statements = await _plain_then_eager_get(crm_engine)
    assert statements == 1
    assert len(conversation.contact.company.automation_rules) == 3  # no MissingGreenlet
    with pytest.raises(NotLoadedError, match=r"Contact\.conversations"):
        _ = conversation.contact.conversations


@pytest.mark.anyio
async def test_eager_get_is_one_statement_and_free_when_all_is_loaded(
    crm_engine: AsyncEngine,
) -> None:
    factory = async_sessionmaker(crm_engine, expire_on_commit=False)
    async with factory() as session:
        async with count_queries(crm_engine) as counter:
            first = await eager_get(session, Conversation, 11, WEBHOOK)
            again = await eager_get(session, Conversation, 11, {"contact": "company"})
            missing = await eager_get(session, Conversation, 10_000, WEBHOOK)
        assert first is again
        assert missing is None
        assert counter.count == 2, counter.statements  # the second call needed nothing
        assert len(first.contact.company.automation_rules) == 3  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_eager_get_checks_its_arguments(crm_engine: AsyncEngine) -> None:
    factory = async_sessionmaker(crm_engine)
    with pytest.raises(TypeError, match="session must be an AsyncSession"):
        await eager_get(Session(), Conversation, 1)  # type: ignore[arg-type]
    async with factory() as session:
        with pytest.raises(ValueError, match=r"ident must have 1 value\(s\) for Conversation"):
            await eager_get(session, Conversation, (1, 2))
        with pytest.raises(ValueError, match="compny"):
            await eager_get(session, Conversation, 1, "contact.compny")
        assert await eager_get(session, Conversation, 1, "contact", raise_others=True)
        for bad in (1, None, [True]):  # checked before the cached plan (1 == True there)
            with pytest.raises(TypeError, match="raise_others must be a bool"):
                await eager_get(session, Conversation, 1, "contact", raise_others=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"raise_others": 1}, TypeError, "raise_others must be a bool"),
        ({"raise_others": None}, TypeError, "raise_others must be a bool"),
        ({"one": "yes"}, TypeError, "one must be a bool"),
        ({"strategies": ["joined"]}, TypeError, "strategies must be a dict"),
        ({"strategies": {"contact": 1}}, TypeError, r"strategies\['contact'\] must be one of"),
        (
            {"strategies": {"contact": "lazy"}},
            ValueError,
            r"strategies\['contact'\] must be one of",
        ),
    ],
)
def test_eager_rejects_bad_options_naming_them(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        eager(Conversation, "contact", **kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_eager_get_builds_its_options_once_per_model_and_paths(
    crm_engine: AsyncEngine,
) -> None:
    """The options and path tree are the CPU of a cache miss: built once, reused after."""
    from parallelkit.sqlalchemy import _get

    factory = async_sessionmaker(crm_engine, expire_on_commit=False)
    _get._plan.cache_clear()
    for ident in (21, 22, 23):
        async with factory() as session, count_queries(crm_engine) as counter:
            row = await eager_get(session, Conversation, ident, WEBHOOK)
            assert row is not None
            assert len(row.contact.company.automation_rules) == 3
            assert counter.count == 1, counter.statements  # one joined statement
    info = _get._plan.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def _keeps_loaded(options: tuple[object, ...]) -> bool:
    from parallelkit.sqlalchemy._compat import KEEP_OPT

    def opts(option: object) -> list[dict[str, object]]:
        found = [getattr(option, "local_opts", None) or {}]
        for child in getattr(option, "context", ()) or ():
            found += opts(child)
        return found

    return any(o.get(KEEP_OPT) for option in options for o in opts(option))


def test_the_guard_keeps_loaded_values_only_where_an_object_can_be_met_twice() -> None:
    """The guard's per-row "keep what this row loaded" check costs a call per row and
    relationship: only graphs that meet a class twice (one row may reach the same
    object at two places) pay it. The reference service's webhook graph does not."""
    assert not _keeps_loaded(eager(Conversation, "contact.company.automation_rules"))
    assert _keeps_loaded(eager(Contact, "company.contacts"))  # back to Contact
    assert _keeps_loaded(eager(Conversation, "contact.conversations"))
