"""pk.Flow under randomized fault injection, on virtual time (asyncio and trio).

Each example builds a random DAG of steps wired by parameter name (with run inputs,
optional inputs, per-step timeouts and retries), gives each step a virtual duration
and a behaviour (succeed, fail, block on an event never set, fail a few attempts
then succeed), runs it with a random ``limit`` / ``settle`` / caller cancellation and
checks the run against a model computed from the case. Time is virtual on both
backends (trio's ``MockClock(autojump_threshold=0)``, an asyncio loop whose clock
jumps to the next timer when idle), so every time below is exact.

Durations are chosen so that events that could race never share an instant: a step
that succeeds takes a multiple of 4 seconds, a failure (or a timeout) happens at a
time that is 1 modulo 4 after its start, the caller is cancelled at 2 modulo 4.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import parallelkit as pk

from .test_fanout import live_tasks
from .virtual_time import run_virtual

T = TypeVar("T")

BACKENDS = ["asyncio", "trio"]
NEVER = 10_002.0  # a caller cancellation nothing else reaches (2 modulo 4)
GUARD = 100_000.0  # virtual seconds: a hang fails the example instead of the suite
PROPERTY = settings(
    derandomize=True,
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_virtual_clocks_are_exact(backend: str) -> None:
    async def main() -> float:
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep, 3)
            tg.start_soon(anyio.sleep, 7)
        with anyio.move_on_after(2):
            await anyio.sleep_forever()
        return anyio.current_time() - start

    assert run_virtual(main, backend) == 9.0


# -- the random cases ---------------------------------------------------------------------
@dataclass(frozen=True)
class Behaviour:
    """What a step does: ``ok`` (sleep ``time``), ``fail`` (sleep ``time``, raise),
    ``block`` (wait for an event never set), ``flaky`` (its first ``failures``
    attempts fail, under ``Retry(attempts=attempts, backoff=0)``)."""

    kind: str
    time: int = 0
    failures: int = 0
    attempts: int = 1
    timeout: int | None = None


@dataclass(frozen=True)
class Case:
    deps: tuple[tuple[str, ...], ...]  # per step s<i>: the earlier steps it needs
    defaulted: tuple[tuple[str, ...], ...]  # the deps it names with a default value
    needs: tuple[tuple[str, ...], ...]  # required inputs it takes
    optional: tuple[tuple[str, ...], ...]  # optional inputs it takes
    how: tuple[Behaviour, ...]
    order: tuple[int, ...]  # registration order
    given: tuple[str, ...]  # the optional inputs the run passes
    limit: int | None
    shared: bool  # the limit as a shared pk.Limiter
    settle: bool
    cancel_at: float | None

    @property
    def names(self) -> list[str]:
        return [f"s{i}" for i in range(len(self.deps))]


INPUTS = ("x0", "x1", "x2")
OPTIONAL = ("y0", "y1")


@st.composite
def behaviours(draw: st.DrawFn) -> Behaviour:
    kind = draw(st.sampled_from(["ok", "ok", "ok", "fail", "block", "flaky", "now", "now_fail"]))
    if kind in ("now", "now_fail"):  # never suspends
        return Behaviour(kind)
    if kind == "ok":
        time = draw(st.sampled_from([0, 4, 8]))
        timeout = draw(st.none() | st.sampled_from([1, 5, 9]))
        return Behaviour("ok", time, timeout=timeout)
    if kind == "fail":
        return Behaviour("fail", draw(st.sampled_from([1, 5, 9])))
    if kind == "block":
        return Behaviour("block", timeout=draw(st.none() | st.sampled_from([1, 5])))
    attempts = draw(st.integers(1, 3))
    return Behaviour("flaky", failures=draw(st.integers(0, 3)), attempts=attempts)


@st.composite
def cases(draw: st.DrawFn, *, faults: bool = True) -> Case:
    size = draw(st.integers(1, 8))
    deps, defaulted, needs, optional, how = [], [], [], [], []
    for i in range(size):
        earlier = [f"s{j}" for j in range(i)]
        mine = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3)) if i else []
        deps.append(tuple(mine))
        defaulted.append(tuple(d for d in mine if draw(st.integers(0, 4)) == 0))
        needs.append(tuple(draw(st.lists(st.sampled_from(INPUTS), unique=True, max_size=2))))
        optional.append(tuple(draw(st.lists(st.sampled_from(OPTIONAL), unique=True, max_size=1))))
        how.append(
            draw(behaviours()) if faults else Behaviour("ok", draw(st.sampled_from([0, 4, 8])))
        )
    order = tuple(draw(st.permutations(range(size))))
    used_optional = sorted({name for names in optional for name in names})
    given_optional = (
        tuple(draw(st.lists(st.sampled_from(used_optional), unique=True))) if used_optional else ()
    )
    limit = draw(st.none() | st.integers(1, 4))
    shared = limit is not None and draw(st.booleans())
    settle = draw(st.booleans())
    cancel_at = draw(st.none() | st.integers(0, 15).map(lambda k: 4.0 * k + 2))
    return Case(
        tuple(deps), tuple(defaulted), tuple(needs), tuple(optional), tuple(how), order,
        given_optional, limit, shared, settle, cancel_at,
    )  # fmt: skip


# -- the model: what a run without a limit does, second by second ----------------------------
@dataclass
class Model:
    status: dict[str, str]  # "ok", "error", "block" (never ends), "skipped"
    start: dict[str, float]
    end: dict[str, float]  # for "ok" / "error": when; "skipped": when it was skipped


def model(case: Case) -> Model:
    status: dict[str, str] = {}
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    for i, name in enumerate(case.names):
        deps = case.deps[i]
        bad = [d for d in deps if status[d] != "ok"]
        if bad:
            status[name] = "skipped"
            failed_at = [end[d] for d in bad if d in end]
            end[name] = min(failed_at) if failed_at else math.inf
            continue
        begin = max((end[d] for d in deps), default=0.0)
        start[name] = begin
        how = case.how[i]
        if how.kind == "ok":
            if how.timeout is not None and how.timeout < how.time:
                status[name], end[name] = "error", begin + how.timeout
            else:
                status[name], end[name] = "ok", begin + how.time
        elif how.kind == "fail":
            status[name], end[name] = "error", begin + how.time
        elif how.kind in ("now", "now_fail"):
            status[name], end[name] = ("ok" if how.kind == "now" else "error"), begin
        elif how.kind == "block":
            if how.timeout is None:
                status[name] = "block"
            else:
                status[name], end[name] = "error", begin + how.timeout
        elif how.failures < how.attempts:
            status[name], end[name] = "ok", begin + 4 * (how.failures + 1)
        else:
            status[name], end[name] = "error", begin + 4 * (how.attempts - 1) + 5
    return Model(status, start, end)


# -- the steps: each logs what it saw --------------------------------------------------------
class StepError(Exception):
    pass


@dataclass
class Log:
    origin: float = 0.0
    running: int = 0  # attempts running
    steps: int = 0  # steps between their first attempt's start and their end
    peak: int = 0
    start: dict[str, float] = field(default_factory=dict)
    end: dict[str, float] = field(default_factory=dict)
    exit: dict[str, str] = field(default_factory=dict)  # "ok", "error", "cancelled"
    raised: dict[str, BaseException] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    fns: dict[str, Callable[..., Any]] = field(default_factory=dict)  # the step functions

    def now(self) -> float:
        return anyio.current_time() - self.origin


def value_of(name: str) -> str:
    return f"value of {name}"


def build(case: Case, log: Log, never: anyio.Event) -> pk.Flow:
    flow = pk.Flow(name="random")
    for i in case.order:
        name, how = f"s{i}", case.how[i]

        async def behave(kwargs: dict[str, Any], name: str = name, how: Behaviour = how) -> str:
            attempt = log.attempts.get(name, 0)
            log.attempts[name] = attempt + 1
            if attempt == 0:
                assert name not in log.start, f"{name} started twice"
                log.start[name] = log.now()
                log.kwargs[name] = kwargs
                log.steps += 1
                log.peak = max(log.peak, log.steps)
            log.running += 1
            try:
                if how.kind == "ok":
                    await anyio.sleep(how.time)
                elif how.kind == "fail":
                    await anyio.sleep(how.time)
                    raise StepError(name)
                elif how.kind == "now_fail":
                    raise StepError(name)
                elif how.kind == "now":
                    pass
                elif how.kind == "block":
                    await never.wait()
                elif attempt < how.failures:
                    last = attempt == how.attempts - 1
                    await anyio.sleep(5 if last else 4)
                    raise StepError(f"{name} attempt {attempt}")
                else:
                    await anyio.sleep(4)
            except BaseException as exc:
                log.running -= 1
                final = how.kind != "flaky" or attempt >= how.attempts - 1
                if isinstance(exc, anyio.get_cancelled_exc_class()) or final:
                    log.steps -= 1
                    log.end[name] = log.now()
                    log.exit[name] = "error" if isinstance(exc, StepError) else "cancelled"
                    if isinstance(exc, StepError):
                        log.raised[name] = exc
                raise
            log.running -= 1
            log.steps -= 1
            log.end[name] = log.now()
            log.exit[name] = "ok"
            return value_of(name)

        deps, defaulted = case.deps[i], case.defaulted[i]
        params = [d for d in deps if d not in defaulted]
        params += list(case.needs[i])
        params += [f"{d}=None" for d in defaulted]
        params += [f"{y}={y!r}" for y in case.optional[i]]
        every = [*deps, *case.needs[i], *case.optional[i]]
        namespace: dict[str, Any] = {"behave": behave}
        exec(  # a step with exactly these parameter names
            f"async def {name}({', '.join(params)}):\n"
            f"    return await behave({{{', '.join(f'{p!r}: {p}' for p in every)}}})\n",
            namespace,
        )
        options: dict[str, Any] = {}
        if how.timeout is not None:
            options["timeout"] = how.timeout
        if how.kind == "flaky":
            options["retry"] = pk.Retry(attempts=how.attempts, backoff=0)
        log.fns[name] = flow.step(**options)(namespace[name])
    return flow


def run_case(
    case: Case,
    log: Log,
    limiter: pk.Limiter | None,
    inputs: dict[str, Any],
    cancel_at: float | None,
    backend: str,
) -> tuple[Any, BaseException | None, float, int, int]:
    """Run the case's flow on virtual time (``limiter``: the shared limit, if any), the
    caller giving up at ``cancel_at``: (result, the error raised, the time it ended,
    live tasks before, live tasks after)."""

    async def main() -> tuple[Any, BaseException | None, float, int, int]:
        never = anyio.Event()
        flow = build(case, log, never)
        before = live_tasks()
        outcome: Any = None
        error: BaseException | None = None
        with anyio.fail_after(GUARD):
            log.origin = anyio.current_time()
            limit = limiter if limiter is not None else case.limit
            with anyio.move_on_after(math.inf if cancel_at is None else cancel_at):
                try:
                    outcome = await flow.run(limit=limit, settle=case.settle, **inputs)
                except Exception as exc:
                    error = exc
        await anyio.lowlevel.checkpoint()
        return outcome, error, log.now(), before, live_tasks()

    return run_virtual(main, backend)


def run_inputs(case: Case) -> dict[str, Any]:
    used = {x for needs in case.needs for x in needs}
    inputs: dict[str, Any] = {x: f"input {x}" for x in sorted(used)}
    inputs.update({y: f"input {y}" for y in case.given})
    return inputs


# -- checks shared by the properties ------------------------------------------------------------
def check_kwargs(case: Case, log: Log, inputs: dict[str, Any]) -> None:
    """Every step that started got its dependencies' values, its inputs, its defaults."""
    for i, name in enumerate(case.names):
        if name not in log.kwargs:
            continue
        expected = {d: value_of(d) for d in case.deps[i]}
        expected.update({x: inputs[x] for x in case.needs[i]})
        expected.update({y: inputs.get(y, y) for y in case.optional[i]})
        assert log.kwargs[name] == expected, name


