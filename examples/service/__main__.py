"""``python -m examples.service``: serve one variant under uvicorn.

Example::

    python -m examples.service --variant expert --port 8001
    python -m examples.service --variant parallelkit \\
        --database postgresql://postgres@127.0.0.1/test \\
        --redis redis://127.0.0.1:6379/0 --store redis

Replicas of one service (run the same command on each host or port)::

    python -m examples.service --name crm --shared \
        --database postgresql://postgres@127.0.0.1/test \
        --redis redis://127.0.0.1:6379/0 --store redis --port 8001
"""

from __future__ import annotations

import argparse
import math
import os
from urllib.parse import urlsplit

import uvicorn

from .app import create_app
from .shared import COLLECTOR, VARIANTS, Settings


def _port(value: str) -> int:
    """``--port``: 1 to 65535 (a larger number would wrap around to another port)."""
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        msg = f"expected a TCP port, 1 to 65535, got {value!r}"
        raise argparse.ArgumentTypeError(msg)
    return int(value)


def _pool_size(value: str) -> int:
    """``--pool-size``: at least 1."""
    if not value.isdigit() or int(value) < 1:
        msg = f"expected a whole number >= 1, got {value!r}"
        raise argparse.ArgumentTypeError(msg)
    return int(value)


#: Seconds a SIGTERM waits for the requests in flight (``--graceful-timeout``). uvicorn
#: waits for ever by default: a client that sent half a request and went quiet, or a
#: provider that never answers, kept the server running (its services up) after SIGTERM.
GRACEFUL_TIMEOUT = 10.0


def _seconds(value: str) -> float:
    """``--graceful-timeout``: a finite number of seconds > 0."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        msg = f"expected a number of seconds > 0, got {value!r}"
        raise argparse.ArgumentTypeError(msg)
    return seconds


def _database(value: str) -> str:
    """``--database``: a URL SQLAlchemy can parse (an empty one: the SQLite default)."""
    if not value:
        return value
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(value)
    except (ArgumentError, ValueError):
        msg = f"not a database URL: {value!r} (e.g. postgresql://postgres@127.0.0.1/test)"
        raise argparse.ArgumentTypeError(msg) from None
    return value


def _redis(value: str) -> str:
    """``--redis``: a redis://, rediss:// or unix:// URL."""
    if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        msg = f"not a Redis URL: {value!r} (e.g. redis://127.0.0.1:6379/0)"
        raise argparse.ArgumentTypeError(msg)
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.service", description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, default="parallelkit")
    parser.add_argument("--name", default="", help="schema / namespace suffix (default: variant)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=_port, default=8000)
    parser.add_argument(
        "--database",
        type=_database,
        default=os.environ.get("DATABASE_URL"),
        help="default: a SQLite file",
    )
    parser.add_argument(
        "--redis", type=_redis, default=None, help="a Redis URL (for --store redis)"
    )
    parser.add_argument("--store", choices=("memory", "redis"), default="memory")
    parser.add_argument(
        "--shared",
        action="store_true",
        help="a replica: join the --name service's schema and Redis namespace (created and "
        "seeded by the first replica to start, never dropped or cleared by any); "
        "needs a PostgreSQL --database",
    )
    parser.add_argument("--pool-size", type=_pool_size, default=10)
    parser.add_argument(
        "--graceful-timeout",
        type=_seconds,
        default=GRACEFUL_TIMEOUT,
        help="seconds a SIGTERM waits for the requests in flight before it cancels them "
        f"and stops the services (default: {GRACEFUL_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    if args.store == "redis" and not args.redis:
        parser.error("--store redis needs a Redis URL (--redis URL)")
    if args.shared and not args.database:
        parser.error("--shared needs a PostgreSQL database (--database URL)")
    try:
        settings = Settings(
            variant=args.variant,
            name=args.name,
            database=args.database,
            redis=args.redis,
            store=args.store,
            pool_size=args.pool_size,
            shared=args.shared,
        )
    except ValueError as exc:  # --name (a schema name), --shared: Settings says what it accepts
        option = "--shared" if args.shared and "shared" in str(exc) else "--name"
        parser.error(f"{option}: {exc}")
    COLLECTOR.start()  # GET /debug/stats reports the time spent collecting garbage
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        # uvicorn types it int, and takes any number of seconds (asyncio.timeout)
        timeout_graceful_shutdown=args.graceful_timeout,
    )


if __name__ == "__main__":
    main()
