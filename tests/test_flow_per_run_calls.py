"""Issue 18: what one ``Flow.run`` of the payment's shape costs, counted, not timed.

The shape: ``charge`` -> (``record`` || ``notify``), each step suspending once, run
per request with ``settle=True`` (and ``settle=False``). ``sys.setprofile`` counts the
Python functions of parallelkit called per run (a coroutine's resumption counts as a
call too), after a warm-up run: a count does not move with the machine's load.

Before (per run, asyncio / trio): 55 / 56 calls (fail-fast), 58 / 59 (settle); the
kwargs of each step built by a comprehension, the timeline's ``_record``, the pool's
sink ``__setitem__`` and ``release`` called per node, the plan looked up, the limit
split and the graph frozen again on every run. Now 38 / 39.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk

pytestmark = pytest.mark.anyio

PACKAGE = os.path.dirname(pk.__file__) + os.sep
ANYIO = os.path.dirname(anyio.__file__) + os.sep
WORKER_TASK = "parallelkit._fanout.pool.Pool._work"  # what start_soon(pool._work) named it


def payment_flow() -> pk.Flow:
    flow = pk.Flow(name="payment")

    @flow.step
    async def charge(payment: int, clients: int) -> str:
        await anyio.lowlevel.checkpoint()
        return "ch_1"

    @flow.step
    async def record(charge: str, payment: int, db: int) -> None:
        await anyio.lowlevel.checkpoint()

    @flow.step
    async def notify(charge: str, payment: int, clients: int) -> None:
        await anyio.lowlevel.checkpoint()

    return flow


@contextmanager
def counting() -> Iterator[Counter[tuple[str, str]]]:
    """Python calls (and resumptions) by ``(file, function)``: parallelkit's files by
    name (``"scheduler.py"``), anyio's as ``"anyio/<name>"``."""
    calls: Counter[tuple[str, str]] = Counter()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            path = frame.f_code.co_filename
            if path.startswith(PACKAGE):
                calls[os.path.basename(path), frame.f_code.co_name] += 1
            elif path.startswith(ANYIO):
                calls["anyio/" + os.path.basename(path), frame.f_code.co_name] += 1

    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(None)


RUNS = 20


async def count_runs(settle: bool) -> tuple[float, Counter[tuple[str, str]]]:
    """parallelkit's calls per run, and every call counted, over ``RUNS`` runs."""
    flow = payment_flow()
    outcomes = await flow.run(payment=1, clients=2, db=3, settle=settle)  # warm up
    assert outcomes["charge"] == (pk.Outcome("ch_1") if settle else "ch_1")
    with counting() as calls:
        for _ in range(RUNS):
            await flow.run(payment=1, clients=2, db=3, settle=settle)
    ours = sum(n for (file, _), n in calls.items() if not file.startswith("anyio/"))
    return ours / RUNS, calls


@pytest.mark.parametrize("settle", [False, True], ids=["fail_fast", "settle"])
async def test_a_payment_run_costs_at_most_44_parallelkit_calls(settle: bool) -> None:
    per_run, calls = await count_runs(settle)
    by_function = {k: n / RUNS for k, n in calls.most_common() if not k[0].startswith("anyio/")}
    assert per_run <= 44, by_function


@pytest.mark.parametrize("settle", [False, True], ids=["fail_fast", "settle"])
async def test_a_repeated_run_does_no_per_run_setup_again(settle: bool) -> None:
    """Per run: no argument check of a valid ``settle``, no plan lookup, no limit split,
    no freeze, no comprehension for a step's kwargs, no span recorded through a call
    (no instrumentation), no sink ``__setitem__`` and no ``release`` of no idle worker,
    no task name computed for the worker."""
    _, calls = await count_runs(settle)
    never = [
        ("check.py", "flag"),
        ("graph.py", "plan"),
        ("graph.py", "freeze"),
        ("options.py", "split_limit"),
        ("options.py", "for_fanout"),
        ("scheduler.py", "<dictcomp>"),
        ("scheduler.py", "__setitem__"),
        ("timeline.py", "_record"),
        ("pool.py", "release"),
        ("anyio/_tasks.py", "get_callable_name"),  # anyio's start_soon, naming the worker
    ]
    assert {key: calls[key] for key in never if calls[key]} == {}
    # settle: one Outcome built per run (charge's value); record and notify returned None
    assert calls["outcome.py", "__post_init__"] == (RUNS if settle else 0)


async def test_the_worker_task_keeps_its_name() -> None:
    """A helper worker's task is named as ``start_soon(pool._work)`` named it."""
    flow = pk.Flow()
    names: list[str] = []

    @flow.step
    async def charge() -> anyio.Event:
        return anyio.Event()

    @flow.step
    async def record(charge: anyio.Event) -> None:  # the caller's: it waits for notify,
        await charge.wait()  # which runs in the helper

    @flow.step
    async def notify(charge: anyio.Event) -> None:
        names.append(anyio.get_current_task().name)
        charge.set()

    for _ in range(2):
        await flow.run()
    assert names == [WORKER_TASK, WORKER_TASK]


async def test_outcomes_and_timeline_as_before() -> None:
    flow = payment_flow()
    for _ in range(2):  # the second run takes the kept plan
        outcomes = await flow.run(payment=1, clients=2, db=3, settle=True)
        assert dict(outcomes) == {
            "charge": pk.Outcome("ch_1"),
            "record": pk.Outcome(None),
            "notify": pk.Outcome(None),
        }
        assert outcomes.ok
        spans = {span.name: span for span in outcomes.timeline}
        assert sorted(spans) == ["charge", "notify", "record"]
        assert all(span.status == "ok" and span.kind == "step" for span in spans.values())
        assert spans["record"].waited_for == ("charge",)
        assert spans["charge"].waited_for == ()
        assert spans["record"].start >= spans["charge"].end
        assert outcomes.timeline.critical_path()[0].name == "charge"
        result = await flow.run(payment=1, clients=2, db=3)
        assert dict(result) == {"charge": "ch_1", "record": None, "notify": None}


async def test_a_kept_plan_is_one_of_the_same_inputs_and_never_stale() -> None:
    """The plan kept for the next run is the frozen graph's, for the same input names:
    a run refused before the flow froze (a bad ``limit``) keeps none, so a step added
    after it is part of the next run; other input names get their own plan."""
    flow = pk.Flow()

    @flow.step
    async def a(x: int, y: int = 0) -> int:
        return x + y

    with pytest.raises(TypeError, match="limit"):
        await flow.run(x=1, limit="3")  # type: ignore[call-overload]

    @flow.step
    async def b(a: int) -> int:  # added after the refused run: the flow is not frozen
        return a * 10

    assert dict(await flow.run(x=1)) == {"a": 1, "b": 10}
    assert dict(await flow.run(x=1, y=2)) == {"a": 3, "b": 30}
    assert dict(await flow.run(x=1)) == {"a": 1, "b": 10}
    assert dict(await flow.run(x=2, targets="a")) == {"a": 2}
    assert dict(await flow.run(x=5)) == {"a": 5, "b": 50}
    with pytest.raises(pk.DefinitionError, match="needs 'x'"):
        await flow.run(y=1)
    with pytest.raises(TypeError, match="unexpected input 'z'"):
        await flow.run(x=1, z=1)
    with pytest.raises(RuntimeError, match="immutable"):

        @flow.step
        async def c(b: int) -> int:
            return b
