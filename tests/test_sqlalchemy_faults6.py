"""parallelkit.sqlalchemy, sixth fault review: expired graphs, scoped sessions, misuse.

* ``load()`` after a rollback (or a commit with ``expire_on_commit=True``, or
  ``session.expire_all()``): its hop statements re-loaded the expired objects without
  ``eager``'s raise guard, so touching a relationship not asked for gave SQLAlchemy's
  ``MissingGreenlet`` instead of :class:`NotLoadedError`;
* the hop statements ignored the query's ``with_loader_criteria`` (SQLAlchemy's own
  lazy loads apply it);
* ``eager_get`` with an ``async_scoped_session`` (a proxy of an ``AsyncSession``);
  ``parallel`` and ``loader_by_id`` given one used the scope's own session (the
  caller's) for every function / batch, and closed it; ``count_queries``,
  ``max_queries`` and ``pool_limiter`` refused one;
* ``engine.execution_options(...)`` (same pool, another ``Engine``) got a second
  ``pool_limiter``: twice the bound over one pool.

SQLite and PostgreSQL; asyncio only (SQLAlchemy's asyncio extension).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable

import anyio.lowlevel
import pytest
from examples.crm import Company, Contact, Conversation
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
)
from sqlalchemy.orm import scoped_session, sessionmaker, with_loader_criteria

from parallelkit.sqlalchemy import (
    LimitedAsyncSession,
    NotLoadedError,
    count_queries,
    eager,
    eager_get,
    fetch_peers,
    load,
    loader_by_id,
    max_queries,
    parallel,
    pool_limiter,
)

pytest_plugins = ["tests.sqla_fixtures"]
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension


async def _rollback(session: AsyncSession) -> None:
    await session.rollback()


async def _commit(session: AsyncSession) -> None:
    await session.commit()  # expire_on_commit=True, SQLAlchemy's default


async def _expire_all(session: AsyncSession) -> None:
    session.expire_all()


EXPIRE: dict[str, Callable[[AsyncSession], Awaitable[None]]] = {
    "rollback": _rollback,
    "commit": _commit,
    "expire_all": _expire_all,
}


# ------------------------------------------------------------ the raise guard after a rollback
@pytest.mark.parametrize("how", sorted(EXPIRE))
@pytest.mark.parametrize("peers", [False, True], ids=["alone", "peers"])
async def test_the_raise_guard_holds_after_the_session_expires(
    crm_engine: AsyncEngine, how: str, peers: bool
) -> None:
    async with AsyncSession(crm_engine) as session:
        options = [*eager(Conversation, "contact"), *([fetch_peers()] if peers else [])]
        stmt = select(Conversation).order_by(Conversation.id).limit(6).options(*options)
        conversations = (await session.scalars(stmt)).all()
        with pytest.raises(NotLoadedError):
            _ = conversations[0].contact.conversations
        await EXPIRE[how](session)
        async with count_queries(crm_engine) as counter:
            contact = await load(conversations[0], "contact")
        assert counter.count == 1
        assert isinstance(contact, Contact)
        # was SQLAlchemy's MissingGreenlet: the hop re-loaded the contact without the guard
        with pytest.raises(NotLoadedError) as caught:
            _ = contact.conversations
        assert caught.value.attribute == "Contact.conversations"
        assert "eager(Conversation, 'contact.conversations', ...)" in str(caught.value)
        if peers:  # the hop re-loaded every peer's contact: each keeps its guard
            for conversation in conversations:
                with pytest.raises(NotLoadedError, match=r"Contact\.company"):
                    _ = conversation.contact.company


async def test_the_hop_restores_the_paths_eager_asked_for(crm_engine: AsyncEngine) -> None:
    async with AsyncSession(crm_engine) as session:
        stmt = (
            select(Conversation)
            .order_by(Conversation.id)
            .limit(6)
            .options(fetch_peers(), *eager(Conversation, "contact.company"))
        )
        conversations = (await session.scalars(stmt)).all()
        await session.rollback()
        async with count_queries(crm_engine) as counter:
            contact = await load(conversations[0], "contact")
            company = await load(conversations[-1], "contact.company")
        assert counter.count == 1  # the hop loads contact.company too, as eager asked
        assert isinstance(contact, Contact)
        assert isinstance(company, Company)
        with pytest.raises(NotLoadedError) as caught:
            _ = company.contacts
        assert caught.value.attribute == "Company.contacts"
        assert caught.value.path == "contact.company.contacts"


async def test_a_hop_from_unguarded_objects_is_unchanged(crm_engine: AsyncEngine) -> None:
    """Rows of a query without options: the hop sends what it sent before, no guard."""
    async with AsyncSession(crm_engine) as session:
        stmt = select(Conversation).order_by(Conversation.id).limit(6).options(fetch_peers())
        conversations = (await session.scalars(stmt)).all()
        await session.rollback()
        async with count_queries(crm_engine) as counter:
            company = await load(conversations[0], "contact.company")
        assert counter.count == 2
        assert isinstance(company, Company)
        assert "contacts" not in company.__dict__


# ------------------------------------------------------------ eager_get and async_scoped_session
async def test_eager_get_takes_an_async_scoped_session(crm_engine: AsyncEngine) -> None:
    scoped = async_scoped_session(async_sessionmaker(crm_engine), scopefunc=asyncio.current_task)
    try:
        # was TypeError: session must be an AsyncSession, got async_scoped_session
        conversation = await eager_get(scoped, Conversation, 1, "contact.company")
        assert conversation is not None
        assert conversation in scoped()  # the scope's own session, not a new one
        assert conversation.contact.company.id == conversation.contact.company_id
        async with count_queries(crm_engine) as counter:
            again = await eager_get(scoped, Conversation, 1, "contact.company")
        assert again is conversation
        assert counter.count == 0  # the identity map of the same session
        with pytest.raises(NotLoadedError):
            _ = conversation.contact.conversations
    finally:
        await scoped.remove()


async def test_eager_get_still_names_what_to_pass(crm_engine: AsyncEngine) -> None:
    sessions = async_sessionmaker(crm_engine)
    with pytest.raises(TypeError, match="session must be an AsyncSession") as caught:
        await eager_get(sessions, Conversation, 1)  # type: ignore[arg-type]
    assert "async_scoped_session" in str(caught.value)


# ------------------------------------------------------------ parallel() and scoped sessions
async def test_parallel_gives_each_function_its_own_session_from_a_scoped_factory(
    crm_engine: AsyncEngine,
) -> None:
    request: contextvars.ContextVar[int] = contextvars.ContextVar("request", default=1)
    scoped = async_scoped_session(async_sessionmaker(crm_engine), scopefunc=request.get)
    mine = scoped()  # the request's own session, in use by the caller
    seen: list[AsyncSession] = []

    async def one(session: AsyncSession) -> int:
        seen.append(session)
        await anyio.lowlevel.checkpoint()
        return len((await session.scalars(select(Company.id))).all())

    try:
        # was: every function got the scope's one session (gather over one session,
        # what parallel exists to avoid), and parallel closed the caller's session
        assert await parallel(scoped, one, one, one) == [10, 10, 10]
        assert len({id(session) for session in seen}) == 3
        assert mine not in seen
        assert scoped() is mine  # the scope still holds the caller's session
    finally:
        await scoped.remove()


@pytest.mark.parametrize("make", ["count_queries", "max_queries", "pool_limiter"])
async def test_the_engine_is_found_behind_a_scoped_session(
    crm_engine: AsyncEngine, make: str
) -> None:
    scoped = async_scoped_session(async_sessionmaker(crm_engine), scopefunc=asyncio.current_task)
    sync_scoped = scoped_session(sessionmaker(crm_engine.sync_engine))
    try:
        if make == "pool_limiter":
            # was TypeError: pool_limiter() needs an engine, ... got async_scoped_session
            assert pool_limiter(scoped) is pool_limiter(crm_engine)
            assert pool_limiter(sync_scoped) is pool_limiter(crm_engine)
            return
        guard = count_queries(scoped) if make == "count_queries" else max_queries(scoped, 1)
        async with guard as counter:
            await scoped.get(Company, 1)
        assert counter.count == 1
        with count_queries(sync_scoped) as counter:
            await scoped.execute(select(Company.id).where(Company.id == 2))
        assert counter.count == 1
    finally:
        await scoped.remove()
        sync_scoped.remove()


async def test_the_hop_applies_the_querys_loader_criteria(crm_engine: AsyncEngine) -> None:
    """``with_loader_criteria`` (a soft-delete filter, a tenant) reaches the hop, as it
    reaches SQLAlchemy's own lazy loads: it loaded every contact before."""
    async with AsyncSession(crm_engine) as session:
        stmt = (
            select(Company)
            .order_by(Company.id)
            .options(fetch_peers(), with_loader_criteria(Contact, Contact.id % 2 == 0))
        )
        companies = (await session.scalars(stmt)).all()
        async with count_queries(crm_engine) as counter:
            contacts = await load(companies[0], "contacts")
        assert counter.count == 1
        assert contacts
        assert all(contact.id % 2 == 0 for contact in contacts)
        assert all(len(company.contacts) == 5 for company in companies)  # peers, same statement


