"""Scenario 7 - server start-up with :class:`parallelkit.Orchestrator`.

The seed starts its server in two hand-written ``Promise.all`` phases
(``listen ∥ Next.js``, then ``Baileys ∥ scheduler ∥ campaign queue``) and
claims 700 ms against 2,000 ms sequential. The code *as written* cannot reach
700 ms: phase two waits for the slowest of phase one (Next.js, 500 ms), so it
takes 500 + 700 = 1,200 ms. 700 ms is the critical path once each service
waits only for what it really needs, which is what the orchestrator does:

* each service declares its dependencies by parameter name (``socket_io``
  needs ``http``; nothing else waits) and starts the moment they are *ready*;
* ``http`` is a real Starlette app served by uvicorn on 127.0.0.1, ready when
  ``GET /ready`` answers 200 (a probe, not a guess); ``GET /health`` reports
  every service (``running.health()``), 503 when a critical one fails;
* a failure rolls back whatever had started; shutdown runs in reverse order;
* ``running.timeline`` is the measured start-up, critical chain included.

The other services are simulated with the seed's durations (scaled by
``scale``). ``build_app`` shows the FastAPI/Starlette way: the app's lifespan
runs the orchestrator (``parallelkit.asgi.lifespan``).

Example:
    ```python
    orch = build_orchestrator(scale=0.1, port=0)     # port 0: simulated http
    async with orch.start() as running:
        print(running.timeline.to_text())
    ```
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio

import parallelkit as pk

__all__ = [
    "DEPENDS",
    "SEED_DURATIONS",
    "SEED_LOG",
    "expected_ready",
    "build_app",
    "build_orchestrator",
    "critical_path",
    "health_endpoint",
    "serve_http",
    "start_seed_phases",
    "start_sequential",
]

# -- THE start-up model -------------------------------------------------------------------
# The one model of the seed's server start, shared by this example, the benchmark
# (benchmarks/bench_startup.py, and the seed table in bench_seed.py) and the docs
# (docs/orchestrator.md, docs/recipes/server-startup.md, which show it literally;
# tests/test_startup_model.py checks that they agree with it).

#: The seed's start-up log: milliseconds at which each part reported ready.
SEED_LOG: Mapping[str, float] = {
    "http": 10,  # "Server LISTENING (0ms)", "Health endpoints ready (10ms)"
    "socket_io": 50,  # "Socket.IO initialized (50ms)"
    "nextjs": 500,  # "Next.js ready (500ms - parallel with Baileys)"
    "baileys": 600,  # "Baileys initialized (600ms - parallel with Next.js)"
    "scheduler": 700,  # "Cadence Scheduler ready (700ms)"
}

#: Seconds each part takes to become ready (sum: the seed's 2,000 ms "sequential").
SEED_DURATIONS: Mapping[str, float] = {
    "http": 0.010,  # listen + health endpoints
    "socket_io": 0.040,  # attached to the http server: ready at 10 + 40 = 50 ms
    "nextjs": 0.500,  # app.prepare()
    "baileys": 0.600,  # WhatsApp client
    "scheduler": 0.700,  # cadence scheduler
    "campaign_queue": 0.150,  # not in the log: the rest of the 2,000 ms sequential total
}

#: What each part really needs before it can start (everything else is independent).
DEPENDS: Mapping[str, tuple[str, ...]] = {"socket_io": ("http",)}


def expected_ready(scale: float = 1.0) -> dict[str, float]:
    """When each part is ready (seconds from the start) if it waits only for ``DEPENDS``.

    Computed from the model alone (no parallelkit): the lower bound any start-up
    can reach. At scale 1 it reproduces :data:`SEED_LOG`.
    """
    done: dict[str, float] = {}

    def finish(name: str) -> float:
        if name not in done:
            start = max((finish(d) for d in DEPENDS.get(name, ())), default=0.0)
            done[name] = start + SEED_DURATIONS[name] * scale
        return done[name]

    for name in SEED_DURATIONS:
        finish(name)
    return done


def critical_path(scale: float = 1.0) -> float:
    """The ideal start-up: the longest chain of ``SEED_DURATIONS`` through ``DEPENDS``."""
    return max(expected_ready(scale).values())


async def _simulate(name: str, scale: float) -> str:
    await anyio.sleep(SEED_DURATIONS[name] * scale)
    return name


async def start_sequential(scale: float = 1.0) -> None:
    """The seed's "before": every part after the previous one (2,000 ms at scale 1)."""
    for name in SEED_DURATIONS:
        await _simulate(name, scale)


