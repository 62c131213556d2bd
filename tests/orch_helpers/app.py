"""An orchestrator served by the subprocess tests (CLI and serve())."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

import parallelkit as pk

LOG = Path(os.environ.get("PK_TEST_LOG", os.devnull))


def log(line: str) -> None:
    with LOG.open("a") as f:
        f.write(line + "\n")


orch = pk.Orchestrator("app")


@orch.service
async def db() -> AsyncIterator[str]:
    log("start db")
    yield "db"
    await anyio.sleep(0.05)
    log("stop db")


@orch.service
async def cache() -> AsyncIterator[str]:
    log("start cache")
    yield "cache"
    log("stop cache")


@orch.service
async def api(db: str, cache: str) -> AsyncIterator[str]:
    log(f"start api {db} {cache}")
    yield "api"
    await anyio.sleep(0.05)
    log("stop api")


orch.process(
    "worker",
    [sys.executable, "-m", "tests.orch_helpers.worker"],
    depends_on=["api"],
    ready=pk.probes.call(lambda: "worker pids" in LOG.read_text()),
    timeout=20,
    stop_timeout=5,
)


if __name__ == "__main__":  # serve() directly: python -m tests.orch_helpers.app BACKEND

    def ready(running: pk.Running) -> None:
        log("ready")

    anyio.run(lambda: orch.serve(on_ready=ready), backend=sys.argv[1])
    log("exited cleanly")
