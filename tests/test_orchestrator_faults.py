"""Orchestrator under faults: slow probes, teardown after yield, process crashes, signals, logs.

Each test pins one promise of the "Teardown" and "Logged once" rules of the design
and fails without the fix it came with. Nothing here asserts on elapsed time:
events, counters and orders only.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

import parallelkit as pk

pytestmark = pytest.mark.anyio

PY = sys.executable


# -- 15.1 a probe whose first check outlasts the timeout --------------------------------------
async def test_probe_wait_first_check_longer_than_timeout_is_a_timeout() -> None:
    async def hangs() -> bool:
        await anyio.sleep_forever()
        return True  # pragma: no cover

    with pytest.raises(TimeoutError, match=r"call .*hangs not ready after 0.05s .*did not answer"):
        await pk.probes.call(hangs).wait(timeout=0.05)


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts and never answers: an HTTP probe's check hangs."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port: int = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield port
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["call", "http"])
async def test_slow_first_probe_check_is_a_startup_error(kind: str, silent_server: int) -> None:
    async def hangs() -> bool:
        await anyio.sleep_forever()
        return True  # pragma: no cover

    probe = (
        pk.probes.call(hangs, name="warm")
        if kind == "call"
        else pk.probes.http(f"http://127.0.0.1:{silent_server}/health")
    )
    orch = pk.Orchestrator()

    @orch.service(ready=probe, timeout=0.05)
    async def api() -> str:
        return "api"

    with pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pytest.fail("not reached")
    err = info.value
    assert err.service == "api"
    assert isinstance(err.__cause__, TimeoutError)
    assert probe.name in str(err)  # names the service and the probe
    assert "'api'" in str(err)
    assert "did not answer" in str(err.__cause__)


# -- 15.2 the code after yield runs exactly once, in reverse dependency order -----------------
class Log:
    """What ran, in order; each service's tear-down is plain code after ``yield``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def service(self, orch: pk.Orchestrator, name: str, *deps: str, **options: Any) -> anyio.Event:
        """A generator service with no ``finally``; returns an event set at its yield."""
        log, reached = self.lines, anyio.Event()
        params = ", ".join(deps)
        namespace: dict[str, Any] = {"log": log, "anyio": anyio, "reached": reached}
        exec(
            f"async def {name}({params}):\n"
            f"    log.append('up {name}')\n"
            "    reached.set()\n"
            f"    yield '{name}'\n"
            "    await anyio.sleep(0)\n"  # a checkpoint: a cancelled tear-down stops here
            f"    log.append('down {name}')\n",
            namespace,
        )
        orch.service(**options)(namespace[name])
        return reached

    def downs(self) -> list[str]:
        return [line[5:] for line in self.lines if line.startswith("down ")]


async def test_readiness_timeout_runs_the_code_after_yield() -> None:
    log, orch = Log(), pk.Orchestrator()
    log.service(orch, "db")
    log.service(orch, "engine", "db", ready=lambda: False, timeout=0.05)
    with pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pytest.fail("not reached")
    assert info.value.service == "engine"
    assert isinstance(info.value.__cause__, TimeoutError)
    assert log.downs() == ["engine", "db"]


async def test_rollback_runs_the_code_after_yield_in_reverse_order() -> None:
    log, orch = Log(), pk.Orchestrator()
    release = anyio.Event()  # never set: "api" reaches its yield, never becomes ready
    log.service(orch, "db")
    log.service(orch, "cache", "db")
    api_reached = log.service(orch, "api", "cache", ready=release.is_set)

    @orch.service
    async def payments(db: str) -> str:
        await api_reached.wait()
        raise ConnectionError("payment provider unreachable")

    with anyio.fail_after(10), pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pytest.fail("not reached")
    assert info.value.service == "payments"
    assert isinstance(info.value.__cause__, ConnectionError)
    assert log.downs() == ["api", "cache", "db"]  # each once, dependents first


async def test_cancelled_start_runs_the_code_after_yield() -> None:
    log, orch = Log(), pk.Orchestrator()
    log.service(orch, "db")
    reached = log.service(orch, "api", "db", ready=lambda: False)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_when_reached() -> None:
                await reached.wait()
                scope.cancel()

            tg.start_soon(cancel_when_reached)
            async with orch.start():
                pytest.fail("not reached")
    assert scope.cancelled_caught
    assert log.downs() == ["api", "db"]


