"""RequestGuard on a real FastAPI app: per-request counts and budgets, the real error first."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from examples.crm import Company, Contact, Conversation
from fastapi import Depends, FastAPI
from fastapi.exceptions import ResponseValidationError
from pydantic import BaseModel, ConfigDict
from sqlalchemy import event, select, text
from sqlalchemy.exc import IllegalStateChangeError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.util import await_only

from parallelkit.sqlalchemy import (
    NotLoadedError,
    QueryCounter,
    RequestGuard,
    SessionInUseError,
    TooManyQueries,
    eager,
    guard_sessions,
)

pytest_plugins = ["tests.sqla_fixtures"]
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension


class ContactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    email: str


class ConversationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    contact: ContactOut


class Left:
    """What a request left behind: its sessions and the tasks it started."""

    sessions: list[AsyncSession]
    tasks: list[asyncio.Task[Any]]

    def __init__(self) -> None:
        self.sessions, self.tasks = [], []

    async def clean(self) -> None:
        if self.tasks:
            await asyncio.wait(self.tasks)
        for session in self.sessions:
            await session.close()


def make_app(
    engine: AsyncEngine, left: Left | None = None, **guard: Any
) -> tuple[FastAPI, dict[str, anyio.Event]]:
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    app = FastAPI()
    events: dict[str, anyio.Event] = {}
    left = left or Left()

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with sessions() as session:
            left.sessions.append(session)
            yield session

    @app.get("/contacts/{company_id}")
    async def contacts(
        company_id: int,
        wait: str = "",
        session: AsyncSession = Depends(get_session),  # noqa: B008
    ) -> list[str]:
        if wait:  # let the test line requests up
            events[f"{wait}-in"].set()
            await events[f"{wait}-go"].wait()
        ids = await session.scalars(select(Contact.id).where(Contact.company_id == company_id))
        # an N+1: one more statement per contact
        return [(await session.get_one(Contact, cid)).email for cid in ids]

    @app.get("/gather")
    async def gather(session: AsyncSession = Depends(get_session)) -> int:  # noqa: B008
        left.tasks += [asyncio.ensure_future(session.get(Company, i)) for i in (1, 2)]
        first, _ = await asyncio.gather(*left.tasks)  # the classic mistake
        return first.id  # type: ignore[no-any-return]

    @app.get("/conversation/{cid}", response_model=ConversationOut)
    async def conversation(
        cid: int,
        session: AsyncSession = Depends(get_session),  # noqa: B008
    ) -> Any:
        return await session.get(Conversation, cid, options=eager(Conversation))  # no contact

    app.add_middleware(RequestGuard, engine=engine, **guard)
    return app, events


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


# ---------------------------------------------------------------------------- counting
async def test_each_request_counts_its_own_statements(crm_engine: AsyncEngine) -> None:
    seen: list[tuple[str, int]] = []
    app, events = make_app(
        crm_engine, on_request=lambda scope, counter: seen.append((scope["path"], counter.count))
    )
    for name in ("a", "b"):
        events[f"{name}-in"], events[f"{name}-go"] = anyio.Event(), anyio.Event()

    async def release() -> None:  # both requests are inside their handler, then both go on
        await events["a-in"].wait()
        await events["b-in"].wait()
        events["a-go"].set()
        events["b-go"].set()

    async with client(app) as http, anyio.create_task_group() as tg:
        tg.start_soon(release)
        first, second = await asyncio.gather(
            http.get("/contacts/1", params={"wait": "a"}),
            http.get("/contacts/99", params={"wait": "b"}),  # no such company: 1 statement
        )
    assert first.status_code == second.status_code == 200
    assert first.headers["x-query-count"] == "11"  # 1 + one per contact
    assert second.headers["x-query-count"] == "1"
    assert sorted(count for _, count in seen) == [1, 11]


async def test_enforce_raises_too_many_queries_for_the_request(crm_engine: AsyncEngine) -> None:
    app, _ = make_app(crm_engine, max_queries=3, enforce=True)
    async with client(app) as http:
        with pytest.raises(
            TooManyQueries, match="expected at most 3 queries, 11 were sent"
        ) as info:
            await http.get("/contacts/1")
        assert "[repeated x10 with different parameters: N+1?]" in str(info.value)
        assert (await http.get("/contacts/99")).status_code == 200  # within the budget


async def test_on_request_sees_every_request_whatever_the_budget_or_outcome(
    crm_engine: AsyncEngine,
) -> None:
    seen: list[tuple[str, int]] = []
    app, _ = make_app(
        crm_engine,
        max_queries=3,
        enforce=True,
        on_request=lambda scope, counter: seen.append((scope["path"], counter.count)),
    )

    @app.get("/broken")
    async def broken(session: AsyncSession = Depends(get_session_of(crm_engine))) -> int:  # noqa: B008
        await session.execute(text("SELECT 1"))
        raise LookupError("the handler failed")

    async with client(app) as http:
        with pytest.raises(TooManyQueries):  # over the budget: enforced
            await http.get("/contacts/1")
        with pytest.raises(LookupError, match="the handler failed"):  # the handler's error
            await http.get("/broken")
        assert (await http.get("/contacts/99")).status_code == 200
    assert seen == [("/contacts/1", 11), ("/broken", 1), ("/contacts/99", 1)]


async def test_a_failing_on_request_never_hides_the_requests_error(
    crm_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    def on_request(scope: Any, counter: QueryCounter) -> None:
        raise RuntimeError("metrics are down")

    app, _ = make_app(crm_engine, max_queries=3, enforce=True, on_request=on_request)
    with caplog.at_level(logging.ERROR, logger="parallelkit.sqlalchemy"):
        async with client(app) as http:
            with pytest.raises(TooManyQueries):
                await http.get("/contacts/1")
            with pytest.raises(RuntimeError, match="metrics are down"):  # a request that worked
                await http.get("/contacts/99")
    (record,) = caplog.records  # logged once: for the request whose own error escaped
    assert record.getMessage().startswith("on_request failed")


def get_session_of(engine: AsyncEngine) -> Any:
    sessions = async_sessionmaker(engine)

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with sessions() as session:
            yield session

    return get_session


async def test_enforce_none_enforces_under_the_pytest_plugin(crm_engine: AsyncEngine) -> None:
    from parallelkit.sqlalchemy import _testing

    assert _testing.active  # this test suite runs with the parallelkit plugin
    app, _ = make_app(crm_engine, max_queries=3)
    async with client(app) as http:
        with pytest.raises(TooManyQueries):
            await http.get("/contacts/1")


async def test_report_logs_once_and_answers(
    crm_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = make_app(crm_engine, max_queries=3, enforce=False, header="X-Statements")
    with caplog.at_level(logging.WARNING, logger="parallelkit.sqlalchemy"):
        async with client(app) as http:
            response = await http.get("/contacts/1")
    assert response.status_code == 200
    assert response.headers["x-statements"] == "11"
    (record,) = caplog.records
    assert record.getMessage().startswith("GET /contacts/1: expected at most 3 queries, 11 were")


# ---------------------------------------------------------------------------- real errors
async def _gather_over_one_session(engine: AsyncEngine, guard: bool) -> BaseException:
    """The classic mistake in a handler whose session comes from a yield dependency."""
    connecting = anyio.Event()
    release = anyio.Event()

    def slow_connect(conn: Any) -> None:  # the first task is still connecting at teardown
        if not connecting.is_set():
            connecting.set()
            await_only(release.wait())

    left = Left()
    app, _ = make_app(engine, left)
    if not guard:
        app.user_middleware.clear()
    was_on = guard_sessions(True)
    event.listen(engine.sync_engine, "engine_connect", slow_connect)
    try:
        async with client(app) as http:
            with pytest.raises(Exception) as info:
                await http.get("/gather")
    finally:
        release.set()
        await left.clean()  # the orphaned first task, then the session it kept open
        event.remove(engine.sync_engine, "engine_connect", slow_connect)
        guard_sessions(was_on)
    return info.value


async def test_session_in_use_is_the_error_the_user_sees(any_engine: AsyncEngine) -> None:
    buried = await _gather_over_one_session(any_engine, guard=False)
    assert isinstance(buried, IllegalStateChangeError)  # what FastAPI shows without it
    assert isinstance(buried.__context__, SessionInUseError)
    error = await _gather_over_one_session(any_engine, guard=True)
    assert isinstance(error, SessionInUseError)
    assert isinstance(error.__cause__, IllegalStateChangeError)  # still reachable


async def test_not_loaded_is_the_error_the_user_sees(crm_engine: AsyncEngine) -> None:
    app, _ = make_app(crm_engine)
    app.user_middleware.clear()
    async with client(app) as http:
        with pytest.raises(ResponseValidationError, match="NotLoadedError"):
            await http.get("/conversation/1")
    app, _ = make_app(crm_engine)
    async with client(app) as http:
        with pytest.raises(NotLoadedError, match=r"Conversation\.contact") as info:
            await http.get("/conversation/1")
    assert info.value.path == "contact"
    assert isinstance(info.value.__cause__, ResponseValidationError)


async def test_not_loaded_is_found_behind_a_middleware_that_runs_the_app_in_a_task(
    crm_engine: AsyncEngine,
) -> None:
    # @app.middleware("http") (Starlette's BaseHTTPMiddleware) runs the route in another
    # task: the error is raised there, only its text reaches the guard
    app, _ = make_app(crm_engine)

    @app.middleware("http")
    async def passthrough(request: Any, call_next: Any) -> Any:
        return await call_next(request)

    app.user_middleware.reverse()  # RequestGuard outside, the task-running middleware inside
    errors: list[NotLoadedError] = []
    async with client(app) as http:
        for _ in range(2):  # each time a new error object, never one raised before
            with pytest.raises(NotLoadedError, match=r"Conversation\.contact") as info:
                await http.get("/conversation/1")
            assert info.value.path == "contact"
            assert isinstance(info.value.__cause__, ResponseValidationError)
            errors.append(info.value)
        assert errors[0] is not errors[1]


async def test_the_guard_changes_no_context_of_a_request(crm_engine: AsyncEngine) -> None:
    # A context variable set per request (even to an int) made uvicorn's server run the
    # garbage collector 30-40 times as often on a cached read: the guard sets none
    seen: list[list[str]] = []
    app, _ = make_app(crm_engine)
    app.user_middleware.clear()
    app.add_middleware(RequestGuard)  # no engine: the error surfacing only

    @app.get("/context")
    async def context() -> int:
        seen.append(sorted(var.name for var in contextvars.copy_context()))
        return 1

    outside = sorted(var.name for var in contextvars.copy_context())
    async with client(app) as http:
        assert (await http.get("/context")).json() == 1
    assert seen == [outside]


async def test_an_unrelated_error_is_left_alone(crm_engine: AsyncEngine) -> None:
    app, _ = make_app(crm_engine)

    @app.get("/boom")
    async def boom() -> None:
        with contextlib.suppress(NotLoadedError):  # handled by the app
            await _touch_unloaded(crm_engine)
        raise KeyError("boom")

    async with client(app) as http:
        with pytest.raises(KeyError, match="boom"):
            await http.get("/boom")


async def _touch_unloaded(engine: AsyncEngine) -> None:
    async with async_sessionmaker(engine)() as session:
        conversation = await session.get_one(Conversation, 1, options=eager(Conversation))
        _ = conversation.contact


async def test_other_scopes_pass_through(crm_engine: AsyncEngine) -> None:
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["type"])

    await RequestGuard(app, engine=crm_engine)({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert calls == ["lifespan"]


# ---------------------------------------------------------------------------- bad arguments
async def _app(scope: Any, receive: Any, send: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_queries": -1}, ValueError, "max_queries must be >= 0"),
        ({"max_queries": 2.5}, TypeError, "max_queries must be an int"),
        ({"max_queries": True}, TypeError, "max_queries must be an int"),
        ({"enforce": "yes"}, TypeError, "enforce must be a bool"),
        ({"header": ""}, TypeError, "header must be a non-empty str or None"),
        ({"header": 3}, TypeError, "header must be a non-empty str or None"),
        ({"header": "x query count"}, ValueError, "header must be an HTTP header name"),
        ({"header": "x-query:count"}, ValueError, "header must be an HTTP header name"),
        ({"header": "x-zählung"}, ValueError, "header must be an HTTP header name"),
        ({"on_request": 3}, TypeError, "on_request must be a callable"),
        ({"engine": "sqlite://"}, TypeError, r"count_queries\(\) target must be"),
        ({"max_queries": 3}, ValueError, "max_queries needs engine="),
        ({"max_queries": 3, "enforce": True}, ValueError, "max_queries needs engine="),
        ({"enforce": False}, ValueError, "enforce needs engine="),
        ({"on_request": print}, ValueError, "on_request needs engine="),
    ],
)
def test_request_guard_rejects_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        RequestGuard(_app, **kwargs)
    with pytest.raises(TypeError, match="app must be an ASGI app"):
        RequestGuard(None)  # type: ignore[arg-type]


def test_counter_type_is_exported() -> None:
    assert QueryCounter.__module__ == "parallelkit.sqlalchemy"
    assert text("SELECT 1") is not None
