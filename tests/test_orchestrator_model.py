"""pk.Orchestrator under model-based randomized fault injection, on virtual time.

Each example builds a random service graph (async generators, async context
managers, plain async functions; probes that pass late, never, or raise; set-up
that fails, hangs or is slow; tear-down that fails, hangs or is slow; a service
that crashes after its ``yield``; critical and non-critical services) and runs it
with a caller that may be cancelled at any time, checking the Teardown,
StartupError and "logged once" rules of the design against what happened.

Times never race: a set-up or probe that succeeds takes a multiple of 4 seconds, a
failure (a set-up error, a timeout) happens 1 modulo 4 after the service's start,
the caller is cancelled at 2 modulo 4, a crash comes 3 modulo 4 after the ``yield``.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

import parallelkit as pk

from .test_fanout import live_tasks
from .virtual_time import run_virtual

BACKENDS = ["asyncio", "trio"]
GUARD = 1_000.0
NEVER = 62.0  # a caller cancellation after everything else (2 modulo 4)
PROPERTY = settings(
    derandomize=True,
    max_examples=int(os.environ.get("ORCH_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Svc:
    deps: tuple[int, ...]
    shape: str  # gen | cm | value
    setup: int  # seconds (multiple of 4 when it succeeds)
    fault: str | None  # None | raise | hang
    probe: str | None  # None | late | never | raise
    late: int
    timeout: float | None
    critical: bool
    down: int  # tear-down seconds
    down_fault: str | None  # None | raise | hang
    crash: int | None  # seconds after the yield (3 mod 4)


@dataclass(frozen=True)
class Case:
    services: tuple[Svc, ...]
    cancel_at: float | None  # 2 mod 4
    body: int  # multiple of 4
    body_raises: bool


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(1, 6))
    services = []
    for i in range(n):
        deps = tuple(sorted(draw(st.sets(st.integers(0, i - 1), max_size=2)))) if i else ()
        shape = draw(st.sampled_from(["gen", "gen", "cm", "value"]))
        fault = draw(st.sampled_from([None, None, None, "raise", "hang"]))
        setup = draw(st.sampled_from([0, 4])) if fault is None else draw(st.sampled_from([1, 5]))
        probe = draw(st.sampled_from([None, None, "late", "never", "raise"]))
        timeout = draw(st.sampled_from([None, 1, 5, 9, 13]))
        down_fault = draw(st.sampled_from([None, None, "raise", "hang"]))
        crash = draw(st.sampled_from([None, None, None, 3, 7])) if shape != "value" else None
        services.append(
            Svc(
                deps=deps,
                shape=shape,
                setup=setup,
                fault=fault,
                probe=probe,
                late=draw(st.sampled_from([0, 4])),
                timeout=timeout,
                critical=draw(st.booleans() | st.just(True)),
                down=draw(st.sampled_from([0, 4])),
                down_fault=down_fault if shape != "value" else None,
                crash=crash,
            )
        )
    cancel_at = draw(st.none() | st.sampled_from([2.0, 6.0, 10.0, 14.0, 18.0, 30.0]))
    return Case(tuple(services), cancel_at, draw(st.sampled_from([0, 4, 8])), draw(st.booleans()))


STOP_TIMEOUT = 2.0


class TeardownFailed(Exception):
    pass


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []
        self.origin = 0.0

    def add(self, kind: str, name: str) -> None:
        self.events.append((anyio.current_time() - self.origin, kind, name))

    def of(self, kind: str) -> list[str]:
        return [name for _, k, name in self.events if k == kind]

    def index(self, kind: str, name: str) -> int:
        return next(i for i, (_, k, n) in enumerate(self.events) if k == kind and n == name)

    def now(self) -> float:
        return anyio.current_time() - self.origin

    def time(self, kind: str, name: str) -> float:
        return self.events[self.index(kind, name)][0]


def build(case: Case, log: Log, crashes: dict[str, BaseException]) -> pk.Orchestrator:
    orch = pk.Orchestrator()
    for i, svc in enumerate(case.services):
        name = f"s{i}"

        def make(name: str, svc: Svc) -> Any:
            async def setup(values: dict[str, Any]) -> str:
                log.add("setup", name)
                for d in svc.deps:
                    assert values[f"s{d}"] == f"s{d}"
                await anyio.sleep(svc.setup)
                if svc.fault == "raise":
                    log.add("fail", name)
                    raise ConnectionError(name)
                if svc.fault == "hang":
                    await anyio.sleep_forever()
                log.add("up", name)
                return name

            async def teardown() -> None:
                log.add("down", name)
                try:
                    await anyio.sleep(svc.down)
                    if svc.down_fault == "hang":
                        await anyio.sleep_forever()
                except BaseException:
                    log.add("cut", name)
                    raise
                log.add("downed", name)
                if svc.down_fault == "raise":
                    raise TeardownFailed(f"teardown {name}")

            async def crasher() -> None:
                assert svc.crash is not None
                await anyio.sleep(svc.crash)
                log.add("crash", name)
                exc = RuntimeError(f"crash {name}")
                crashes[name] = exc
                raise exc

            async def gen(**values: Any) -> AsyncIterator[str]:
                value = await setup(values)
                try:
                    async with anyio.create_task_group() as tg:
                        if svc.crash is not None:
                            tg.start_soon(crasher)
                        yield value
                        tg.cancel_scope.cancel()
                finally:
                    await teardown()

            async def plain(**values: Any) -> str:
                return await setup(values)

            if svc.shape == "gen":
                return gen
            if svc.shape == "cm":
                return asynccontextmanager(gen)
            return plain

        fn = make(name, svc)
        sig = [inspect.Parameter(f"s{d}", inspect.Parameter.KEYWORD_ONLY) for d in svc.deps]
        fn.__signature__ = inspect.Signature(sig)
        fn.__name__ = fn.__qualname__ = name
        probe = make_probe(svc, name, log) if svc.probe is not None else None
        orch.service(
            ready=probe, timeout=svc.timeout, stop_timeout=STOP_TIMEOUT, critical=svc.critical
        )(fn)
    return orch


def make_probe(svc: Svc, name: str, log: Log) -> pk.probes.Probe:
    state: dict[str, float] = {}

    async def check(value: str) -> bool:
        assert value == name
        if svc.probe == "raise":
            raise LookupError(f"probe {name}")
        if svc.probe == "never":
            return False
        if "at" not in state:
            state["at"] = anyio.current_time() + svc.late
        await anyio.sleep(max(0.0, state["at"] - anyio.current_time()))
        log.add("probed", name)
        return True

    return pk.probes.call(check, name=f"probe {name}")


class Capture(logging.Handler):
    """The records parallelkit logs (kept off the root logger: run_virtual fails on any)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=cases())
