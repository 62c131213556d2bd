"""``python -m examples.service``: serve one variant under uvicorn.

Example::

    python -m examples.service --variant expert --port 8001
    python -m examples.service --variant parallelkit \\
        --database postgresql://postgres@127.0.0.1/test \\
        --redis redis://127.0.0.1:6379/0 --store redis
"""

from __future__ import annotations

import argparse
import os

import uvicorn

from .app import create_app
from .shared import COLLECTOR, VARIANTS, Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.service", description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, default="parallelkit")
    parser.add_argument("--name", default="", help="schema / namespace suffix (default: variant)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--database", default=os.environ.get("DATABASE_URL"), help="default: a SQLite file"
    )
    parser.add_argument("--redis", default=None, help="a Redis URL (for --store redis)")
    parser.add_argument("--store", choices=("memory", "redis"), default="memory")
    parser.add_argument("--pool-size", type=int, default=10)
    args = parser.parse_args(argv)
    settings = Settings(
        variant=args.variant,
        name=args.name,
        database=args.database,
        redis=args.redis,
        store=args.store,
        pool_size=args.pool_size,
    )
    COLLECTOR.start()  # GET /debug/stats reports the time spent collecting garbage
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