def check_order_and_limit(case: Case, log: Log) -> None:
    """No step started before all it needs had finished; never over ``limit``."""
    for i, name in enumerate(case.names):
        if name in log.start:
            for dep in case.deps[i]:
                assert log.exit.get(dep) == "ok", (name, dep)
                assert log.end[dep] <= log.start[name], (name, dep)
    if case.limit is not None:
        assert log.peak <= case.limit


def check_work_conserving(case: Case, log: Log, until: float) -> None:
    """With a limit, a step ready but not started means every slot was busy."""
    assert case.limit is not None
    points = sorted({0.0, until, *log.start.values(), *log.end.values()})

    def busy(t: float) -> int:
        return sum(
            1 for n, s in log.start.items() if s < t and (n not in log.end or t < log.end[n])
        )

    for i, name in enumerate(case.names):
        if any(log.exit.get(d) != "ok" for d in case.deps[i]):
            continue  # never ready
        ready = max((log.end[d] for d in case.deps[i]), default=0.0)
        began = log.start.get(name, until)
        for a, b in itertools.pairwise(points):
            if ready <= a and b <= began:
                mid = (a + b) / 2
                assert busy(mid) == case.limit, (name, mid, busy(mid))


def check_timeline(case: Case, log: Log, timeline: pk.Timeline, exact: bool) -> None:
    origin = timeline.origin
    assert origin == log.origin
    spans = {s.name: s for s in timeline}
    assert len(spans) == len(timeline) == len(case.names)
    for i, name in enumerate(case.names):
        span = spans[name]
        assert span.kind == "step"
        assert sorted(span.waited_for) == sorted(case.deps[i])
        assert span.start <= span.end
        assert span.queued <= span.start
        if name in log.start:
            assert span.start - origin == log.start[name]
            assert span.end - origin == log.end[name]
            assert span.status == log.exit[name] or (
                log.exit[name] == "cancelled" and span.status == "error"  # a timeout
            ), (name, span.status, log.exit[name])
            ready = max((log.end[d] for d in case.deps[i]), default=0.0)
            assert span.queued - origin == (ready if case.limit is not None else log.start[name])
        else:
            assert span.status == "skipped"
            assert span.queued == span.start == span.end
    ends = [s.end for s in timeline]
    assert ends == sorted(ends)  # recorded in the order they finished
    assert timeline.total == max(ends) - origin
    path = timeline.critical_path()
    ran = [s for s in timeline if s.status != "skipped"]
    if not ran:
        assert path == ()
    else:
        assert path[-1].end == max(s.end for s in ran)
        assert not [d for d in path[0].waited_for if spans[d].status != "skipped"]
        for before, after in itertools.pairwise(path):
            assert before.name in after.waited_for
            # the dependency that ended last among those that ran
            assert before.end == max(
                spans[d].end for d in after.waited_for if spans[d].status != "skipped"
            )
        if exact:  # no limit: each step started when its last dependency ended
            assert path[0].start == origin
            for before, after in itertools.pairwise(path):
                assert after.start == before.end
            assert sum(s.duration for s in path) == path[-1].end - origin
    as_dict = timeline.to_dict()
    assert as_dict["total"] == timeline.total
    assert as_dict["critical_path"] == [s.name for s in path]
    assert [d["name"] for d in as_dict["spans"]] == [s.name for s in timeline]
    for d, s in zip(as_dict["spans"], timeline, strict=True):
        assert (d["queued"], d["start"], d["end"]) == (
            s.queued - origin, s.start - origin, s.end - origin
        )  # fmt: skip
        assert (d["status"], d["waited_for"]) == (s.status, list(s.waited_for))
    text = timeline.to_text().splitlines()
    assert len(text) == 1 + len(timeline) + (1 if path else 0)
    rows = text[1 : 1 + len(timeline)]
    assert sorted(r.split(" |")[0].strip() for r in rows) == sorted(spans)
    mermaid = timeline.to_mermaid().splitlines()
    tasks = [line for line in mermaid[4:] if not line.strip().startswith("section")]
    assert len(tasks) == len(timeline)
    assert sum(":crit," in line for line in tasks) == len(path)


