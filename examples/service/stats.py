"""What ``GET /health`` and ``GET /debug/stats`` report: statements, requests, the pool,
the cache store, the garbage collector."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "COLLECTOR",
    "CollectorTime",
    "CountRequests",
    "StatementCounter",
    "add_debug_routes",
]


class StatementCounter:
    """Counts the server's SQL statements and finished requests (``GET /debug/stats``).

    ``statements``: every statement the engine sends (``before_cursor_execute``;
    BEGIN/COMMIT are not counted). ``requests`` / ``active``: requests finished /
    running, counted by :class:`CountRequests` (``/health`` and ``/debug/*`` excluded).
    ``checked_out`` / ``slots``: the pool's connections in use and, in the parallelkit
    variant, its pool limiter's slots held and waited for: all 0 at rest, after any load
    or fault (a leak shows here).
    """

    __slots__ = ("active", "count", "engine", "limiter", "requests", "store")

    def __init__(self) -> None:
        self.count = 0
        self.requests = 0
        self.active = 0
        self.engine: AsyncEngine | None = None
        #: anything with ``statistics().running`` / ``.waiting`` (a pool limiter)
        self.limiter: Any = None
        #: a cache store with a dataclass ``statistics()`` (a RedisStore), or None
        self.store: Any = None

    def attach(self, engine: AsyncEngine) -> None:
        """Listen on ``engine``."""
        self.engine = engine

        def counted(*_: Any) -> None:
            self.count += 1

        event.listen(engine.sync_engine, "before_cursor_execute", counted)

    def at_rest(self) -> dict[str, Any]:
        """``checked_out`` connections; ``slots``: ``{"running", "waiting"}`` or ``None``;
        ``store``: the cache store's statistics (timeouts, degraded reads...) or ``None``."""
        pool = self.engine.sync_engine.pool if self.engine is not None else None
        checked_out = pool.checkedout() if isinstance(pool, QueuePool) else 0
        slots = None
        if self.limiter is not None:
            stats = self.limiter.statistics()
            slots = {"running": stats.running, "waiting": stats.waiting}
        store = None if self.store is None else asdict(self.store.statistics())
        return {"checked_out": checked_out, "slots": slots, "store": store}


class CollectorTime:
    """CPU time the server spends in Python's cyclic garbage collector, and its full
    collections (``GET /debug/stats``). Counted from :meth:`start`, which only a server
    process calls (``python -m examples.service``): a test's process is left alone."""

    __slots__ = ("_began", "full", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._began = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.process_time()
        else:
            self.seconds += time.process_time() - self._began
            self.full += info["generation"] == 2


COLLECTOR = CollectorTime()


class CountRequests:
    """A pure ASGI middleware counting requests (for the benchmark's per-request numbers)."""

    def __init__(self, app: ASGIApp, counter: StatementCounter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(("/debug/", "/health")):
            await self.app(scope, receive, send)
            return
        self.counter.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter.active -= 1
            self.counter.requests += 1


def add_debug_routes(app: FastAPI, counter: StatementCounter, variant: str) -> None:
    """``GET /health`` (200 once started), ``GET /debug/stats`` (statements, requests so far,
    connections checked out and pool slots held: see :class:`StatementCounter`)."""
    app.add_middleware(CountRequests, counter=counter)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "variant": variant}

    @app.get("/debug/stats")
    async def stats() -> dict[str, Any]:
        return {
            "gc_seconds": COLLECTOR.seconds,
            "gc_full": COLLECTOR.full,
            "statements": counter.count,
            "requests": counter.requests,
            "active": counter.active,
            **counter.at_rest(),
            "pid": os.getpid(),
            "variant": variant,
        }