def test_a_random_start_up_with_random_faults_keeps_its_promises(backend: str, case: Case) -> None:
    log = Log()
    crashes: dict[str, BaseException] = {}
    snapshots: list[tuple[float, pk.Health, dict[str, str]]] = []
    outcome: dict[str, Any] = {}
    capture = Capture()
    pk_logger = logging.getLogger("parallelkit")
    pk_logger.addHandler(capture)
    pk_logger.propagate = False

    async def main() -> tuple[int, int]:
        orch = build(case, log, crashes)
        before = live_tasks()
        log.origin = anyio.current_time()
        with anyio.fail_after(GUARD):
            with anyio.move_on_after(NEVER if case.cancel_at is None else case.cancel_at):
                try:
                    async with orch.start() as running:
                        outcome["running"] = running
                        outcome["entered"] = anyio.current_time() - log.origin
                        for _ in range(case.body + 1):
                            states = {n: running.state(n) for n in running}
                            snapshots.append((log.now(), running.health(), states))
                            await anyio.sleep(1)
                        if case.body_raises:
                            raise KeyError("body")
                except Exception as exc:
                    outcome["error"] = exc
        outcome["ended"] = log.now()
        await anyio.lowlevel.checkpoint()
        return before, live_tasks()

    try:
        before, after = run_virtual(main, backend)
    finally:
        pk_logger.removeHandler(capture)
        pk_logger.propagate = True
    check(case, log, crashes, snapshots, outcome, capture.records)
    assert after == before  # nothing left running


