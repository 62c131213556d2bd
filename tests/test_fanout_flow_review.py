"""An adversarial review of the fault paths of ``gather`` / ``map`` / ``imap`` /
``Flow`` / ``Limiter`` / ``Retry``: bad arguments of every kind, ``BaseException``s
from items and inputs, inputs that fail mid-way, a caller cancelled at every tick
with a shared limiter, retries and rates on a virtual clock, ``imap`` left early,
Flow signatures, settle mode with skipped steps.

Both anyio backends; trio runs on ``MockClock(autojump_threshold=0)``; nothing here
asserts on real elapsed time.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from trio.testing import MockClock

import parallelkit as pk

BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])
GUARD = 30.0  # a hang guard only


def run(main: Callable[[], Awaitable[Any]], backend: str = "trio") -> Any:
    if backend == "trio":
        clock = MockClock(autojump_threshold=0)
        return anyio.run(main, backend="trio", backend_options={"clock": clock})
    return anyio.run(main, backend="asyncio")


async def ident(x: Any) -> Any:
    await anyio.lowlevel.checkpoint()
    return x


# ------------------------------------------------------------------------ bad arguments
BAD_OPTIONS: list[dict[str, Any]] = [
    {"limit": True},
    {"limit": 0},
    {"limit": -1},
    {"limit": 1.5},
    {"rate": math.nan},
    {"rate": math.inf},
    {"rate": True},
    {"timeout": math.nan},
    {"timeout": math.inf},
    {"timeout": True},
    {"timeout": 0},
    {"settle": 1},
    {"retry": 3},
]


def _named(info: pytest.ExceptionInfo[BaseException], kw: dict[str, Any]) -> None:
    assert next(iter(kw)) in str(info.value), info.value


@BACKENDS
@pytest.mark.parametrize("kw", BAD_OPTIONS)
def test_map_imap_gather_refuse_bad_options_naming_them(backend: str, kw: dict[str, Any]) -> None:
    calls: list[int] = []

    async def item(x: int) -> int:
        calls.append(x)
        return x

    async def main() -> None:
        with pytest.raises((TypeError, ValueError)) as info:
            await pk.map(item, [1], **kw)
        _named(info, kw)
        with pytest.raises((TypeError, ValueError)) as info:
            pk.imap(item, [1], **kw)
        _named(info, kw)
        with pytest.raises((TypeError, ValueError)) as info:
            await pk.gather(item(1), **kw)  # the coroutine is closed: no warning
        _named(info, kw)

    run(main, backend)
    assert calls == []


@pytest.mark.parametrize(
    "kw",
    [
        {"concurrency": True},
        {"concurrency": 0},
        {"concurrency": 1.0},
        {"rate": math.nan},
        {"rate": math.inf},
        {"rate": True},
        {"burst": True},
    ],
)
def test_limiter_refuses_bad_arguments_naming_them(kw: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        pk.Limiter(**kw)
    _named(info, kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"attempts": True},
        {"attempts": 0},
        {"attempts": 1.0},
        {"backoff": math.nan},
        {"backoff": math.inf},
        {"on": 5},
        {"on": (int,)},
        {"on": ()},
    ],
)
def test_retry_refuses_bad_arguments_naming_them(kw: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        pk.Retry(**kw)
    _named(info, kw)


@BACKENDS
def test_flow_refuses_bad_options_naming_them(backend: str) -> None:
    flow = pk.Flow()
    ran: list[str] = []

    @flow.step
    async def a() -> int:
        ran.append("a")
        return 1

    async def main() -> None:
        for kw in ({"limit": True}, {"limit": 0}, {"settle": 1}, {"targets": 5}):
            with pytest.raises((TypeError, ValueError)) as info:
                await flow.run(**kw)  # type: ignore[call-overload]
            _named(info, kw)

    run(main, backend)
    assert ran == []
    for kw in ({"timeout": math.nan}, {"timeout": True}, {"limit": True}, {"retry": 1}):
        with pytest.raises((TypeError, ValueError)) as info:
            pk.Flow().step(**kw)  # type: ignore[call-overload]
        _named(info, kw)


@BACKENDS
def test_wrong_kinds_of_functions_and_inputs_are_type_errors(backend: str) -> None:
    def sync(x: int) -> int:
        return x

    async def main() -> None:
        for fn in (sync, lambda x: ident(x)):
            with pytest.raises(TypeError, match="fn"):
                await pk.map(fn, [1])
            with pytest.raises(TypeError, match="fn"):
                pk.imap(fn, [1])
        with pytest.raises(TypeError, match="items"):
            await pk.map(ident, 5)  # type: ignore[call-overload]
        with pytest.raises(TypeError, match="gather item 1"):
            await pk.gather(ident(0), 5)  # type: ignore[call-overload]
        with pytest.raises(TypeError, match="gather item 1 returned int"):
            await pk.gather(lambda: ident(0), lambda: 2)  # type: ignore[arg-type]
        # a zero-argument lambda returning a coroutine is a gather item, called in turn
        assert await pk.gather(lambda: ident(1), lambda: ident(2), limit=1) == [1, 2]
        flow = pk.Flow()
        with pytest.raises(TypeError):  # NotAsyncError
            flow.step(name="l")(lambda: ident(1))
        with pytest.raises(pk.DefinitionError, match="positional-only"):

            @flow.step
            async def p(x: int, /) -> int:
                return x

    run(main, backend)


# --------------------------------------------------------------- failures of every kind
class Interrupt(BaseException):
    """A KeyboardInterrupt-like failure."""


@BACKENDS
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, Interrupt])
@pytest.mark.parametrize("settle", [False, True])
def test_an_items_base_exception_comes_out_as_itself(
    backend: str, exc_type: type[BaseException], settle: bool
) -> None:
    raised = exc_type()
    started: list[int] = []
    stopped: list[int] = []

    async def item(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        if x == 2:
            raise raised
        started.append(x)
        try:
            await anyio.sleep(10)
        finally:
            stopped.append(x)
        return x

    async def main() -> BaseException | None:
        try:
            with anyio.fail_after(GUARD):
                await pk.map(item, range(4), settle=settle)  # type: ignore[call-overload]
        except BaseException as exc:
            return exc
        return None

    assert run(main, backend) is raised
    assert sorted(stopped) == sorted(started)  # every item that began was stopped


def _sync_input(err: Exception) -> Iterator[int]:
    yield from range(3)
    raise err


async def _async_input(err: Exception) -> AsyncIterator[int]:
    for i in range(3):
        yield i
    raise err


@BACKENDS
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("settle", [False, True])
@pytest.mark.parametrize("limit", [None, 2])
def test_an_input_failing_midway_fails_map_and_imap_with_its_error(
    backend: str, kind: str, settle: bool, limit: int | None
) -> None:
    async def main() -> None:
        for call in ("map", "imap"):
            err = ValueError("the input broke")
            items: Any = _sync_input(err) if kind == "sync" else _async_input(err)
            with pytest.raises(ValueError) as info:
                if call == "map":
                    await pk.map(ident, items, limit=limit, settle=settle)
                else:
                    async with pk.imap(ident, items, limit=limit, settle=settle) as results:
                        async for _ in results:
                            pass
            assert info.value is err

    run(main, backend)


# ------------------------------------------------------- the caller cancelled anywhere
class _Track:
    def __init__(self) -> None:
        self.running = 0
        self.calls = 0

    async def item(self, x: int) -> int:
        self.running += 1
        self.calls += 1
        try:
            await anyio.sleep(0.01 * (x % 3))
            await anyio.lowlevel.checkpoint()
            if x % 4 == 3 and self.calls < 6:
                raise ConnectionError(x)
            return x
        finally:
            self.running -= 1


async def _scenario(kind: str, t: _Track, limiter: pk.Limiter, settle: bool) -> Any:
    retry = pk.Retry(attempts=3, backoff=0.02)
    opts: dict[str, Any] = {
        "limit": limiter, "rate": 50, "timeout": 1, "retry": retry, "settle": settle
    }  # fmt: skip
    if kind == "map":
        return await pk.map(t.item, range(8), **opts)
    if kind == "gather":
        return await pk.gather(*(functools.partial(t.item, i) for i in range(8)), **opts)
    if kind.startswith("imap"):
        out = []
        async with pk.imap(t.item, range(8), ordered=kind == "imap_ordered", **opts) as rs:
            async for r in rs:
                out.append(r)
        return out
    flow = pk.Flow()

    @flow.step(retry=retry, limit=limiter)
    async def a() -> int:
        return await t.item(1)

    @flow.step(retry=retry, limit=limiter)
    async def b() -> int:
        return await t.item(3)

    @flow.step(retry=retry)
    async def c(a: int, b: int) -> int:
        return await t.item(2)

    @flow.step
    async def d(a: int) -> int:
        return await t.item(5)

    return await flow.run(settle=settle, limit=2)  # type: ignore[call-overload]


@BACKENDS
@pytest.mark.parametrize("kind", ["map", "gather", "imap", "imap_ordered", "flow"])
@pytest.mark.parametrize("settle", [False, True])
def test_a_caller_cancelled_at_any_tick_leaves_nothing_running_and_no_slot_held(
    backend: str, kind: str, settle: bool
) -> None:
    async def main() -> None:
        for ticks in range(80):
            limiter = pk.Limiter(concurrency=3, rate=100)
            t = _Track()
            with anyio.CancelScope() as scope:

                async def cancel(scope: anyio.CancelScope = scope, ticks: int = ticks) -> None:
                    for _ in range(ticks):
                        await anyio.lowlevel.checkpoint()
                    scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(cancel)
                    # (fail-fast: a ConnectionError before the cancellation came)
                    with contextlib.suppress(ConnectionError):
                        await _scenario(kind, t, limiter, settle)
            assert t.running == 0, ticks
            stats = limiter.statistics()
            assert (stats.running, stats.waiting) == (0, 0), (ticks, stats)
            with anyio.fail_after(GUARD):
                async with limiter:  # still usable
                    pass

    run(main, backend)


# ---------------------------------------------------------- retries, rates, deadlines
@BACKENDS
@pytest.mark.parametrize("settle", [False, True])
def test_retries_that_run_out_give_the_last_original_error(backend: str, settle: bool) -> None:
    errors: list[ConnectionError] = []

    async def item(x: int) -> int:
        errors.append(ConnectionError(len(errors)))
        await anyio.lowlevel.checkpoint()
        raise errors[-1]

    async def main() -> BaseException | None:
        try:
            outcomes = await pk.map(
                item, [1], retry=pk.Retry(attempts=3, backoff=0.01), settle=settle
            )  # type: ignore[call-overload]
        except ConnectionError as exc:
            return exc
        return outcomes[0].error  # type: ignore[no-any-return]

    assert run(main, backend) is errors[-1]
    assert len(errors) == 3


def test_a_rate_spaces_the_starts_on_the_virtual_clock() -> None:
    starts: list[float] = []

    async def item(x: int) -> None:
        starts.append(anyio.current_time())
        await anyio.sleep(10)

    async def main() -> list[float]:
        t0 = anyio.current_time()
        await pk.map(item, range(4), rate=2, limit=2)
        return [s - t0 for s in starts]

    assert run(main) == pytest.approx([0, 0.5, 10, 10.5])


def test_a_deadline_around_a_retry_ends_its_backoff() -> None:
    calls: list[int] = []

    async def item(x: int) -> int:
        calls.append(x)
        raise ConnectionError

    async def main() -> float:
        with pytest.raises(TimeoutError), anyio.fail_after(5):
            await pk.map(item, [1], retry=pk.Retry(attempts=5, backoff=100, max_backoff=100))
        return anyio.current_time()

    run(main)
    assert calls == [1]


def test_a_timeout_per_attempt_is_retried_then_raised() -> None:
    calls: list[float] = []

    async def item(x: int) -> int:
        calls.append(anyio.current_time())
        await anyio.sleep(10)
        return x  # pragma: no cover

    async def main() -> None:
        with pytest.raises(TimeoutError):
            retry = pk.Retry(attempts=2, backoff=0.5, on=TimeoutError)
            await pk.map(item, [1], timeout=1, retry=retry)

    run(main)
    assert len(calls) == 2


# --------------------------------------------------------------------------- imap left
@BACKENDS
def test_imap_left_by_break_or_an_error_cancels_and_closes_its_input(backend: str) -> None:
    closed: list[str] = []

    async def numbers(tag: str) -> AsyncIterator[int]:
        try:
            for i in range(100):
                yield i
        finally:
            closed.append(tag)

    async def item(x: int) -> int:
        await anyio.sleep(x % 3)
        return x

    async def main() -> None:
        got = []
        async with pk.imap(item, numbers("break"), limit=3) as results:
            async for r in results:
                got.append(r)
                if len(got) == 4:
                    break
        err = ValueError("the body's")
        with pytest.raises(ValueError) as info:
            async with pk.imap(item, numbers("error"), limit=3) as results:
                async for _ in results:
                    raise err
        assert info.value is err

    run(main, backend)
    assert closed == ["break", "error"]


# ------------------------------------------------------------------------------- Flow
@BACKENDS
def test_flow_parameters_keyword_only_defaults_and_missing(backend: str) -> None:
    flow = pk.Flow()

    @flow.step
    async def a() -> int:
        await anyio.sleep(1)
        return 1

    @flow.step
    async def b(*, a: int, x: int = 5) -> int:  # keyword-only: a dependency, an input
        return a + x

    @flow.step
    async def c(a: int = 7) -> int:  # a default does not make a step optional
        return a

    async def main() -> None:
        assert dict(await flow.run()) == {"a": 1, "b": 6, "c": 1}
        assert (await flow.run(x=1))["b"] == 2
        with pytest.raises(TypeError, match="y"):
            await flow.run(y=2)  # an input no step uses
        with pytest.raises(TypeError, match="a"):
            await flow.run(a=2)  # an input with a step's name

    run(main, backend)
    other = pk.Flow()

    @other.step
    async def needs(z: int) -> int:
        return z

    with pytest.raises(pk.DefinitionError, match="z"):
        run(other.run, backend)


def test_settle_with_skipped_steps_records_and_renders_them() -> None:
    flow = pk.Flow(name="f")

    @flow.step
    async def a() -> int:
        await anyio.sleep(2)
        raise ValueError("a")

    @flow.step
    async def b(a: int) -> int:
        return a  # pragma: no cover

    @flow.step
    async def d(b: int) -> int:
        return b  # pragma: no cover

    @flow.step
    async def c() -> int:
        await anyio.sleep(1)
        return 3

    outcomes = run(functools.partial(flow.run, settle=True))
    assert isinstance(outcomes["a"].error, ValueError)
    for name, dependency in (("b", "a"), ("d", "b")):
        skipped = outcomes[name].error
        assert isinstance(skipped, pk.DependencyFailed)
        assert skipped.dependency == dependency
    assert outcomes["c"].value == 3
    timeline = outcomes.timeline
    statuses = {s.name: s.status for s in timeline.spans}
    assert statuses == {"a": "error", "b": "skipped", "d": "skipped", "c": "ok"}
    assert [s.name for s in timeline.critical_path()] == ["a"]
    assert timeline.total == pytest.approx(2)
    assert "skipped" in timeline.to_text()


# ------------------------------------------------ a Cancelled that nothing cancelled
async def _re_raises_a_stored_cancellation(x: int) -> int:
    """Catches the cancellation of a scope of its own, and raises that exception again
    after the scope is gone: no cancellation of the task is going on."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.sleep(1)
        except anyio.get_cancelled_exc_class() as exc:
            stored = exc
            raise
    await anyio.lowlevel.checkpoint()
    if x == 1:
        raise stored
    return x


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("settle", [False, True])
def test_a_cancellation_no_scope_caused_is_the_items_failure_never_a_hole(
    backend: str, settle: bool
) -> None:
    """An item that raises a cancellation exception no cancellation of its task caused
    has failed (fail-fast: raised; settle: its outcome); map never returns holes."""

    async def main() -> Any:
        try:
            return await pk.map(_re_raises_a_stored_cancellation, range(3), settle=settle)  # type: ignore[call-overload]
        except anyio.get_cancelled_exc_class() as exc:
            return exc

    got = run(main, backend)
    if settle:
        assert [o.ok for o in got] == [True, False, True]
        assert [o.value for o in got if o.ok] == [0, 2]
    else:
        assert isinstance(got, BaseException)


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(
            "asyncio",
            marks=pytest.mark.skipif(
                sys.version_info < (3, 11),
                reason="asyncio on 3.10 has no Task.cancelling(): a step in the caller's "
                "task cannot tell a stray CancelledError from its own cancellation",
            ),
        ),
        "trio",
    ],
)
def test_a_flow_step_raising_a_cancellation_no_scope_caused_fails_the_run(backend: str) -> None:
    flow = pk.Flow()

    @flow.step
    async def a() -> int:
        return await _re_raises_a_stored_cancellation(1)

    @flow.step
    async def b() -> int:
        return await _re_raises_a_stored_cancellation(0)

    async def main() -> Any:
        try:
            return await flow.run()
        except anyio.get_cancelled_exc_class() as exc:
            return exc

    assert isinstance(run(main, backend), BaseException)  # never an empty result
