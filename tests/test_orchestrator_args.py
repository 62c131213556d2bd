"""Bad arguments to the Orchestrator, its processes, probes and the ASGI helpers.

One rule (DESIGN "Argument rules"): a wrong type is a TypeError, a wrong value a
ValueError, checked at the door, the message naming the argument as written.
Also: the definition-error messages tell the user what to do.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from typing import Any

import pytest

import parallelkit as pk
from parallelkit import asgi

BAD_SECONDS: list[tuple[object, type[Exception]]] = [
    ("1", TypeError),
    (True, TypeError),
    (0, ValueError),
    (-1, ValueError),
    (math.nan, ValueError),
    (math.inf, ValueError),
]


@pytest.mark.parametrize(("value", "error"), BAD_SECONDS)
@pytest.mark.parametrize("option", ["timeout", "stop_timeout"])
def test_service_seconds(option: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=option):
        pk.Orchestrator().service(**{option: value})


@pytest.mark.parametrize(("value", "error"), BAD_SECONDS)
@pytest.mark.parametrize("option", ["timeout", "stop_timeout"])
def test_process_seconds(option: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=option):
        pk.Orchestrator().process("web", "true", **{option: value})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"critical": 1}, TypeError, "critical must be a bool"),
        ({"critical": "yes"}, TypeError, "critical must be a bool"),
        ({"ready": 5}, TypeError, "ready must be"),
        ({"retry": 3}, TypeError, "retry"),
        ({"name": "not a name"}, pk.DefinitionError, "identifier"),
        ({"name": 5}, TypeError, "name must be a str"),  # a type: not a DefinitionError
        ({"name": b"db"}, TypeError, "name must be a str"),
    ],
)
def test_service_options(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        pk.Orchestrator().service(**kwargs)


def test_service_decorates_a_callable() -> None:
    with pytest.raises(TypeError, match="service must be a function"):
        pk.Orchestrator().service(42)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"restart": "sometimes"},
            ValueError,
            "restart must be one of 'no', 'on-failure', 'always'",
        ),
        ({"restart": 1}, TypeError, "restart must be one of"),
        ({"max_restarts": 0}, ValueError, "max_restarts must be >= 1"),
        ({"max_restarts": -1}, ValueError, "max_restarts must be >= 1"),
        ({"max_restarts": True}, TypeError, "max_restarts must be an int"),
        ({"max_restarts": "3"}, TypeError, "max_restarts must be an int"),
        ({"max_restarts": 1.5}, TypeError, "max_restarts must be an int"),
        ({"critical": 0}, TypeError, "critical must be a bool"),
        ({"ready": "port 80"}, TypeError, "ready must be"),
        ({"env": {"A": 1}}, TypeError, "env must be a mapping of str to str"),
        ({"env": ["A=1"]}, TypeError, "env must be"),
        ({"cwd": 5}, TypeError, "cwd must be a path"),
        ({"depends_on": "db"}, TypeError, "depends_on"),
        ({"depends_on": None}, TypeError, "depends_on must be a sequence of service names"),
        ({"depends_on": 5}, TypeError, "depends_on must be a sequence of service names"),
        ({"depends_on": ["db", 5]}, TypeError, "depends_on must be a sequence of service names"),
    ],
)
def test_process_options(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        pk.Orchestrator().process("web", "true", **kwargs)


@pytest.mark.parametrize("name", [5, None, b"web"])
def test_process_name_of_the_wrong_type_is_a_type_error(name: object) -> None:
    with pytest.raises(TypeError, match="name must be a str"):
        pk.Orchestrator().process(name, "true")  # type: ignore[arg-type]


def test_process_depends_on_is_read_once() -> None:
    # a generator was consumed by the type check, leaving the process with no dependencies
    orch = pk.Orchestrator()
    orch.process("db", "true")
    orch.process("web", "true", depends_on=(name for name in ["db"]))
    assert orch.services["web"].depends_on == ("db",)
    assert [p.name for p in orch._graph.nodes["web"].params] == ["db"]  # the graph too


def test_process_max_restarts_none_and_positive_accepted() -> None:
    orch = pk.Orchestrator()
    orch.process("a", "true", max_restarts=None, restart="always")
    orch.process("b", "true", max_restarts=1, restart="on-failure")
    assert orch.services["a"].extra["max_restarts"] is None


@pytest.mark.parametrize(
    ("output", "error"), [("file", ValueError), (5, TypeError), (None, TypeError)]
)
def test_orchestrator_output(output: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="output must be one of 'stdout', 'logging'"):
        pk.Orchestrator(output=output)  # type: ignore[arg-type]


PROBE_CASES: list[tuple[Callable[[], object], type[Exception], str]] = [
    (lambda: pk.probes.tcp("h", True), TypeError, "port must be an int"),  # type: ignore[arg-type]
    (lambda: pk.probes.tcp("h", "80"), TypeError, "port must be an int"),  # type: ignore[arg-type]
    (lambda: pk.probes.tcp("h", 0), ValueError, "port must be >= 1"),
    (lambda: pk.probes.tcp("h", 70_000), ValueError, "port must be <= 65535"),
    (lambda: pk.probes.tcp("h", 1, connect_timeout=math.nan), ValueError, "connect_timeout"),
    (lambda: pk.probes.tcp("h", 1, connect_timeout="1"), TypeError, "connect_timeout"),  # type: ignore[arg-type]
    (lambda: pk.probes.http("http://h/", request_timeout=0), ValueError, "request_timeout"),
    (lambda: pk.probes.http("http://h/", status=99), ValueError, "status must be"),
    (lambda: pk.probes.http("http://h/", status=True), TypeError, "status must be"),  # type: ignore[arg-type]
    (lambda: pk.probes.http("http://h/", status=[200, "x"]), TypeError, "status must be"),  # type: ignore[list-item]
    (lambda: pk.probes.http("http://h/", status=()), ValueError, "status must be"),
    (lambda: pk.probes.call(lambda: True, initial=0), ValueError, "initial"),
    (lambda: pk.probes.call(lambda: True, max_interval=math.inf), ValueError, "max_interval"),
    (lambda: pk.probes.call(lambda: True, initial=True), TypeError, "initial"),  # type: ignore[arg-type]
    (lambda: pk.probes.call(42), TypeError, "fn must be callable"),  # type: ignore[arg-type]
    (lambda: pk.probes.call(lambda: True, name=5), TypeError, "name must be a str"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("make", "error", "match"), PROBE_CASES)
def test_probe_arguments(make: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


@pytest.mark.anyio
@pytest.mark.parametrize(("value", "error"), BAD_SECONDS)
async def test_probe_wait_timeout(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="timeout"):
        await pk.probes.call(lambda: True).wait(timeout=value)  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"signals": "SIGTERM"}, TypeError, "signals must be"),
        ({"signals": ()}, TypeError, "signals must be"),
        ({"signals": (99999,)}, ValueError, "signals must hold signal numbers"),
        ({"signals": ("TERM",)}, TypeError, "signals must hold signal numbers"),
        # was a RuntimeError on asyncio, an OSError on trio, neither naming the argument
        ({"signals": (signal.SIGKILL,)}, ValueError, "signals: SIGKILL cannot be caught"),
        ({"signals": (signal.SIGTERM, 19)}, ValueError, "signals: SIGSTOP cannot be caught"),
        ({"on_ready": 5}, TypeError, "on_ready must be a callable"),
    ],
)
async def test_serve_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    orch = pk.Orchestrator()
    started: list[str] = []

    @orch.service
    async def db() -> str:
        started.append("db")
        return "db"

    with pytest.raises(error, match=match):
        await orch.serve(**kwargs)
    assert started == []  # checked before anything started


def test_asgi_arguments() -> None:
    with pytest.raises(TypeError, match="lifespan"):
        asgi.lifespan(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="service must be a service name or its function"):
        asgi.service(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected must be a class"):
        asgi.service("db", "Engine")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_running_get_by_name_and_type() -> None:
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> dict[str, int]:
        return {"pool": 5}

    async with orch.start() as running:
        assert running.get("db", dict) == {"pool": 5}
        assert running.get(db, dict) == {"pool": 5}
        with pytest.raises(TypeError, match="service 'db' is dict, not str"):
            running.get("db", str)
        with pytest.raises(TypeError, match="expected must be a class"):
            running.get("db", "dict")  # type: ignore[call-overload]


# -- messages that tell what to do ---------------------------------------------------------
def test_unknown_dependency_says_what_to_do() -> None:
    orch = pk.Orchestrator()

    @orch.service
    async def database() -> str:
        return "db"

    @orch.service
    async def api(databse: str) -> str:
        return "api"

    with pytest.raises(pk.DefinitionError) as info:
        orch.start()
    text = str(info.value)
    assert "service 'api' needs 'databse', which is not a service" in text
    assert "run(" not in text  # the Orchestrator has no run(); Flow's advice does not apply
    assert "Register a service named 'databse'" in text
    assert "did you mean 'database'?" in text

    orch2 = pk.Orchestrator()
    orch2.process("web", "true", depends_on=["api"])
    with pytest.raises(pk.DefinitionError, match="process 'web' depends on 'api'"):
        orch2.start()


def test_a_sync_factory_of_a_client_is_told_how_to_enter_it() -> None:
    """``def client(): return httpx.AsyncClient()`` is refused at the door (a sync
    function's result is known only once called); the message shows the async
    generator that enters the client, since that is what the user meant."""
    orch = pk.Orchestrator()
    with pytest.raises(TypeError, match=r"sync function") as caught:

        @orch.service
        def client() -> Any:
            return object()

    message = str(caught.value)
    assert "async with Client() as c: yield c" in message
    assert "@asynccontextmanager" in message
