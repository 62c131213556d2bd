"""count_queries / max_queries / TooManyQueries and the pytest fixtures."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from examples.crm import Contact, Conversation
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import parallelkit as pk
from parallelkit.sqlalchemy import (
    QueryCounter,
    TooManyQueries,
    count_queries,
    eager,
    max_queries,
)

pytest_plugins = ["tests.sqla_fixtures"]

FIVE = [1, 6, 11, 16, 21]  # five conversations of five different contacts


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's asyncio extension runs on asyncio only (greenlet bridge), not on trio.
    return "asyncio"


def n_plus_one(session: Session) -> list[str]:
    """The seed's slow pattern: one query for the list, then one per row."""
    conversations = session.scalars(select(Conversation).where(Conversation.id.in_(FIVE))).all()
    return [c.contact.email for c in conversations]  # a lazy load per distinct contact


# ---------------------------------------------------------------------------- count_queries
def test_counts_statements_on_a_sync_engine(sync_engine: Engine) -> None:
    with count_queries(sync_engine) as counter:
        with sync_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.execute(text("SELECT 2"))
        assert counter.count == 2
    assert counter.statements == ["SELECT 1", "SELECT 2"]
    with sync_engine.connect() as conn:
        conn.execute(text("SELECT 3"))
    assert counter.count == 2  # not listening after the block
    assert "inactive count=2" in repr(counter)


@pytest.mark.parametrize("kind", ["session", "sessionmaker", "connection"])
def test_accepts_sessions_factories_and_connections(sync_engine: Engine, kind: str) -> None:
    with Session(sync_engine) as session, sync_engine.connect() as conn:
        target = {
            "session": session,
            "sessionmaker": sessionmaker(sync_engine),
            "connection": conn,
        }[kind]
        with count_queries(target) as counter:
            if kind == "connection":
                conn.execute(text("SELECT 1"))
            else:
                session.get(Conversation, 1)
        assert counter.count == 1


def test_rejects_what_it_cannot_count() -> None:
    with pytest.raises(TypeError, match="count_queries\\(\\) target must be"):
        count_queries("sqlite://")
    with pytest.raises(TypeError, match="single bind"):
        count_queries(Session())


def test_a_counter_is_entered_once(sync_engine: Engine) -> None:
    counter = count_queries(sync_engine)
    with counter, pytest.raises(RuntimeError, match="already active"):
        counter.__enter__()


def test_repeated_marks_the_n_plus_one_statement(sync_engine: Engine) -> None:
    with Session(sync_engine) as session, count_queries(sync_engine) as counter:
        n_plus_one(session)
    repeated = counter.repeated()
    assert len(repeated) == 1
    ((statement, times),) = repeated.items()
    assert "FROM contacts" in statement
    assert times == counter.count - 1 >= 1


def test_same_statement_same_parameters_is_not_n_plus_one(sync_engine: Engine) -> None:
    with sync_engine.connect() as conn, count_queries(sync_engine) as counter:
        conn.execute(text("SELECT 1"))
        conn.execute(text("SELECT 1"))
    assert counter.repeated() == {}


@pytest.mark.anyio
async def test_counts_on_async_engines_and_sessions(crm_engine: AsyncEngine) -> None:
    factory = async_sessionmaker(crm_engine)
    for target in (crm_engine, factory):
        async with factory() as session, count_queries(target) as counter:
            await session.get(Conversation, 1)
            await session.get(Conversation, 2)
        assert counter.count == 2
    async with factory() as session:
        async with count_queries(session) as counter:
            await session.scalar(select(Contact).limit(1))
        assert counter.count == 1
        async with crm_engine.connect() as conn:
            with count_queries(conn) as counter:
                await conn.execute(text("SELECT 1"))
            assert counter.count == 1


# ---------------------------------------------------------------------------- max_queries
def test_max_queries_passes_within_the_budget(sync_engine: Engine) -> None:
    with Session(sync_engine) as session, max_queries(sync_engine, 2) as counter:
        conversation = session.get(Conversation, 1, options=eager(Conversation, "contact.company"))
        assert conversation is not None
        assert conversation.contact.company.name
    assert counter.count == 1


