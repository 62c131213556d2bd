"""Helpers of the reference service's tests (examples/service).

* :class:`ServiceProcess`: the service served in a subprocess on a free port, as
  ``python -m examples.service`` does (the ``slow`` tests talk to it over HTTP);
* :func:`drop`, :func:`conversation_count`: a service's PostgreSQL schema, dropped and
  counted, for the tests of shared (replicas) and private servers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
from examples.crm.models import Conversation
from examples.service import Settings
from examples.service.shared import ServiceDatabase
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def module_command(port: int, args: list[str]) -> list[str]:
    """``python -m examples.service --port <port> <args>``."""
    return [sys.executable, "-m", "examples.service", "--port", str(port), *args]


class ServiceProcess:
    """A server in a subprocess on a free port (its output in ``log``): ``command(port)``
    run from the repository root, without the environment's ``DATABASE_URL``."""

    #: the hang guard of :meth:`started`, in seconds
    start_guard: float = 60

    def __init__(self, log: Path, command: Callable[[int], list[str]]) -> None:
        self.port = free_port()
        self.log = log
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("DATABASE_URL", None)
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                command(self.port), cwd=ROOT, env=env, stdout=out, stderr=out
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def started(self) -> None:
        """Once ``/health`` answers 200 (the process must not end meanwhile)."""
        with anyio.fail_after(self.start_guard):  # hang guard: seeding 2,000 conversations
            while True:
                assert self.process.poll() is None, self.output()
                try:
                    async with httpx.AsyncClient() as http:
                        if (await http.get(f"{self.url}/health")).status_code == 200:
                            return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.1)

    async def terminate(self) -> int:
        """SIGTERM, then its exit status."""
        self.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):  # hang guard
            while self.process.poll() is None:
                await anyio.sleep(0.05)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


async def drop(settings: Settings) -> None:
    """Drop the service's schema (what an operator does to remove it)."""
    from examples.crm.db import drop_schema, make_engine

    assert settings.database is not None
    engine = make_engine(settings.database, schema=settings.schema)
    try:
        await drop_schema(engine, schema=settings.schema)
    finally:
        await engine.dispose()


async def conversation_count(db: ServiceDatabase) -> int:
    async with db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(Conversation)) or 0)
