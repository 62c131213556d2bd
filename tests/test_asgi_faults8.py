"""Fault review 8 of the ASGI integration: parallelkit.asgi and RequestGuard.

Used as the docs say, then pushed: a FastAPI router bringing a lifespan of its own,
a lifespan passed uncalled, an app that handles or swallows the guard's own error,
a sub-app with a guard of its own mounted in a guarded app. In-process (the lifespan
entered as a server enters it, requests through ``httpx.ASGITransport``); events and
counters, never elapsed time.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

import parallelkit as pk
from parallelkit.asgi import lifespan, service

pytestmark = pytest.mark.anyio

BOTH = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _orchestrator(name: str, log: list[str]) -> pk.Orchestrator:
    orch = pk.Orchestrator()

    @orch.service(name=name)
    async def value() -> AsyncIterator[str]:
        log.append(f"{name} up")
        yield name
        log.append(f"{name} down")

    return orch


# ---------------------------------------------------------------- lifespan: one per app
@BOTH
async def test_a_router_lifespan_of_another_orchestrator_is_refused_naming_the_fix() -> None:
    """FastAPI runs an included router's ``lifespan=`` inside the app's and merges
    their states, the app's keys winning: the router's orchestrator started, but
    ``service("cache")`` then failed every request with "no service named 'cache'"
    (the requests saw the app's orchestrator only). Now the start fails, naming
    the fix, and what had started stops."""
    log: list[str] = []
    router = APIRouter(lifespan=lifespan(_orchestrator("cache", log)))

    @router.get("/cache")
    async def read(cache: Annotated[str, service("cache")]) -> str:
        return cache

    app = FastAPI(lifespan=lifespan(_orchestrator("db", log)))
    app.include_router(router)
    with anyio.fail_after(30), pytest.raises(RuntimeError, match="one Orchestrator") as info:
        async with app.router.lifespan_context(app):
            pass
    assert "already runs a parallelkit lifespan" in str(info.value)
    assert log == ["db up", "db down"]


@BOTH
async def test_two_apps_each_with_a_lifespan_may_run_nested() -> None:
    """The refusal is per app: two apps' lifespans entered one inside the other
    (two apps in one test) both start."""
    log: list[str] = []
    first = FastAPI(lifespan=lifespan(_orchestrator("db", log)))
    second = FastAPI(lifespan=lifespan(_orchestrator("cache", log)))
    with anyio.fail_after(30):
        async with (
            first.router.lifespan_context(first) as one,
            second.router.lifespan_context(second) as two,
        ):
            assert (one or {})["db"] == "db"
            assert (two or {})["cache"] == "cache"
        async with first.router.lifespan_context(first) as again:  # once more, after
            assert (again or {})["db"] == "db"
    assert log == ["db up", "cache up", "cache down", "db down", "db up", "db down"]


def test_lifespan_given_uncalled_says_to_call_it() -> None:
    """``FastAPI(lifespan=lifespan)`` (not ``lifespan(orch)``): the server calls it
    with the app, and the message only said it "takes a parallelkit.Orchestrator"."""
    with pytest.raises(TypeError, match=r"lifespan=lifespan\(orch\)"):
        lifespan(FastAPI())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"takes a parallelkit\.Orchestrator, got 3$"):
        lifespan(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- RequestGuard
@pytest.fixture
async def engine() -> AsyncIterator[Any]:
    pytest.importorskip("aiosqlite")
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import StaticPool

    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _statements(engine: Any, n: int) -> None:
    from sqlalchemy import text

    async with engine.connect() as conn:
        for _ in range(n):
            await conn.execute(text("SELECT 1"))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # SQLAlchemy's asyncio extension
async def test_an_app_handling_assertion_errors_still_gets_the_budget_error(engine: Any) -> None:
    """The guard raises ``TooManyQueries`` (an ``AssertionError``) out of the app's
    ``send`` of the response start. With an ``exception_handler(AssertionError)``,
    Starlette took the response for started and raised "Caught handled exception,
    but response already started." over it: that RuntimeError escaped instead of
    the budget error (no response had started: the guard withheld it)."""
    from parallelkit.sqlalchemy import RequestGuard, TooManyQueries

    app = FastAPI()

    @app.exception_handler(AssertionError)
    async def bad_request(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/")
    async def index() -> int:
        await _statements(engine, 3)
        return 1

    app.add_middleware(RequestGuard, engine=engine, max_queries=1, enforce=True)
    async with client(app) as http:
        with anyio.fail_after(30), pytest.raises(TooManyQueries) as info:
            await http.get("/")
    assert info.value.count == 3
    assert isinstance(info.value.__cause__, RuntimeError)  # what hid it, reachable


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_app_swallowing_the_budget_error_does_not_lose_it(engine: Any) -> None:
    """An app (or middleware) that catches what ``send`` raises and returns: the guard
    had withheld the response start and raised; with the error swallowed the request
    ended with no response and no error (the server's "returned without starting
    response"), the over-budget request never reported."""
    from parallelkit.sqlalchemy import RequestGuard, TooManyQueries

    seen: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _statements(engine, 2)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        except Exception:  # what a careless app does
            return
        await send({"type": "http.response.body", "body": b"ok"})

    guard = RequestGuard(
        app, engine=engine, max_queries=1, enforce=True,
        on_request=lambda scope, counter: seen.append(counter.count),
    )  # fmt: skip
    async with client(guard) as http:
        with anyio.fail_after(30), pytest.raises(TooManyQueries):
            await http.get("/")
    assert seen == [2]  # on_request once, as for any request


def _guarded(engine: Any, statements: int, **guard: Any) -> FastAPI:
    from parallelkit.sqlalchemy import RequestGuard

    app = FastAPI()

    @app.get("/q")
    async def query() -> int:
        await _statements(engine, statements)
        return statements

    app.add_middleware(RequestGuard, engine=engine, **guard)
    return app


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_guarded_sub_app_in_a_guarded_app_is_counted_and_reported_once(
    engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A sub-app built with its own RequestGuard, mounted in an app that has one too
    (one ``make_app()`` for both): each sub-app request got two ``x-query-count``
    headers and, over both budgets, two warnings listing the same statements. Now:
    one header (the innermost guard's), one warning; each guard's ``on_request``."""
    calls: list[tuple[str, int]] = []

    def recorder(name: str) -> Any:
        return lambda scope, counter: calls.append((name, counter.count))

    inner = _guarded(engine, 3, max_queries=1, enforce=False, on_request=recorder("inner"))
    outer = _guarded(engine, 4, max_queries=2, enforce=False, on_request=recorder("outer"))
    outer.mount("/sub", inner)
    caplog.set_level(logging.WARNING, logger="parallelkit.sqlalchemy")
    async with client(outer) as http:
        with anyio.fail_after(30):
            sub = await http.get("/sub/q")
            own = await http.get("/q")
    assert sub.status_code == own.status_code == 200
    assert sub.headers.get_list("x-query-count") == ["3"]
    assert own.headers.get_list("x-query-count") == ["4"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "parallelkit.sqlalchemy"]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("GET /sub/q: expected at most 1 queries, 3 were sent")
    assert warnings[1].startswith("GET /q: expected at most 2 queries, 4 were sent")
    assert calls == [("inner", 3), ("outer", 3), ("outer", 4)]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_sub_app_guard_enforces_its_own_budget_inside_a_laxer_one(engine: Any) -> None:
    """Each guard checks its own budget: the sub-app's stricter one raises, once."""
    from parallelkit.sqlalchemy import TooManyQueries

    inner = _guarded(engine, 3, max_queries=1, enforce=True)
    outer = _guarded(engine, 0, max_queries=10, enforce=True)
    outer.mount("/sub", inner)
    async with client(outer) as http:
        with anyio.fail_after(30), pytest.raises(TooManyQueries) as info:
            await http.get("/sub/q")
    assert (info.value.limit, info.value.count) == (1, 3)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_guarded_app_called_in_process_from_a_handler_is_another_request(
    engine: Any,
) -> None:
    """A handler calling another guarded app in-process (``httpx.ASGITransport``):
    that is a request of its own, not a sub-app; the outer request keeps its header
    and its budget (its count includes the inner request's statements)."""
    from parallelkit.sqlalchemy import RequestGuard, TooManyQueries

    inner = _guarded(engine, 2, max_queries=5, enforce=True)
    outer = FastAPI()
    inner_headers: list[str] = []

    @outer.get("/")
    async def index() -> int:
        async with client(inner) as http:
            response = await http.get("/q")
        inner_headers.extend(response.headers.get_list("x-query-count"))
        return 0

    outer.add_middleware(RequestGuard, engine=engine, max_queries=1, enforce=True)
    async with client(outer) as http:
        with anyio.fail_after(30), pytest.raises(TooManyQueries) as info:
            await http.get("/")
    assert inner_headers == ["2"]
    assert (info.value.limit, info.value.count) == (1, 2)


def _streaming(engine: Any, **guard: Any) -> Any:
    from fastapi.responses import StreamingResponse

    from parallelkit.sqlalchemy import RequestGuard

    app = FastAPI()

    @app.get("/")
    async def index() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            await _statements(engine, 2)  # after the headers: checked at the end
            yield b"done"

        return StreamingResponse(body())

    return RequestGuard(app, engine=engine, **guard)


def _failing(scope: Any, counter: Any) -> None:
    msg = "metrics backend down"
    raise ValueError(msg)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_failing_on_request_never_hides_a_budget_checked_at_the_end(
    engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream over its budget (checked when its body ends) and an ``on_request``
    that raises: ``on_request`` ran first and its ``ValueError`` escaped, the
    ``TooManyQueries`` never raised. The request fails over its budget, so, as for
    any failed request, the ``on_request`` error is logged and the budget escapes."""
    from parallelkit.sqlalchemy import TooManyQueries

    caplog.set_level(logging.ERROR, logger="parallelkit.sqlalchemy")
    guard = _streaming(engine, max_queries=1, enforce=True, on_request=_failing)
    async with client(guard) as http:
        with anyio.fail_after(30), pytest.raises(TooManyQueries) as info:
            await http.get("/")
    assert info.value.count == 2
    [record] = [r for r in caplog.records if r.name == "parallelkit.sqlalchemy"]
    assert "on_request failed" in record.getMessage()
    assert isinstance(record.exc_info and record.exc_info[1], ValueError)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_failing_on_request_never_hides_the_budget_report(
    engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Reporting (``enforce=False``): the over-budget warning was never logged when
    ``on_request`` raised (its error escaped first). Now the warning is logged, once,
    and the ``on_request`` error, the only error of the request, escapes."""
    caplog.set_level(logging.WARNING, logger="parallelkit.sqlalchemy")
    guard = _streaming(engine, max_queries=1, enforce=False, on_request=_failing)
    async with client(guard) as http:
        with anyio.fail_after(30), pytest.raises(ValueError, match="metrics backend down"):
            await http.get("/")
    messages = [r.getMessage() for r in caplog.records if r.name == "parallelkit.sqlalchemy"]
    assert len(messages) == 1
    assert messages[0].startswith("GET /: expected at most 1 queries, 2 were sent")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_outer_guard_still_enforces_its_budget_on_a_sub_app(engine: Any) -> None:
    """A laxer (or count-only) guard on the sub-app does not lift the outer budget."""
    from parallelkit.sqlalchemy import TooManyQueries

    inner = _guarded(engine, 3)  # counts, no budget
    outer = _guarded(engine, 0, max_queries=2, enforce=True)
    outer.mount("/sub", inner)
    async with client(outer) as http:
        with anyio.fail_after(30), pytest.raises(TooManyQueries) as info:
            await http.get("/sub/q")
    assert (info.value.limit, info.value.count) == (2, 3)
