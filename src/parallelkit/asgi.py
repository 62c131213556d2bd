"""ASGI lifespan adapter: start an Orchestrator with a Starlette / FastAPI app.

``lifespan=lifespan(orch)`` starts every service before the server accepts its
first request and stops them, in reverse dependency order, when the server shuts
down::

    from fastapi import FastAPI, Request
    from parallelkit.asgi import lifespan

    app = FastAPI(lifespan=lifespan(orch))

    @app.get("/users")
    async def users(request: Request):
        db = request.state.db            # each service's value is in the lifespan state
        ...

The lifespan **state** holds each started service's value under its name, plus
the :class:`~parallelkit.Running` under ``"running"`` (unless a service has that
name). A start-up failure is logged with its full traceback (logger
``parallelkit.orchestrator``) and re-raised, so the server reports
"Application startup failed" and exits non-zero instead of serving requests with
half of its services missing.

This module imports nothing from Starlette: it works with any framework that takes
a ``lifespan(app)`` async context manager factory.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from ._orchestrator.orchestrator import Orchestrator

__all__ = ["lifespan"]

logger = logging.getLogger("parallelkit.orchestrator")


def lifespan(orch: Orchestrator, /) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """Make a ``lifespan=`` for Starlette / FastAPI that runs ``orch``.

    Args:
        orch: the orchestrator whose services the app needs.

    Returns:
        ``lifespan(app)``: an async context manager factory yielding the lifespan
        state (``{service name: value, ..., "running": Running}``).

    Raises:
        TypeError: ``orch`` is not an :class:`~parallelkit.Orchestrator`.

    Example:
        ```python
        app = Starlette(routes=routes, lifespan=lifespan(orch))
        ```
    """
    if not isinstance(orch, Orchestrator):
        msg = f"lifespan() takes a parallelkit.Orchestrator, got {orch!r}"  # type: ignore[unreachable]
        raise TypeError(msg)

    @asynccontextmanager
    async def _lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        started = False
        try:
            async with orch.start() as running:
                started = True
                state: dict[str, Any] = dict(running.items())
                state.setdefault("running", running)
                yield state
        except Exception:
            if not started:
                logger.exception("application start-up failed: the services could not start")
            raise

    return _lifespan
