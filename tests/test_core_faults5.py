"""Fault review 5 of the core: the retry adapter with a user's tenacity policy (its
waits, its clock, its hooks), the error tree across pickle and copy, and the
argument checker's normalized numbers."""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import pickle
import weakref
from collections.abc import Callable
from typing import Any
from unittest import mock

import anyio
import pytest
import tenacity

import parallelkit as pk
from parallelkit._core.check import choice

from .virtual_time import run_virtual

BACKENDS = ["asyncio", "trio"]


class HookFailed(Exception):
    pass


# ------------------------------------------------------------------- a policy's waits
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_negative_wait_of_a_tenacity_policy_is_no_wait_not_an_error(backend: str) -> None:
    """A computed wait ("retry at the time the server gave", already past) can be below
    zero. tenacity on asyncio sleeps 0 for it; anyio's sleep refused it, so the item
    failed with ``ValueError: delay must be a non-negative number`` on its first
    failure, its own error lost and no retry made."""
    starts: list[float] = []

    async def flaky(i: int) -> int:
        starts.append(anyio.current_time())
        if len(starts) < 3:
            raise ConnectionError(i)
        return i

    policy = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(3), wait=lambda _state: -1.0, reraise=True
    )

    async def main() -> list[int]:
        return await pk.map(flaky, [7], retry=policy)

    assert run_virtual(main, backend) == [7]
    assert starts == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, None, "1"])
def test_a_wait_that_is_not_a_number_of_seconds_says_so_and_keeps_the_items_error(
    backend: str, bad: object
) -> None:
    def wait(_state: tenacity.RetryCallState) -> Any:
        return bad

    policy = tenacity.AsyncRetrying(stop=tenacity.stop_after_attempt(3), wait=wait, reraise=True)
    calls = 0

    async def fail(i: int) -> int:
        nonlocal calls
        calls += 1
        raise ConnectionError(i)

    async def main() -> BaseException | None:
        with pytest.raises(ValueError, match=r"^the wait of the retry= policy must") as info:
            await pk.map(fail, [1], retry=policy)
        return info.value.__context__

    assert isinstance(run_virtual(main, backend), ConnectionError)
    assert calls == 1


# ------------------------------------------------------------------- a policy's clock
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stop", ["after", "before"])
def test_stop_after_delay_counts_on_the_event_loops_clock(backend: str, stop: str) -> None:
    """tenacity times a call with ``time.monotonic``; the sleeps between attempts are
    on the event loop's clock. On a virtual clock (trio's ``MockClock``, the way
    time-dependent code is tested) the real clock barely moves, so
    ``stop_after_delay(5)`` went on retrying: a thousand attempts here, each 1 s."""
    starts: list[float] = []

    async def slow_failure(i: int) -> int:
        starts.append(anyio.current_time())
        await anyio.sleep(1)
        raise ConnectionError(i)

    if stop == "before" and not hasattr(tenacity, "stop_before_delay"):
        pytest.skip("this tenacity has no stop_before_delay")
    delay = tenacity.stop_after_delay(5) if stop == "after" else tenacity.stop_before_delay(5)
    policy = tenacity.AsyncRetrying(
        stop=delay | tenacity.stop_after_attempt(1000),
        wait=tenacity.wait_fixed(1),
        reraise=True,
    )

    async def main() -> None:
        with pytest.raises(ConnectionError):
            await pk.map(slow_failure, [1], retry=policy)

    run_virtual(main, backend)
    # attempts end at 1, 3 and 5: then 5 s have passed (stop_after_delay), or would
    # have, after the next 1 s wait (stop_before_delay: 5 + 1 >= 5; at 3: 3 + 1 < 5)
    assert starts == [0.0, 2.0, 4.0]


# ------------------------------------------------------------------- a policy's hooks
def _raise(_state: tenacity.RetryCallState) -> Any:
    raise HookFailed("a bug in the hook")


async def _raise_async(_state: tenacity.RetryCallState) -> Any:
    raise HookFailed("a bug in the async hook")