def test_max_queries_catches_n_plus_one_and_names_the_repeated_statement(
    sync_engine: Engine,
) -> None:
    with (
        pytest.raises(TooManyQueries) as info,
        Session(sync_engine) as session,
        max_queries(sync_engine, 2),
    ):
        n_plus_one(session)
    error = info.value
    assert error.limit == 2
    assert error.count == len(error.statements) > 2
    message = str(error)
    assert f"expected at most 2 queries, {error.count} were sent" in message
    assert "[repeated x" in message
    assert "N+1" in message
    marked = next(line for line in message.splitlines() if "[repeated x" in line)
    assert "FROM contacts" in marked
    assert message.count("FROM contacts") == 1  # the repeated statement is listed once
    assert isinstance(error, pk.ParallelkitError)
    assert isinstance(error, AssertionError)


def test_the_fix_passes_the_same_guard(sync_engine: Engine) -> None:
    with Session(sync_engine) as session, max_queries(sync_engine, 1):
        stmt = select(Conversation).where(Conversation.id.in_(FIVE))
        conversations = session.scalars(stmt.options(*eager(Conversation, "contact"))).all()
        assert len({c.contact.email for c in conversations}) == 5


def test_an_error_in_the_block_is_not_masked(sync_engine: Engine) -> None:
    with pytest.raises(KeyError), Session(sync_engine) as session, max_queries(sync_engine, 0):
        n_plus_one(session)
        raise KeyError("boom")


