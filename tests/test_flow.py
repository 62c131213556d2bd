"""pk.Flow: wiring by parameter name, maximal overlap, errors, fail-fast, settle."""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parallelkit as pk

from .test_fanout import STRAY_NEEDS, live_tasks, stray_cancellation, virtual_clock

pytestmark = pytest.mark.anyio

# a generous bound so that a scheduling bug fails instead of hanging the suite (never
# reached by a passing test, however loaded the machine: nothing here waits on time)
GUARD = 60.0


def payment_flow() -> pk.Flow:
    flow = pk.Flow(name="payment")

    @flow.step
    async def charge(payment_id: str) -> str:
        await anyio.sleep(0.01)
        return f"ch_{payment_id}"

    @flow.step
    async def record(charge: str, payment_id: str) -> tuple[str, str]:
        return (payment_id, charge)

    @flow.step
    async def notify(charge: str, channel: str = "email") -> str:
        return f"{channel}:{charge}"

    return flow


# -- wiring ----------------------------------------------------------------------------
async def test_steps_receive_their_dependencies_by_name() -> None:
    result = await payment_flow().run(payment_id="p1")
    assert dict(result) == {
        "charge": "ch_p1",
        "record": ("p1", "ch_p1"),
        "notify": "email:ch_p1",
    }
    assert result["record"] == ("p1", "ch_p1")
    assert len(result.timeline) == 3


async def test_optional_inputs_use_the_default_unless_given() -> None:
    flow = payment_flow()
    assert (await flow.run(payment_id="p"))["notify"] == "email:ch_p"
    assert (await flow.run(payment_id="p", channel="sms"))["notify"] == "sms:ch_p"


async def test_typed_accessor_takes_the_step_function() -> None:
    flow = pk.Flow()

    @flow.step
    async def n() -> int:
        return 3

    @flow.step(name="double")
    async def twice(n: int) -> int:
        return 2 * n

    result = await flow.run()
    assert result.get(n) == 3
    assert result.get(twice) == 6
    assert result.get("double") == 6
    assert result.get("missing", "x") == "x"

    async def other() -> None: ...

    with pytest.raises(KeyError, match="not a step of this flow"):
        result.get(other)


async def test_targets_run_only_what_they_need() -> None:
    flow = payment_flow()
    result = await flow.run(payment_id="p", targets=["record"])
    assert set(result) == {"charge", "record"}
    [notify] = [s for s in flow.steps if s == "notify"]
    assert notify not in result
    result = await flow.run(payment_id="p", targets="notify")
    assert set(result) == {"charge", "notify"}


async def test_targets_accept_step_functions() -> None:
    flow = pk.Flow()

    @flow.step
    async def a() -> int:
        return 1

    @flow.step
    async def b(a: int) -> int:
        return a + 1

    @flow.step
    async def c() -> int:
        raise AssertionError("not a target")  # pragma: no cover

    assert dict(await flow.run(targets=[b])) == {"a": 1, "b": 2}


async def test_empty_flow_runs() -> None:
    result = await pk.Flow().run()
    assert dict(result) == {}
    assert result.timeline.total == 0.0


# -- overlap -----------------------------------------------------------------------------------
async def test_independent_steps_overlap() -> None:
    """Each waits for the other to have started: only possible when they overlap."""
    flow = pk.Flow()
    a_started, b_started = anyio.Event(), anyio.Event()

    @flow.step
    async def a() -> str:
        a_started.set()
        await b_started.wait()
        return "a"

    @flow.step
    async def b() -> str:
        b_started.set()
        await a_started.wait()
        return "b"

    with anyio.fail_after(GUARD):
        result = await flow.run()
    assert dict(result) == {"a": "a", "b": "b"}


async def test_steps_ready_together_start_together_not_behind_a_siblings_work() -> None:
    """Four steps ready at once all start within two scheduler passes, as in a task
    group: not one after another, each behind whatever the previous one started (a
    task that blocks the event loop, say, as a server's first config load does)."""
    flow = pk.Flow()
    started: list[str] = []
    seen_by_a: list[set[str]] = []
    done = anyio.Event()

    @flow.step
    async def a() -> None:
        started.append("a")
        for _ in range(2):
            await anyio.lowlevel.checkpoint()
            seen_by_a.append(set(started))
        done.set()

    def waiting(name: str) -> Any:
        async def step() -> None:
            started.append(name)
            await done.wait()

        step.__name__ = name
        return step

    for name in ("b", "c", "d"):
        flow.step(waiting(name))
    with anyio.fail_after(GUARD):
        await flow.run()
    assert seen_by_a[-1] == {"a", "b", "c", "d"}  # after a's second pass: every one


