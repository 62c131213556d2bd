"""Review of the trio "stray cancellation" rule (``_core/backend.is_stray_cancellation``)
and of the orchestrator's fault fixes that lean on it; each test on asyncio and trio.

1. trio: the rule read ``trio.current_effective_deadline() != -inf``. A shield hides
   the cancelled scopes outside it, so a *real* ``Cancelled`` looked at behind one
   (in a shielded clean-up, or once a shield went up around the code that is
   unwinding) was taken for a stray one: a failure. ``SWRCache``: a caller joining
   the load of a cancelled leader while the loader's clean-up runs (its wait shields
   the leader's load) got the leader's ``Cancelled`` raised at it as the load's error,
   instead of a load of its own (it crashed its task group). The rule now walks every
   scope around the task, shielded or not.
2. The readiness reason for a stray cancellation named ``CancelledError`` on trio too.
3. Guards (these passed before): a kept ``Cancelled`` raised again where nothing is
   cancelled is still a failure (pool, probe, a crashed service's tear-down); real
   cancellations that meet shielded clean-ups in set-ups and probes still cancel.

No real elapsed time is asserted: virtual time (``tests/virtual_time.py``), events.
"""

from __future__ import annotations

import signal
import sys
import warnings
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk
from parallelkit._core.backend import is_failure, is_stray_cancellation
from parallelkit._orchestrator.process import ManagedProcess
from tests.virtual_time import run_virtual

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

BACKENDS = ["asyncio", "trio"]
#: asyncio cannot tell a stray CancelledError without Task.cancelling() (3.11+)
NEEDS_CANCELLING = pytest.mark.skipif(sys.version_info < (3, 11), reason="no Task.cancelling()")


async def _kept_cancellation() -> BaseException:
    """A cancellation exception of a scope that has ended: raised again, nothing
    cancelled the task that raises it (a stray one, on both backends)."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.sleep(1)
        except anyio.get_cancelled_exc_class() as exc:
            kept = exc
            raise
    await anyio.lowlevel.checkpoint()
    return kept


# -- 1. a real cancellation looked at behind a shield -----------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["this task", "a child task"])
def test_a_cancellation_looked_at_behind_a_shield_is_no_failure(backend: str, where: str) -> None:
    seen: list[tuple[bool, bool]] = []

    async def look() -> None:
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class() as exc:
            with anyio.CancelScope(shield=True):  # a clean-up that must finish
                await anyio.lowlevel.checkpoint()
                seen.append((is_failure(exc), is_stray_cancellation(exc)))
            raise

    async def main() -> None:
        with anyio.CancelScope() as scope:
            if where == "this task":
                scope.cancel()
                await look()
            else:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(look)
                    await anyio.lowlevel.checkpoint()
                    scope.cancel()
        assert scope.cancelled_caught

    run_virtual(main, backend)
    assert seen == [(False, False)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deadline_looked_at_behind_a_shield_is_no_failure(backend: str) -> None:
    seen: list[bool] = []

    async def main() -> None:
        with anyio.move_on_after(1) as scope:
            try:
                await anyio.sleep(10)
            except anyio.get_cancelled_exc_class() as exc:
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(1)  # a bounded clean-up, past the deadline
                    seen.append(is_failure(exc))
                raise
        assert scope.cancelled_caught

    run_virtual(main, backend)
    assert seen == [False]


@NEEDS_CANCELLING
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kept_cancellation_is_still_stray_behind_a_shield(backend: str) -> None:
    """The other side: nothing cancelled, shield or not, the kept one is a failure."""
    seen: list[bool] = []

    async def main() -> None:
        kept = await _kept_cancellation()
        seen.append(is_failure(kept))
        with anyio.CancelScope(shield=True):
            await anyio.lowlevel.checkpoint()
            seen.append(is_failure(kept))

    run_virtual(main, backend)
    assert seen == [True, True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_caller_joining_a_cancelled_leaders_clean_up_loads_for_itself(backend: str) -> None:
    """SWRCache (not entered: the first caller leads the load in its own task). The
    leader is cancelled; its loader's clean-up is shielded; a second caller joins
    meanwhile (its wait shields the leader's load). The leader's ``Cancelled`` was
    kept as the load's error (trio) and raised at the second caller."""
    got: dict[str, Any] = {}

    async def main() -> None:
        cache = pk.SWRCache(fresh=60, stale=0)
        started, cleaning, finish = anyio.Event(), anyio.Event(), anyio.Event()

        async def loader(_key: str) -> str:
            started.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):  # closing its connection
                    cleaning.set()
                    await finish.wait()
                raise
            return "never"  # pragma: no cover

        async def own_loader(_key: str) -> str:
            return "loaded by the second caller"

        async def leader(scope: anyio.CancelScope) -> None:
            with scope:
                got["leader"] = await cache.get("k", loader)
            got["leader cancelled"] = scope.cancelled_caught

        async def second() -> None:
            got["second"] = await cache.get("k", own_loader)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "SWRCache is not entered"
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()
                tg.start_soon(leader, scope)
                await started.wait()
                scope.cancel()
                await cleaning.wait()
                tg.start_soon(second)
                await anyio.sleep(0.1)  # the second caller waits for the load
                finish.set()

    run_virtual(main, backend)
    assert got == {"leader cancelled": True, "second": "loaded by the second caller"}