# -- the property ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=cases())
def test_a_random_flow_with_random_faults_keeps_its_promises(backend: str, case: Case) -> None:
    expected = model(case)
    inputs = run_inputs(case)
    exact = case.limit is None
    cancel_at = case.cancel_at
    blocks = "block" in expected.status.values()
    if blocks and cancel_at is None and (case.settle or not any(
        s == "error" for s in expected.status.values()
    )):  # fmt: skip
        cancel_at = NEVER  # it would never end: the caller gives up
    if case.limit is not None and cancel_at is None and blocks:
        cancel_at = NEVER  # a blocked step may hold the only slot
    log = Log()
    limiter = pk.Limiter(concurrency=case.limit) if case.shared else None
    run = run_case(case, log, limiter, inputs, cancel_at, backend)
    outcome, error, ended, before, after = run

    # nothing of the run is left: no step running, no task, no slot held
    assert log.running == 0
    assert after == before
    for name in log.start:
        if name not in log.end:  # cancelled between two attempts (in the retry's wait)
            assert case.how[int(name[1:])].kind == "flaky"
            assert (outcome, log.exit.get(name)) == (None, None)
            log.end[name], log.exit[name] = ended, "cancelled"
            log.steps -= 1
    assert log.steps == 0
    if limiter is not None:
        assert limiter.statistics().running == 0
    check_kwargs(case, log, inputs)
    check_order_and_limit(case, log)

    failures = [n for n, s in expected.status.items() if s == "error"]
    first_failure = min((expected.end[n] for n in failures), default=math.inf)
    stop = min(cancel_at if cancel_at is not None else math.inf,
               first_failure if not case.settle else math.inf)  # fmt: skip

    if outcome is None and error is None:  # the caller was cancelled
        assert cancel_at is not None
        assert ended == cancel_at
        assert all(start < cancel_at for start in log.start.values())
        if exact:
            assert cancel_at < first_failure or case.settle
            ran = {n for n, s in expected.start.items() if s < cancel_at}
            assert set(log.start) == ran
        elif case.limit is not None:
            check_work_conserving(case, log, cancel_at)
        return

    if error is not None:  # fail-fast: the first failure, unchanged
        assert not case.settle
        raised_at = log.end[next(n for n, e in log.raised.items() if e is error)] if isinstance(
            error, StepError
        ) else None  # fmt: skip
        assert isinstance(error, (StepError, TimeoutError)), repr(error)
        failed_now = [
            n for n in log.end if log.exit[n] != "ok" and log.end[n] == ended
            and n in log.start and expected.status.get(n) == "error"
        ]  # fmt: skip
        assert failed_now, (ended, log.exit)
        if raised_at is not None:
            assert raised_at == ended
        # no step started after the failure; everything still running was cancelled
        # (a step ready at the very instant of the failure may have started with it)
        assert all(start <= ended for start in log.start.values())
        assert all(end <= ended for end in log.end.values())
        if exact:
            assert ended == stop == first_failure
            assert {n for n, s in expected.start.items() if s < ended} <= set(log.start)
            assert set(log.start) <= {n for n, s in expected.start.items() if s <= ended}
            assert any(expected.end[n] == ended for n in failures)
        else:
            check_work_conserving(case, log, ended)
        return

    # the run completed
    assert cancel_at is None or ended < cancel_at
    timeline: pk.Timeline = outcome.timeline
    check_timeline(case, log, timeline, exact)
    if case.limit is not None:
        check_work_conserving(case, log, ended)
    assert ended == timeline.total
    if not case.settle:
        assert not failures
        assert dict(outcome) == {n: value_of(n) for n in case.names}
        if exact:
            assert ended == max(expected.end.values(), default=0.0)
        return
    assert isinstance(outcome, pk.FlowOutcomes)
    assert set(outcome) == set(case.names)
    for i, name in enumerate(case.names):
        result = outcome[name]
        status = expected.status[name]
        assert status != "block"
        if status == "ok":
            assert result.ok
            assert result.value == value_of(name)
        elif status == "error":
            if name in log.raised:
                assert result.error is log.raised[name]
            else:
                assert isinstance(result.error, TimeoutError)
            assert timeline[name].status == "error"
        else:
            skipped = result.error
            assert isinstance(skipped, pk.DependencyFailed), repr(skipped)
            assert skipped.step == name
            assert skipped.dependency in case.deps[i]
            assert expected.status[skipped.dependency] in ("error", "skipped")
            assert name not in log.start
            if exact:
                assert timeline[name].start - timeline.origin == expected.end[name]
        if exact and name in expected.start:
            assert log.start[name] == expected.start[name]
            if status != "block":
                assert log.end[name] == expected.end[name]
    assert outcome.ok == (not failures)
    assert set(outcome.errors) == {n for n, s in expected.status.items() if s != "ok"}