async def test_a_step_starts_when_its_own_deps_finish_not_layer_by_layer() -> None:
    """``slow`` (layer 0) only finishes after ``after_fast`` (layer 1) has run."""
    flow = pk.Flow()
    after_fast_ran = anyio.Event()

    @flow.step
    async def fast() -> int:
        return 1

    @flow.step
    async def slow() -> int:
        await after_fast_ran.wait()
        return 2

    @flow.step
    async def after_fast(fast: int) -> int:
        after_fast_ran.set()
        return fast + 10

    @flow.step
    async def joined(slow: int, after_fast: int) -> int:
        return slow + after_fast

    with anyio.fail_after(GUARD):
        result = await flow.run()
    assert result["joined"] == 13
    timeline = result.timeline
    assert timeline["after_fast"].start < timeline["slow"].end
    assert timeline["joined"].start >= timeline["slow"].end


@dataclass
class Tracker:
    finished: set[str]
    running: int = 0
    peak: int = 0


@st.composite
def dags(draw: st.DrawFn) -> tuple[dict[str, list[str]], dict[str, int], int | None]:
    """A random DAG (edges only point to earlier nodes), random work, a random limit."""
    size = draw(st.integers(1, 12))
    graph: dict[str, list[str]] = {}
    for i in range(size):
        earlier = [f"s{j}" for j in range(i)]
        deps = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3)) if earlier else []
        graph[f"s{i}"] = deps
    work = {name: draw(st.integers(0, 4)) for name in graph}  # checkpoints / ms of sleep
    limit = draw(st.none() | st.integers(1, 4))
    return graph, work, limit


def build(graph: dict[str, list[str]], work: dict[str, int], tracker: Tracker) -> pk.Flow:
    flow = pk.Flow()
    names = list(graph)
    random.Random(len(names)).shuffle(names)  # registration order != dependency order
    for name in names:
        deps = graph[name]
        namespace: dict[str, Any] = {"tracker": tracker, "anyio": anyio}
        params = ", ".join(deps)
        source = (
            f"async def {name}({params}):\n"
            f"    assert tracker.finished >= set({deps!r}), ({name!r}, tracker.finished)\n"
            f"    tracker.running += 1\n"
            f"    tracker.peak = max(tracker.peak, tracker.running)\n"
            f"    try:\n"
            f"        for _ in range({work[name]}):\n"
            f"            await anyio.sleep({work[name] % 2} * 0.001)\n"
            f"    finally:\n"
            f"        tracker.running -= 1\n"
            f"    tracker.finished.add({name!r})\n"
            f"    return ({name!r}, {', '.join(deps) + ',' if deps else ''})\n"
        )
        exec(source, namespace)
        flow.step(namespace[name])
    return flow


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=dags())
async def test_dependency_order_is_never_violated(
    case: tuple[dict[str, list[str]], dict[str, int], int | None],
) -> None:
    graph, work, limit = case
    tracker = Tracker(set())
    flow = build(graph, work, tracker)
    with anyio.fail_after(GUARD):
        result = await flow.run(limit=limit)
    assert tracker.finished == set(graph)
    if limit is not None:
        assert tracker.peak <= limit
    for name, deps in graph.items():
        assert result[name][0] == name
        assert [r[0] for r in result[name][1:]] == deps  # each got its deps' values
        span = result.timeline[name]
        assert set(span.waited_for) == set(deps)
        for dep in deps:
            assert span.queued >= result.timeline[dep].end
        assert span.start >= span.queued


class Crowd:
    """Steps that each stay until as many as the bound are running together (or all
    that are left): the bound is reached exactly when it is allowed, with no timing."""

    def __init__(self, total: int, bound: int) -> None:
        self.total, self.bound = total, bound
        self.running = self.peak = self.done = 0

    async def step(self) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        while self.running < min(self.bound, self.total - self.done):
            await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        self.running -= 1
        self.done += 1

    def flow(self) -> pk.Flow:
        flow = pk.Flow()
        for i in range(self.total):
            namespace: dict[str, Any] = {"crowd": self}
            exec(f"async def s{i}():\n    await crowd.step()\n", namespace)
            flow.step(namespace[f"s{i}"])
        return flow


async def test_limit_bounds_running_steps_and_accepts_a_shared_limiter() -> None:
    crowd = Crowd(10, 2)
    with anyio.fail_after(GUARD):
        await crowd.flow().run(limit=2)
    assert (crowd.peak, crowd.done) == (2, 10)
    crowd = Crowd(10, 3)
    shared = pk.Limiter(concurrency=3)
    with anyio.fail_after(GUARD):
        await crowd.flow().run(limit=shared)
    assert (crowd.peak, crowd.done) == (3, 10)
    assert shared.statistics().running == 0