async def test_loader_by_id_leaves_a_scoped_sessions_own_session_alone(
    crm_engine: AsyncEngine,
) -> None:
    request: contextvars.ContextVar[int] = contextvars.ContextVar("request", default=1)
    scoped = async_scoped_session(async_sessionmaker(crm_engine), scopefunc=request.get)
    mine = scoped()
    try:
        kept = await mine.get(Company, 2)
        async with loader_by_id(scoped, Company) as companies:
            found = await companies.load(1)
        assert found is not None
        assert found.id == 1
        assert found not in mine  # a session of its own, closed after the batch
        # was: the batch ran in the scope's session, the caller's, and closed it
        assert kept in mine
        assert scoped() is mine
    finally:
        await scoped.remove()


# ------------------------------------------------------------ one pool, one limiter
@pytest.mark.parametrize("first", ["engine", "copy"])
async def test_an_execution_options_copy_shares_the_engines_limiter(
    small_pool: AsyncEngine, first: str
) -> None:
    """``engine.execution_options(...)`` is another Engine object over the *same* pool:
    a second limiter of its own doubled the bound (2 + 2 slots over 2 connections)."""
    autocommit = small_pool.execution_options(isolation_level="AUTOCOMMIT")
    assert autocommit.sync_engine.pool is small_pool.sync_engine.pool
    order = [small_pool, autocommit] if first == "engine" else [autocommit, small_pool]
    limiters = [pool_limiter(target) for target in order]
    assert limiters[0] is limiters[1]
    sessions = async_sessionmaker(autocommit, class_=LimitedAsyncSession)
    async with sessions() as session:
        await session.execute(text("SELECT 1"))
        assert limiters[0].statistics().running == 1  # a slot of the engine's one bound
    assert limiters[0].statistics().running == 0
    await small_pool.dispose()  # a new pool for the same engine: still its one limiter
    assert pool_limiter(autocommit) is limiters[0]
    assert pool_limiter(small_pool) is limiters[0]
