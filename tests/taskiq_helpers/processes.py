"""Start and stop real ``taskiq worker`` processes for a test, never leaving orphans.

Each worker runs in its own session (process group): ``taskiq worker`` is a process
manager with a child that does the work, and killing the group kills both, which
is what "a worker dies" means here (``SIGKILL``: no cleanup, no acknowledgement).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import pytest
import redis as redis_sync

from .tasks import Tasks, build

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository: `tests` is a package


class Workers:
    """A set of worker processes on one queue; use as a context manager."""

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        module: str = "tests.taskiq_helpers.worker:broker",
        group: str = "parallelkit",
        max_async_tasks: int = 16,
        log_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.queue = queue
        self.module = module
        self.group = group
        self.max_async_tasks = max_async_tasks
        self.log_dir = log_dir
        self.extra_env = extra_env or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *names: str, timeout: float = 30.0, wait: bool = True) -> None:
        """Start one worker per consumer name; wait until each has started."""
        for name in names:
            env = {
                **os.environ,
                **self.extra_env,
                "PK_TASKIQ_URL": self.url,
                "PK_TASKIQ_QUEUE": self.queue,
                "PK_TASKIQ_CONSUMER": name,
            }
            log = self.log_dir / f"{name}.log" if self.log_dir is not None else Path(os.devnull)
            with log.open("ab") as out:  # the child keeps its own copy of the descriptor
                self.procs[name] = self._spawn(env, out)
        if wait:
            self.wait_ready(names, timeout)

    def _spawn(self, env: dict[str, str], out: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "taskiq",
                "worker",
                self.module,
                "--app-dir",
                str(ROOT),
                "--workers",
                "1",
                "--max-async-tasks",
                str(self.max_async_tasks),
                "--log-level",
                "WARNING",
                "--shutdown-timeout",
                "2",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, names: tuple[str, ...], timeout: float) -> None:
        """Wait until every named worker has started (its startup hook sets a key)."""
        client = redis_sync.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                missing = [n for n in names if not client.exists(f"{self.queue}:ready:{n}")]
                if not missing:
                    return
                for name in missing:
                    if self.procs[name].poll() is not None:
                        msg = f"worker {name} exited with {self.procs[name].returncode}"
                        raise RuntimeError(msg)
                if time.monotonic() > deadline:
                    msg = f"workers {missing} not ready after {timeout}s"
                    raise TimeoutError(msg)
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self, name: str) -> None:
        """SIGKILL a worker's whole process group: it dies holding its messages."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGKILL every worker's process group and reap it: no orphans, no waiting
        for a graceful shutdown (the test's Redis keys are dropped anyway)."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):  # the group may outlive its leader
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait(timeout=10)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def new_queue() -> str:
    """A queue name of its own (its keys are dropped by :func:`drop_keys`)."""
    return f"pk-test-{uuid.uuid4().hex[:10]}"


def drop_keys(url: str, prefix: str) -> None:
    """Delete every Redis key of one test run (the stream, results, logs)."""
    client = redis_sync.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def asyncio_backend() -> str:
    """A Taskiq test module imports this as its ``anyio_backend`` (Taskiq's client and
    redis-py are asyncio libraries)."""
    return "asyncio"


@pytest.fixture(name="tasks")
async def own_queue_tasks(redis_url: str) -> AsyncIterator[Tasks]:
    """``tasks``: producer-side handles on a queue of their own, the consumer group
    created, the queue's keys deleted afterwards; no worker (a module that imports this
    fixture reads the stream itself)."""
    queue = new_queue()
    handles = build(redis_url, queue)
    await handles.broker.startup()
    try:
        yield handles
    finally:
        await handles.broker.shutdown()
        drop_keys(redis_url, queue)


def task_id_of(data: bytes) -> str:
    """The task id in a Taskiq message's data."""
    return str(json.loads(data)["task_id"])