# -- an error in hand is not lost to a cancellation of the caller's scope ----------------------
async def test_a_failed_start_is_raised_when_the_caller_is_cancelled_while_it_unwinds() -> None:
    # db reached its yield but is not ready; api fails; while db tears down, the caller's
    # deadline passes: the ConnectionError was lost (neither raised nor logged)
    orch, downs = pk.Orchestrator(), []
    caller = anyio.CancelScope()
    reached = anyio.Event()
    unreachable = ConnectionError("payment provider unreachable")

    @orch.service(ready=lambda: False)
    async def db() -> AsyncIterator[str]:
        reached.set()
        yield "db"
        caller.cancel()  # the caller's deadline passes during the tear-down
        await anyio.lowlevel.checkpoint()
        downs.append("db")

    @orch.service
    async def payments() -> str:
        await reached.wait()
        raise unreachable

    with anyio.fail_after(20), pytest.raises(pk.StartupError) as info, caller:
        async with orch.start():
            pytest.fail("not reached")
    assert info.value.__cause__ is unreachable
    assert downs == ["db"]


async def test_a_crash_is_raised_when_the_caller_is_cancelled_at_the_same_time() -> None:
    # the crash cancelled the body, and so did the caller: the crash was lost (it is not
    # logged, being meant to be raised), only the cancellation went on
    orch, downs = pk.Orchestrator(), []
    caller = anyio.CancelScope()
    died = KeyError("worker died")
    crash = anyio.Event()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        downs.append("db")

    @orch.service
    async def worker(db: str) -> AsyncIterator[str]:
        async def die() -> None:
            await crash.wait()
            raise died

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(die)
                yield "worker"
        finally:
            caller.cancel()  # the caller gives up in the same instant

    with anyio.fail_after(20), pytest.raises(KeyError) as info, caller:
        async with orch.start():
            crash.set()
            await anyio.sleep_forever()
    assert info.value is died
    assert downs == ["db"]


async def test_a_body_error_is_raised_when_the_caller_is_cancelled_during_the_stop() -> None:
    orch = pk.Orchestrator()
    caller = anyio.CancelScope()
    failed = ValueError("handler failed")

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        caller.cancel()  # the caller's deadline passes during the stop
        await anyio.lowlevel.checkpoint()

    with anyio.fail_after(20), pytest.raises(ValueError) as info, caller:
        async with orch.start():
            raise failed
    assert info.value is failed


async def test_retry_runs_the_code_after_yield_of_each_failed_attempt() -> None:
    orch = pk.Orchestrator()
    lines: list[str] = []
    attempts = 0

    @orch.service(retry=pk.Retry(attempts=3, backoff=0), ready=lambda: attempts == 3, timeout=0.5)
    async def flaky() -> AsyncIterator[int]:
        nonlocal attempts
        attempts += 1
        number = attempts
        yield number
        lines.append(f"disposed {number}")

    async with orch.start() as running:
        assert running["flaky"] == 3
        assert lines == ["disposed 1", "disposed 2"]
    assert lines == ["disposed 1", "disposed 2", "disposed 3"]


async def test_teardown_error_of_the_unready_service_is_reported() -> None:
    orch = pk.Orchestrator()

    @orch.service(ready=lambda: False, timeout=0.05)
    async def engine() -> AsyncIterator[str]:
        yield "engine"
        raise OSError("dispose failed")

    with pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pytest.fail("not reached")
    assert isinstance(info.value.__cause__, TimeoutError)
    [(name, exc)] = info.value.teardown_errors
    assert name == "engine"
    assert isinstance(exc, OSError)


# -- 15.3 a process that exits before it is ready ---------------------------------------------
async def test_process_exit_before_ready_is_the_cause() -> None:
    orch = pk.Orchestrator(output=lambda *a: None)
    script = (
        "import sys\n"
        "print('loading config')\n"
        "print('error: port 3000 in use', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    orch.process("web", [PY, "-c", script], ready=lambda: False, timeout=30)
    with anyio.fail_after(20), pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pytest.fail("not reached")
    cause = info.value.__cause__
    assert isinstance(cause, pk.ProcessError)
    assert isinstance(cause, subprocess.CalledProcessError)
    assert cause.returncode == 3
    assert cause.name == "web"
    text = str(cause)
    assert "exited with code 3" in text
    assert "loading config" in text
    assert "[stderr] error: port 3000 in use" in text
    assert "exited with code 3" in str(info.value)


# -- 15.6 a second signal shortens waits, never reorders or skips -----------------------------
async def test_second_sigterm_keeps_the_stop_order_in_process() -> None:
    orch = pk.Orchestrator()
    lines: list[str] = []
    ready, api_stopping = anyio.Event(), anyio.Event()

    # a stop that begins after the second signal is immediate (cancelled at its first
    # wait), but still begins in its turn, once
    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        lines.append("db down")
        await anyio.lowlevel.checkpoint()
        lines.append("db finished")  # pragma: no cover (cancelled above)

    @orch.service
    async def cache(db: str) -> AsyncIterator[str]:
        yield "cache"
        lines.append("cache down")
        await anyio.lowlevel.checkpoint()
        lines.append("cache finished")  # pragma: no cover (cancelled above)

    @orch.service
    async def api(cache: str) -> AsyncIterator[str]:
        yield "api"
        api_stopping.set()
        try:
            await anyio.sleep_forever()  # a stuck tear-down: the second signal cuts it
        finally:
            lines.append("api cut short")

    async def drive() -> None:
        await ready.wait()
        os.kill(os.getpid(), signal.SIGTERM)
        await api_stopping.wait()  # graceful stop under way, stuck in api
        os.kill(os.getpid(), signal.SIGTERM)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drive)
            await orch.serve(signals=(signal.SIGTERM,), on_ready=lambda _running: ready.set())
    assert lines == ["api cut short", "cache down", "db down"]