async def start_seed_phases(scale: float = 1.0) -> None:
    """The seed's "after", as written: two ``Promise.all`` phases (1,200 ms at scale 1)."""

    async def listen() -> None:  # socket.io is attached to the listening server
        await _simulate("http", scale)
        await _simulate("socket_io", scale)

    await asyncio.gather(listen(), _simulate("nextjs", scale))
    await asyncio.gather(
        _simulate("baileys", scale),
        _simulate("scheduler", scale),
        _simulate("campaign_queue", scale),
    )


# -- the real HTTP part -------------------------------------------------------------------
def health_endpoint(get_running: Any) -> Any:
    """A Starlette endpoint: 200 with each service's health, 503 when failing.

    ``get_running(request)`` returns the :class:`parallelkit.Running` (or ``None``
    while starting).
    """
    from starlette.responses import JSONResponse

    async def health(request: Any) -> Any:
        running = get_running(request)
        if running is None:
            return JSONResponse({"status": "starting"})
        report = await running.health(timeout=1.0)
        body = {
            "status": report.status,
            "services": {n: {"state": h.state, "ok": h.ok} for n, h in report.services.items()},
        }
        return JSONResponse(body, status_code=503 if report.status == "failing" else 200)

    return health


async def _ready(request: Any) -> Any:
    from starlette.responses import PlainTextResponse

    return PlainTextResponse("ready")


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _loaded_config(app: Any) -> Any:
    """A uvicorn config for ``app``, loaded now.

    Loading imports uvicorn's protocol modules: tens of milliseconds of blocking work
    the first time. Done before the start, it does not hold up the services that
    start next to the http server (they share its event loop).
    """
    import uvicorn

    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    config.load()
    return config


async def serve_http(app: Any, sock: socket.socket) -> AsyncIterator[Any]:
    """Serve ``app`` (or a ``uvicorn.Config``) on a bound socket until the generator is closed."""
    import uvicorn

    config = app if isinstance(app, uvicorn.Config) else _loaded_config(app)
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        try:
            yield server
        finally:
            server.should_exit = True


def build_orchestrator(
    scale: float = 1.0,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    state: dict[str, Any] | None = None,
) -> pk.Orchestrator:
    """The seed's server as services.

    Args:
        scale: multiplies every simulated duration.
        port: ``None``: a real uvicorn on a free port of ``host``; an int: that
            port; ``0``: the http part simulated too (no sockets; works on trio).
        host: the interface to listen on.
        state: ``/health`` reports ``state["running"]`` (set it to the
            ``Running`` once started, e.g. ``orch.serve(on_ready=...)``).
    """
    orch = pk.Orchestrator(name="crm server")
    holder: dict[str, Any] = state if state is not None else {}

    if port == 0:

        async def simulated_http() -> str:
            return await _simulate("http", scale)

        orch.service(name="http")(simulated_http)
    else:
        from starlette.applications import Starlette
        from starlette.routing import Route

        sock = _bind(host, port or 0)  # bound now: no race for the port
        bound = sock.getsockname()[1]
        app = Starlette(
            routes=[
                Route("/health", health_endpoint(lambda _request: holder.get("running"))),
                Route("/ready", _ready),  # the probe: /health would probe itself
            ]
        )

        config = _loaded_config(app)  # now, not while the other services start

        @orch.service(ready=pk.probes.http(f"http://{host}:{bound}/ready"), timeout=10)
        async def http() -> AsyncIterator[str]:
            async for _server in serve_http(config, sock):
                yield f"http://{host}:{bound}"

    @orch.service
    async def socket_io(http: str) -> str:
        return await _simulate("socket_io", scale)

    for name in ("nextjs", "baileys", "scheduler", "campaign_queue"):

        async def part(name: str = name) -> str:
            return await _simulate(name, scale)

        orch.service(name=name)(part)

    return orch


def build_app(scale: float = 1.0) -> Any:
    """A Starlette app whose lifespan starts the (simulated) services, FastAPI-style.

    Run it with ``uvicorn --factory examples.crm.startup:build_app``; ``GET
    /health`` reports each service (the lifespan state holds ``running``).
    The same pattern works for FastAPI (``FastAPI(lifespan=...)``).
    """
    from starlette.applications import Starlette
    from starlette.routing import Route

    from parallelkit.asgi import lifespan

    orch = build_orchestrator(scale, port=0)  # uvicorn serves this app: http is "simulated"
    return Starlette(
        routes=[Route("/health", health_endpoint(lambda request: request.state.running))],
        lifespan=lifespan(orch),
    )
