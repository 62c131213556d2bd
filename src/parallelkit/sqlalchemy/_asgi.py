"""RequestGuard: ASGI middleware counting each request's statements, surfacing the real error."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .._core.check import callable_, callable_with, count_or_none, flag
from . import _testing
from ._queries import _ACTIVE, QueryCounter, TooManyQueries
from ._surface import cause

__all__ = ["RequestGuard"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 field-name


def _logger() -> logging.Logger:
    return logging.getLogger("parallelkit.sqlalchemy")  # at use: importing creates none


class _RequestCounter(QueryCounter):
    """A guard's counter of one request (its ``scope``).

    Guards nested on one engine (a mounted sub-app with a guard of its own: Starlette
    hands it the same scope) count the same request: the innermost sets the header
    (``nested`` tells the outer ones), and a request over budget is reported once
    (``reported``: an inner guard raised or logged it).
    """

    __slots__ = ("nested", "outers", "reported", "scope")

    def __init__(self, target: object, scope: Scope) -> None:
        super().__init__(target)
        self.scope = scope
        self.nested = self.reported = False
        self.outers = [
            outer
            for outer in _ACTIVE.get()
            if isinstance(outer, _RequestCounter)
            and outer.scope is scope  # not a request of another app called in-process
            and outer._target is self._target
        ]
        for outer in self.outers:
            outer.nested = True

    def report(self) -> None:
        """Over budget, raised or logged here: the outer guards say nothing more."""
        for outer in self.outers:
            outer.reported = True


class RequestGuard:
    """ASGI middleware: one request's statement count and budget, and the real error first.

    Add it to any ASGI app (FastAPI, Starlette, ...)::

        app.add_middleware(RequestGuard, engine=engine, max_queries=10)

    For every HTTP request it:

    * counts the statements the request sends on ``engine`` (and only that
      request's: :func:`count_queries` counts per context), and sets the
      ``x-query-count`` response header (``header=None``: no header);
    * over ``max_queries``, **enforces** or **reports**: with ``enforce=True``
      it raises :class:`TooManyQueries` (the statements listed, N+1 suspects
      marked): before the response starts, so the client gets a 500 and a test
      client raises it (also when the app handles or swallows what its ``send``
      raised: no response started, that error is the one that escapes); with
      ``enforce=False`` it logs one warning on the ``parallelkit.sqlalchemy``
      logger with the same listing and lets the response through.
      ``enforce=None`` (the default) enforces while the parallelkit pytest
      plugin runs your tests and reports otherwise: one app, strict in tests,
      quiet in production. Statements sent after the
      response started (a streaming body, FastAPI's ``BackgroundTasks``, which
      run inside the request after its response) are not in the header but
      count for the request: the budget is checked when the request ends, so
      over it an enforced error comes after the response was sent;
    * calls ``on_request(scope, counter)`` after each request (for metrics),
      whatever the budget, also when the request fails, over its budget included
      (then an error raised by ``on_request`` is logged, and the request's own
      error escapes; a report over budget is logged before ``on_request`` runs);
    * makes the real error the one that escapes: a :class:`SessionInUseError`
      buried under the ``IllegalStateChangeError`` SQLAlchemy raises when a
      yield dependency closes the session, or a :class:`NotLoadedError` that
      pydantic turned into a ``ResponseValidationError``, is re-raised itself
      (``from`` the exception that hid it, which stays reachable). An error
      the app raised itself while handling one of ours (an ``HTTPException``,
      its own exception, ``raise ... from exc``) is the app's answer: left alone.

    A request that goes through two guards on one engine (a sub-app with a guard
    of its own, mounted in a guarded app) gets one header (the innermost guard's)
    and is reported over budget once: each guard checks its own budget, the first
    one over it raises or logs, the others then say nothing more; each guard's
    ``on_request`` is called.

    Args:
        app: the ASGI app.
        engine: what :func:`count_queries` accepts; ``None``: no counting (only
            the error surfacing).
        max_queries: the per-request budget, an int >= 0, or ``None`` (count only).
        enforce: raise over budget (``True``), report (``False``) or decide by
            whether the pytest plugin is running (``None``).
        header: the response header carrying the count, or ``None``.
        on_request: called with ``(scope, counter)`` after every counted request.

    Raises:
        TypeError: an option of the wrong type (the message names it), an
            ``engine`` that :func:`count_queries` does not accept, or an
            ``on_request`` that is ``async`` (it is called, never awaited) or cannot
            take ``(scope, counter)``.
        ValueError: ``max_queries`` below 0, a ``header`` that is not an HTTP
            header name, or ``max_queries``, ``enforce`` or ``on_request`` without
            ``engine`` (nothing would be counted: the budget would never be
            checked).
    """

    __slots__ = ("_app", "_enforce", "_engine", "_header", "_limit", "_on_request")

    def __init__(
        self,
        app: ASGIApp,
        *,
        engine: object = None,
        max_queries: int | None = None,
        enforce: bool | None = None,
        header: str | None = "x-query-count",
        on_request: Callable[[Scope, QueryCounter], object] | None = None,
    ) -> None:
        self._app = callable_("app", app, what="an ASGI app")
        self._limit = count_or_none("max_queries", max_queries, minimum=0)
        self._enforce = enforce if enforce is None else flag("enforce", enforce)
        if header is not None and not (isinstance(header, str) and header):
            msg = f"header must be a non-empty str or None, got {header!r}"
            raise TypeError(msg)
        if header is not None and not _TOKEN.fullmatch(header):
            # else every response fails in the server (h11: "Illegal header name")
            msg = f"header must be an HTTP header name (letters, digits, '-', ...), got {header!r}"
            raise ValueError(msg)
        self._header = header.lower().encode("latin-1") if header else None
        # called, never awaited, after each request: an async one would record nothing
        self._on_request = (
            None
            if on_request is None
            else callable_with(
                "on_request", on_request, 2, what="a callable: a plain function of (scope, counter)"
            )
        )
        self._engine = engine
        if engine is not None:
            QueryCounter(engine)  # a bad engine fails here, not at the first request
        else:
            # without an engine nothing is counted: these options would do nothing, silently
            for option, value in (("max_queries", max_queries), ("enforce", enforce),
                                  ("on_request", on_request)):  # fmt: skip
                if value is not None:
                    msg = f"{option} needs engine= (the engine whose statements are counted)"
                    raise ValueError(msg)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self._app(scope, receive, send)
            return
        try:
            if self._engine is None:
                await self._app(scope, receive, send)
            else:
                await self._counted(scope, receive, send)
        except Exception as exc:
            real = cause(exc)
            if real is None:
                raise
            raise real from exc

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        enforce = _testing.active if self._enforce is None else self._enforce
        raised: TooManyQueries | None = None  # ours, raised into the app's send

        async def counted_send(message: Message) -> None:
            nonlocal raised
            if message["type"] == "http.response.start":
                if enforce and self._over(counter) and not counter.reported:
                    if raised is None:
                        raised = self._error(counter)
                        counter.report()
                    raise raised
                if self._header is not None and not counter.nested:  # the innermost's
                    headers = [
                        *message.get("headers", ()),
                        (self._header, str(counter.count).encode()),
                    ]
                    message = {**message, "headers": headers}
            await send(message)

        counter = _RequestCounter(self._engine, scope)
        try:
            with counter:
                await self._app(scope, receive, counted_send)
        except BaseException as exc:
            # over the budget (enforced), the handler failed or was cancelled: still a
            # request for on_request; the request's own error is the one that escapes
            self._failed(scope, counter)
            if raised is not None and raised is not exc and isinstance(exc, Exception):
                # what the app made of ours (Starlette's "response already started" for
                # an AssertionError handler): no response started, the budget is the error
                raise raised from exc
            raise
        over = self._over(counter) and not counter.reported
        if raised is None and over and enforce:  # statements after the response started
            raised = self._error(counter)
        if raised is not None:  # (or the app swallowed ours): the request's answer
            counter.report()
            self._failed(scope, counter)
            raise raised
        if over:
            counter.report()
            _logger().warning(
                "%s %s: %s", scope.get("method", ""), scope.get("path", ""), self._error(counter)
            )
        if self._on_request is not None:
            self._on_request(scope, counter)

    def _failed(self, scope: Scope, counter: QueryCounter) -> None:
        """``on_request`` for a request that failed: its own error is logged, never raised."""
        if self._on_request is not None:
            try:
                self._on_request(scope, counter)
            except Exception:
                _logger().exception("on_request failed for a request that failed too")

    def _over(self, counter: QueryCounter) -> bool:
        return self._limit is not None and counter.count > self._limit

    def _error(self, counter: QueryCounter) -> TooManyQueries:
        assert self._limit is not None
        return TooManyQueries(self._limit, counter.statements, counter.repeated())

    def __repr__(self) -> str:
        return f"RequestGuard(max_queries={self._limit!r}, enforce={self._enforce!r})"
