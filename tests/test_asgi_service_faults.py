"""Fault review of the orchestrator behind a FastAPI / Starlette app (parallelkit.asgi).

In-process: the lifespan runs in a task of its own (as a server runs it), requests go
through ``httpx.ASGITransport`` with the lifespan state the server would give them.
Events, never elapsed time; ``fail_after`` only bounds a hang.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import anyio.abc
import httpx
import pytest
from fastapi import FastAPI, Request

import parallelkit as pk
from parallelkit.asgi import lifespan, running, running_from, service

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup  # type: ignore[import-not-found, unused-ignore]

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])]


class Engine:
    def __init__(self) -> None:
        self.disposed = False


RunningDep = Annotated[pk.Running, running()]


def with_state(app: Any, state: dict[str, Any]) -> Any:
    """What an ASGI server does with the lifespan state: a copy in each scope."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    return wrapped


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_running_from_never_gives_a_torn_down_value() -> None:
    """A critical service crashes while the app serves: every service is torn down.
    ``service("db")`` answered 503; ``running_from(request).get("db")`` (the fast path
    the FastAPI recipe recommends), ``running_from(request)["db"]``, the ``running()``
    dependency and ``request.state.running`` returned the disposed engine."""
    orch = pk.Orchestrator()
    crash = anyio.Event()

    @orch.service
    async def db() -> AsyncIterator[Engine]:
        engine = Engine()
        yield engine
        engine.disposed = True

    @orch.service
    async def worker(db: Engine) -> AsyncIterator[str]:
        async def die() -> None:
            await crash.wait()
            raise RuntimeError("worker died")

        async with anyio.create_task_group() as tg:
            tg.start_soon(die)
            yield "worker"

    app = FastAPI(lifespan=lifespan(orch))
    lookups = {
        "get": lambda request, _: running_from(request).get("db", Engine),
        "item": lambda request, _: running_from(request)["db"],
        "state": lambda request, _: request.state.running.get("db"),
        "dependency": lambda _, state: state.get("db", Engine),
    }

    @app.get("/{how}")
    async def read(how: str, request: Request, state: RunningDep) -> dict[str, bool]:
        return {"disposed": lookups[how](request, state).disposed}

    stopped = anyio.Event()

    async def serve(*, task_status: anyio.abc.TaskStatus[dict[str, Any]]) -> None:
        with pytest.raises(RuntimeError, match="worker died"):
            async with app.router.lifespan_context(app) as state:
                assert state is not None
                task_status.started(dict(state))
                await anyio.sleep_forever()
        stopped.set()

    with anyio.fail_after(10):  # a bound for a hang
        async with anyio.create_task_group() as tg:
            state = await tg.start(serve)
            async with client(with_state(app, state)) as http:
                for how in lookups:
                    assert (await http.get(f"/{how}")).json() == {"disposed": False}
                crash.set()
                await stopped.wait()  # every service torn down
                assert state["running"].state("db") == "stopped"
                for how in lookups:
                    with pytest.raises(LookupError, match="service 'db' is stopped"):
                        await http.get(f"/{how}")


async def test_the_lifespan_state_gets_the_teardown_errors() -> None:
    orch = pk.Orchestrator()
    boom = RuntimeError("db could not stop")

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        raise boom

    app = FastAPI(lifespan=lifespan(orch))
    with pytest.raises(ExceptionGroup) as info:
        async with app.router.lifespan_context(app) as state:
            assert state is not None
    assert info.value.exceptions == (boom,)
    assert state["running"].teardown_errors == [("db", boom)]


async def test_running_lookups_reject_a_wrong_type_and_list_the_services() -> None:
    """A wrong type was a ``KeyError`` (``get(123)``) or ``unhashable type: 'list'``;
    a function of another orchestrator did not say which services there are."""
    orch, other = pk.Orchestrator(), pk.Orchestrator()

    @orch.service
    async def db() -> str:
        return "db"

    @other.service
    async def cache() -> str:
        return "cache"  # pragma: no cover

    async with orch.start() as run:
        for wrong in (123, None, ["db"]):
            with pytest.raises(TypeError, match="service must be a service's name or its function"):
                run.get(wrong)  # type: ignore[call-overload]
            with pytest.raises(TypeError, match=r"a service's name \(str\) is needed"):
                run[wrong]  # type: ignore[index]
            with pytest.raises(TypeError, match=r"name must be a service's name \(str\)"):
                run.state(wrong)  # type: ignore[arg-type]
        foreign = r"is not a service of this orchestrator; services: \['db'\]"
        with pytest.raises(KeyError, match=foreign):
            run.get(cache)
        with pytest.raises(KeyError, match=r"no service named 'nosuch'; services: \['db'\]"):
            run.state("nosuch")
        assert run.get("db", str) == "db"


async def test_a_request_the_lifespan_did_not_prepare_says_why() -> None:
    """``httpx.ASGITransport`` runs no lifespan: the error said to create the app with
    ``lifespan=`` (which it was), not that the lifespan had not run."""
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> str:
        return "db"  # pragma: no cover

    app = FastAPI(lifespan=lifespan(orch))

    @app.get("/")
    async def read(value: Annotated[str, service("db", str)]) -> str:
        return value  # pragma: no cover

    async with client(app) as http:
        with pytest.raises(RuntimeError, match="lifespan has not run") as info:
            await http.get("/")
    assert "LifespanManager" in str(info.value)