# -- definition errors --------------------------------------------------------------------
def test_cycle_is_raised_with_its_path() -> None:
    flow = pk.Flow()

    @flow.step
    async def a(c: int) -> int: ...

    @flow.step
    async def b(a: int) -> int: ...

    with pytest.raises(pk.CycleError) as info:

        @flow.step
        async def c(b: int) -> int: ...

    assert info.value.cycle == ("c", "b", "a", "c")
    assert isinstance(info.value, pk.DefinitionError)


async def test_unknown_parameter_lists_what_is_available() -> None:
    flow = pk.Flow()

    @flow.step
    async def charge(payment_id: str) -> str: ...

    @flow.step
    async def record(chrage: str) -> None: ...

    with pytest.raises(pk.DefinitionError) as info:
        await flow.run(payment_id="p")
    message = str(info.value)
    assert "'record' needs 'chrage'" in message
    assert "['charge', 'record']" in message
    assert "inputs given: ['payment_id']" in message
    assert "did you mean 'charge'?" in message


async def test_missing_input_is_raised_before_any_step_starts() -> None:
    flow = pk.Flow()
    started: list[str] = []

    @flow.step
    async def first() -> None:
        started.append("first")  # pragma: no cover

    @flow.step
    async def second(user_id: int) -> None:
        started.append("second")  # pragma: no cover

    with pytest.raises(pk.DefinitionError, match="'second' needs 'user_id'"):
        await flow.run()
    assert started == []


async def test_unexpected_input_is_a_type_error() -> None:
    flow = payment_flow()
    with pytest.raises(TypeError, match=r"unexpected input 'paymentid'.*'payment_id'"):
        await flow.run(paymentid="p")
    with pytest.raises(TypeError, match="'charge' has the name of a step"):
        await flow.run(payment_id="p", charge="c")


def test_duplicate_step_name() -> None:
    flow = pk.Flow()

    @flow.step
    async def load() -> None: ...

    with pytest.raises(pk.DefinitionError, match="duplicate step name 'load'"):

        @flow.step(name="load")
        async def load_again() -> None: ...


def test_non_async_functions_are_refused() -> None:
    flow = pk.Flow()

    def sync(x: int) -> int:
        return x

    async def agen() -> Any:
        yield 1

    with pytest.raises(pk.DefinitionError, match="'sync' must be an async function"):
        flow.step(sync)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'sync' must be an async function"):
        flow.step(sync)  # type: ignore[arg-type]
    with pytest.raises(pk.DefinitionError, match="async generator"):
        flow.step(agen)
    assert flow.steps == ()


@pytest.mark.parametrize("reserved", ["limit", "settle", "targets"])
def test_reserved_names(reserved: str) -> None:
    flow = pk.Flow()
    with pytest.raises(pk.DefinitionError, match=f"'{reserved}' is reserved"):
        flow.step(name=reserved)(_noop)
    namespace: dict[str, Any] = {}
    exec(f"async def step({reserved}): ...", namespace)
    with pytest.raises(pk.DefinitionError, match=f"parameter '{reserved}' is reserved"):
        flow.step(namespace["step"])


