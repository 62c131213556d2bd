"""Fault review 3 of the core primitives: fan-out options together, Limiter, Flow,
SWRCache and BatchLoader under combinations and bad input the other tests leave out."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

from .virtual_time import run_virtual

BACKENDS = ["asyncio", "trio"]


# ------------------------------------------------------------------------- Limiter
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_level_rate_limiter_survives_a_new_event_loop_whose_clock_is_behind(
    backend: str,
) -> None:
    """A Limiter is made once per resource, at module level, and so outlives an event
    loop (one per test, ``anyio.run`` twice in a script). trio starts each run's clock at
    a random offset, so the next run's clock may read far behind the one the limiter's
    reservations were made on: the first start of that run must not wait for a turn
    measured on the old clock (up to two days on trio's real clock)."""
    partner = pk.Limiter(rate=1)

    async def first_run() -> None:
        await anyio.sleep(80_000)  # this run's clock reads 80,000 s (up to 200,000 on trio)
        for _ in range(3):
            async with partner:
                pass

    async def next_run() -> float:
        began = anyio.current_time()  # a new clock: 0 s
        async with partner:
            pass
        async with partner:
            pass
        return anyio.current_time() - began

    run_virtual(first_run, backend)
    assert run_virtual(next_run, backend) == 1.0  # its own turn at once, the next 1 s later


@pytest.mark.parametrize("make", ["Limiter", "map"])
def test_a_rate_too_small_for_its_interval_is_refused_not_unlimited(make: str) -> None:
    """A positive, finite ``rate`` below ~5.6e-309 has an interval ``1 / rate`` that
    overflows to infinity; with ``burst=2`` the limiter's arithmetic (``inf - inf``)
    then let every start through at once: the lowest rate was no limit at all."""
    with pytest.raises(ValueError, match=r"^rate must be at least"):
        if make == "Limiter":
            pk.Limiter(rate=1e-320, burst=2)
        else:
            anyio.run(lambda: pk.map(_echo, [1, 2], rate=1e-320))
    pk.Limiter(rate=1e-300, burst=2)  # tiny, but its interval is a number


# ------------------------------------------------------------------------- SWRCache
@pytest.mark.anyio
@pytest.mark.parametrize("wrap", ["plain", "partial"])
async def test_an_async_generator_loader_is_refused_before_any_load(wrap: str) -> None:
    """``cache.get(key, loader)`` refuses a loader that is not callable before any load
    starts; an async generator function is known not to return one value just as well,
    without calling it. Found out only at load time, it cost a load (a flight other
    callers joined) and its message told the user to write the ``async def`` they wrote."""
    import functools

    async def rows(key: str):  # type: ignore[no-untyped-def]  # a streaming query by mistake
        yield key

    loader = rows if wrap == "plain" else functools.partial(rows)
    cache = pk.SWRCache(fresh=10, stale=60)
    async with cache:
        with pytest.raises(TypeError, match=r"loader .*async generator function") as info:
            await cache.get("k", loader)
    assert "write it with `async def`" not in str(info.value)
    assert (cache.statistics().misses, cache.statistics().loads) == (0, 0)


# ------------------------------------------------------------------------- Retry
def test_a_retry_predicate_that_cannot_take_the_exception_is_refused_at_the_door() -> None:
    """``on=`` is a predicate ``exc -> bool``: one that cannot be called with the
    exception is a wrong argument, refused when the policy is made (naming ``on``),
    not found out at the first failure, where its TypeError replaced the item's
    error."""
    with pytest.raises(TypeError, match=r"^on must be"):
        pk.Retry(on=lambda: True)
    with pytest.raises(TypeError, match=r"^on must be"):
        pk.Retry(on=lambda exc, extra: True)
    pk.Retry(on=lambda exc, extra=None: True)  # callable with the exception: accepted
    pk.Retry(on=lambda *args: True)
    pk.Retry(on=callable)  # a builtin with a signature


@pytest.mark.anyio
@pytest.mark.parametrize("settle", [False, True])
async def test_a_retry_predicate_that_raises_keeps_the_items_error(settle: bool) -> None:
    """A predicate that fails (a bug in it) fails the item with its own error, and the
    item's exception it was asked about is not lost: it is that error's context, shown
    in the traceback (tenacity calls the predicate outside any ``except`` block)."""
    seen: list[BaseException] = []

    def on(exc: BaseException) -> bool:
        seen.append(exc)
        return {}["no such key"]  # type: ignore[no-any-return]

    async def fail(i: int) -> int:
        raise ConnectionError(i)

    policy = pk.Retry(attempts=3, backoff=0, on=on)
    if settle:
        [outcome] = await pk.map(fail, [1], retry=policy, settle=True)
        error = outcome.error
    else:
        with pytest.raises(KeyError) as info:
            await pk.map(fail, [1], retry=policy)
        error = info.value
    assert isinstance(error, KeyError)
    assert isinstance(seen[0], ConnectionError)
    assert error.__context__ is seen[0]


def test_an_on_error_that_cannot_take_the_key_and_the_error_is_refused_at_the_door() -> None:
    """``on_error(key, exc)``: a callback of the wrong shape (``lambda exc: ...``) is a
    wrong argument, refused when the cache is made, not at the first failed refresh,
    whose error it would then lose."""
    with pytest.raises(TypeError, match=r"^on_error must be"):
        pk.SWRCache(on_error=lambda exc: None)
    pk.SWRCache(on_error=lambda key, exc: None)
    pk.SWRCache(on_error=print)


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_an_on_error_that_raises_logs_the_refresh_error_with_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed refresh is handed to ``on_error``; if that callback raises, its error is
    logged, and the refresh error it was handling must show in that log record (as its
    context): it reached no caller, so the log is the only place it can be seen."""
    clock = _Clock()
    refresh_error = ConnectionError("database is down")

    def on_error(key: object, exc: Exception) -> None:
        raise RuntimeError("the alerting client is down too")

    loads = 0

    async def load(key: str) -> str:
        nonlocal loads
        loads += 1
        if loads > 1:
            raise refresh_error
        return "v1"

    cache = pk.SWRCache(fresh=10, stale=60, clock=clock, on_error=on_error)
    with caplog.at_level("ERROR", logger="parallelkit.cache"):
        async with cache:
            assert await cache.get("k", load) == "v1"
            clock.now = 20
            assert await cache.get("k", load) == "v1"  # the refresh fails in the background
            with anyio.fail_after(5):
                while cache.statistics().refresh_errors == 0:
                    await anyio.lowlevel.checkpoint()
    [record] = [r for r in caplog.records if r.name == "parallelkit.cache"]
    assert record.exc_info is not None
    logged = record.exc_info[1]
    assert isinstance(logged, RuntimeError)
    assert logged.__context__ is refresh_error


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: pk.SWRCache(clock=lambda now: now), "clock"),
        (lambda: pk.map(_echo, [1], progress=lambda done: None), "progress"),
    ],
)
def test_a_callback_of_the_wrong_shape_is_refused_before_any_work(make: object, name: str) -> None:
    """Callbacks are checked at the door like every other argument: a clock that wants
    an argument failed on the cache's first hit, a ``progress`` that takes only
    ``done`` failed the whole map after its first item had run."""
    with pytest.raises(TypeError, match=rf"^{name} must be .*cannot be called with"):
        result = make()  # type: ignore[operator]
        if hasattr(result, "close"):  # the map coroutine: the check is in the call
            anyio.run(lambda: result)


async def _echo(x: int) -> int:
    return x


# ------------------------------------------------------- fan-out options together (held)
@pytest.mark.parametrize("backend", BACKENDS)
def test_timeout_retry_and_rate_together_each_attempt_is_a_timed_start(backend: str) -> None:
    """Held: ``timeout=`` bounds each attempt (not the retries together, nor the wait
    for a turn), an attempt cut off by its timeout is retried like any failure, and
    each retry takes a turn of ``rate=`` again."""
    starts: list[tuple[int, float]] = []

    async def main() -> list[int]:
        tries: dict[int, int] = {}

        async def fetch(i: int) -> int:
            starts.append((i, anyio.current_time()))
            tries[i] = tries.get(i, 0) + 1
            if tries[i] == 1:
                await anyio.sleep(10)  # over the timeout: cancelled, then retried
            return i

        policy = pk.Retry(attempts=2, backoff=0)
        return await pk.map(fetch, range(3), limit=3, rate=1, timeout=2, retry=policy)

    assert run_virtual(main, backend) == [0, 1, 2]
    # first attempts 1 s apart; each retry (timed out at start + 2) waits for a turn
    assert starts == [(0, 0.0), (1, 1.0), (2, 2.0), (0, 3.0), (1, 4.0), (2, 5.0)]


@pytest.mark.anyio
async def test_an_invalidate_during_a_background_refresh_keeps_the_old_value_out() -> None:
    """Held: a background refresh that loaded the old row before ``invalidate`` ends
    after it: the old value is not stored, the next call loads the new one, and a
    refresh invalidated and then failing is counted and reported once."""
    clock = _Clock()
    reported: list[object] = []
    cache = pk.SWRCache(fresh=10, stale=60, clock=clock, on_error=lambda k, e: reported.append(e))
    row, gate = "old", anyio.Event()

    async def load(key: str) -> str:
        seen = row
        await gate.wait()
        return seen

    gate.set()
    async with cache:
        assert await cache.get("k", load) == "old"
        gate = anyio.Event()
        clock.now = 20
        assert await cache.get("k", load) == "old"  # stale: the refresh reads "old", waits
        await anyio.lowlevel.checkpoint()
        row = "new"
        await cache.invalidate("k")
        gate.set()
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        assert await cache.get("k", load) == "new"

        failure = ConnectionError("down")
        broken = anyio.Event()

        async def fail(key: str) -> str:
            await broken.wait()
            raise failure

        clock.now = 40
        assert await cache.get("k", fail) == "new"  # a refresh that will fail
        await anyio.lowlevel.checkpoint()
        await cache.invalidate("k")
        broken.set()
        with anyio.fail_after(5):
            while not reported:
                await anyio.lowlevel.checkpoint()
    assert reported == [failure]
    assert cache.statistics().refresh_errors == 1


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["tenacity.asyncio", "async def"])
async def test_an_async_retry_condition_of_a_tenacity_policy_is_obeyed(kind: str) -> None:
    """tenacity (8.4+) accepts async retry conditions in ``AsyncRetrying`` and awaits
    them. parallelkit wraps the condition (so that a cancellation is never retried): the
    wrapper called it without awaiting, took the coroutine for ``True`` and retried
    every error, the non-transient ones too ("coroutine was never awaited")."""
    tenacity = pytest.importorskip("tenacity")
    tenacity_asyncio = pytest.importorskip("tenacity.asyncio")
    if not hasattr(tenacity_asyncio, "retry_if_exception"):
        pytest.skip("this tenacity has no async retry conditions")

    async def transient(exc: BaseException) -> bool:
        await anyio.lowlevel.checkpoint()
        return isinstance(exc, ConnectionError)

    async def condition(state: object) -> bool:
        outcome = state.outcome  # type: ignore[attr-defined]
        return outcome.failed and await transient(outcome.exception())  # type: ignore[no-any-return]

    retry = tenacity_asyncio.retry_if_exception(transient) if kind != "async def" else condition
    policy = tenacity.AsyncRetrying(stop=tenacity.stop_after_attempt(4), retry=retry, reraise=True)
    calls: list[type[BaseException]] = []

    async def call(error: type[BaseException]) -> None:
        calls.append(error)
        raise error("boom")

    with pytest.raises(ValueError, match="boom"):
        await pk.map(call, [ValueError], retry=policy)
    assert calls == [ValueError]  # not transient: not retried
    calls.clear()
    with pytest.raises(ConnectionError, match="boom"):
        await pk.map(call, [ConnectionError], retry=policy)
    assert calls == [ConnectionError] * 4  # transient: retried until the stop


async def _async_callback(*args: object) -> object:
    return args


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: pk.SWRCache(on_error=_async_callback), "on_error"),
        (lambda: pk.SWRCache(clock=_async_callback), "clock"),
        (lambda: pk.SWRCache().cached(key=_async_callback), "key"),
        (lambda: pk.map(_echo, [1], progress=_async_callback), "progress"),
        (lambda: pk.Retry(on=_async_callback), "on"),
    ],
)
def test_an_async_callback_where_a_plain_one_is_called_is_refused(make: object, name: str) -> None:
    """These callbacks are called, never awaited. An ``async def`` one (natural in an
    async code base: ``async def on_error(key, exc): await alert(...)``) returned a
    coroutine nobody awaited: the alert was never sent (a failed refresh reported to no
    one), every error retried (``on=``: a coroutine is true), a new key per call
    (``key=``: a coroutine object is hashable), a ``RuntimeWarning`` at best."""
    with pytest.raises(TypeError, match=rf"^{name} must be .*async function"):
        result = make()  # type: ignore[operator]
        if hasattr(result, "close"):  # the map coroutine: the check is in the call
            anyio.run(lambda: result)


@pytest.mark.anyio
@pytest.mark.parametrize("jitter", [0, 0.5, 0.999])
async def test_jitter_shortens_only_the_fresh_window_within_its_bound(jitter: float) -> None:
    """Held: ``jitter`` takes up to that share off each fresh window (``0``: none), never
    makes it negative, and leaves the stale window its full length; ``1`` is refused."""
    with pytest.raises(ValueError, match=r"^jitter must be a fraction in \[0, 1\)"):
        pk.SWRCache(jitter=1)
    clock = _Clock()
    store = pk.MemoryStore(100)
    cache = pk.SWRCache(fresh=10, stale=60, jitter=jitter, clock=clock, store=store)

    async def load(key: int) -> int:
        return key

    async with cache:
        for key in range(50):
            await cache.get(key, load)
    for key in range(50):
        entry = store.peek(key)
        assert entry is not None
        fresh = entry.fresh_until - entry.loaded_at
        assert 10 * (1 - jitter) <= fresh <= 10
        assert fresh == 10 if jitter == 0 else fresh > 0
        assert entry.stale_until - entry.fresh_until == pytest.approx(60)
