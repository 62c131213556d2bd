"""Serve an app in-process for tests: its lifespan runs, requests go through httpx.

``httpx.ASGITransport`` does not run the lifespan, and Starlette's ``TestClient``
is sync; :func:`client` does what a server does: runs the lifespan, and hands
each request a copy of the lifespan state (``request.state``).

Example:
    ```python
    async with client(create_app(Settings(variant="expert"))) as http:
        response = await http.get("/conversations/1")
    ```
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["client"]


@asynccontextmanager
async def client(
    app: Any, *, state: dict[str, Any] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` talking to ``app`` in-process, between start-up and shutdown.

    Args:
        app: a Starlette / FastAPI app.
        state: if given, receives the lifespan state (the started services).
    """
    async with app.router.lifespan_context(app) as started:
        shared: dict[str, Any] = dict(started or {})
        if state is not None:
            state.update(shared)

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            scope["state"] = dict(shared)
            inner: ASGIApp = app
            await inner(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            yield http