# -- everything at once: failures, starts and the caller's cancellation share instants --------
@st.composite
def crowded_behaviours(draw: st.DrawFn) -> Behaviour:
    kind = draw(st.sampled_from(["ok", "ok", "fail", "block", "flaky", "now", "now_fail"]))
    if kind in ("now", "now_fail"):
        return Behaviour(kind)
    if kind == "block":
        return Behaviour("block", timeout=draw(st.none() | st.integers(1, 2)))
    if kind == "flaky":
        attempts = draw(st.integers(1, 3))
        return Behaviour("flaky", failures=draw(st.integers(0, 3)), attempts=attempts)
    timeout = draw(st.none() | st.integers(1, 2)) if kind == "ok" else None
    return Behaviour(kind, draw(st.integers(0, 2)), timeout=timeout)


@st.composite
def crowded_cases(draw: st.DrawFn) -> Case:
    case = draw(cases())
    how = tuple(draw(crowded_behaviours()) for _ in case.how)
    cancel_at = draw(st.none() | st.integers(0, 6).map(float))
    return Case(
        case.deps, case.defaulted, case.needs, case.optional, how, case.order, case.given,
        case.limit, case.shared, case.settle, cancel_at,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=crowded_cases())
def test_a_flow_whose_events_coincide_still_ends_cleanly(backend: str, case: Case) -> None:
    """Failures, step starts, timeouts and the caller's deadline at the same instants:
    whatever wins, the run ends with a result, the first failure's own exception or
    the caller's cancellation, and leaves nothing behind."""
    inputs = run_inputs(case)
    cancel_at = case.cancel_at
    if cancel_at is None and any(h.kind == "block" and h.timeout is None for h in case.how):
        cancel_at = NEVER
    log = Log()
    limiter = pk.Limiter(concurrency=case.limit) if case.shared else None
    run = run_case(case, log, limiter, inputs, cancel_at, backend)
    outcome, error, ended, before, after = run
    assert log.running == 0
    assert after == before
    for name in log.start:
        if name not in log.end:  # cancelled between two attempts
            assert outcome is None
            log.end[name], log.exit[name] = ended, "cancelled"
            log.steps -= 1
    assert log.steps == 0
    if limiter is not None:
        assert limiter.statistics().running == 0
    check_kwargs(case, log, inputs)
    check_order_and_limit(case, log)
    assert all(start <= ended for start in log.start.values())
    if error is not None:
        assert not case.settle
        if isinstance(error, StepError):
            assert any(e is error for e in log.raised.values())
        else:
            assert isinstance(error, TimeoutError), repr(error)
        # the first failure: nothing failed before the run ended
        assert all(log.end[n] == ended for n in log.raised)
        return
    if outcome is None:
        assert ended == cancel_at
        return
    assert cancel_at is None or ended <= cancel_at
    check_timeline(case, log, outcome.timeline, exact=False)
    if not case.settle:
        assert not log.raised
        assert dict(outcome) == {n: value_of(n) for n in case.names}
        return
    for i, name in enumerate(case.names):
        result = outcome[name]
        if name in log.raised:
            assert result.error is log.raised[name]
        elif name not in log.start:
            assert isinstance(result.error, pk.DependencyFailed)
            assert result.error.dependency in case.deps[i]
            assert not outcome[result.error.dependency].ok
        elif result.ok:
            assert result.value == value_of(name)
        else:
            assert isinstance(result.error, TimeoutError)