def crashed_with(error: BaseException | None, crashes: dict[str, BaseException]) -> bool:
    """``error`` is a crash, or its tear-down's error raised while the crash was in flight."""
    if isinstance(error, TeardownFailed):  # the lifetime's own error, over its crash
        return any(str(error) == f"teardown {name}" for name in crashes)
    seen: list[BaseException] = []
    stack = [error] if error is not None else []
    while stack:
        exc = stack.pop()
        if any(exc is e for e in seen):
            continue
        seen.append(exc)
        if any(exc is e for e in crashes.values()):
            return exc is error or isinstance(error, TeardownFailed)
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        if exc.__context__ is not None:
            stack.append(exc.__context__)
    return False


def check(
    case: Case,
    log: Log,
    crashes: dict[str, BaseException],
    snapshots: list[tuple[float, pk.Health, dict[str, str]]],
    outcome: dict[str, Any],
    records: list[logging.LogRecord],
) -> None:
    svcs = {f"s{i}": s for i, s in enumerate(case.services)}
    cancel_at = NEVER if case.cancel_at is None else case.cancel_at
    ups = log.of("up")
    torn = [n for n in ups if svcs[n].shape != "value"]
    downs = log.of("down")
    # every service that reached its yield is torn down exactly once, nothing else is
    assert sorted(downs) == sorted(torn), log.events
    # each tear-down ended (normally or cut short by its stop_timeout)
    for n in downs:
        assert (n in log.of("downed")) != (n in log.of("cut")), (n, log.events)
    # reverse dependency order: a dependent's tear-down ends before its dependency's begins
    # (a service that crashed tears itself down at once: no order with its dependents)
    crashed = set(log.of("crash"))
    for n in downs:
        for d in svcs[n].deps:
            name = f"s{d}"
            if name in downs and name not in crashed:
                end = log.index("downed", n) if n in log.of("downed") else log.index("cut", n)
                assert end < log.index("down", name), (n, name, log.events)
    # nothing is set up after a critical failure was seen (or the caller gave up)
    error = outcome.get("error")
    entered = "entered" in outcome
    reported: list[tuple[str, BaseException]] = []
    if isinstance(error, pk.StartupError):
        assert not entered
        failing = svcs[error.service]
        assert failing.critical
        cause = error.__cause__
        if isinstance(cause, ConnectionError):
            assert str(cause) == error.service
            assert failing.fault == "raise"
            failed_at = log.time("fail", error.service)
        elif isinstance(cause, TimeoutError):
            assert failing.timeout is not None
            failed_at = log.time("setup", error.service) + failing.timeout
        else:
            assert crashed_with(cause, {error.service: crashes[error.service]}), cause
            if isinstance(cause, TeardownFailed):
                reported.append((error.service, cause))
            failed_at = log.time("crash", error.service)
        assert outcome["ended"] >= failed_at
        for t, kind, _name in log.events:
            if kind == "setup":
                assert t <= failed_at, log.events
        # (a crash while a cancelled start unwinds is still raised: failed_at may be later)
        reported += list(error.teardown_errors)
    for t, kind, _name in log.events:
        if kind == "setup":
            assert t <= cancel_at
    if isinstance(error, BaseExceptionGroup) and not isinstance(error, pk.StartupError):
        running = outcome["running"]
        assert list(error.exceptions) == [e for _, e in running.teardown_errors]
        reported += list(running.teardown_errors)
    if error is not None and not isinstance(error, (pk.StartupError, BaseExceptionGroup)):
        # the body's error, or a critical service's crash: raised as itself
        assert entered
        if isinstance(error, KeyError):
            assert case.body_raises
        else:
            assert crashed_with(error, crashes), (error, crashes)
            if isinstance(error, TeardownFailed):  # raised by its tear-down, over the crash
                reported.append(("", error))
    # tear-down errors: reported to the caller or logged, once each, never both
    logged = [
        r.exc_info[1] for r in records if r.exc_info and isinstance(r.exc_info[1], TeardownFailed)
    ]
    raised_downs = [n for n in log.of("downed") if svcs[n].down_fault == "raise"]
    reported_ids = [id(e) for _, e in reported if isinstance(e, TeardownFailed)]
    logged_ids = [id(e) for e in logged]
    assert len(set(reported_ids) | set(logged_ids)) == len(reported_ids) + len(logged_ids), (
        "a tear-down error both raised and logged"
    )
    assert sorted(
        [str(e) for _, e in reported if isinstance(e, TeardownFailed)] + [str(e) for e in logged]
    ) == sorted(f"teardown {n}" for n in raised_downs), (reported, logged, log.events)
    # the health snapshots agree with what the services did
    for _t, health, states in snapshots:
        for n, state in states.items():
            assert health.services[n].state == state
            if state == "ready":
                assert n in ups or svcs[n].shape == "value"
                assert health.services[n].ok
        bad = [h for h in health.services.values() if not h.ok]
        expected = "failing" if any(h.critical for h in bad) else "degraded" if bad else "ok"
        assert health.status == expected
    # after the stop: nothing is ready
    running = outcome.get("running")
    if running is not None:
        after = running.health()
        for n in running:
            assert running.state(n) in ("stopped", "crashed"), (n, running.state(n))
        assert not after.ok or not list(running)
        # the timeline's stop spans: one per started service, dependents first
        stops = {s.name: s for s in running.timeline if s.kind == "stop"}
        starts = {s.name: s for s in running.timeline if s.kind == "start"}
        for n in running:
            assert n in stops, (n, list(stops))
            assert starts[n].start - running.timeline.origin == log.time("setup", n)
            for d in svcs[n].deps:
                if f"s{d}" not in crashed and n not in crashed:
                    assert stops[n].end <= stops[f"s{d}"].start, (n, d, list(running.timeline))