@pytest.mark.anyio
@pytest.mark.parametrize("hook", ["before_sleep", "after", "stop", "wait", "retry"])
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("settle", [False, True])
async def test_a_hook_of_a_tenacity_policy_that_raises_keeps_the_items_error(
    hook: str, kind: str, settle: bool
) -> None:
    """tenacity calls a policy's hooks outside any ``except`` block: a ``before_sleep``
    (or ``after``, ``stop``, ``wait``, a retry condition) that raises failed the item
    with its own error and the item's error was gone, from the traceback too."""
    options: dict[str, Any] = {"stop": tenacity.stop_after_attempt(3), "reraise": True}
    options[hook] = _raise if kind == "sync" else _raise_async
    if hook == "retry" and kind == "sync":
        options[hook] = tenacity.retry_if_exception(lambda exc: _raise(None))  # type: ignore[arg-type]
    policy = tenacity.AsyncRetrying(**options)
    errors: list[BaseException] = []

    async def fail(i: int) -> int:
        errors.append(ConnectionError(i))
        raise errors[-1]

    if settle:
        [outcome] = await pk.map(fail, [1], retry=policy, settle=True)
        error = outcome.error
    else:
        with pytest.raises(HookFailed) as info:
            await pk.map(fail, [1], retry=policy)
        error = info.value
    assert isinstance(error, HookFailed)
    assert len(errors) == 1
    assert error.__context__ is errors[0]


@pytest.mark.anyio
async def test_a_retry_error_callback_that_raises_keeps_the_items_error() -> None:
    policy = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(2), retry_error_callback=_raise
    )
    errors: list[BaseException] = []

    async def fail(i: int) -> int:
        errors.append(ConnectionError(i))
        raise errors[-1]

    with pytest.raises(HookFailed) as info:
        await pk.map(fail, [1], retry=policy)
    assert info.value.__context__ is errors[-1]
    assert len(errors) == 2


@pytest.mark.anyio
async def test_the_hooks_still_see_the_policys_state() -> None:
    """The adapted hooks call the user's with the same retry state, in tenacity's
    order, and a ``before_sleep`` that logs is not disturbed."""
    seen: list[tuple[str, int]] = []
    policy = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(3),
        before=lambda s: seen.append(("before", s.attempt_number)),
        after=lambda s: seen.append(("after", s.attempt_number)),
        before_sleep=lambda s: seen.append(("sleep", s.attempt_number)),
        reraise=True,
    )

    calls = 0

    async def flaky(i: int) -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError(i)
        return i

    assert await pk.map(flaky, [3], retry=policy) == [3]
    first, second = [("after", 1), ("sleep", 1)], [("after", 2), ("sleep", 2)]
    assert seen == [("before", 1), *first, ("before", 2), *second, ("before", 3)]


# ------------------------------------------------------------------- the error tree
def _redis() -> Any:
    return pytest.importorskip("parallelkit.redis")


ERRORS: dict[str, Callable[[], BaseException]] = {
    "CycleError": lambda: pk.CycleError(["a", "b", "a"]),
    "DependencyFailed": lambda: pk.DependencyFailed("record", "charge"),
    "StartupError": lambda: pk.StartupError("db"),
    "StartupError-message": lambda: pk.StartupError(
        "db", "db timed out", teardown_errors=[("cache", ValueError("x"))]
    ),
    "ProcessError": lambda: pk.ProcessError("worker", 2, ["python", "w.py"], ["boom"], restarts=3),
    "DefinitionError": lambda: pk.DefinitionError("unknown step 'x'"),
    # parallelkit.redis's errors take keyword or extra arguments too (imported late:
    # the root never imports an integration)
    "LockNotAcquired": lambda: _redis().LockNotAcquired("jobs", "lock 'jobs' is held"),
    "LockLost": lambda: _redis().LockLost("jobs", 7, "lock 'jobs' was lost"),
    "SerializationError": lambda: _redis().SerializationError(
        "cannot store", namespace="n", key="k", type_name="set"
    ),
}


