"""gather / map / imap under randomized fault injection, against a reference model.

Each example builds a random mix of items (succeed, raise, hang, take virtual time,
fail a few attempts then succeed), options (``limit`` as an int or a shared
``Limiter``, also shared with a rival ``map``; ``rate``; ``timeout``; ``retry`` as
``pk.Retry`` or a tenacity ``AsyncRetrying``; ``settle``), inputs (a list, a
generator, an async generator, either failing midway) and a caller cancelled from
outside at a random time; for ``imap`` also ``ordered`` and a consumer that breaks
out or raises. It runs on virtual time on both backends (trio's ``MockClock``, and
an asyncio loop whose clock jumps to the next timer) and checks DESIGN.md's
invariants: the bound, the pull-ahead, fail-fast (the original object, nothing
started after it), settle (one ``Outcome`` per item, the original errors), retries
= attempts, per-attempt ``TimeoutError``, the rate, and that nothing is left behind
(no task, no limiter slot, nothing logged). Hypothesis is derandomized: no flakes.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import tenacity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parallelkit as pk

from .test_fanout import live_tasks
from .virtual_time import run_virtual

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

BACKENDS = ["asyncio", "trio"]
PROPERTY = settings(
    max_examples=int(os.environ.get("PK_FANOUT_EXAMPLES", "60")),
    deadline=None,
    derandomize=not os.environ.get("PK_FANOUT_EXAMPLES"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
GUARD = 10_000.0  # virtual seconds: a run still going then is hung


# ---------------------------------------------------------------- the model
class Boom(Exception):
    """An item's failure: one object per (item, attempt)."""


class SourceError(Exception):
    """The input iterable failed."""


class ConsumerError(Exception):
    """The body of ``async with imap(...)`` failed."""


Attempt = tuple[str, int]  # ("ok" | "raise" | "hang", virtual seconds)


@dataclass
class Case:
    api: str  # map | gather | imap
    items: list[list[Attempt]]  # per item, per attempt (the last one repeats)
    limit_kind: str  # none | int | limiter
    bound: int
    rate: float | None
    limiter_rate: float | None
    timeout: float | None
    retry_kind: str  # none | pk | tenacity
    attempts: int
    settle: bool
    source: str  # list | gen | agen
    source_fails_at: int | None
    cancel_at: float | None
    rival: int  # items of a second map sharing the limiter (0: none)
    rival_fails: bool = False  # its second item raises (fail-fast: it stops)
    progress: bool = False  # map's progress callback
    ordered: bool = False
    consumer: str = "all"  # all | break | raise
    consume: int = 0  # results taken before break / raise
    consumer_delay: int = 0


def attempts_allowed(case: Case) -> int:
    return case.attempts if case.retry_kind != "none" else 1


def retried(case: Case, result: str) -> bool:
    """Whether an attempt that ended as ``result`` is tried again (attempts left)."""
    if result in ("ok", "hang") or case.retry_kind == "none":
        return False
    return case.retry_kind != "pk_boom" or result == "raise"


def attempt_result(case: Case, beh: Attempt) -> str:
    """What one attempt ends as: ok | raise | timeout | hang."""
    kind, seconds = beh
    timeout = case.timeout
    if kind == "hang":
        return "hang" if timeout is None else "timeout"
    if timeout is not None and seconds > timeout:
        return "timeout"
    return kind


def model(case: Case, i: int) -> tuple[str, int]:
    """(final result, attempts used) of item ``i``: ok | raise | timeout | hang."""
    plan = case.items[i]
    allowed = attempts_allowed(case)
    for attempt in range(allowed):
        result = attempt_result(case, plan[min(attempt, len(plan) - 1)])
        if not retried(case, result) or attempt == allowed - 1:
            return result, attempt + 1
    raise AssertionError  # pragma: no cover