# -- definition errors: cycles, unknown names, stray and clashing inputs ----------------------
def simple_step(name: str, params: list[str], started: list[str]) -> Callable[..., Any]:
    async def behave(name: str = name) -> str:
        started.append(name)
        await anyio.sleep(1)
        return value_of(name)

    namespace: dict[str, Any] = {"behave": behave}
    exec(  # a step with exactly these parameter names
        f"async def {name}({', '.join(params)}):\n    return await behave()\n", namespace
    )
    fn: Callable[..., Any] = namespace[name]
    return fn


def reaches(edges: dict[str, list[str]], start: str, goal: str) -> bool:
    """Whether ``start`` needs ``goal``, directly or not, through ``edges``."""
    stack, seen = [start], set()
    while stack:
        here = stack.pop()
        for dep in edges.get(here, []):
            if dep == goal:
                return True
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return False


@PROPERTY
@given(
    wanted=st.integers(1, 7).flatmap(
        lambda n: st.lists(
            st.lists(st.integers(0, n - 1), unique=True, max_size=3), min_size=n, max_size=n
        )
    ),
    extra=st.sampled_from(["none", "stray", "clash", "missing"]),
)
def test_cycles_and_wiring_errors_are_raised_before_any_step_starts(
    wanted: list[list[int]], extra: str
) -> None:
    """Steps wired at random (cycles included), registered in order: a step that closes
    a cycle is refused by its decorator with a real cycle through it; the others are
    kept. ``run()`` then refuses, before any step starts, a parameter that names no
    step (one refused), a missing input, a stray input and an input named like a step."""
    started: list[str] = []
    flow = pk.Flow()
    edges: dict[str, list[str]] = {}
    for i, deps in enumerate(wanted):
        name = f"s{i}"
        params = [f"s{d}" for d in deps]
        if extra == "missing" and i == 0:
            params.append("x0")
        closes = any(reaches(edges, f"s{d}", name) or d == i for d in deps)
        try:
            flow.step(simple_step(name, params, started))
        except pk.CycleError as exc:
            assert closes
            cycle = exc.cycle
            assert cycle[0] == cycle[-1] == name
            for here, needs in itertools.pairwise(cycle):  # each names the next
                assert needs in (edges.get(here, []) if here != name else params)
        else:
            assert not closes
            edges[name] = params
    assert tuple(edges) == flow.steps
    unknown = sorted({d for deps in edges.values() for d in deps} - set(edges) - {"x0"})
    inputs: dict[str, Any] = {}
    if extra == "stray":
        inputs["stray"] = 1
    if extra == "clash" and edges:
        inputs[next(iter(edges))] = 1

    async def main() -> None:
        await flow.run(**inputs)

    if extra in ("stray", "clash") and inputs:
        with pytest.raises(TypeError, match=repr(next(iter(inputs)))):
            run_virtual(main, "trio")
    elif unknown or (extra == "missing" and "s0" in edges):
        with pytest.raises(pk.DefinitionError, match="neither a step nor a run input"):
            run_virtual(main, "trio")
    else:
        run_virtual(main, "trio")
        assert sorted(started) == sorted(edges)
        return
    assert started == []