# -- what the property found -------------------------------------------------------------------
def crashing_service(orch: pk.Orchestrator, log: list[str], **options: Any) -> None:
    """A service whose task group fails 3 s after its ``yield``; its tear-down hangs."""

    @orch.service(stop_timeout=STOP_TIMEOUT, **options)
    async def db() -> AsyncIterator[str]:
        try:
            async with anyio.create_task_group() as tg:

                async def crasher() -> None:
                    await anyio.sleep(3)
                    raise RuntimeError("crash db")

                tg.start_soon(crasher)
                yield "db"
                tg.cancel_scope.cancel()
        finally:
            log.append("down")
            try:
                await anyio.sleep_forever()
            finally:
                log.append("cut")


def run_capturing(main: Any, backend: str) -> list[logging.LogRecord]:
    capture = Capture()
    pk_logger = logging.getLogger("parallelkit")
    pk_logger.addHandler(capture)
    pk_logger.propagate = False
    try:
        run_virtual(main, backend)
    finally:
        pk_logger.removeHandler(capture)
        pk_logger.propagate = True
    return capture.records


def failed_start(orch: pk.Orchestrator, backend: str) -> pk.StartupError:
    """The ``StartupError`` that starting ``orch`` raises (on virtual time)."""
    seen: list[pk.StartupError] = []

    async def main() -> None:
        with anyio.fail_after(GUARD):
            try:
                async with orch.start():
                    pytest.fail("the start should have failed")
            except pk.StartupError as exc:
                seen.append(exc)

    run_capturing(main, backend)
    [error] = seen
    return error


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_crash_whose_teardown_hangs_is_bounded_by_stop_timeout(backend: str) -> None:
    """A critical service crashed while running and its code after ``yield`` hung: the
    crash's tear-down ignored ``stop_timeout`` (shielded, no deadline), so the
    orchestrator hung for ever, out of reach even of the caller's own cancellation."""
    log: list[str] = []
    orch = pk.Orchestrator()
    crashing_service(orch, log)
    seen: list[tuple[float, BaseException]] = []

    async def main() -> None:
        with anyio.fail_after(GUARD), anyio.move_on_after(100):
            try:
                async with orch.start():
                    await anyio.sleep(50)
            except RuntimeError as exc:
                seen.append((anyio.current_time(), exc))

    records = run_capturing(main, backend)
    assert log == ["down", "cut"]
    [(ended, error)] = seen
    assert str(error) == "crash db"  # the crash itself, not "ended while running"
    assert ended == pytest.approx(3 + STOP_TIMEOUT)
    assert [r.getMessage() for r in records] == [
        "service 'db' did not stop within stop_timeout=2s; its tear-down was cancelled"
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_crash_before_ready_whose_teardown_is_cut_short_is_the_cause(backend: str) -> None:
    """The service's task group failed while its probe was still waiting, and its
    tear-down was cut short by ``stop_timeout``: the StartupError's cause was "ended
    before it was ready" (a RuntimeError of parallelkit's), the crash was lost."""
    log: list[str] = []
    orch = pk.Orchestrator()

    async def later() -> bool:
        await anyio.sleep(10)
        return True

    crashing_service(orch, log, ready=pk.probes.call(later))
    error = failed_start(orch, backend)
    assert log == ["down", "cut"]
    assert error.service == "db"
    assert isinstance(error.__cause__, RuntimeError)
    assert str(error.__cause__) == "crash db"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_teardown_error_of_a_non_critical_service_that_failed_is_logged(backend: str) -> None:
    """A non-critical service reached its ``yield``, then its probe timed out: its
    tear-down ran and raised, and that error went nowhere (not raised, not logged, not
    in ``teardown_errors``): only the failure to start was logged."""
    error = TeardownFailed("db teardown")
    orch = pk.Orchestrator()

    @orch.service(ready=lambda: False, timeout=1, critical=False)
    async def db() -> AsyncIterator[str]:
        yield "db"
        raise error

    async def main() -> None:
        async with orch.start() as running:
            assert isinstance(running.failed["db"], TimeoutError)

    records = run_capturing(main, backend)
    assert [r.exc_info[1] for r in records if r.exc_info and r.exc_info[1] is error] == [error]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_starts_on_a_service_that_crashed_while_its_teardown_runs(backend: str) -> None:
    """``db`` crashed at 3 s and its tear-down took until its stop_timeout (5 s); ``api``,
    which needs ``db``, became startable at 4 s (when ``cache`` was ready) and was set up
    on the crashed ``db``: the orchestrator heard of the crash only after the tear-down."""
    log: list[str] = []
    orch = pk.Orchestrator()
    crashing_service(orch, log)

    @orch.service
    async def cache() -> str:
        await anyio.sleep(4)
        return "cache"

    @orch.service
    async def api(db: str, cache: str) -> str:
        log.append("api set up")
        return "api"

    error = failed_start(orch, backend)
    assert log == ["down", "cut"]
    assert error.service == "db"
    assert str(error.__cause__) == "crash db"


class Crashed(Exception):
    pass


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["probe times out", "crash", "last retry"])
def test_nothing_starts_while_a_failed_service_tears_down(backend: str, how: str) -> None:
    """``db``'s probe timed out at 1 s; its tear-down then ran for 1.5 s, and only then
    did the orchestrator hear of the failure: ``api``, startable at 2 s (its dependency
    ``cache`` was ready), was set up meanwhile. So too when db's own task group failed
    before it was ready, and when the last attempt of a retried start failed (at 3.5 s,
    torn down until 5 s; ``cache`` ready at 4 s)."""
    log: list[str] = []
    failure = Crashed("db crashed")
    teardown_error = TeardownFailed("db teardown")
    attempts = 2 if how == "last retry" else 1

    async def check() -> bool:
        await anyio.sleep(10)
        return True

    async def crasher() -> None:
        await anyio.sleep(1)
        raise failure

    orch = pk.Orchestrator()

    @orch.service(
        ready=pk.probes.call(check) if how == "crash" else (lambda: False),
        timeout=None if how == "crash" else 1,
        stop_timeout=STOP_TIMEOUT,
        retry=pk.Retry(attempts=attempts, backoff=0) if attempts > 1 else None,
    )
    async def db() -> AsyncIterator[str]:
        log.append("db set up")
        try:
            async with anyio.create_task_group() as tg:
                if how == "crash":
                    tg.start_soon(crasher)
                yield "db"
                tg.cancel_scope.cancel()
        finally:
            log.append("db down")
            await anyio.sleep(1.5)
            log.append("db downed")
            last = log.count("db set up") == attempts
            if last and how != "crash":  # (a crash comes out of the tear-down itself)
                raise teardown_error

    @orch.service
    async def cache() -> str:
        await anyio.sleep(2 if attempts == 1 else 4)
        return "cache"

    @orch.service
    async def api(cache: str) -> str:
        log.append("api set up")
        return "api"

    seen: list[pk.StartupError] = []

    async def main() -> None:
        with anyio.fail_after(GUARD):
            try:
                async with orch.start():
                    pytest.fail("db never ready")
            except pk.StartupError as exc:
                seen.append(exc)

    records = run_capturing(main, backend)
    assert log == ["db set up", "db down", "db downed"] * attempts
    [error] = seen
    assert error.service == "db"
    if how == "crash":
        assert error.__cause__ is failure
    else:
        assert isinstance(error.__cause__, TimeoutError)
    # the failure and the tear-down's error are each reported once: raised, not logged
    assert [r.exc_info[1] for r in records if r.exc_info] == []
    expected = [] if how == "crash" else [teardown_error]
    assert [e for _, e in error.teardown_errors] == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_crash_before_ready_that_the_service_caught_fails_the_start(backend: str) -> None:
    """``db``'s task group failed while its probe waited, and ``db`` caught that error
    (``except*``): its start ended in a cancellation that nothing had asked for, which
    ended the orchestrator's own task group, and ``orch.start()`` raised
    ``RuntimeError: generator didn't yield`` from contextlib, naming no service."""
    orch = pk.Orchestrator()
    caught: list[BaseException] = []

    async def later() -> bool:
        await anyio.sleep(10)
        return True

    async def crasher() -> None:
        await anyio.sleep(1)
        raise ConnectionError("lost")

    @orch.service(ready=pk.probes.call(later))
    async def db() -> AsyncIterator[str]:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(crasher)
                yield "db"
        except BaseExceptionGroup as group:
            caught.append(group)

    error = failed_start(orch, backend)
    assert len(caught) == 1
    assert error.service == "db"
    assert isinstance(error.__cause__, RuntimeError)
    assert "ended before it was ready" in str(error.__cause__)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("last", ["ready", "fails"])