@st.composite
def cases(draw: st.DrawFn, api: str, shared: bool = False) -> Case:
    """A random case; ``shared``: the limit is a Limiter another ``map`` uses too."""
    attempt = st.one_of(
        st.tuples(st.just("ok"), st.integers(0, 3)),
        st.tuples(st.just("raise"), st.integers(0, 2)),
        st.tuples(st.just("hang"), st.just(0)),
    )
    weights = st.sampled_from(["ok", "mixed"] if shared else ["ok", "ok", "ok", "mixed"])
    items = []
    for _ in range(draw(st.integers(0, 9))):
        if draw(weights) == "ok":
            items.append([("ok", draw(st.integers(0, 3)))])
        else:
            items.append(draw(st.lists(attempt, min_size=1, max_size=3)))
    limit_kind = "limiter" if shared else draw(st.sampled_from(["none", "int", "limiter"]))
    retry_kind = draw(st.sampled_from(["none", "none", "pk", "pk_boom", "tenacity"]))
    source = "list" if api == "gather" else draw(st.sampled_from(["list", "gen", "agen"]))
    case = Case(
        api=api,
        items=items,
        limit_kind=limit_kind,
        bound=draw(st.integers(1, 4)),
        rate=draw(st.sampled_from([None, None, 1.0, 4.0])),
        limiter_rate=draw(st.sampled_from([None, None, 2.0])) if limit_kind == "limiter" else None,
        timeout=draw(st.sampled_from([None, None, 0.5, 1.5, 2.5])),
        retry_kind=retry_kind,
        attempts=draw(st.integers(1, 3)),
        settle=draw(st.sampled_from([False, False, True] if shared else [False, True])),
        source=source,
        source_fails_at=(
            None if source == "list" else draw(st.one_of(st.none(), st.integers(0, len(items))))
        ),
        cancel_at=draw(st.sampled_from([None, None, 0.0, 0.5, 1.5, 3.5, 7.5])),
        rival=draw(st.integers(shared, 4)) if limit_kind == "limiter" else 0,
        rival_fails=draw(st.booleans()),
        progress=api == "map" and draw(st.booleans()),
    )
    if api == "imap":
        case.ordered = draw(st.booleans())
        case.consumer = draw(st.sampled_from(["all", "all", "break", "raise"]))
        case.consume = draw(st.integers(0, len(items)))
        case.consumer_delay = draw(st.integers(0, 2))
    return case


