"""What one request costs, counted instead of timed: Python calls per request, by library.

``python -m benchmarks.service_calls [--endpoint payment] [--clients 16] [--requests 400]
[--database URL]``

On this shared machine two identical servers differ by up to 15-20 % in CPU per
request (the A/A column of ``python -m benchmarks service``): more than most of the
differences between the variants. A count does not move with the machine. Each
variant's app is served in this process (its lifespan runs; the ASGI app is called
directly, no HTTP, no uvicorn), warmed up with the same requests, then
``sys.setprofile`` counts, while ``clients`` concurrent clients make ``requests``
requests:

* ``call`` events: every Python function called *and every resumption of a
  coroutine frame* (a request task resumed after an ``await`` counts each frame of
  its stack: the deeper the middleware stack, the more an ``await`` in the handler's
  own task costs);
* ``c_call`` events: every call of a C function from Python.

Reported per request, in total and by library (the buckets of
:mod:`benchmarks.service_profile`, by the file of the frame called). A count is not
a time: a call into asyncpg's C code and a ``dict.get`` count the same. What it
shows exactly is what one variant adds to the same request over another, and
where. The garbage collector is not in it (see the GC column of the service
benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from examples.service.app import create_app
from examples.service.shared import VARIANTS, Settings

from ._util import table
from .service_load import ENDPOINTS, Request, requests_for
from .service_profile import _bucket


async def _call(app: Any, state: dict[str, Any], request: Request) -> int:
    """One request, straight into the ASGI app (as a server does: a copy of the state)."""
    path, _, query = request.path.partition("?")
    body = request.body or b""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": dict(state),
    }
    sent = False
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


async def count(
    variant: str,
    endpoint: str,
    *,
    clients: int,
    requests: int,
    database: str | None,
    library: str | None = None,
) -> dict[str, Any]:
    """Calls per request of one variant's ``endpoint`` (after a warm-up of ``requests``);
    with ``library``, also per function of that library."""
    app = create_app(Settings(variant=variant, name=f"calls_{variant}", database=database))
    tag = f"calls-{variant}-{time.time_ns()}"
    warm = requests_for(endpoint, requests, tag=f"{tag}-warm")
    measured = requests_for(endpoint, requests, tag=tag)
    calls: Counter[str] = Counter()
    functions: Counter[str] = Counter()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            qualname = getattr(code, "co_qualname", code.co_name)  # Python 3.11+
            name = f"{qualname} ({code.co_filename}:{code.co_firstlineno})"
            bucket = _bucket(name)
            calls[bucket] += 1
            if bucket == library:
                functions[name] += 1
        elif event == "c_call":
            calls["C functions"] += 1
            if library == "C functions":
                functions[getattr(arg, "__qualname__", repr(arg))] += 1

    with _production_sessions():
        statuses = await _drive(app, warm, measured, clients, profile)
    ok = sum(1 for s in statuses if s == 200)
    if ok != len(measured):
        msg = f"{variant} {endpoint}: {len(measured) - ok} of {len(measured)} answers not 200"
        raise RuntimeError(msg)
    per = {name: n / len(measured) for name, n in calls.most_common()}
    top = {name: n / len(measured) for name, n in functions.most_common(30)}
    return {"total": sum(per.values()), "by_library": per, "functions": top}


@contextmanager
def _production_sessions() -> Iterator[None]:
    """The session guard off, as in production (parallelkit's pytest plugin turns it on
    for every session of a test run: the expert's and the ordinary's too)."""
    guard = sys.modules.get("parallelkit.sqlalchemy")
    was_on = guard is not None and guard.guard_sessions(False)
    try:
        yield
    finally:
        if was_on:
            assert guard is not None
            guard.guard_sessions(True)


async def _drive(
    app: Any, warm: list[Request], measured: list[Request], clients: int, profile: Any
) -> list[int]:
    """Serve ``warm`` then, counted by ``profile``, ``measured``; the statuses of those."""
    async with app.router.lifespan_context(app) as started:
        state = dict(started or {})
        await serve(app, state, warm, clients)  # caches filled, statements prepared, the pool open
        sys.setprofile(profile)
        try:
            return await serve(app, state, measured, clients)
        finally:
            sys.setprofile(None)


async def serve(app: Any, state: dict[str, Any], batch: list[Request], clients: int) -> list[int]:
    """Serve ``batch`` to ``app`` (its lifespan ``state`` entered) from ``clients``
    concurrent clients; the statuses, in no order."""
    pending = iter(batch)
    statuses: list[int] = []

    async def client() -> None:
        for request in pending:
            statuses.append(await _call(app, state, request))

    await asyncio.gather(*(client() for _ in range(clients)))
    return statuses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service_calls")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="payment")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--database", default=None, help="default: a SQLite file")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--library", default=None, help="also list the most called functions of one library"
    )
    a = parser.parse_args(argv)
    results = {
        v: asyncio.run(
            count(
                v,
                a.endpoint,
                clients=a.clients,
                requests=a.requests,
                database=a.database,
                library=a.library,
            )
        )
        for v in a.variants
    }
    libraries = sorted({k for r in results.values() for k in r["by_library"]})
    rows = [
        [lib, *(round(results[v]["by_library"].get(lib, 0.0), 1) for v in a.variants)]
        for lib in libraries
    ]
    rows.append(["total", *(round(results[v]["total"], 1) for v in a.variants)])
    print(
        f"{a.endpoint}: calls per request ({a.requests} requests, {a.clients} clients,"
        f" in-process, {a.database or 'SQLite'})"
    )
    print(table(["library", *a.variants], rows))
    for v in a.variants if a.library else ():
        print(f"\n{v}: the most called of {a.library} (calls per request)")
        for name, n in results[v]["functions"].items():
            print(f"  {n:8.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
