"""Fault-path review of the Orchestrator: what came out of probing it from outside.

1. asyncio: a readiness check that raises a ``CancelledError`` nothing caused (it
   awaited a future cancelled elsewhere) is a failed check, "not ready", with a
   reason; it used to end the service's task as if cancelled, which anyio's task
   group answers by cancelling the whole start without a word: ``async with
   orch.start()`` raised ``RuntimeError: generator didn't yield``, and an awaited
   ``running.health()`` said ``"ok"`` for a probe that had failed.
2. asyncio: a ``Task.cancel()`` of one service's task before it is ready (in its set-up
   or its probe; a watchdog, a driver) fails the start with a ``StartupError`` naming
   it, after the rollback; it too ended in ``RuntimeError: generator didn't yield``.
   A stray ``CancelledError`` in the tear-down of a service that crashed lost the
   crash ("ended while running", no cause, nothing logged): it is the tear-down's
   error, the crash in its chain.
3. A callable object that cannot be hashed (a dataclass with an async ``__call__``)
   registered as a service raised ``TypeError: unhashable type`` *after* registering
   it (half done: registering it again was a duplicate); a function registered under
   two names was looked up by ``running.get(fn)`` as the last one, silently.
4. ``running.get(name, expected)`` checks ``expected`` at the door, not after a lookup
   that may fail first with a ``KeyError``.
5. A process that dies after printing long lines (a progress bar, binary) made its
   ``ProcessError`` (and the ``StartupError``) hundreds of kilobytes long: each line of
   the tail is cut to 1,000 characters (the output itself is passed on whole).
6. The readiness wait of a process whose timeout ran out on the way to its first check
   (a real clock moves on between two readings) is a ``TimeoutError``, not a
   ``ValueError`` about an argument the user never passed.
7. ``ManagedProcess.send_signal(True)`` sent SIGHUP (a bool is an int to Python); a
   signal that is not one is a ``TypeError``/``ValueError`` naming ``signum``.
8. ``Orchestrator(output=fn)`` took a function that cannot be called as ``fn(name,
   stream, line)`` (it crashed the process service at its first line), or an async one
   (each line's coroutine never awaited: the output lost); refused at the door now.
9. A request's view of the services (``parallelkit.asgi``) said ``"db" in view`` for
   a torn-down service its ``view["db"]`` refuses (``NotServed``), and ``view.items()``
   raised half-way: it lists only what it can serve.
10. ``orch.process(..., depends_on=["db", "db"])`` made two edges (``waited_for`` said
    ``('db', 'db')``): a name given twice is one dependency.

No real elapsed time is asserted: virtual time (``tests/virtual_time.py``, trio's
``MockClock``), events and counters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from typing import Any

import anyio
import pytest

import parallelkit as pk
from parallelkit._orchestrator.process import ManagedProcess, process_ready
from tests.virtual_time import run_virtual

BACKENDS = ["asyncio", "trio"]
#: asyncio only (trio has no stray cancellations); Python 3.10 cannot tell one
STRAY = pytest.mark.skipif(sys.version_info < (3, 11), reason="no Task.cancelling()")

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]


async def _stray_cancellation() -> None:
    """Await a future that something else cancelled: a CancelledError nothing caused."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.cancel()
    await future


# -- 1. a stray CancelledError in a readiness check is "not ready" (asyncio) ----------------
@STRAY
def test_a_stray_cancellation_in_a_probe_fails_the_start_with_its_reason() -> None:
    torn_down: list[str] = []

    async def main() -> None:
        orch = pk.Orchestrator()

        async def check(_value: object) -> bool:
            await _stray_cancellation()
            return True

        @orch.service
        async def db() -> Any:
            yield "db"
            torn_down.append("db")

        @orch.service(ready=check, timeout=5)
        async def cache(db: str) -> Any:
            yield "cache"
            torn_down.append("cache")

        with pytest.raises(pk.StartupError) as info:
            async with orch.start():
                raise AssertionError("never reached")
        assert info.value.service == "cache"
        cause = info.value.__cause__
        assert isinstance(cause, TimeoutError)
        assert "CancelledError, but nothing cancelled the check" in str(cause)

    run_virtual(main, "asyncio")
    assert torn_down == ["cache", "db"]  # each once, in reverse order


@STRAY
def test_a_stray_cancellation_in_a_probe_makes_an_awaited_health_not_ok() -> None:
    async def main() -> None:
        orch = pk.Orchestrator()
        checks = 0

        async def check(_value: object) -> bool:
            nonlocal checks
            checks += 1
            if checks > 1:  # passes at start-up, then its check fails this way
                await _stray_cancellation()
            return True

        @orch.service(ready=check)
        async def search() -> str:
            return "search"

        async with orch.start() as running:
            health = await running.health()
            assert health.status == "failing"
            assert not health.services["search"].ok
            reason = health.services["search"].reason
            assert reason is not None
            assert "nothing cancelled the check" in reason

    run_virtual(main, "asyncio")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cancellation_of_the_caller_still_goes_through_a_probe(backend: str) -> None:
    """The stray-cancellation rule does not catch a real one: a caller's deadline
    still ends a start waiting on a probe that never passes."""
    torn_down: list[str] = []

    async def main() -> None:
        orch = pk.Orchestrator()

        @orch.service(ready=lambda: False)
        async def db() -> Any:
            yield "db"
            torn_down.append("db")

        with anyio.move_on_after(3) as scope:
            async with orch.start():
                raise AssertionError("never reached")
        assert scope.cancelled_caught

    run_virtual(main, backend)
    assert torn_down == ["db"]