# ---------------------------------------------------------------- the world
@dataclass
class World:
    """Everything the items, the input and the consumer saw."""

    case: Case
    running: int = 0  # attempts of ours running now
    rival_running: int = 0
    peak: int = 0  # most attempts of ours (and the rival's, if sharing) at once
    calls: Counter[int] = field(default_factory=Counter)
    errors: dict[tuple[int, int], BaseException] = field(default_factory=dict)
    starts: list[float] = field(default_factory=list)  # attempt start times (rate)
    rival_starts: list[float] = field(default_factory=list)
    failed: bool = False  # an item raised its final error (fail-fast: stop here)
    late: list[tuple[int, int]] = field(default_factory=list)  # started after it
    stopped: float = math.inf  # when the caller was cancelled / the imap consumer left
    progress: list[tuple[int, int | None]] = field(default_factory=list)
    pulled: int = 0
    finished: int = 0  # items whose last attempt ended
    consumed: int = 0  # imap results the consumer took
    ahead: int = 0  # most (pulled - finished), or (pulled - consumed) for imap
    source_error: SourceError | None = None

    def note_peak(self) -> None:
        self.peak = max(self.peak, self.running + self.rival_running)

    async def fn(self, i: int) -> tuple[int, int]:
        case = self.case
        attempt = self.calls[i]
        self.calls[i] += 1
        # fail-fast: nothing starts after the failure, not even in the same tick; after
        # a cancellation (or the consumer leaving) a worker that was already on its way
        # may still take an item in that tick (as a task started just before it would)
        if (self.failed and not case.settle) or anyio.current_time() > self.stopped:
            self.late.append((i, attempt))
        self.starts.append(anyio.current_time())
        plan = case.items[i]
        kind, seconds = plan[min(attempt, len(plan) - 1)]
        last = model(case, i)[1] == attempt + 1
        self.running += 1
        self.note_peak()
        try:
            if kind == "hang":
                await anyio.sleep_forever()
            await anyio.sleep(seconds)
            if kind == "raise":
                exc = Boom(i, attempt)
                self.errors[i, attempt] = exc
                if last:
                    self.failed = True
                raise exc
            return i, attempt
        finally:
            self.running -= 1
            if last:
                self.finished += 1

    async def rival_fn(self, i: int) -> int:
        self.rival_running += 1
        self.note_peak()
        self.rival_starts.append(anyio.current_time())
        try:
            await anyio.sleep(1 + i % 2)
            if i == 1 and self.case.rival_fails:
                raise Boom("rival")
            return i
        finally:
            self.rival_running -= 1

    def note_pull(self) -> None:
        self.pulled += 1
        done = self.consumed if self.case.api == "imap" else self.finished
        self.ahead = max(self.ahead, self.pulled - done)

    def source_error_at(self, index: int) -> SourceError:
        self.source_error = SourceError(index)
        return self.source_error

    def gen(self) -> Iterator[int]:
        for i in range(len(self.case.items)):
            if self.case.source_fails_at == i:
                raise self.source_error_at(i)
            self.note_pull()
            yield i
        if self.case.source_fails_at == len(self.case.items):
            raise self.source_error_at(len(self.case.items))

    async def agen(self) -> AsyncIterator[int]:
        for i in range(len(self.case.items)):
            await anyio.lowlevel.checkpoint()
            if self.case.source_fails_at == i:
                raise self.source_error_at(i)
            self.note_pull()
            yield i
        if self.case.source_fails_at == len(self.case.items):
            raise self.source_error_at(len(self.case.items))

    def items(self) -> Any:
        if self.case.source == "gen":
            return self.gen()
        if self.case.source == "agen":
            return self.agen()
        return list(range(len(self.case.items)))


def build_options(case: Case) -> tuple[dict[str, Any], pk.Limiter | None]:
    limiter = None
    options: dict[str, Any] = {"rate": case.rate, "timeout": case.timeout}
    if case.limit_kind == "int":
        options["limit"] = case.bound
    elif case.limit_kind == "limiter":
        limiter = pk.Limiter(concurrency=case.bound, rate=case.limiter_rate)
        options["limit"] = limiter
    if case.retry_kind == "pk":
        options["retry"] = pk.Retry(attempts=case.attempts, backoff=0.5, max_backoff=1.0)
    elif case.retry_kind == "pk_boom":
        options["retry"] = pk.Retry(attempts=case.attempts, backoff=0, on=(Boom,))
    elif case.retry_kind == "tenacity":
        options["retry"] = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(case.attempts),
            wait=tenacity.wait_fixed(0.25),
            reraise=True,
        )
    return options, limiter


# ---------------------------------------------------------------- the run
@dataclass
class Run:
    result: Any = None
    error: BaseException | None = None
    cancelled: bool = False
    guard_hit: bool = False
    returned: bool = False
    rival: list[int] | None = None
    tasks_before: int = 0
    tasks_after: int = 0
    limiter_after: pk.LimiterStatistics | None = None


async def fan_out(world: World, options: dict[str, Any]) -> Any:
    case = world.case
    if case.api == "gather":
        if case.retry_kind == "none":
            aws: list[Any] = [world.fn(i) for i in range(len(case.items))]
        else:
            aws = [lambda i=i: world.fn(i) for i in range(len(case.items))]
        return await pk.gather(*aws, settle=case.settle, **options)
    if case.api == "map":
        if case.progress:
            options["progress"] = lambda done, total: world.progress.append((done, total))
        return await pk.map(world.fn, world.items(), settle=case.settle, **options)
    got: list[Any] = []
    async with pk.imap(
        world.fn, world.items(), ordered=case.ordered, settle=case.settle, **options
    ) as results:
        async for value in results:
            world.consumed += 1
            if case.consumer != "all" and len(got) >= case.consume:
                world.stopped = anyio.current_time()
                if case.consumer == "break":
                    break
                raise ConsumerError
            got.append(value)
            if case.consumer_delay:
                await anyio.sleep(case.consumer_delay)
    return got