# -- 2./3. orchestrator ----------------------------------------------------------------------
@NEEDS_CANCELLING
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kept_cancellation_in_a_probe_is_not_ready_with_its_own_name(backend: str) -> None:
    torn_down: list[str] = []

    async def main() -> None:
        orch = pk.Orchestrator()

        async def check(_value: object) -> bool:
            raise await _kept_cancellation()

        @orch.service(ready=check, timeout=5)
        async def db() -> Any:
            yield "db"
            torn_down.append("db")

        with pytest.raises(pk.StartupError) as info:
            async with orch.start():
                raise AssertionError("never reached")
        assert info.value.service == "db"
        cause = info.value.__cause__
        assert isinstance(cause, TimeoutError)
        name = anyio.get_cancelled_exc_class().__name__  # CancelledError, Cancelled
        assert f"{name}, but nothing cancelled the check" in str(cause)

    run_virtual(main, backend)
    assert torn_down == ["db"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["set-up", "probe"])
def test_a_deadline_meeting_a_shielded_clean_up_still_cancels_the_start(
    backend: str, where: str
) -> None:
    """A real cancellation that the service's code cleans up behind a shield: no
    StartupError, nothing logged as an error; the caller's scope caught it."""
    torn_down: list[str] = []

    async def slow() -> bool:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await anyio.sleep(1)
            raise
        return True  # pragma: no cover

    async def main() -> None:
        orch = pk.Orchestrator()

        @orch.service(ready=slow if where == "probe" else None)
        async def db() -> Any:
            if where == "set-up":
                await slow()
            yield "db"
            torn_down.append("db")

        with anyio.move_on_after(3) as scope:
            async with orch.start():
                raise AssertionError("never reached")
        assert scope.cancelled_caught

    run_virtual(main, backend)
    assert torn_down == (["db"] if where == "probe" else [])