def test_the_teardown_error_of_a_retried_attempt_is_logged(backend: str, last: str) -> None:
    """The first attempt's probe timed out and its tear-down raised; the retry then
    started: that error was kept only until the next attempt's tear-down replaced it,
    and when the next attempt became ready it went nowhere (not raised, not logged)."""
    errors = [TeardownFailed("attempt 1"), TeardownFailed("attempt 2")]
    attempts: list[int] = []
    orch = pk.Orchestrator()

    @orch.service(
        retry=pk.Retry(attempts=2, backoff=0),
        ready=lambda: len(attempts) == 2 and last == "ready",
        timeout=1,
    )
    async def db() -> AsyncIterator[str]:
        attempts.append(len(attempts) + 1)
        number = len(attempts)
        yield "db"
        if number == 1 or last == "fails":
            raise errors[number - 1]

    seen: list[pk.StartupError] = []

    async def main() -> None:
        with anyio.fail_after(GUARD):
            try:
                async with orch.start():
                    pass
            except pk.StartupError as exc:
                seen.append(exc)

    records = run_capturing(main, backend)
    assert attempts == [1, 2]
    logged = [r.exc_info[1] for r in records if r.exc_info]
    assert logged == [errors[0]]  # nobody receives it: logged, once
    if last == "fails":
        [error] = seen
        assert isinstance(error.__cause__, TimeoutError)
        assert [e for _, e in error.teardown_errors] == [errors[1]]
    else:
        assert seen == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("critical", [True, False])
def test_a_second_failure_in_a_failed_start_is_logged(backend: str, critical: bool) -> None:
    """``a`` and ``b`` failed to start at the same moment (or ``b``, not critical, before
    ``a``): the StartupError names one, and the other error went nowhere."""
    orch = pk.Orchestrator()
    errors = {"a": ConnectionError("a"), "b": ConnectionError("b")}

    @orch.service
    async def a() -> str:
        await anyio.sleep(1)
        raise errors["a"]

    @orch.service(critical=critical)
    async def b() -> str:
        await anyio.sleep(1 if critical else 0.5)
        raise errors["b"]

    seen: list[pk.StartupError] = []

    async def main() -> None:
        with anyio.fail_after(GUARD):
            try:
                async with orch.start():
                    pytest.fail("a failed")
            except pk.StartupError as exc:
                seen.append(exc)

    records = run_capturing(main, backend)
    [error] = seen
    other = "b" if error.service == "a" else "a"
    assert error.__cause__ is errors[error.service]
    assert [r.exc_info[1] for r in records if r.exc_info] == [errors[other]]