def execute(case: Case, backend: str) -> tuple[World, Run]:
    world = World(case)
    run = Run()

    async def main() -> None:
        options, limiter = build_options(case)
        run.tasks_before = live_tasks()

        async def rival() -> None:
            try:
                run.rival = await pk.map(world.rival_fn, range(case.rival), limit=limiter)
            except Boom as exc:
                run.rival = [exc.args[0]]

        async def caller() -> None:
            with anyio.move_on_after(GUARD) as guard:
                with anyio.CancelScope() as scope:
                    if case.cancel_at is not None:
                        tg.start_soon(cancel_later, scope, case.cancel_at)
                    try:
                        run.result = await fan_out(world, options)
                    except Exception as exc:
                        run.error = exc
                    finally:
                        run.returned = True
                run.cancelled = scope.cancelled_caught
            run.guard_hit = guard.cancelled_caught

        async def cancel_later(scope: anyio.CancelScope, delay: float) -> None:
            await anyio.sleep(delay)
            if not run.returned:
                world.stopped = anyio.current_time()
            scope.cancel()

        async with anyio.create_task_group() as tg:
            if case.rival:
                tg.start_soon(rival)
            tg.start_soon(caller)
        run.tasks_after = live_tasks()
        if limiter is not None:
            run.limiter_after = limiter.statistics()

    run_virtual(main, backend)
    return world, run


# ---------------------------------------------------------------- the checks
def check_outcome(world: World, i: int, outcome: Any) -> None:
    final, used = model(world.case, i)
    assert isinstance(outcome, pk.Outcome)
    if final == "ok":
        assert outcome.ok, (i, outcome)
        assert outcome.value == (i, used - 1)
    elif final == "raise":
        assert outcome.error is world.errors[i, used - 1], (i, outcome)
    else:
        assert final == "timeout", (i, final)
        assert type(outcome.error) is TimeoutError, (i, outcome)
    assert world.calls[i] == used, (i, world.calls[i], used)


def item_errors(world: World) -> list[BaseException]:
    return [
        world.errors[i, used - 1]
        for i in range(len(world.case.items))
        for final, used in [model(world.case, i)]
        if final == "raise" and (i, used - 1) in world.errors
    ]