@pytest.mark.parametrize(("n", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_max_queries_validates_n(sync_engine: Engine, n: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="n must be"):
        max_queries(sync_engine, n)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_max_queries_async(crm_engine: AsyncEngine) -> None:
    factory = async_sessionmaker(crm_engine)
    async with factory() as session:
        with pytest.raises(TooManyQueries, match="at most 1 queries, 3 were sent"):
            async with max_queries(session, 1):
                for pk_ in (1, 2, 3):
                    await session.get(Conversation, pk_)


def test_too_many_queries_message_without_repeats() -> None:
    error = TooManyQueries(1, ["SELECT a\n  FROM t", "SELECT b FROM t"])
    assert str(error).splitlines() == [
        "expected at most 1 queries, 2 were sent:",
        "    1. SELECT a FROM t",
        "    2. SELECT b FROM t",
    ]


# ---------------------------------------------------------------------------- pytest fixtures
def test_query_counter_fixture(
    sync_engine: Engine, query_counter: Callable[[object], QueryCounter]
) -> None:
    with query_counter(sync_engine) as counter, sync_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert counter.count == 1


def test_max_queries_fixture(sync_engine: Engine, max_queries: type[max_queries]) -> None:
    with (
        pytest.raises(TooManyQueries),
        Session(sync_engine) as session,
        max_queries(sync_engine, 1),
    ):
        n_plus_one(session)


def test_plugin_imports_nothing_optional(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, parallelkit.pytest_plugin, parallelkit; "
        "assert 'parallelkit.sqlalchemy' not in sys.modules, 'imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_memory_engine_works_too() -> None:
    engine = create_engine("sqlite://")
    try:
        with count_queries(engine) as counter, engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()  # Python 3.13 warns about sqlite connections left open
    assert counter.count == 1
    aengine = create_async_engine("sqlite+aiosqlite://")
    assert count_queries(aengine)._target is aengine.sync_engine


# ---------------------------------------------------------------------------- one request
@pytest.mark.anyio
async def test_concurrent_requests_on_one_engine_count_their_own_statements(
    crm_engine: AsyncEngine,
) -> None:
    factory = async_sessionmaker(crm_engine)
    both_counting = [anyio.Event(), anyio.Event()]
    counts: dict[str, int] = {}

    async def request(name: str, index: int, n: int) -> None:
        async with factory() as session, count_queries(crm_engine) as counter:
            await session.execute(text("SELECT 1"))
            both_counting[index].set()
            await both_counting[1 - index].wait()  # both counters active from here on
            for i in range(n):
                await session.execute(text(f"SELECT {i}"))
            # tasks started inside the block belong to this request
            await pk.gather(
                *(lambda: _one_statement(factory) for _ in range(index + 1)), limit=None
            )
        counts[name] = counter.count

    async def bystander() -> None:  # same engine, counted by nobody
        await both_counting[0].wait()
        await both_counting[1].wait()
        async with factory() as session:
            for i in range(7):
                await session.execute(text(f"SELECT {i}"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(request, "a", 0, 2)
        tg.start_soon(request, "b", 1, 5)
        tg.start_soon(bystander)
    assert counts == {"a": 1 + 2 + 1, "b": 1 + 5 + 2}


async def _one_statement(factory: async_sessionmaker[Any]) -> None:
    async with factory() as session:
        await session.execute(text("SELECT 42"))


def test_threads_count_their_own_statements(sync_engine: Engine) -> None:
    barrier = threading.Barrier(2, timeout=30)
    counts: dict[int, int] = {}

    def worker(n: int) -> None:
        with count_queries(sync_engine) as counter, sync_engine.connect() as conn:
            barrier.wait()  # both counters active
            for i in range(n):
                conn.execute(text(f"SELECT {i}"))
            barrier.wait()
        counts[n] = counter.count

    threads = [threading.Thread(target=worker, args=(n,)) for n in (3, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts == {3: 3, 4: 4}


def test_nested_counters_both_count_and_the_listener_goes_away(sync_engine: Engine) -> None:
    from sqlalchemy import event

    from parallelkit.sqlalchemy import _queries

    with count_queries(sync_engine) as outer, sync_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        with count_queries(sync_engine) as inner:
            conn.execute(text("SELECT 2"))
        conn.execute(text("SELECT 3"))
    assert (outer.count, inner.count) == (3, 1)
    assert id(sync_engine) not in _queries._listeners
    assert not event.contains(sync_engine, "before_cursor_execute", _queries._listener)


# ---------------------------------------------------------------------------- the plugin
PLUGIN_TEST = """
import sqlalchemy
from sqlalchemy import event
from sqlalchemy.orm import Session

from parallelkit.sqlalchemy import _sessions, _testing


def test_guard_is_on_during_the_tests():
    assert event.contains(Session, "after_transaction_create", _sessions._on_transaction)
    assert _testing.active
"""

PLUGIN_CONFTEST = """
from sqlalchemy import event
from sqlalchemy.orm import Session


def pytest_sessionfinish(session):
    from parallelkit.sqlalchemy import _sessions, _testing

    on = event.contains(Session, "after_transaction_create", _sessions._on_transaction)
    (session.config.rootpath / "after.txt").write_text(f"{on} {_testing.active}")
"""


def run_pytest_in(tmp_path: Path) -> None:
    """Run pytest (the plugin installed, as for a user) on the files in ``tmp_path``."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("ini", [None, "parallelkit_guard_sessions = false"])
def test_the_plugin_turns_the_guard_on_for_the_session_and_off_after(
    tmp_path: Path, ini: str | None
) -> None:
    (tmp_path / "test_user.py").write_text(
        PLUGIN_TEST if ini is None else PLUGIN_TEST.replace("assert ", "assert not ")
    )
    (tmp_path / "conftest.py").write_text(PLUGIN_CONFTEST)
    (tmp_path / "pytest.ini").write_text(f"[pytest]\n{ini or ''}\n")
    run_pytest_in(tmp_path)
    assert (tmp_path / "after.txt").read_text() == "False False"


LAZY_IMPORT_TEST = """
import pytest


@pytest.fixture
def engine():
    from sqlalchemy import create_engine  # the first import of SQLAlchemy: in a fixture

    return create_engine("sqlite://")


def test_guard_is_on_though_sqlalchemy_was_imported_late(engine):
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from parallelkit.sqlalchemy import _sessions, _testing

    assert event.contains(Session, "after_transaction_create", _sessions._on_transaction)
    assert _testing.active
"""


def test_the_plugin_guards_a_session_whose_fixture_imports_sqlalchemy(tmp_path: Path) -> None:
    """Whether SQLAlchemy is installed decides, not whether it was imported before the
    first test: a fixture that imports it would otherwise leave the guard off, silently."""
    (tmp_path / "test_lazy.py").write_text(LAZY_IMPORT_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    run_pytest_in(tmp_path)
