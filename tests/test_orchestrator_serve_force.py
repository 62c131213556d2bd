"""A second signal to serve() makes every stop immediate, also the ones that begin later.

Like docker compose, honcho or foreman, a second Ctrl-C stops everything now: the
tear-downs in progress are cut short, and a stop that begins after it is immediate
too (its tear-down cancelled, its process killed at once), still in reverse
dependency order. The in-process tests run on virtual time (trio's ``MockClock``,
the ``VirtualLoop`` for asyncio): a stop that waited for its ``stop_timeout`` shows
as a timed-out tear-down, not as a slow test. The one with a real process runs on
real time (virtual time would jump past the process's exit) and checks what was
sent to it, never how long anything took.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
import trio.testing

import parallelkit as pk
from tests.virtual_time import VirtualLoop

BACKENDS = ["asyncio", "trio"]


def sigterm_self() -> None:
    """What ``kill <pid>`` would do; only called while serve()'s handler is installed."""
    os.kill(os.getpid(), signal.SIGTERM)


def run_on_virtual_time(main: Callable[[], Awaitable[None]], backend: str) -> None:
    options: dict[str, Any]
    if backend == "trio":
        options = {"clock": trio.testing.MockClock(autojump_threshold=0)}
    else:
        options = {"loop_factory": VirtualLoop}
    anyio.run(main, backend=backend, backend_options=options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stop_that_begins_after_the_second_signal_is_cancelled_at_once(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # db's stop began after the second signal: it waited its whole stop_timeout (60 s)
    orch, lines = pk.Orchestrator(), []
    hosts: dict[str, Any] = {}

    @orch.service(stop_timeout=60)
    async def db() -> AsyncIterator[str]:
        yield "db"
        lines.append("db down")  # the code after yield runs, once ...
        try:
            await anyio.sleep(30)
            lines.append("db waited")  # pragma: no cover (the bug)
        except anyio.get_cancelled_exc_class():
            lines.append("db cancelled")  # ... cancelled at its first wait
            raise

    @orch.service(stop_timeout=60)
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"
        sigterm_self()  # the second signal, while api's tear-down is stuck
        try:
            await anyio.sleep_forever()
        finally:
            lines.append("api cut short")

    def ready(running: pk.Running) -> None:
        hosts.update(running._session.hosts)
        sigterm_self()

    async def main() -> None:
        with anyio.fail_after(1000):  # a hang guard (virtual time)
            await orch.serve(signals=(signal.SIGTERM,), on_ready=ready)

    with caplog.at_level(logging.WARNING, logger="parallelkit"):
        run_on_virtual_time(main, backend)
    assert lines == ["api cut short", "db down", "db cancelled"]  # in order, each once
    assert hosts["db"].forced
    assert not hosts["db"].timed_out
    assert "did not stop within" not in caplog.text
    assert "service 'db': the stop was forced (a second signal)" in caplog.text


@pytest.mark.anyio
async def test_a_process_whose_stop_begins_after_the_second_signal_is_killed_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the reviewer's case: a process that ignores SIGTERM still got its stop_timeout.
    # Real time (a real process: virtual time would jump past its exit); what the test
    # checks is that SIGKILL came first, not how long anything took
    orch = pk.Orchestrator(output="logging")
    hosts: dict[str, Any] = {}
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    script += "print('up', flush=True)\nwhile True: time.sleep(1)"
    orch.process(
        "worker",
        [sys.executable, "-c", script],
        ready=pk.probes.call(lambda process: "up" in process.tail),
        stop_timeout=30,
    )

    @orch.service(stop_timeout=30)
    async def api(worker: pk.ManagedProcess) -> AsyncIterator[str]:
        yield "api"
        sigterm_self()  # the second signal, while api's tear-down is stuck
        await anyio.sleep_forever()

    def ready(running: pk.Running) -> None:
        hosts.update(running._session.hosts)
        sigterm_self()

    with anyio.fail_after(20), caplog.at_level(logging.WARNING, logger="parallelkit"):
        await orch.serve(signals=(signal.SIGTERM,), on_ready=ready)  # (a hang guard)
    process = hosts["worker"].value
    assert process.returncode == -signal.SIGKILL  # killed at once: no SIGTERM grace
    assert not process.running
    assert hosts["worker"].forced
    assert not hosts["worker"].timed_out
    assert "after SIGTERM; sending SIGKILL" not in caplog.text
    assert "did not stop within" not in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_after_the_second_signal_dependencies_still_stop_after_their_dependents(
    backend: str,
) -> None:
    # immediate, never reordered: a chain stops dependents first, each tear-down once
    orch, lines = pk.Orchestrator(), []

    @orch.service(stop_timeout=60)
    async def db() -> AsyncIterator[str]:
        yield "db"
        lines.append("db down")
        await anyio.sleep(30)

    @orch.service(stop_timeout=60)
    async def cache(db: str) -> AsyncIterator[str]:
        yield "cache"
        lines.append("cache down")
        await anyio.sleep(30)

    @orch.service(stop_timeout=60)
    async def api(cache: str) -> AsyncIterator[str]:
        yield "api"
        lines.append("api down")
        sigterm_self()  # the second signal
        await anyio.sleep_forever()

    async def main() -> None:
        with anyio.fail_after(1000):  # a hang guard (virtual time)
            start = anyio.current_time()
            await orch.serve(signals=(signal.SIGTERM,), on_ready=lambda _: sigterm_self())
            # nothing waited for a timer: each stop after the signal was immediate
            assert anyio.current_time() - start < 30

    run_on_virtual_time(main, backend)
    assert lines == ["api down", "cache down", "db down"]