# -- 2. a Task.cancel() of a service's task before it is ready (asyncio) ---------------------
@pytest.mark.parametrize("where", ["set-up", "probe"])
def test_a_task_cancel_of_a_service_before_it_is_ready_is_a_startup_error(where: str) -> None:
    torn_down: list[str] = []

    async def main() -> None:
        orch = pk.Orchestrator()
        tasks: list[asyncio.Task[Any]] = []

        @orch.service
        async def db() -> Any:
            yield "db"
            torn_down.append("db")

        def cancel_its_task() -> bool:
            tasks[0].cancel()  # a watchdog (or a driver) cancelling "its" task
            return False

        @orch.service(ready=cancel_its_task if where == "probe" else None)
        async def api(db: str) -> Any:
            task = asyncio.current_task()
            assert task is not None
            tasks.append(task)
            if where == "set-up":
                cancel_its_task()
                await asyncio.sleep(0)
            yield "api"
            torn_down.append("api")  # reached its yield: torn down once

        with pytest.raises(pk.StartupError) as info:
            async with orch.start():
                raise AssertionError("never reached")
        assert info.value.service == "api"
        assert isinstance(info.value.__cause__, RuntimeError)
        assert "ended before it was ready" in str(info.value.__cause__)
        assert "Task.cancel()" in str(info.value.__cause__)

    run_virtual(main, "asyncio")
    assert torn_down == (["api", "db"] if where == "probe" else ["db"])


@STRAY
def test_a_stray_cancellation_in_the_tear_down_of_a_crashed_service_keeps_the_crash() -> None:
    """The crash was lost: "service 'db' ended while running", no cause, nothing logged."""
    stopped: list[str] = []

    async def main() -> None:
        orch = pk.Orchestrator()

        @orch.service
        async def db() -> Any:
            try:
                async with anyio.create_task_group() as tg:

                    async def pool_watchdog() -> None:
                        await anyio.sleep(1)
                        raise ConnectionError("pool lost")

                    tg.start_soon(pool_watchdog)
                    yield "db"
            finally:
                await _stray_cancellation()  # a driver's close on a dead connection

        @orch.service
        async def api(db: str) -> Any:
            yield "api"
            stopped.append("api")

        with pytest.raises(RuntimeError) as info:
            async with orch.start():
                await anyio.sleep(10)
        assert "service 'db': its tear-down raised CancelledError" in str(info.value)
        seen: list[BaseException] = []
        error: BaseException | None = info.value
        while error is not None:  # the crash is in the chain, printed with it
            seen.append(error)
            error = error.__cause__ or error.__context__
        crashes = [e for e in seen if isinstance(e, BaseExceptionGroup)]
        assert crashes
        assert isinstance(crashes[0].exceptions[0], ConnectionError)

    run_virtual(main, "asyncio")
    assert stopped == ["api"]