def _same(a: object, b: object) -> bool:
    if isinstance(a, BaseException):
        return type(a) is type(b) and a.args == b.args
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@pytest.mark.parametrize("make", ERRORS.values(), ids=ERRORS.keys())
@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
def test_every_error_of_the_tree_survives_pickle_and_copy(
    make: Callable[[], BaseException], how: str
) -> None:
    """The default reduction calls ``cls(*args)``: ``CycleError`` came back with a
    cycle of the message's characters, ``StartupError`` with its message taken for
    the service's name, ``DependencyFailed`` (and the redis errors) failed with a
    ``TypeError``, ``ProcessError`` lost its restarts from ``args``: an error raised
    in a worker process could not be sent back whole."""
    error = make()
    error.hint = "while starting the api"  # type: ignore[attr-defined]  # as add_note does
    again = {
        "pickle": lambda e: pickle.loads(pickle.dumps(e)),
        "copy": copy.copy,
        "deepcopy": copy.deepcopy,
    }[how](error)
    assert type(again) is type(error)
    assert again.args == error.args
    assert str(again) == str(error)
    assert again.hint == "while starting the api"  # type: ignore[attr-defined]
    assert set(vars(again)) == set(vars(error))
    for name, value in vars(error).items():
        assert _same(value, getattr(again, name)), name


# ------------------------------------------------------------------- the checker
def test_a_negative_zero_wait_is_stored_as_zero() -> None:
    """``-0.0`` passes ``>= 0``; it was kept as is and shown as ``backoff=-0.0``."""
    policy = pk.Retry(backoff=-0.0, jitter=-0.0)
    assert math.copysign(1.0, policy.backoff) == 1.0
    assert math.copysign(1.0, policy.jitter) == 1.0
    assert "-0.0" not in repr(policy)


class _Elementwise:
    """Compares as a NumPy array of strings does: ``==`` gives a truthy non-bool."""

    def __eq__(self, other: object) -> Any:
        return [other == "always"]

    __hash__ = None  # type: ignore[assignment]


@pytest.mark.parametrize("bad", [_Elementwise(), mock.ANY], ids=["array-like", "mock.ANY"])
def test_a_choice_is_a_str_not_whatever_compares_equal_to_one(bad: object) -> None:
    """``choice`` compared with ``==``: an array of strings (``==`` gives an array,
    truthy) or ``mock.ANY`` was accepted as ``restart=`` and stored as the policy."""
    with pytest.raises(TypeError, match=r"^restart must be one of 'no', 'on-failure', 'always'"):
        pk.Orchestrator().process("worker", ["true"], restart=bad)


def test_an_unhashable_choice_is_refused_by_name() -> None:
    """Checked against a set of choices, a list failed with ``unhashable type: 'list'``,
    naming neither the argument nor the choices."""
    with pytest.raises(TypeError, match=r"^fail must be one of .*, got \['open'\]"):
        choice("fail", ["open"], frozenset({"open", "closed"}))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("retry", "hint"),
    [
        (3, r"; for 3 attempts in all, pass retry=parallelkit\.Retry\(attempts=3\)$"),
        (tenacity.Retrying(), r"; a Retrying sleeps with time\.sleep, blocking the event loop"),
    ],
    ids=["int", "tenacity.Retrying"],
)
async def test_a_retry_of_the_wrong_kind_says_what_to_pass_instead(
    retry: object, hint: str
) -> None:
    """``retry=3`` (attempts?) and tenacity's sync ``Retrying`` are the likely misuses:
    the error named the argument but not what to pass."""

    async def never(i: int) -> int:
        raise AssertionError(i)

    with pytest.raises(TypeError, match=r"^retry must be a parallelkit\.Retry, .*" + hint):
        await pk.map(never, [1], retry=retry)  # type: ignore[call-overload]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_wait_of_infinity_sleeps_until_the_caller_cancels(backend: str) -> None:
    calls = 0

    async def fail(i: int) -> int:
        nonlocal calls
        calls += 1
        raise ConnectionError(i)

    policy = tenacity.AsyncRetrying(wait=tenacity.wait_fixed(math.inf), reraise=True)

    async def main() -> tuple[bool, float]:
        with anyio.move_on_after(100) as scope:
            await pk.map(fail, [1], retry=policy)
        return scope.cancelled_caught, anyio.current_time()

    assert run_virtual(main, backend) == (True, 100.0)
    assert calls == 1


