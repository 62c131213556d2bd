"""Fault review: the Orchestrator's runtime fault paths, after start-up.

A non-critical service that crashes while the start goes on, a process that exits
while the orchestrator stops, a one-shot process that finished, and a
``KeyboardInterrupt``-like error from a service or its probe.

Some tests run real subprocesses, so the module is in the slow set.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk
from parallelkit._orchestrator import process as process_module

from .test_orchestrator_faults import parallelkit_records
from .test_process import alive

# subprocesses: the main job only, not the fast unit set
pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PY = sys.executable
SLEEPER = [PY, "-c", "import time; time.sleep(60)"]


def crashing(crash: anyio.Event, message: str) -> Any:
    """A service whose own task group fails with ``ConnectionError(message)`` on ``crash``."""

    async def lifetime() -> AsyncIterator[str]:
        async with anyio.create_task_group() as tg:

            async def die() -> None:
                await crash.wait()
                raise ConnectionError(message)

            tg.start_soon(die)
            yield "client"

    return lifetime


async def until(predicate: Any) -> None:
    """Poll ``predicate()`` until it holds (a hang guard, not a timing assertion)."""
    with anyio.fail_after(20):
        while not predicate():
            await anyio.sleep(0.001)


# -- a non-critical service that crashed during the start -----------------------------
async def test_a_service_does_not_start_on_a_non_critical_service_that_crashed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # search (non-critical) was ready, then crashed while slow still started; indexer,
    # which needs both, was then started with search's torn-down value. As when search
    # fails to start, its dependents are skipped.
    orch = pk.Orchestrator()
    crash = anyio.Event()
    orch.service(name="search", critical=False)(crashing(crash, "search down"))
    started: list[str] = []

    @orch.service
    async def slow() -> str:
        crash.set()
        await until(lambda: "'search' crashed" in caplog.text)  # logged: nobody receives it
        return "slow"

    @orch.service
    async def indexer(search: str, slow: str) -> str:
        started.append("indexer")
        return "indexer"

    @orch.service
    async def reader(indexer: str) -> str:
        started.append("reader")
        return "reader"

    with caplog.at_level(logging.DEBUG):
        async with orch.start() as running:
            assert started == []
            assert running.state("indexer") == running.state("reader") == "skipped"
            assert running.skipped["indexer"].dependency == "search"
            assert isinstance(running.skipped["indexer"].__cause__, ConnectionError)
            assert running.skipped["reader"].dependency == "indexer"
            health = running.health()
    assert health.status == "failing"  # indexer is critical and was skipped
    assert health.services["slow"].ok
    assert health.services["indexer"].state == "skipped"


async def test_the_health_of_a_crashed_service_names_the_services_still_running_on_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # search (non-critical) crashed while running; indexer keeps running on its value
    # (documented: not stopped), and reader on indexer's. health() said only that search
    # crashed: nothing said which running services were hit.
    orch = pk.Orchestrator()
    crash = anyio.Event()
    orch.service(name="search", critical=False)(crashing(crash, "search cluster down"))

    @orch.service
    async def indexer(search: str) -> str:
        return f"indexer on {search}"

    @orch.service(critical=False)
    async def reader(indexer: str) -> str:
        return "reader"

    @orch.service
    async def web() -> str:
        return "web"

    with caplog.at_level(logging.DEBUG):
        async with orch.start() as running:
            crash.set()
            await until(lambda: running.state("search") == "crashed")
            snapshot = running.health()
            fresh = await running.health()
            assert running.state("indexer") == running.state("reader") == "ready"
    for health in (snapshot, fresh):
        assert health.status == "degraded"  # as documented
        reason = health.services["search"].reason
        assert reason is not None
        assert "search cluster down" in reason
        assert reason.endswith("still running on it: 'indexer', 'reader'")
        assert health.services["web"].reason is None


# -- a process exits while the orchestrator stops -------------------------------------
@pytest.mark.parametrize("restart", ["on-failure", "always"])
async def test_a_process_that_exits_while_the_orchestrator_stops_is_not_restarted(
    restart: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The stop had begun (api, which needs the worker, was tearing down) when the
    # worker died: it was restarted, again and again, while the stop went on, and
    # the last one got SIGTERM a moment after it was spawned.
    orch = pk.Orchestrator(output=lambda *line: None)
    orch.process("worker", SLEEPER, restart=restart, stop_timeout=5)  # type: ignore[arg-type]
    hosts: dict[str, Any] = {}
    events: list[str] = []

    @orch.service
    async def api(worker: pk.ManagedProcess) -> AsyncIterator[str]:
        yield "api"
        events.append("api stopping")
        pid = worker.pid
        assert pid is not None
        worker.send_signal(signal.SIGKILL)  # the worker dies while the stop runs
        # the worker's exit is decided: restarted (before the fix), or not
        await until(lambda: worker.restarts > 0 or hosts["worker"].state == "crashed")
        events.append("api stopped")

    with caplog.at_level(logging.DEBUG):
        async with orch.start() as running:
            hosts.update(running._session.hosts)
            first = running["worker"].pid
    process = running["worker"]
    assert process.restarts == 0
    assert process.pid == first
    assert not alive(first)
    assert events == ["api stopping", "api stopped"]
    assert running.state("worker") == "crashed"
    # the exit is reported once, as a crash nobody receives (the orchestrator stops)
    [record] = [r for r in parallelkit_records(caplog) if r.exc_info]
    assert "'worker' crashed" in record.getMessage()
    assert isinstance(record.exc_info[1], pk.ProcessError)  # type: ignore[index]
    assert "restarting" not in caplog.text


class _PausedAnyio:
    """``anyio`` as the process module sees it, its restart pause held until ``resume``."""

    def __init__(self, resume: anyio.Event) -> None:
        self.resume = resume

    def __getattr__(self, name: str) -> Any:
        return getattr(anyio, name)

    async def sleep(self, seconds: float) -> None:
        await self.resume.wait()
        await anyio.sleep(seconds)


async def test_a_restart_pausing_when_the_stop_begins_is_not_spawned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The worker died while running; its restart waits out its pause. The stop begins
    # during that pause (api tears down first): the restart was spawned all the same.
    orch = pk.Orchestrator(output=lambda *line: None)
    orch.process("worker", SLEEPER, restart="on-failure", stop_timeout=5)
    spawned = 0
    real_open_process = anyio.open_process
    stop_began = anyio.Event()
    hosts: dict[str, Any] = {}

    async def open_process(*args: Any, **kwargs: Any) -> Any:
        nonlocal spawned
        spawned += 1
        return await real_open_process(*args, **kwargs)

    @orch.service
    async def api(worker: pk.ManagedProcess) -> AsyncIterator[str]:
        yield "api"
        stop_began.set()  # the pause ends now, while the stop goes on
        await until(lambda: spawned > 1 or hosts["worker"].state == "crashed")

    with caplog.at_level(logging.DEBUG), pytest.MonkeyPatch.context() as patch:
        patch.setattr(anyio, "open_process", open_process)
        patch.setattr(process_module, "anyio", _PausedAnyio(stop_began))
        async with orch.start() as running:
            hosts.update(running._session.hosts)
            worker = running["worker"]
            worker.send_signal(signal.SIGKILL)
            await until(lambda: "restarting in" in caplog.text)  # its pause has begun
    assert spawned == 1
    assert worker.restarts == 0
    assert worker.pid is not None
    assert not alive(worker.pid)
    assert running.state("worker") == "crashed"
    [record] = [r for r in parallelkit_records(caplog) if r.exc_info]  # reported once
    assert isinstance(record.exc_info[1], pk.ProcessError)  # type: ignore[index]


# -- a one-shot process that finished ---------------------------------------------------
@pytest.mark.parametrize("restart", ["no", "on-failure"])
async def test_a_one_shot_process_that_exited_0_is_healthy(
    restart: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A migration: api waits for it (its probe checks the work is done); it exits 0
    # and is not restarted ("exit 0 just ends it", "a one-shot job ... may have done
    # what the probe looks for"). health() said "failing" ("process exited with code
    # 0") for as long as the app ran, although its probe passes.
    done = tmp_path / "migrated"
    orch = pk.Orchestrator(output=lambda *line: None)
    orch.process(
        "migrate",
        [PY, "-c", f"import pathlib; pathlib.Path({str(done)!r}).write_text('ok')"],
        ready=pk.probes.call(done.exists),
        restart=restart,  # type: ignore[arg-type]
        timeout=20,
    )

    @orch.service
    async def api(migrate: pk.ManagedProcess) -> str:
        return "api"

    with caplog.at_level(logging.INFO):
        async with orch.start() as running:
            host = running._session.hosts["migrate"]
            # its supervisor has seen the exit, and decided not to restart it
            await until(lambda: "'migrate' exited with code 0" in caplog.text)
            snapshot = running.health()
            fresh = await running.health()
            assert host.state == "ready"
            done.unlink()  # its work undone: the probe, re-run, says so
            undone = await running.health()
    for health in (snapshot, fresh):
        assert health.status == "ok", health
        assert health.services["migrate"].ok
        assert health.services["migrate"].reason is None
    assert undone.status == "failing"
    assert undone.services["migrate"].reason is not None


async def test_a_process_without_a_probe_that_exited_0_is_still_not_ok(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # without a probe nothing says it was meant to end (a server that stopped serving)
    orch = pk.Orchestrator(output=lambda *line: None)
    orch.process("web", [PY, "-c", "pass"])
    with caplog.at_level(logging.INFO):
        async with orch.start() as running:
            await until(lambda: "'web' exited with code 0" in caplog.text)
            health = await running.health()
    assert health.status == "failing"
    assert health.services["web"].reason == "process exited with code 0"


async def test_a_process_that_exited_and_waits_for_its_restart_is_not_ok() -> None:
    # still honest the other way: between an exit and its restart the process is down
    orch = pk.Orchestrator(output=lambda *line: None)
    orch.process("worker", [PY, "-c", "import sys; sys.exit(0)"], restart="always")
    seen: list[pk.Health] = []
    running: pk.Running | None = None

    class AtTheRestart(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "restarting in" in record.getMessage() and running is not None and not seen:
                seen.append(running.health())  # the process exited, its restart pending

    handler = AtTheRestart()
    process_logger = logging.getLogger("parallelkit.process")
    process_logger.addHandler(handler)
    try:
        async with orch.start() as running:
            await until(lambda: seen)
    finally:
        process_logger.removeHandler(handler)
    [health] = seen
    assert health.status == "failing"
    assert health.services["worker"].reason == "process exited with code 0"


# -- a KeyboardInterrupt-like BaseException from a service ---------------------------------
class Interrupt(BaseException):
    """A ``KeyboardInterrupt``-like error (not an ``Exception``, not a cancellation)."""


def interrupted_at(where: str) -> tuple[pk.Orchestrator, list[str], Interrupt]:
    """db, then api on db; api raises an ``Interrupt`` at ``where``."""
    orch = pk.Orchestrator()
    log: list[str] = []
    stop = Interrupt(where)

    @orch.service
    async def db() -> AsyncIterator[str]:
        log.append("db up")
        yield "db"
        log.append("db down")

    def probe(value: str) -> bool:
        if where == "probe":
            raise stop
        return True

    @orch.service(ready=probe)
    async def api(db: str) -> AsyncIterator[str]:
        if where == "setup":
            raise stop
        async with anyio.create_task_group() as tg:

            async def background() -> None:
                if where == "background":
                    await until(lambda: "body" in log)
                    raise stop

            tg.start_soon(background)
            log.append("api up")
            yield "api"
            log.append("api down")
            if where == "teardown":
                raise stop

    return orch, log, stop


@pytest.mark.parametrize("where", ["probe", "setup", "background", "teardown"])
async def test_a_keyboard_interrupt_like_error_from_a_service_comes_out_as_itself(
    where: str,
) -> None:
    # A readiness probe that raised one: it was lost, replaced by a StartupError whose
    # cause was a RuntimeError guessing at "its own task group was cancelled". From the
    # set-up, a background task or the tear-down: a BaseExceptionGroup came out (the
    # docs: a group only for tear-down errors after a clean run).
    orch, log, stop = interrupted_at(where)
    caught: BaseException | None = None
    try:
        with anyio.fail_after(20):  # a hang guard
            async with orch.start():
                log.append("body")
                if where == "background":
                    await anyio.sleep_forever()  # until its crash ends the body
    except BaseException as exc:  # what came out is the point
        caught = exc
    assert caught is stop, f"{caught!r} came out"
    assert log[0] == "db up"
    assert log[-1] == "db down"  # everything that started is torn down, dependents first
    assert log.count("db down") == 1
    if "api up" in log and where != "background":  # (a crash is thrown into it)
        assert log.index("api down") < log.index("db down")


async def test_a_keyboard_interrupt_like_error_from_a_probe_comes_out_of_health_as_itself() -> None:
    # await running.health() re-runs the probes in a task group: the error came out
    # of it in a BaseExceptionGroup
    orch = pk.Orchestrator()
    stop = Interrupt("probe")
    checks = 0

    def probe(value: str) -> bool:
        nonlocal checks
        checks += 1
        if checks > 1:  # not at start-up: in the health check
            raise stop
        return True

    @orch.service(ready=probe)
    async def db() -> AsyncIterator[str]:
        yield "db"

    @orch.service(ready=lambda value: True)
    async def cache() -> AsyncIterator[str]:
        yield "cache"

    caught: BaseException | None = None
    async with orch.start() as running:
        try:
            await running.health()
        except BaseException as exc:  # what came out is the point
            caught = exc
    assert caught is stop, f"{caught!r} came out"


@pytest.mark.parametrize("where", ["setup", "on_ready"])
async def test_a_keyboard_interrupt_like_error_comes_out_of_serve_as_itself(where: str) -> None:
    # serve() runs start() beside its signal watcher, in a task group: the error came
    # out of it in a BaseExceptionGroup
    orch, log, stop = interrupted_at("setup" if where == "setup" else "none")

    def on_ready(running: pk.Running) -> None:
        raise stop

    caught: BaseException | None = None
    try:
        with anyio.fail_after(20):  # a hang guard
            await orch.serve(signals=(signal.SIGTERM,), on_ready=on_ready)
    except BaseException as exc:  # what came out is the point
        caught = exc
    assert caught is stop, f"{caught!r} came out"
    assert log[-1] == "db down"
