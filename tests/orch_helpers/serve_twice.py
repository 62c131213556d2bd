"""serve() runs; a second serve() (same or another orchestrator) is tried; then SIGTERM.

Usage: ``python -m tests.orch_helpers.serve_twice <backend> <same|other>``. Prints
what the second serve() did, then sends itself SIGTERM: the first serve() must stop
gracefully (``db stopped``, ``served``) and the program exit 0. Run in a subprocess:
a serve() left without its signal handler dies of the SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator

import anyio

import parallelkit as pk


def build(name: str) -> pk.Orchestrator:
    orch = pk.Orchestrator(name)

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        print(f"{name} db stopped", flush=True)

    return orch


async def main(mode: str) -> None:
    first = build("first")
    second = first if mode == "same" else build("second")
    ready = anyio.Event()

    async def serve_first() -> None:
        await first.serve(on_ready=lambda running: ready.set())
        print("first served", flush=True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_first)
        with anyio.fail_after(10):  # a hang guard
            await ready.wait()
        with anyio.move_on_after(5):  # a hang guard: a second serve() that is not refused
            try:
                await second.serve()
            except RuntimeError as exc:
                print(f"refused: {exc}", flush=True)
            else:
                print("second served", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    anyio.run(main, sys.argv[2], backend=sys.argv[1])