@NEEDS_CANCELLING
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kept_cancellation_in_a_crashed_services_tear_down_keeps_the_crash(
    backend: str,
) -> None:
    """The trio twin of ``test_orchestrator_review``'s asyncio test (0eeabb9's
    ``raised is crash``): the tear-down's stray cancellation is its error, the crash
    in its chain; a cancellation of the body (by the crash) does not hide it."""
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
                raise await _kept_cancellation()  # a driver's close gone wrong

        @orch.service
        async def api(db: str) -> Any:
            yield "api"
            stopped.append("api")

        with pytest.raises(RuntimeError) as info:
            async with orch.start():
                await anyio.sleep(10)
        name = anyio.get_cancelled_exc_class().__name__
        assert f"service 'db': its tear-down raised {name}" in str(info.value)
        seen: list[BaseException] = []
        error: BaseException | None = info.value
        while error is not None:
            seen.append(error)
            error = error.__cause__ or error.__context__
        crashes = [e for e in seen if isinstance(e, BaseExceptionGroup)]
        assert crashes
        assert isinstance(crashes[0].exceptions[0], ConnectionError)

    run_virtual(main, backend)
    assert stopped == ["api"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pool_unit_cleaning_up_behind_a_shield_is_cancelled_not_failed(backend: str) -> None:
    """pk.map under a deadline: units that clean up behind a shield end cancelled (the
    caller's scope catches it); none is a failed Outcome."""

    async def unit(x: int) -> int:
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await anyio.sleep(1)
            raise
        return x  # pragma: no cover

    async def main() -> None:
        with anyio.move_on_after(1) as scope:
            await pk.map(unit, range(3), settle=True)
            raise AssertionError("never reached")
        assert scope.cancelled_caught

    run_virtual(main, backend)


@NEEDS_CANCELLING
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kept_cancellation_raised_by_the_body_of_start_is_not_swallowed(backend: str) -> None:
    """``async with orch.start(): ...`` whose body raises a cancellation nothing caused
    (asyncio: it awaited a future cancelled elsewhere): the services' task group took
    it for its own cancellation and the block ended as if the body had finished."""
    torn_down: list[str] = []
    after: list[str] = []

    async def main() -> None:
        orch = pk.Orchestrator()

        @orch.service
        async def db() -> Any:
            yield "db"
            torn_down.append("db")

        kept = await _kept_cancellation()
        with pytest.raises(anyio.get_cancelled_exc_class()) as info:
            async with orch.start():
                raise kept
            after.append("the block ended normally")  # type: ignore[unreachable]
        assert info.value is kept

    run_virtual(main, backend)
    assert torn_down == ["db"]
    assert after == []


# -- an owner's body (_core/owned.py: is_failure asked before the task group is cancelled)
@NEEDS_CANCELLING
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("owner", ["SWRCache", "BatchLoader"])
def test_a_kept_cancellation_raised_by_an_owners_body_is_not_swallowed(
    backend: str, owner: str
) -> None:
    async def load_many(keys: list[int]) -> list[int]:
        return keys  # pragma: no cover

    async def main() -> None:
        kept = await _kept_cancellation()
        made: Any = pk.SWRCache() if owner == "SWRCache" else pk.BatchLoader(load_many)
        with pytest.raises(anyio.get_cancelled_exc_class()) as info:
            async with made:
                raise kept
        assert info.value is kept

    run_virtual(main, backend)


# -- 0eeabb9: send_signal's new check ----------------------------------------------------------
@pytest.mark.skipif(not hasattr(signal, "SIGRTMIN"), reason="no real-time signals")
def test_send_signal_takes_a_real_time_signal() -> None:
    """``signal.Signals`` lists SIGRTMIN and SIGRTMAX only: ``SIGRTMIN + 1`` (a real
    signal, os.killpg sends it) was refused as "no signal has that number"."""
    process = ManagedProcess("web", "true")
    process.send_signal(signal.SIGRTMIN + 1)  # not running: a no-op, as for SIGTERM
    process.send_signal(signal.SIGKILL)
    with pytest.raises(ValueError, match=r"^signum must be a signal number"):
        process.send_signal(0)


@NEEDS_CANCELLING
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kept_cancellation_in_a_set_up_is_a_startup_error_saying_how(backend: str) -> None:
    """Change 1 reaches the set-up on trio: a StartupError whose cause says what
    happened on this backend (the hint named only asyncio's futures)."""

    async def main() -> None:
        orch = pk.Orchestrator()

        @orch.service
        async def db() -> Any:
            raise await _kept_cancellation()
            yield "db"  # type: ignore[unreachable]  # pragma: no cover

        with pytest.raises(pk.StartupError) as info:
            async with orch.start():
                raise AssertionError("never reached")
        assert info.value.service == "db"
        cause = str(info.value.__cause__)
        name = anyio.get_cancelled_exc_class().__name__
        assert f"its set-up raised {name}, but nothing cancelled it" in cause
        assert ("future" in cause) == (backend == "asyncio")

    run_virtual(main, backend)