def check(world: World, run: Run) -> None:
    case = world.case
    n = len(case.items)
    # nothing left behind
    assert world.running == 0
    assert world.rival_running == 0
    assert run.tasks_after == run.tasks_before
    if run.limiter_after is not None:
        assert (run.limiter_after.running, run.limiter_after.waiting) == (0, 0)
    if case.rival:
        failed = case.rival_fails and case.rival > 1
        assert run.rival == (["rival"] if failed else list(range(case.rival)))
    # the bound: at most `limit` attempts running, the rival's included when shared
    if case.limit_kind != "none":
        assert world.peak <= case.bound, (world.peak, case.bound)
        assert world.ahead <= (2 * case.bound if case.api == "imap" else case.bound) + 1, (
            world.ahead
        )
    # the rate: starts at least 1/rate apart
    # the rate: a call's own starts 1/rate apart (taken last, just before the start); a
    # shared limiter's: no window of 1 s holds more than `rate` of all its users' starts
    if case.rate is not None:
        gaps = [b - a for a, b in itertools.pairwise(sorted(world.starts))]
        assert all(gap >= 1 / case.rate - 1e-9 for gap in gaps), (case.rate, world.starts)
    if case.limiter_rate is not None:
        starts = sorted(world.starts + world.rival_starts)
        for k, t in enumerate(starts):
            in_window = [u for u in starts[k:] if u < t + 1.0 - 1e-9]
            assert len(in_window) <= math.ceil(case.limiter_rate), (case.limiter_rate, starts)
    # retries: never more attempts than the policy allows
    for i in range(n):
        assert world.calls[i] <= model(case, i)[1], (i, world.calls[i])
    # fail-fast: nothing starts after the first failure
    assert world.late == [], world.late

    can_hang = any(model(case, i)[0] == "hang" for i in range(n))
    if run.guard_hit:
        assert can_hang, "the fan-out hung"
        return
    if run.cancelled:
        return
    error = run.error
    if error is not None:
        assert not isinstance(error, BaseExceptionGroup), repr(error)
        if isinstance(error, ConsumerError):
            assert case.consumer == "raise"
            return
        if isinstance(error, SourceError):
            assert error is world.source_error
            return
        assert not case.settle or isinstance(error, ConsumerError), repr(error)
        if isinstance(error, TimeoutError):
            assert type(error) is TimeoutError
            assert any(model(case, i)[0] == "timeout" for i in range(n))
        else:
            assert any(error is e for e in item_errors(world)), repr(error)
        return
    # it returned
    assert world.source_error is None or (case.api == "imap" and case.consumer != "all")
    if case.api == "imap":
        check_imap_result(world, run.result)
        return
    results = run.result
    assert len(results) == n
    if case.progress:
        total = n if case.source == "list" else None
        assert world.progress == [(k, total) for k in range(1, n + 1)]
    for i, value in enumerate(results):
        if case.settle:
            check_outcome(world, i, value)
        else:
            assert model(case, i)[0] == "ok"
            assert value == (i, model(case, i)[1] - 1)
            assert world.calls[i] == model(case, i)[1]


def check_imap_result(world: World, got: list[Any]) -> None:
    case = world.case
    n = len(case.items)
    if case.consumer == "all":
        assert len(got) == n
    else:
        assert len(got) == min(n, case.consume)
    if case.settle:
        indexes = []
        for outcome in got:
            assert isinstance(outcome, pk.Outcome)
            if outcome.ok:
                indexes.append(outcome.value[0])
            else:
                found = [i for (i, _a), e in world.errors.items() if e is outcome.error]
                if found:
                    indexes.append(found[0])
                else:
                    assert type(outcome.error) is TimeoutError
                    indexes.append(None)
        if case.consumer == "all":
            for outcome, i in zip(got, indexes, strict=True):
                if i is not None:
                    check_outcome(world, i, outcome)
    else:
        indexes = [value[0] for value in got]
        for i, attempt in got:
            assert model(case, i) == ("ok", attempt + 1)
    if case.ordered:
        assert indexes == list(range(len(got))) or None in indexes
    else:
        known = [i for i in indexes if i is not None]
        assert len(set(known)) == len(known)


# ---------------------------------------------------------------- the properties
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("api", ["map", "gather"])
@PROPERTY
@given(data=st.data())
def test_map_and_gather_against_the_model(api: str, backend: str, data: st.DataObject) -> None:
    case = data.draw(cases(api))
    world, run = execute(case, backend)
    check(world, run)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(data=st.data())
def test_imap_against_the_model(backend: str, data: st.DataObject) -> None:
    case = data.draw(cases("imap"))
    world, run = execute(case, backend)
    check(world, run)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(data=st.data())
def test_a_limiter_shared_with_another_map(backend: str, data: st.DataObject) -> None:
    """Found: an item started after the failure (the failing one handed its slot to a
    worker of ours); the shared rate exceeded when the call has a rate of its own."""
    case = data.draw(cases(data.draw(st.sampled_from(["map", "gather", "imap"])), shared=True))
    world, run = execute(case, backend)
    check(world, run)