# -- targets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=cases(faults=False), data=st.data())
def test_targets_run_exactly_what_they_need(backend: str, case: Case, data: st.DataObject) -> None:
    chosen = data.draw(st.lists(st.sampled_from(case.names), min_size=1, max_size=3, unique=True))
    needed: set[str] = set()
    stack = list(chosen)
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack.extend(case.deps[int(name[1:])])
    # only the inputs the needed steps take: the others may be left out
    inputs = {
        k: v for k, v in run_inputs(case).items()
        if any(k in case.needs[int(n[1:])] + case.optional[int(n[1:])] for n in needed)
        or k in case.given
    }  # fmt: skip
    by_function = data.draw(st.booleans())
    log = Log()

    async def main() -> pk.FlowResult:
        flow = build(case, log, anyio.Event())
        targets: list[Any] = [log.fns[n] for n in chosen] if by_function else chosen
        log.origin = anyio.current_time()
        return await flow.run(limit=case.limit, targets=targets, **inputs)

    result = run_virtual(main, backend)
    assert set(result) == needed == set(log.start)
    assert {s.name for s in result.timeline} == needed
    for name in needed:
        assert result[name] == value_of(name)
    check_order_and_limit(case, log)


# -- Timeline renderings against random spans ------------------------------------------------
@st.composite
def timelines(draw: st.DrawFn) -> pk.Timeline:
    size = draw(st.integers(1, 8))
    spans = []
    for i in range(size):
        queued = draw(st.integers(0, 40))
        start = queued + draw(st.sampled_from([0, 0, 1, 5]))
        end = start + draw(st.sampled_from([0, 0, 1, 4, 20]))  # ties are common
        status = draw(st.sampled_from(["ok", "ok", "error", "cancelled", "skipped"]))
        if status == "skipped":
            queued = start = end
        earlier = [f"s{j}" for j in range(i)]
        waited = (
            tuple(draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3))) if i else ()
        )
        spans.append(pk.Span(f"s{i}", queued / 4, start / 4, end / 4, status, waited))
    spans = draw(st.permutations(spans))
    origin = draw(st.none() | st.just(0.0))
    return pk.Timeline(spans, origin=origin, name="random")


