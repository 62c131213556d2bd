"""ASGI lifespan adapter and typed dependencies: an Orchestrator behind a Starlette / FastAPI app.

``lifespan=lifespan(orch)`` starts every service before the server accepts its
first request and stops them, in reverse dependency order, when the server shuts
down. Handlers get the services' values, typed, without ``request.state``::

    from typing import Annotated
    from fastapi import FastAPI
    from parallelkit.asgi import lifespan, service

    app = FastAPI(lifespan=lifespan(orch))

    @app.get("/users")
    async def users(db: Annotated[AsyncEngine, service("db")]):   # db: AsyncEngine
        ...

In a Starlette handler (no dependency injection), ``running_from(request)`` is the
typed :class:`~parallelkit.Running`: ``running_from(request).get("db", AsyncEngine)``.

The lifespan **state** also holds each started service's value under its name,
plus the :class:`~parallelkit.Running` under ``"running"`` (unless a service has
that name), for code that reads ``request.state``. A start-up failure is raised
as :class:`~parallelkit.StartupError` (not logged here: the server reports it,
once, and exits non-zero instead of serving requests with half of its services
missing).

This module imports neither Starlette nor FastAPI: :func:`lifespan` works with any
framework that takes a ``lifespan(app)`` async context manager factory;
:func:`service` and :func:`running` import FastAPI when they are called.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from ._core.public import export
from ._orchestrator.orchestrator import Orchestrator
from ._orchestrator.running import NotServed, Running

__all__ = ["lifespan", "running", "running_from", "service"]

T = TypeVar("T")

#: Where the lifespan state keeps the Running (a key no service name can take).
STATE_KEY = "parallelkit.running"

#: The apps whose parallelkit lifespan runs in this context: FastAPI runs an included
#: router's ``lifespan=`` inside the app's, in the same task, with the same app.
_APPS: ContextVar[tuple[Any, ...]] = ContextVar("parallelkit_lifespan_apps", default=())


def lifespan(orch: Orchestrator, /) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """Make a ``lifespan=`` for Starlette / FastAPI that runs ``orch``.

    Args:
        orch: the orchestrator whose services the app needs.

    Returns:
        ``lifespan(app)``: an async context manager factory yielding the lifespan
        state (``{service name: value, ..., "running": Running}``).

    One app runs one parallelkit lifespan: FastAPI runs an included router's
    ``lifespan=`` inside the app's and merges their states, so a second
    orchestrator there would start while requests saw only the first one's
    services. Its start is refused (a ``RuntimeError``; what had started stops):
    give all the services to one :class:`~parallelkit.Orchestrator`.

    Raises:
        TypeError: ``orch`` is not an :class:`~parallelkit.Orchestrator` (also
            ``lifespan=lifespan``, uncalled: the server then passes the app).

    Example:
        ```python
        app = Starlette(routes=routes, lifespan=lifespan(orch))
        ```
    """
    if not isinstance(orch, Orchestrator):
        msg = f"lifespan() takes a parallelkit.Orchestrator, got {orch!r}"  # type: ignore[unreachable]
        if hasattr(orch, "router"):  # the app (Starlette, FastAPI): lifespan=lifespan
            msg += ": write lifespan=lifespan(orch), not lifespan=lifespan"
        raise TypeError(msg)

    @asynccontextmanager
    async def _lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        entered = _APPS.get()
        if any(other is app for other in entered):
            msg = (
                f"{app!r} already runs a parallelkit lifespan (entered twice, or an "
                "included FastAPI router has a lifespan= of its own, which FastAPI runs "
                "inside the app's: its requests would see only one orchestrator's "
                "services): give all the services to one Orchestrator, with one "
                "lifespan=lifespan(orch) on the app"
            )
            raise RuntimeError(msg)
        if app is not None:  # lifespan(orch)(None): no app to tell apart
            _APPS.set((*entered, app))
        try:
            # a start-up failure propagates as it is: the server reports it (once)
            async with orch.start() as running:
                # what requests see: a service torn down (a crash) is not served
                served = running._served()
                state: dict[str, Any] = dict(running.items())
                state.setdefault("running", served)
                state[STATE_KEY] = served
                yield state
        finally:  # by identity (a token would fail if closed from another context)
            _APPS.set(tuple(other for other in _APPS.get() if other is not app))

    return _lifespan


def running_from(connection: Any, /) -> Running:
    """The :class:`~parallelkit.Running` of the app's lifespan, from a request (typed).

    Args:
        connection: a Starlette / FastAPI ``Request`` or ``WebSocket`` (anything
            with the ASGI ``scope``) of an app whose ``lifespan=`` is
            :func:`lifespan`.

    A service that crashed, or was stopped (a critical service crashed: every
    service is torn down), is not served: ``running_from(request).get("db")``
    raises ``NotServed`` (a ``LookupError`` naming the service and why), never
    returns the torn-down value (a disposed engine, a closed client).

    Raises:
        TypeError: ``connection`` has no ASGI ``scope`` (not a request or websocket).
        RuntimeError: the app's lifespan did not start an orchestrator (it has
            not run, has not finished starting, or is not :func:`lifespan`).

    Example:
        ```python
        async def users(request: Request) -> JSONResponse:
            engine = running_from(request).get("db", AsyncEngine)   # typed
        ```
    """
    scope = getattr(connection, "scope", None)
    if not isinstance(scope, Mapping):
        msg = (
            "connection must be a request or websocket (anything with an ASGI scope), "
            f"got {type(connection).__name__} {connection!r}"
        )
        raise TypeError(msg)
    state = scope.get("state")
    found = state.get(STATE_KEY) if isinstance(state, Mapping) else None
    if not isinstance(found, Running):
        msg = (
            "no parallelkit orchestrator in this request's lifespan state: the app's "
            "lifespan has not run (httpx.ASGITransport does not run it: use "
            "asgi_lifespan.LifespanManager, or `with TestClient(app) as client:` - "
            "starlette's TestClient runs it only in a `with` block; a server started "
            "with --lifespan off; an app mounted in another, whose lifespan= is never "
            "run: give it to the outermost app), has not finished starting, or is not "
            "lifespan=parallelkit.asgi.lifespan(orch)"
        )
        raise RuntimeError(msg)  # noqa: TRY004 - a set-up mistake, not a bad argument
    return found


def service(service: str | Callable[..., Any], expected: type[Any] | None = None, /) -> Any:
    """A FastAPI dependency giving one service's value: ``Annotated[T, service("db")]``.

    Use it as the metadata of ``Annotated`` (the handler's parameter is typed
    ``T`` for the type checker) or as a default (``db: Engine = service("db")``).
    The value is looked up per request in the lifespan's
    :class:`~parallelkit.Running`; a failed or skipped service gives the
    ``KeyError`` of :meth:`Running.get <parallelkit.Running.get>`. A service that
    crashed, or was stopped (a critical service crashed while the server runs:
    every service is torn down), answers the request with a **503** ("service
    'db' is not available"), never with its torn-down value.

    Args:
        service: the service's name, or its decorated function.
        expected: a class the value must be an instance of (checked per request,
            a ``TypeError`` if not); ``None`` checks nothing.

    Returns:
        a ``fastapi.Depends`` marker.

    The marker's dependency is one function per ``(service, expected)``: override it
    in tests with ``app.dependency_overrides[service("db").dependency] = fake``, and
    every handler that asks for ``service("db")`` gets the fake.

    Raises:
        TypeError: ``service`` is neither a name nor a callable, or ``expected``
            is not a class (or is a protocol not marked ``@runtime_checkable``:
            it cannot be checked).
        ValueError: ``service`` is a name that is not an identifier (no service
            can have it).
        ImportError: FastAPI is not installed (in Starlette, use
            :func:`running_from`).

    Example:
        ```python
        @app.get("/users")
        async def users(db: Annotated[AsyncEngine, service("db")]) -> list[str]: ...
        ```
    """
    if not isinstance(service, str) and not callable(service):
        msg = f"service must be a service name or its function, got {service!r}"  # type: ignore[unreachable]
        raise TypeError(msg)
    if isinstance(service, str) and not service.isidentifier():
        msg = f"service must be a service's name (an identifier), got {service!r}"
        raise ValueError(msg)
    if expected is not None and not isinstance(expected, type):
        msg = f"expected must be a class or None, got {expected!r}"  # type: ignore[unreachable]
        raise TypeError(msg)
    if expected is not None:
        try:
            isinstance(None, expected)  # what each request will check
        except TypeError as exc:  # a protocol that is not @runtime_checkable
            msg = f"expected cannot be checked with isinstance(): {exc}"
            raise TypeError(msg) from None
    key = (service, expected)
    try:
        marker = _MARKERS.get(key)
        cached = True
    except TypeError:  # an unhashable callable: a marker of its own each time
        marker, cached = None, False
    if marker is None:
        name = service if isinstance(service, str) else getattr(service, "__name__", "service")

        def dependency(connection: Any) -> Any:
            try:
                return running_from(connection)._lookup(service, expected, live=True)
            except NotServed as exc:  # torn down: a 503, never its value
                from starlette.exceptions import HTTPException

                raise HTTPException(503, f"service {exc.name!r} is not available") from exc

        marker = _depends(dependency, f"parallelkit_service_{name}")
        if cached:
            _MARKERS[key] = marker
    return marker


#: one ``Depends`` marker per ``(service, expected)``: ``app.dependency_overrides``
#: keyed by its dependency applies to every handler that asks for that service
_MARKERS: dict[tuple[Any, Any], Any] = {}
_RUNNING: Any = None  # the one marker of running()


def running() -> Any:
    """A FastAPI dependency giving the :class:`~parallelkit.Running`.

    Raises:
        ImportError: FastAPI is not installed (in Starlette, use
            :func:`running_from`).

    Example:
        ```python
        @app.get("/health")
        async def health(running: Annotated[pk.Running, parallelkit.asgi.running()]):
            return {"status": (await running.health()).status}
        ```
    """
    global _RUNNING  # made once, on first use (FastAPI is optional)
    if _RUNNING is None:
        _RUNNING = _depends(running_from, "parallelkit_running")
    return _RUNNING


def _depends(fn: Callable[[Any], Any], name: str) -> Any:
    """``Depends(fn)``, with ``fn`` taking the connection the way FastAPI injects it.

    The dependency is an ``async def``: FastAPI runs a plain ``def`` dependency in
    its thread pool, a thread hop (about 0.2 ms of CPU) per request for a lookup.
    """
    try:
        from fastapi import Depends  # optional: only FastAPI users call this
    except ImportError as exc:
        msg = (
            "service() and running() are FastAPI dependencies: `pip install fastapi`; "
            "in a Starlette handler use running_from(request).get(name) instead"
        )
        raise ImportError(msg, name="fastapi") from exc
    from starlette.requests import HTTPConnection

    async def dependency(connection: HTTPConnection) -> Any:
        return fn(connection)

    dependency.__name__ = dependency.__qualname__ = name
    dependency.__annotations__ = {"connection": HTTPConnection, "return": Any}
    return Depends(dependency)


export(globals())