@pytest.mark.anyio
async def test_a_cancellation_in_an_async_hook_passes_through_untouched() -> None:
    """The hooks keep the item's error on a hook's *failure*; a cancellation that
    reaches a hook (an async ``before_sleep`` waiting) is let through as it is, and
    the item is not retried."""
    caught: list[BaseException] = []
    calls = 0

    scope = anyio.CancelScope()

    async def before_sleep(_state: tenacity.RetryCallState) -> None:
        scope.cancel()  # the caller gives up while the hook waits
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class() as exc:
            caught.append(exc)
            raise

    async def fail(i: int) -> int:
        nonlocal calls
        calls += 1
        raise ConnectionError(i)

    policy = tenacity.AsyncRetrying(before_sleep=before_sleep, reraise=True)
    with scope:
        await pk.map(fail, [1], retry=policy)
    assert scope.cancelled_caught
    assert calls == 1
    assert len(caught) == 1
    assert caught[0].__context__ is None


@pytest.mark.anyio
@pytest.mark.parametrize("settle", [False, True])
async def test_without_reraise_the_retry_error_has_the_original_as_its_cause(settle: bool) -> None:
    """As documented: a policy without ``reraise=True`` raises tenacity's ``RetryError``
    (fail-fast) or keeps it (settle), and the item's last exception is its cause; a
    policy that retries on a *result* and runs out has no exception to re-raise."""
    errors: list[BaseException] = []

    async def fail(i: int) -> int:
        errors.append(ConnectionError(i))
        raise errors[-1]

    async def nothing(i: int) -> int | None:
        return None

    on_error = tenacity.AsyncRetrying(stop=tenacity.stop_after_attempt(2))
    on_result = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(2),
        retry=tenacity.retry_if_result(lambda value: value is None),
        reraise=True,
    )
    if settle:
        [failed] = await pk.map(fail, [1], retry=on_error, settle=True)
        [empty] = await pk.map(nothing, [1], retry=on_result, settle=True)
        first, second = failed.error, empty.error
    else:
        with pytest.raises(tenacity.RetryError) as info:
            await pk.map(fail, [1], retry=on_error)
        first = info.value
        with pytest.raises(tenacity.RetryError) as info:
            await pk.map(nothing, [1], retry=on_result)
        second = info.value
    assert isinstance(first, tenacity.RetryError)
    assert first.__cause__ is errors[-1]
    assert len(errors) == 2
    assert isinstance(second, tenacity.RetryError)
    assert second.last_attempt.result() is None


# ------------------------------------------------------------------- Outcome
def test_unwrap_leaves_no_reference_cycle_behind() -> None:
    """``unwrap`` raised ``self.error`` from a frame holding ``self``: the traceback
    kept that frame, its locals the outcome, the outcome the exception: a cycle per
    failed item unwrapped (with its frames, the item's locals), freed only by the
    cycle collector."""

    class Failed(Exception):
        pass

    def unwrap_one() -> weakref.ref[Failed]:
        outcome: pk.Outcome[int] = pk.Outcome.failure(Failed("x"))
        ref = weakref.ref(outcome.error)  # type: ignore[arg-type]
        with contextlib.suppress(Failed):
            outcome.unwrap()
        del outcome  # this frame (in the traceback) keeps no path to the exception
        return ref

    enabled = gc.isenabled()
    gc.disable()
    try:
        ref = unwrap_one()
        assert ref() is None
    finally:
        if enabled:
            gc.enable()