@PROPERTY
@given(timeline=timelines(), width=st.integers(10, 60))
def test_every_rendering_of_a_timeline_shows_every_span(timeline: pk.Timeline, width: int) -> None:
    origin, total = timeline.origin, timeline.total
    lines = timeline.to_text(width).splitlines()
    path = timeline.critical_path()
    assert len(lines) == 1 + len(timeline) + (1 if path else 0)
    rows = {line.split(" |")[0].strip(): line for line in lines[1 : 1 + len(timeline)]}
    for span in timeline:
        bar = rows[span.name].split("|")[1]
        assert len(bar) == width
        if span.status == "skipped":
            assert "█" not in bar
        else:  # it ran: at least one column, however short and however late
            assert "█" in bar, (span, rows[span.name])
        if "░" in bar:
            assert span.queued < span.start
    if path:
        assert lines[-1] == "critical path: " + " → ".join(s.name for s in path)
    as_dict = timeline.to_dict()
    assert as_dict["total"] == total
    assert [s["name"] for s in as_dict["spans"]] == [s.name for s in timeline]
    mermaid = timeline.to_mermaid().splitlines()
    tasks = [line for line in mermaid[4:] if not line.strip().startswith("section")]
    assert sorted(t.split(" :")[0].strip() for t in tasks) == sorted(s.name for s in timeline)
    assert sum(":crit," in t for t in tasks) == len(path)
    for task in tasks:
        name = task.split(" :")[0].strip()
        start, end = (int(v) for v in task.rsplit(",", 2)[1:])
        span = timeline[name]
        assert start == round((span.start - origin) * 1000)
        assert end == max(round((span.end - origin) * 1000), start)