# -- 3. what running.get(fn) can tell apart ---------------------------------------------------
@dataclasses.dataclass
class _Factory:
    """A callable object that cannot be hashed (a dataclass's ``__eq__`` removes it)."""

    dsn: str

    async def __call__(self) -> str:
        return self.dsn


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unhashable_service_callable_registers_whole_and_runs(backend: str) -> None:
    orch = pk.Orchestrator()
    factory = _Factory("sqlite://")
    assert orch.service(name="db")(factory) is factory  # was: TypeError: unhashable type
    assert list(orch.services) == ["db"]

    async def main() -> None:
        async with orch.start() as running:
            assert running["db"] == "sqlite://"
            with pytest.raises(KeyError, match="is not a service of this orchestrator"):
                running.get(factory)

    run_virtual(main, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_function_registered_under_two_names_is_looked_up_by_name(backend: str) -> None:
    orch = pk.Orchestrator()

    async def worker() -> str:
        return "worker"

    orch.service(name="mail")(worker)
    orch.service(name="sms")(worker)

    async def main() -> None:
        async with orch.start() as running:
            # was: the value of "sms", silently (the last one registered)
            with pytest.raises(KeyError, match=r"registered as services 'mail', 'sms'"):
                running.get(worker)
            assert running.get("mail") == running.get("sms") == "worker"

    run_virtual(main, backend)


# -- 4. running.get: expected is checked before the lookup ------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_expected_is_a_type_error_before_the_lookup(backend: str) -> None:
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> str:
        return "db"

    async def main() -> None:
        async with orch.start() as running:
            with pytest.raises(TypeError, match="expected must be a class, got 'str'"):
                running.get("nope", "str")  # type: ignore[call-overload]
            with pytest.raises(TypeError, match="expected must be a class"):
                running.get(db, "str")  # type: ignore[call-overload]
            assert running.get("db", str) == "db"

    run_virtual(main, backend)


# -- 5. the tail of a process that printed long lines stays short ------------------------------
@pytest.mark.slow
@pytest.mark.anyio
async def test_the_error_of_a_process_that_printed_long_lines_stays_short() -> None:
    lines: list[str] = []
    orch = pk.Orchestrator(output=lambda _name, _stream, line: lines.append(line))
    program = (
        "import sys\n"
        "print('starting')\n"
        "sys.stdout.write('#' * 300000 + '\\n')\n"
        "sys.stderr.write('E' * 5000 + '\\n')\n"
        "sys.exit(3)\n"
    )
    orch.process("job", [sys.executable, "-c", program], ready=lambda: False, timeout=30)
    with pytest.raises(pk.StartupError) as info:
        async with orch.start():
            raise AssertionError("never reached")
    error = info.value.__cause__
    assert isinstance(error, pk.ProcessError)
    assert error.returncode == 3
    assert len(str(error)) < 20_000  # was over 300,000 characters
    assert len(str(info.value)) < 20_000
    assert error.tail[0] == "starting"
    assert all(len(line) <= 1100 for line in error.tail)
    assert "[stderr] " + "E" * 1000 + "... [4000 more characters]" in error.tail
    # the output itself is passed on whole (in pieces of at most 64 KiB)
    assert sum(len(line) for line in lines if line.startswith("#")) == 300000


# -- 6. a readiness wait whose time ran out on the way is a TimeoutError ------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_process_readiness_wait_past_its_deadline_is_a_timeout(backend: str) -> None:
    async def main() -> None:
        process = ManagedProcess("web", "true")
        probe = pk.probes.call(lambda: False)
        # the deadline passed between the caller's reading of the clock and this one's
        with pytest.raises(TimeoutError, match="timeout ran out before its first check"):
            await process_ready(probe, process, anyio.current_time() - 0.001)

    run_virtual(main, backend)


# -- 7. ManagedProcess.send_signal checks its argument ------------------------------------------
@pytest.mark.parametrize(
    ("signum", "error"),
    [
        (True, TypeError),
        ("TERM", TypeError),
        (None, TypeError),
        (1.5, TypeError),
        (99999, ValueError),
    ],
)
def test_send_signal_refuses_what_is_not_a_signal_naming_signum(
    signum: object, error: type[Exception]
) -> None:
    # True was SIGHUP to the whole group (an int to Python); the others failed unnamed
    # in os.killpg, or not at all while no process ran
    process = ManagedProcess("web", "true")
    with pytest.raises(error, match=r"^signum must be a signal number"):
        process.send_signal(signum)  # type: ignore[arg-type]


# -- 8. Orchestrator(output=fn): a function it cannot call is refused at the door ------------
async def _async_output(name: str, stream: str, line: str) -> None:
    """Called for each line, never awaited: every line lost."""


@pytest.mark.parametrize(
    ("output", "match"),
    [
        (lambda line: None, r"cannot be called with 3 arguments"),
        (_async_output, r"it is called, never awaited"),
    ],
    ids=["one-argument", "async"],
)
def test_an_output_function_it_cannot_call_is_a_type_error_naming_output(
    output: Any, match: str
) -> None:
    # was taken, and failed (or lost the line) at the process's first line of output
    with pytest.raises(TypeError, match=r"^output must be a function \(name, stream, line\)"):
        pk.Orchestrator(output=output)
    with pytest.raises(TypeError, match=match):
        pk.Orchestrator(output=output)


def test_output_functions_it_can_call_are_still_taken() -> None:
    for output in (print, lambda *parts: None, lambda name, stream, line, extra=0: None):
        pk.Orchestrator(output=output)


# -- 9. a request's view lists only what it can serve -------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_request_view_does_not_list_a_torn_down_service(backend: str) -> None:
    async def main() -> None:
        orch = pk.Orchestrator()

        @orch.service
        async def db() -> Any:
            yield "engine"

        async with orch.start() as running:
            view = running._served()  # what parallelkit.asgi hands a request
            assert "db" in view
            assert view.items() == [("db", "engine")]
        # was: "db" in view, and view.items() raised NotServed half-way
        assert "db" not in view
        assert (list(view), len(view), view.items()) == ([], 0, [])
        with pytest.raises(pk.NotServed):
            view["db"]
        assert "db" in running  # the Running itself still lists it, with its value
        assert running["db"] == "engine"

    run_virtual(main, backend)


# -- 10. a dependency named twice is one dependency --------------------------------------------
@pytest.mark.slow
@pytest.mark.anyio
async def test_a_process_dependency_named_twice_is_waited_for_once() -> None:
    orch = pk.Orchestrator(output=lambda *_line: None)

    @orch.service
    async def settings() -> str:
        return "settings"

    orch.process("worker", [sys.executable, "-c", "pass"], depends_on=["settings", "settings"])
    assert orch.services["worker"].depends_on == ("settings",)
    async with orch.start() as running:
        assert running.timeline["worker"].waited_for == (
            "settings",
        )  # was ('settings', 'settings')
