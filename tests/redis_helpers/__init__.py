"""Helpers for the parallelkit.redis tests.

``worker.py`` is run as separate OS processes; the functions here start them, and
start/stop a private ``redis-server`` for the outage tests.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError

from parallelkit._cache.store import CacheEntry

if TYPE_CHECKING:
    from parallelkit.redis import RedisStore

WORKER = Path(__file__).resolve().parent / "worker.py"


class Commands:
    """Counts the commands a client sends (scripts included: they are EVALSHA)."""

    def __init__(self, r: aredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        send = r.execute_command

        async def counting(*args: Any, **options: Any) -> Any:
            self.count += 1
            return await send(*args, **options)

        monkeypatch.setattr(r, "execute_command", counting)


class LostReply:
    """The first script (``EVALSHA``) a client sends runs in Redis, but its reply never
    comes: the caller hangs until cancelled, as if cancelled with the reply on its way.

    ``ran`` is set once Redis ran it; later commands pass through.
    """

    def __init__(self, r: aredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ran = anyio.Event()
        send = r.execute_command

        async def losing(*args: Any, **options: Any) -> Any:
            result = await send(*args, **options)
            if args[0] == "EVALSHA" and not self.ran.is_set():
                self.ran.set()
                await anyio.sleep_forever()
            return result

        monkeypatch.setattr(r, "execute_command", losing)


class Refused:
    """While ``on``, Redis answers the script with ``sha`` with an error (``READONLY``,
    as a primary demoted by a failover does); ``refused`` counts those answers."""

    def __init__(self, r: aredis.Redis, monkeypatch: pytest.MonkeyPatch, sha: str) -> None:
        self.on = True
        self.refused = 0
        send = r.execute_command

        async def refusing(*args: Any, **options: Any) -> Any:
            if self.on and args[0] == "EVALSHA" and args[1] == sha:
                self.refused += 1
                msg = "You can't write against a read only replica."
                raise ReadOnlyError(msg)
            return await send(*args, **options)

        monkeypatch.setattr(r, "execute_command", refusing)


def bad_arguments(cases: list[tuple[dict[str, Any], type[Exception], str]]) -> Any:
    """Parametrize a test over ``(kwargs, error type, message regex)`` cases."""
    ids = [repr(kwargs) for kwargs, _, _ in cases]
    return pytest.mark.parametrize(("kwargs", "error", "message"), cases, ids=ids)


def entry(value: Any, fresh: float = 30, stale: float = 60) -> CacheEntry[Any]:
    """A cache entry loaded now (on the wall clock, like RedisStore's)."""
    now = time.time()
    return CacheEntry(value, now, now + fresh, now + fresh + stale)


class FakeTimer:
    """A clock the test moves by hand (``store._guard.timer``, ``store._near.timer``)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_prefix() -> str:
    """A random key namespace, so parallel test runs never collide."""
    return f"pktest:{uuid.uuid4().hex[:12]}"


def client(url: str, **kwargs: Any) -> aredis.Redis:
    """A client that fails fast when Redis is down (one retry, no back-off).

    Its pool makes callers wait for a connection instead of raising
    ``MaxConnectionsError`` when hundreds of tasks use it at once.
    """
    kwargs.setdefault("retry", Retry(NoBackoff(), 1))
    kwargs.setdefault("socket_connect_timeout", 1.0)
    kwargs.setdefault("socket_timeout", 2.0)
    kwargs.setdefault("max_connections", 50)
    kwargs.setdefault("timeout", 10)
    pool = aredis.BlockingConnectionPool.from_url(url, **kwargs)
    return aredis.Redis.from_pool(pool)


def start_workers(
    mode: str, url: str, prefix: str, n: int, *args: str
) -> list[subprocess.Popen[str]]:
    """Start ``n`` worker processes of ``mode`` (they meet at a Redis barrier)."""
    cmd = [sys.executable, str(WORKER), mode, url, prefix, "--processes", str(n), *args]
    return [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]


def wait_workers(procs: list[subprocess.Popen[str]], timeout: float = 60) -> list[dict[str, Any]]:
    """Wait for every worker; fail with its stderr if one failed."""
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def stop_workers(procs: list[subprocess.Popen[str]]) -> None:
    """Kill what still runs and close every pipe (no ResourceWarning)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


async def renewals(r: aredis.Redis, key: str, count: int) -> None:
    """Return once ``key``'s remaining ttl went up ``count`` times (each time: a renewal).

    Fails if the key expires meanwhile; gives up after a minute.
    """
    seen, last = 0, await r.pttl(key)
    with anyio.fail_after(60):
        while seen < count:
            await anyio.sleep(0.01)
            now = await r.pttl(key)
            assert now > 0, f"{key} expired: it was not renewed"
            seen, last = seen + (now > last), now


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A throw-away ``redis-server`` on a port of its own, for outage tests."""

    def __init__(self, *args: str) -> None:
        self.binary = shutil.which("redis-server")
        self.port = free_port()
        self.args = args  # more options (``"--dir", "/proc"``: no snapshot can be saved)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.binary is not None
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:  # noqa: PERF203 - polling for the port
                time.sleep(0.02)
        msg = f"redis-server did not start on port {self.port}"
        raise RuntimeError(msg)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open and stops answering (a hang)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the paused server answers again."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # a paused process dies as well
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


async def eventually(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll ``check()`` until true; fail after a generous ``timeout`` (never a timing claim)."""
    with anyio.move_on_after(timeout):
        while not check():
            await anyio.sleep(0.005)
        return
    pytest.fail(f"not within {timeout} s: {what}")


async def heard(store: RedisStore, count: int) -> None:
    """Wait until ``store`` received ``count`` invalidations (its own writes' included)."""
    await eventually(
        lambda: store.statistics().near_invalidations >= count, f"{count} invalidations"
    )


@contextlib.asynccontextmanager
async def cleaned(url: str, prefix: str) -> AsyncIterator[aredis.Redis]:
    """A client on ``url``; the keys under ``prefix`` are deleted afterwards."""
    conn = client(url)
    yield conn
    keys = [k async for k in conn.scan_iter(match=f"{prefix}:*")]
    if keys:
        await conn.delete(*keys)
    await conn.aclose()