def test_bad_names_and_options() -> None:
    flow = pk.Flow()
    with pytest.raises(pk.DefinitionError, match="identifier"):
        flow.step(name="load-user")(_noop)
    with pytest.raises(pk.DefinitionError, match="keyword"):
        flow.step(name="class")(_noop)
    with pytest.raises(ValueError, match="timeout"):
        flow.step(timeout=0)
    with pytest.raises(TypeError, match="retry"):
        flow.step(retry=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^limit must be >= 1"):
        flow.step(limit=0)
    with pytest.raises(TypeError, match="name"):
        pk.Flow(name=3)  # type: ignore[arg-type]


async def test_bad_run_options() -> None:
    flow = payment_flow()
    with pytest.raises(ValueError, match="limit"):
        await flow.run(payment_id="p", limit=0)
    with pytest.raises(TypeError, match="settle"):
        await flow.run(payment_id="p", settle="yes")  # type: ignore[call-overload]
    with pytest.raises(pk.DefinitionError, match="unknown target 'nope'"):
        await flow.run(payment_id="p", targets=["nope"])

    async def refund(charge: str) -> None: ...  # a function, not a step of this flow

    with pytest.raises(pk.DefinitionError, match=r"targets: .*refund.* is not a step"):
        await flow.run(payment_id="p", targets=refund)
    with pytest.raises(TypeError, match="targets must be step names or step functions, got 42"):
        await flow.run(payment_id="p", targets=["record", 42])  # type: ignore[list-item]


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"timeout": 0}, ValueError, "timeout must be > 0"),
        ({"timeout": -1}, ValueError, "timeout must be > 0"),
        ({"timeout": NAN}, ValueError, "timeout must be > 0"),
        ({"timeout": INF}, ValueError, "timeout must be finite"),
        ({"timeout": True}, TypeError, "timeout must be a number"),
        ({"timeout": "5"}, TypeError, "timeout must be a number"),
        ({"retry": 3}, TypeError, "retry must be"),
        ({"limit": 0}, ValueError, "limit must be >= 1"),
        ({"limit": -1}, ValueError, "limit must be >= 1"),
        ({"limit": 1.5}, TypeError, "limit must be an int"),
        ({"limit": True}, TypeError, "limit must be an int"),
        ({"name": 3}, TypeError, "name must be a str or None"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_step_options_are_checked_at_the_door(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    flow = pk.Flow()
    with pytest.raises(error, match=f"^{message}"):
        flow.step(**kwargs)
    assert flow.steps == ()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"limit": 0}, ValueError, "limit must be >= 1"),
        ({"limit": -3}, ValueError, "limit must be >= 1"),
        ({"limit": 2.0}, TypeError, "limit must be an int"),
        ({"limit": False}, TypeError, "limit must be an int"),
        ({"limit": "4"}, TypeError, "limit must be an int"),
        ({"settle": "yes"}, TypeError, "settle must be a bool"),
        ({"settle": 1}, TypeError, "settle must be a bool"),
        ({"settle": None}, TypeError, "settle must be a bool"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
async def test_run_options_are_checked_before_any_step_starts(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    flow = pk.Flow()
    started: list[str] = []

    @flow.step
    async def only() -> None:
        started.append("only")  # pragma: no cover

    with pytest.raises(error, match=f"^{message}"):
        await flow.run(**kwargs)
    assert started == []


def test_flow_name_must_be_a_str() -> None:
    with pytest.raises(TypeError, match=r"^name must be a str or None"):
        pk.Flow(name=3)  # type: ignore[arg-type]


async def test_steps_start_as_they_become_ready() -> None:
    """A limit far above the flow costs what its steps cost: one worker per step
    that can run, not ``limit`` workers."""
    flow = pk.Flow()
    all_in = anyio.Event()
    running = 0
    tasks_then = 0

    async def meet() -> None:
        nonlocal running, tasks_then
        running += 1
        if running == 3:
            tasks_then = live_tasks()
            all_in.set()
        await all_in.wait()

    for name in ("a", "b", "c"):
        namespace: dict[str, Any] = {"meet": meet}
        exec(f"async def {name}():\n    await meet()\n", namespace)
        flow.step(namespace[name])
    before = live_tasks()
    await flow.run(limit=100_000)
    assert tasks_then - before <= 3


async def test_flow_is_immutable_once_run() -> None:
    flow = payment_flow()
    await flow.run(payment_id="p")
    with pytest.raises(RuntimeError, match="immutable"):
        flow.step(_noop)


async def _noop() -> None:
    return None


# -- failures ---------------------------------------------------------------------------------
async def test_fail_fast_raises_the_original_and_cancels_the_rest() -> None:
    flow = pk.Flow()
    boom = ValueError("card declined")
    cleaned: list[str] = []
    started: list[str] = []

    audit_started = anyio.Event()

    @flow.step
    async def charge() -> None:
        await audit_started.wait()  # fails while slow_audit runs
        raise boom

    @flow.step
    async def slow_audit() -> None:
        audit_started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cleaned.append("slow_audit")

    @flow.step
    async def record(charge: None) -> None:
        started.append("record")  # pragma: no cover

    with anyio.fail_after(GUARD), pytest.raises(ValueError) as info:
        await flow.run()
    assert info.value is boom  # the same object, not an ExceptionGroup
    assert cleaned == ["slow_audit"]  # cancelled and finished before run() raised
    assert started == []


async def test_fail_fast_starts_no_step_after_the_first_failure() -> None:
    # charge and reserve wake in the same tick; charge fails. reserve ends (cancellation
    # reaches it only at its next await) and releases ship: ship must not start.
    flow = pk.Flow()
    events: list[str] = []
    gate = anyio.Event()

    @flow.step
    async def charge() -> str:
        events.append("charge")
        await gate.wait()
        events.append("charge failed")
        raise ConnectionError("card declined")

    @flow.step
    async def reserve() -> str:
        events.append("reserve")
        await gate.wait()
        return "r1"

    @flow.step
    async def ship(reserve: str) -> None:
        events.append("ship")  # a side effect: the parcel leaves

    async def open_gate() -> None:
        while len(events) < 2:
            await anyio.lowlevel.checkpoint()
        gate.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_gate)
        with anyio.fail_after(GUARD), pytest.raises(ConnectionError):
            await flow.run()
    assert "charge failed" in events
    assert "ship" not in events[events.index("charge failed") :]


async def test_the_calling_task_is_the_first_worker() -> None:
    """A chain runs in the caller's task (no task at all); at a fork, at most one helper."""
    flow = pk.Flow()
    ran_in: dict[str, int] = {}

    @flow.step
    async def charge() -> str:
        ran_in["charge"] = anyio.get_current_task().id
        await anyio.lowlevel.checkpoint()
        return "ch_1"

    @flow.step
    async def record(charge: str) -> None:
        ran_in["record"] = anyio.get_current_task().id
        await anyio.lowlevel.checkpoint()

    @flow.step
    async def notify(charge: str) -> None:
        ran_in["notify"] = anyio.get_current_task().id
        await anyio.lowlevel.checkpoint()

    caller = anyio.get_current_task().id
    with anyio.fail_after(GUARD):
        await flow.run(targets=[record])  # a chain: charge then record
    assert ran_in == {"charge": caller, "record": caller}
    ran_in.clear()
    with anyio.fail_after(GUARD):
        await flow.run()  # charge, then record || notify
    assert ran_in["charge"] == caller
    # at the fork the caller takes the first ready step itself; the other goes to one
    # helper task (or to the caller again, if it is free before the helper first runs)
    assert ran_in["record"] == caller
    assert len(set(ran_in.values())) <= 2


async def test_the_caller_leaving_a_fork_frees_its_slot_for_later_steps() -> None:
    """The caller finishes its branch first and leaves the pool (no parking); two steps
    released later by the other branch still run side by side under ``limit=2``."""
    flow = pk.Flow()
    y_started, y_may_finish = anyio.Event(), anyio.Event()
    z1_started, z2_started = anyio.Event(), anyio.Event()

    @flow.step
    async def root() -> int:
        await anyio.lowlevel.checkpoint()
        return 1

    @flow.step
    async def x(root: int) -> int:  # the caller's branch: ends while y still runs
        await y_started.wait()  # so y is the helper's, whatever the scheduling order
        y_may_finish.set()
        return root

    @flow.step
    async def y(root: int) -> int:  # the helper's branch: ends after x
        y_started.set()
        await y_may_finish.wait()
        await anyio.lowlevel.checkpoint()
        return root + 1

    @flow.step
    async def z1(y: int) -> str:  # z1 and z2 each wait for the other to start
        z1_started.set()
        await z2_started.wait()
        return f"z1:{y}"

    @flow.step
    async def z2(y: int) -> str:
        z2_started.set()
        await z1_started.wait()
        return f"z2:{y}"

    with anyio.fail_after(GUARD):
        result = await flow.run(limit=2)
    assert (result["x"], result["z1"], result["z2"]) == (1, "z1:2", "z2:2")


def count_parks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the pool's parked waits (a worker waiting for work to be released)."""
    from parallelkit._fanout.pool import Pool

    parks = [0]
    park = Pool.park

    async def counted(self: Pool) -> None:
        parks[0] += 1
        await park(self)

    monkeypatch.setattr(Pool, "park", counted)
    return parks


async def test_a_worker_with_nothing_left_to_start_exits_instead_of_parking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The payment's shape: the helper's ``notify`` ends while the caller's ``record``
    still runs. No step is left to start, so the helper exits (no event, no wake-up)."""
    parks = count_parks(monkeypatch)
    flow = pk.Flow()
    notified = anyio.Event()

    @flow.step
    async def charge() -> str:
        await anyio.lowlevel.checkpoint()
        return "ch_1"

    @flow.step
    async def record(charge: str) -> str:  # the caller's branch: ends last
        await notified.wait()
        return f"paid:{charge}"

    @flow.step
    async def notify(charge: str) -> None:  # the helper's branch
        await anyio.lowlevel.checkpoint()
        notified.set()

    with anyio.fail_after(GUARD):
        result = await flow.run()
    assert result["record"] == "paid:ch_1"
    assert parks == [0]


async def test_a_worker_parks_while_a_step_is_left_to_start_and_takes_it_when_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The helper's ``b`` ends while the caller's ``a`` runs and ``c1``/``c2`` (after
    ``a``) are still to start: the helper parks, and is woken to run one of them beside
    the caller (each waits for the other to start)."""
    parks = count_parks(monkeypatch)
    flow = pk.Flow()
    b_done = anyio.Event()
    c1_started, c2_started = anyio.Event(), anyio.Event()

    @flow.step
    async def root() -> int:
        await anyio.lowlevel.checkpoint()
        return 1

    @flow.step
    async def a(root: int) -> int:  # the caller's
        await b_done.wait()
        await anyio.lowlevel.checkpoint()  # the helper parks meanwhile
        return root

    @flow.step
    async def b(root: int) -> None:  # the helper's
        await anyio.lowlevel.checkpoint()
        b_done.set()

    @flow.step
    async def c1(a: int) -> str:
        c1_started.set()
        await c2_started.wait()
        return "c1"

    @flow.step
    async def c2(a: int) -> str:
        c2_started.set()
        await c1_started.wait()
        return "c2"

    with anyio.fail_after(GUARD):
        result = await flow.run(limit=2)
    assert (result["c1"], result["c2"]) == ("c1", "c2")
    assert parks == [1]


async def test_a_failure_in_the_calling_task_is_raised_unchanged_or_settled() -> None:
    flow = pk.Flow()
    boom = ValueError("card declined")

    @flow.step
    async def charge() -> None:
        await anyio.lowlevel.checkpoint()
        raise boom

    @flow.step
    async def record(charge: None) -> None:  # pragma: no cover - never runs
        raise AssertionError

    with pytest.raises(ValueError) as info:
        await flow.run()
    assert info.value is boom
    outcomes = await flow.run(settle=True)
    assert outcomes["charge"].error is boom
    assert isinstance(outcomes["record"].error, pk.DependencyFailed)
    assert [span.status for span in outcomes.timeline.spans] == ["error", "skipped"]


async def test_settle_gives_outcomes_and_skips_downstream() -> None:
    flow = pk.Flow()
    boom = RuntimeError("stripe down")

    @flow.step
    async def charge() -> str:
        raise boom

    @flow.step
    async def record(charge: str) -> str:
        raise AssertionError("must not run")  # pragma: no cover

    @flow.step
    async def receipt(record: str) -> str:
        raise AssertionError("must not run")  # pragma: no cover

    @flow.step
    async def audit() -> str:
        await anyio.sleep(0.001)
        return "logged"

    result = await flow.run(settle=True)
    assert result["audit"] == pk.Outcome.success("logged")
    assert result.get(charge).error is boom
    skipped = result["record"].error
    assert isinstance(skipped, pk.DependencyFailed)
    assert (skipped.step, skipped.dependency) == ("record", "charge")
    transitive = result.get(receipt).error
    assert isinstance(transitive, pk.DependencyFailed)
    assert transitive.dependency == "record"
    assert not result.ok
    assert set(result.errors) == {"charge", "record", "receipt"}
    statuses = {s.name: s.status for s in result.timeline}
    assert statuses == {"charge": "error", "record": "skipped", "receipt": "skipped", "audit": "ok"}


async def test_settle_all_ok_and_dependents_get_plain_values() -> None:
    result = await payment_flow().run(payment_id="p", settle=True)
    assert result.ok
    assert result.errors == {}
    assert result["charge"].unwrap() == "ch_p"
    assert result["record"].unwrap() == ("p", "ch_p")  # not an Outcome passed along


class Interrupt(BaseException):
    """A non-cancellation BaseException (stands in for KeyboardInterrupt/SystemExit)."""


@pytest.mark.parametrize("settle", [False, True])
@pytest.mark.parametrize("where", ["calling task", "helper"])
async def test_a_base_exception_from_a_step_comes_out_unchanged(where: str, settle: bool) -> None:
    """A step raises a BaseException that is not a cancellation while its sibling
    runs: the run stops (settle too) and raises it as itself, not wrapped in a
    BaseExceptionGroup; the sibling was cancelled and has finished."""
    flow = pk.Flow()
    interrupt = Interrupt("stop")
    cleaned: list[str] = []

    hanging = anyio.Event()

    async def fails() -> None:
        await hanging.wait()
        raise interrupt

    async def hangs() -> None:
        hanging.set()
        try:
            await anyio.sleep_forever()
        finally:
            cleaned.append("hangs")

    @flow.step
    async def head() -> int:
        return 1

    # the caller takes the first ready step, a helper the second
    first, second = (fails, hangs) if where == "calling task" else (hangs, fails)

    @flow.step
    async def a(head: int) -> None:
        await first()

    @flow.step
    async def b(head: int) -> None:
        await second()

    with anyio.fail_after(GUARD), pytest.raises(Interrupt) as raised:
        await flow.run(settle=settle)
    assert raised.value is interrupt
    assert cleaned == ["hangs"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason=STRAY_NEEDS)
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("where", ["calling task", "helper"])
async def test_a_step_raising_cancelled_error_by_itself_is_a_failure(where: str) -> None:
    """A step awaits a future someone else cancelled (asyncio): its CancelledError is
    the step's failure (fail-fast raises it, settle keeps it in an Outcome and skips
    what depends on it), not a cancellation. Run in a helper task it used to end
    the run quietly: the result missed steps, settle gave ``Outcome(None)`` for
    steps that never ran."""
    import asyncio

    flow = pk.Flow()
    seen: list[BaseException] = []

    async def cancelled_elsewhere() -> int:
        await anyio.lowlevel.checkpoint()
        await stray_cancellation(seen)

    async def fine() -> int:
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        return 2

    @flow.step
    async def head() -> int:
        return 1

    first, second = (cancelled_elsewhere, fine)
    if where == "helper":
        first, second = second, first

    @flow.step
    async def a(head: int) -> int:
        return await first()

    @flow.step
    async def b(head: int) -> int:
        return await second()

    @flow.step
    async def c(a: int, b: int) -> int:  # pragma: no cover - never runs
        return a + b

    with pytest.raises(asyncio.CancelledError) as raised:
        await flow.run()
    assert raised.value is seen[-1]
    outcomes = await flow.run(settle=True)
    failed, ok = ("a", "b") if where == "calling task" else ("b", "a")
    assert outcomes[failed].error is seen[-1]
    assert outcomes[ok].unwrap() == 2
    assert isinstance(outcomes["c"].error, pk.DependencyFailed)
    assert outcomes.timeline[failed].status == "error"


async def test_caller_cancellation_leaves_no_task_behind() -> None:
    flow = pk.Flow()
    running = 0
    cleaned = 0
    both_started = anyio.Event()

    async def hold() -> None:
        nonlocal running, cleaned
        running += 1
        if running == 2:
            both_started.set()
        try:
            await anyio.sleep_forever()
        finally:
            running -= 1
            cleaned += 1

    @flow.step
    async def a() -> None:
        await hold()

    @flow.step
    async def b() -> None:
        await hold()

    @flow.step
    async def c(a: None) -> None:
        raise AssertionError("must not start")  # pragma: no cover

    async with anyio.create_task_group() as tg:

        async def caller() -> None:
            await flow.run()

        tg.start_soon(caller)
        with anyio.fail_after(GUARD):
            await both_started.wait()
        tg.cancel_scope.cancel()
    assert (running, cleaned) == (0, 2)


async def test_step_timeout_and_retry_use_the_shared_adapter() -> None:
    flow = pk.Flow()
    attempts = 0

    @flow.step(retry=pk.Retry(attempts=3, backoff=0))
    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionError("blip")
        return "ok"

    @flow.step(timeout=0.01)
    async def hangs() -> None:
        await anyio.sleep_forever()

    result = await flow.run(settle=True)
    assert result.get(flaky).unwrap() == "ok"
    assert attempts == 3
    assert isinstance(result.get(hangs).error, TimeoutError)


async def test_per_step_limit_is_shared_across_runs() -> None:
    flow = pk.Flow()
    running = peak = 0

    @flow.step(limit=1)
    async def exclusive(n: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.001)
        running -= 1
        return n

    results = await pk.gather(*(flow.run(n=n) for n in range(5)))
    assert [r["exclusive"] for r in results] == list(range(5))
    assert peak == 1


# -- concurrency --------------------------------------------------------------------------------
async def test_concurrent_runs_of_one_flow_do_not_share_state() -> None:
    flow = payment_flow()

    async def one(i: int) -> tuple[int, Any]:
        await anyio.sleep(random.random() * 0.002)
        return i, await flow.run(payment_id=f"p{i}")

    runs = await pk.gather(*(one(i) for i in range(25)))
    for i, result in runs:
        assert result["record"] == (f"p{i}", f"ch_p{i}")
        assert len(result.timeline) == 3


# -- the seed's payment race --------------------------------------------------------------------
class FakeStripe:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.charges: dict[str, str] = {}

    async def create_charge(self, payment_id: str) -> str:
        await anyio.sleep(self.delay)
        charge_id = f"ch_{payment_id}"
        self.charges[payment_id] = charge_id
        return charge_id


class FakeDB:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    async def insert_payment(self, payment_id: str, charge_id: str | None) -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        row = {"payment_id": payment_id, "charge_id": charge_id}
        self.rows.append(row)
        return row


async def test_the_seed_gather_races_the_insert_against_the_charge() -> None:
    """The seed's shape: one gather, so the insert cannot have the charge id yet."""
    stripe, db = FakeStripe(delay=0.005), FakeDB()
    await pk.gather(
        stripe.create_charge("p1"),
        db.insert_payment("p1", stripe.charges.get("p1")),  # read before the charge exists
    )
    assert db.rows == [{"payment_id": "p1", "charge_id": None}]  # the data race


@settings(max_examples=40, deadline=None)
@given(charge_work=st.integers(0, 3), record_work=st.integers(0, 3), notify_work=st.integers(0, 3))
async def test_flow_makes_the_payment_race_impossible(
    charge_work: int, record_work: int, notify_work: int
) -> None:
    """Both ways: what needs the charge waits for it, and what does not need each
    other overlaps: ``record`` finishes only once ``notify`` has started, so a
    scheduler running them one after the other would hang (and hit the guard)."""
    log: list[tuple[str, str]] = []
    notify_started = anyio.Event()
    db = FakeDB()
    charges: dict[str, str] = {}
    flow = pk.Flow(name="payment")

    async def work(name: str, steps: int) -> None:
        log.append(("start", name))
        for _ in range(steps):
            await anyio.lowlevel.checkpoint()

    @flow.step
    async def charge(payment_id: str) -> str:
        await work("charge", charge_work)
        charges[payment_id] = f"ch_{payment_id}"
        log.append(("end", "charge"))
        return charges[payment_id]

    @flow.step
    async def record(payment_id: str, charge: str) -> dict[str, Any]:
        await work("record", record_work)
        row = await db.insert_payment(payment_id, charge)
        await notify_started.wait()
        log.append(("end", "record"))
        return row

    @flow.step
    async def notify(charge: str) -> str:
        notify_started.set()
        await work("notify", notify_work)
        log.append(("end", "notify"))
        return charge

    with anyio.fail_after(GUARD):
        result = await flow.run(payment_id="p1")
    assert db.rows == [{"payment_id": "p1", "charge_id": "ch_p1"}]
    assert result.get(record)["charge_id"] == charges["p1"]
    at = log.index
    assert at(("end", "charge")) < at(("start", "record"))  # the insert has the charge id
    assert at(("end", "charge")) < at(("start", "notify"))
    assert at(("start", "notify")) < at(("end", "record"))  # they overlapped
    last = "record" if at(("end", "record")) > at(("end", "notify")) else "notify"
    assert [s.name for s in result.timeline.critical_path()] == ["charge", last]


async def test_timeline_is_json_ready_and_renders() -> None:
    result = await payment_flow().run(payment_id="p")
    timeline = result.timeline
    data = json.loads(json.dumps(timeline.to_dict()))
    assert data["name"] == "payment"
    assert {s["name"] for s in data["spans"]} == {"charge", "record", "notify"}
    assert math.isclose(data["total"], timeline.total)
    assert timeline.total >= timeline["charge"].duration
    assert "critical path: charge →" in timeline.to_text()
    assert timeline.to_mermaid().startswith("gantt")


async def test_timeline_draws_no_wait_without_a_limit() -> None:
    """No ``limit``: no slot to wait for, so no span shows waiting (``░``), however
    long the engine took to pick a ready step up."""
    flow = pk.Flow()

    @flow.step
    async def a() -> int:
        await anyio.lowlevel.checkpoint()
        return 1

    @flow.step
    async def b(a: int) -> int:
        return a

    @flow.step
    async def c(a: int) -> int:
        await anyio.lowlevel.checkpoint()
        return a

    timeline = (await flow.run()).timeline
    assert [s.wait for s in timeline] == [0.0, 0.0, 0.0]
    assert "░" not in timeline.to_text()


@virtual_clock()
async def test_timeline_draws_the_wait_for_a_limit_slot() -> None:
    flow = pk.Flow()

    @flow.step
    async def first() -> None:
        await anyio.sleep(1)

    @flow.step
    async def second() -> None:
        await anyio.sleep(1)

    timeline = (await flow.run(limit=1)).timeline
    waits = sorted(s.wait for s in timeline)
    assert waits == pytest.approx([0.0, 1.0])  # one waited for the other's slot
    later = max(timeline, key=lambda s: s.start)
    row = next(line for line in timeline.to_text().splitlines() if line.startswith(later.name))
    assert "░" in row


def test_reprs() -> None:
    flow = payment_flow()
    assert repr(flow) == "<Flow 'payment' steps=['charge', 'record', 'notify']>"
    assert pk.Flow.__module__ == "parallelkit"