async def test_signal_during_start_runs_the_code_after_yield() -> None:
    log, orch = Log(), pk.Orchestrator()
    log.service(orch, "db")
    reached = log.service(orch, "api", "db", ready=lambda: False)

    async def drive() -> None:
        await reached.wait()
        os.kill(os.getpid(), signal.SIGTERM)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drive)
            await orch.serve(signals=(signal.SIGTERM,))  # the start aborted: returns

    assert log.downs() == ["api", "db"]


# -- 15.10 an error the caller receives is not also logged ------------------------------------
def parallelkit_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("parallelkit")]


async def test_startup_error_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @orch.service
    async def api(db: str) -> str:
        raise ConnectionError("config server down")

    with caplog.at_level(logging.DEBUG), pytest.raises(pk.StartupError):
        async with orch.start():
            pytest.fail("not reached")
    assert [
        r for r in parallelkit_records(caplog) if r.exc_info or r.levelno >= logging.ERROR
    ] == []


async def test_crash_and_teardown_errors_logged_only_when_nobody_receives_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        raise OSError("flush failed")

    with caplog.at_level(logging.DEBUG), pytest.raises(ExceptionGroup):  # raised: not logged
        async with orch.start():
            pass
    assert [r for r in parallelkit_records(caplog) if r.exc_info] == []

    # the body's own error is raised; the tear-down error is not: it is logged, once
    with caplog.at_level(logging.DEBUG), pytest.raises(ZeroDivisionError):
        async with orch.start():
            1 / 0  # noqa: B018
    logged = [r for r in parallelkit_records(caplog) if r.exc_info]
    assert len(logged) == 1
    assert "'db' failed to stop cleanly" in logged[0].getMessage()


async def test_non_critical_crash_is_logged_critical_crash_is_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    orch = pk.Orchestrator()
    crashed = anyio.Event()

    def dying(message: str) -> Any:
        async def lifetime() -> AsyncIterator[str]:
            async with anyio.create_task_group() as tg:

                async def die() -> None:
                    crashed.set()
                    raise RuntimeError(message)

                tg.start_soon(die)
                yield message

        return lifetime

    orch.service(name="optional", critical=False)(dying("optional died"))
    with caplog.at_level(logging.DEBUG):
        async with orch.start() as running:
            await crashed.wait()
            with anyio.fail_after(10):
                while running.state("optional") != "crashed":
                    await anyio.sleep(0.001)
    [record] = [r for r in parallelkit_records(caplog) if r.exc_info]
    assert "'optional' crashed" in record.getMessage()

    caplog.clear()
    orch2 = pk.Orchestrator()
    orch2.service(name="vital")(dying("vital died"))
    with caplog.at_level(logging.DEBUG), pytest.raises(RuntimeError, match="vital died"):
        async with orch2.start():
            await anyio.sleep_forever()
    assert [r for r in parallelkit_records(caplog) if r.exc_info] == []


if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup


async def test_a_setup_error_raised_while_the_start_is_cancelled_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """b's set-up turns the cancellation into its own error while a's failure rolls the
    start-up back: nobody receives b's error, so it is logged, not dropped."""
    orch = pk.Orchestrator("app")
    b_waiting = anyio.Event()

    @orch.service
    async def a() -> AsyncIterator[str]:
        await b_waiting.wait()
        raise ConnectionError("a is down")
        yield "a"  # pragma: no cover

    @orch.service
    async def b() -> AsyncIterator[str]:
        try:
            b_waiting.set()
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            raise RuntimeError("b gave up") from None
        yield "b"  # pragma: no cover

    with (
        caplog.at_level(logging.WARNING, logger="parallelkit"),
        pytest.raises(pk.StartupError) as info,
    ):
        async with orch.start():
            pytest.fail("body must not run")
    assert info.value.service == "a"
    records = parallelkit_records(caplog)
    logged = [r for r in records if "while its start was cancelled" in r.message]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert str(logged[0].exc_info[1]) == "b gave up"