@PROPERTY
@given(timeline=timelines())
@example(timeline=pk.Timeline([pk.Span("s0", 0, 0, 1), pk.Span("s1", 1, 1, 1, "ok", ("s0",))]))
def test_the_critical_path_is_a_chain_that_ends_last(timeline: pk.Timeline) -> None:
    ran = {s.name: s for s in timeline if s.status != "skipped"}
    path = timeline.critical_path()
    if not ran:
        assert path == ()
        return
    last = max(s.end for s in ran.values())
    assert path[-1].end == last
    # the span that ended last: none that waited for it ended with it
    assert not [s for s in ran.values() if s.end == last and path[-1].name in s.waited_for]
    for before, after in itertools.pairwise(path):
        assert before.name in after.waited_for
        deps = [ran[d] for d in after.waited_for if d in ran]
        assert before.end == max(d.end for d in deps)
        assert not [d for d in deps if d.end == before.end and before.name in d.waited_for]
    assert not [d for d in path[0].waited_for if d in ran]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_last_step_that_takes_no_time_is_on_the_critical_path_and_drawn(backend: str) -> None:
    """``record`` does not suspend: it ends at the very reading ``charge`` ended at.
    It still ended last (it could only start once ``charge`` had ended), so the
    critical path ends with it, and the chart draws it (it used to be cut off the
    right edge)."""
    flow = pk.Flow(name="payment")

    @flow.step
    async def charge(payment_id: str) -> str:
        await anyio.sleep(10)
        return f"ch_{payment_id}"

    @flow.step
    async def record(charge: str) -> str:
        return charge

    async def main() -> pk.Timeline:
        return (await flow.run(payment_id="p1")).timeline

    timeline = run_virtual(main, backend)
    assert timeline["record"].end == timeline["charge"].end
    assert [s.name for s in timeline.critical_path()] == ["charge", "record"]
    rows = dict(line.split(" |", 1) for line in timeline.to_text().splitlines()[1:3])
    assert "█" in rows["record"].split("|")[0]
    assert timeline.to_dict()["critical_path"] == ["charge", "record"]


# -- many runs of one flow at once ----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(
    deps=st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            *[
                st.lists(st.sampled_from([f"s{j}" for j in range(i)]), unique=True, max_size=2)
                if i
                else st.just([])
                for i in range(n)
            ]
        )
    ),
    data=st.data(),
)
def test_concurrent_runs_share_nothing_but_the_per_step_limits(
    backend: str, deps: tuple[list[str], ...], data: st.DataObject
) -> None:
    runs = data.draw(st.integers(2, 4))
    times = data.draw(st.lists(st.sampled_from([0, 1, 3]), min_size=len(deps), max_size=len(deps)))
    bounded = data.draw(st.sets(st.integers(0, len(deps) - 1)))
    running: dict[str, int] = {}
    peak: dict[str, int] = {}
    flow = pk.Flow()
    for i, needs in enumerate(deps):
        name = f"s{i}"

        async def behave(run: int, got: dict[str, Any], name: str = name, i: int = i) -> str:
            assert all(v.endswith(f"@{run}") for v in got.values()), (name, run, got)
            running[name] = running.get(name, 0) + 1
            peak[name] = max(peak.get(name, 0), running[name])
            try:
                await anyio.sleep(times[i])
            finally:
                running[name] -= 1
            return f"{name}@{run}"

        namespace: dict[str, Any] = {"behave": behave}
        exec(  # a step with exactly these parameter names
            f"async def {name}({', '.join(['run', *needs])}):\n"
            f"    return await behave(run, {{{', '.join(f'{d!r}: {d}' for d in needs)}}})\n",
            namespace,
        )
        flow.step(limit=1 if i in bounded else None)(namespace[name])
    results: dict[int, pk.FlowResult] = {}

    async def main() -> None:
        async def one(run: int) -> None:
            results[run] = await flow.run(run=run)

        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                for run in range(runs):
                    tg.start_soon(one, run)

    run_virtual(main, backend)
    for run, result in results.items():
        assert dict(result) == {f"s{i}": f"s{i}@{run}" for i in range(len(deps))}
        for i, needs in enumerate(deps):
            span = result.timeline[f"s{i}"]
            assert all(result.timeline[d].end <= span.start for d in needs)
    assert len(results) == runs
    for i in bounded:
        assert peak[f"s{i}"] == 1
    assert not any(running.values())
