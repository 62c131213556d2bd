"""pk.Flow faults, third round: shapes and misuse of the step signatures, the run's
inputs and targets, settle mode's skipped steps, result look-ups, cancellation.

Found by running the recipes of docs/flow.md and docs/recipes/payment-flow.md with
odd step signatures, wrong inputs, targets chosen per request and cancellations at
every await, on asyncio and trio.
"""

from __future__ import annotations

import itertools
import random
import traceback
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import anyio
import anyio.lowlevel
import pytest
import trio.testing

import parallelkit as pk
from parallelkit._graph.graph import Graph, Node, Param

pytestmark = pytest.mark.anyio

GUARD = 30.0  # a hang guard only: nothing here waits on time


def on_mock_clock(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` on trio with a clock that jumps to the next deadline at once."""
    anyio.run(
        main,
        backend="trio",
        backend_options={"clock": trio.testing.MockClock(autojump_threshold=0)},
    )


# -- settle: a skipped step's DependencyFailed leads to the failure ----------------------
def payment(fails: BaseException | None, limiter: pk.Limiter) -> pk.Flow:
    """The payment recipe with every option: ``charge`` retried, limited, timed out."""
    flow = pk.Flow(name="payment")

    @flow.step(timeout=1, retry=pk.Retry(attempts=2, backoff=0.01), limit=limiter)
    async def charge(payment_id: str) -> str:
        await anyio.lowlevel.checkpoint()
        if fails is not None:
            raise fails
        await anyio.sleep(5)  # over the timeout
        return f"ch_{payment_id}"  # pragma: no cover - never reached

    @flow.step(limit=1)
    async def record(charge: str, payment_id: str) -> str:  # pragma: no cover - skipped
        return payment_id

    @flow.step
    async def receipt(record: str) -> str:  # pragma: no cover - skipped
        return record

    @flow.step
    async def audit(payment_id: str) -> str:
        await anyio.lowlevel.checkpoint()
        return f"audited {payment_id}"

    return flow


def assert_chained_to(outcomes: pk.FlowOutcomes, failure: BaseException) -> None:
    record, receipt = outcomes["record"].error, outcomes["receipt"].error
    assert isinstance(record, pk.DependencyFailed)
    assert isinstance(receipt, pk.DependencyFailed)
    assert receipt.__cause__ is record  # skipped because record was skipped ...
    assert record.__cause__ is failure  # ... because charge failed: this error
    assert outcomes["audit"].unwrap() == "audited p1"
    try:
        outcomes["receipt"].unwrap()  # as the FastAPI recipe does after settle=True
    except pk.DependencyFailed as exc:
        shown = "".join(traceback.format_exception(exc))
    line = type(failure).__name__ + (f": {failure}" if str(failure) else "")
    assert f"\n{line}\n" in shown  # the traceback shows why


@pytest.mark.parametrize("limit", [None, 2, "limiter"])
async def test_a_skipped_steps_error_is_chained_to_the_failure_that_caused_it(
    limit: int | str | None,
) -> None:
    """``outcomes["receipt"].unwrap()`` raised a DependencyFailed with no cause: the
    traceback said "'record' failed" (it was itself skipped) and never showed the
    card being declined, whatever the step's options and the run's ``limit=``."""
    declined = ValueError("card declined")
    limiter = pk.Limiter(concurrency=1)
    run_limit = pk.Limiter(concurrency=2) if limit == "limiter" else cast("int | None", limit)
    with anyio.fail_after(GUARD):
        outcomes = await payment(declined, limiter).run(
            payment_id="p1", settle=True, limit=run_limit
        )
    assert outcomes["charge"].error is declined
    assert_chained_to(outcomes, declined)
    assert limiter.statistics().running == 0


def test_a_step_timing_out_under_retry_is_the_cause_of_what_it_skipped() -> None:
    async def main() -> None:
        limiter = pk.Limiter(concurrency=1)
        flow = payment(None, limiter)
        start = anyio.current_time()
        outcomes = await flow.run(payment_id="p1", settle=True, limit=2)
        timeout = outcomes["charge"].error
        assert isinstance(timeout, TimeoutError)
        assert anyio.current_time() - start == pytest.approx(2.01)  # 2 attempts + back-off
        assert_chained_to(outcomes, timeout)
        # the timeline: every span closed, the skipped ones at the failure's reading
        timeline = outcomes.timeline
        statuses = {s.name: s.status for s in timeline}
        assert statuses == {
            "audit": "ok",
            "charge": "error",
            "record": "skipped",
            "receipt": "skipped",
        }
        assert timeline["record"].start == timeline["receipt"].end == timeline["charge"].end
        assert [s.name for s in timeline.critical_path()] == ["charge"]
        assert limiter.statistics().running == 0

    on_mock_clock(main)


# -- the plans kept for targets chosen per request --------------------------------------
def test_targets_in_any_order_share_one_plan_and_the_plans_kept_are_bounded() -> None:
    """A flow per request with ``targets=`` the fields a client asked for, in its
    order: each new order (and each repeat of a name) built and kept one more plan,
    forever: 20,000 requests over 8 steps kept 10,977 plans (15 MB)."""
    graph = Graph(kind="step")
    names = [f"field{i}" for i in range(10)]
    for name in names:
        graph.add(Node(name, (Param("user_id"),)))
    plan = graph.plan({"user_id"}, ["field1", "field2"])
    assert graph.plan({"user_id"}, ["field2", "field1", "field2"]) is plan
    assert plan.order == ("field1", "field2")
    rnd = random.Random(0)
    for _ in range(2_000):
        graph.plan({"user_id"}, rnd.sample(names, rnd.randint(1, 10)))
    assert len(graph._plans) <= 256  # 1,023 sets of targets: the oldest plans dropped
    # a plan dropped is made again when needed, the same
    assert graph.plan({"user_id"}, ["field2", "field1"]).order == ("field1", "field2")


# -- the run's inputs: every one named, suggestions that can be followed -----------------
def profile_flow() -> pk.Flow:
    flow = pk.Flow()

    @flow.step
    async def charge(payment_id: str) -> str:
        return f"ch_{payment_id}"

    @flow.step
    async def record(charge: str) -> str:
        return charge

    @flow.step
    async def profile(user_id: int, org_id: int, charge: str) -> str:
        return f"{user_id}/{org_id}/{charge}"

    return flow


async def test_every_missing_input_is_named_at_once() -> None:
    """Only the first missing input was named: fixed, the run failed again on the next."""
    with pytest.raises(pk.DefinitionError) as info:
        await profile_flow().run()
    message = str(info.value)
    assert "'charge' needs 'payment_id'" in message
    assert "Also missing: 'user_id' (step 'profile'), 'org_id' (step 'profile')" in message


async def test_a_missing_input_suggests_no_name_the_step_already_takes() -> None:
    """``profile`` takes ``user_id`` and ``org_id``; with only ``org_id`` missing, the
    message asked "did you mean 'user_id'?": a parameter of its own, given already."""
    with pytest.raises(pk.DefinitionError, match="'profile' needs 'org_id'") as info:
        await profile_flow().run(payment_id="p1", user_id=1)
    assert "did you mean" not in str(info.value)


async def test_several_unexpected_inputs_are_named_together_with_followable_hints() -> None:
    """Only the first unexpected input was named; and a step's name was suggested for
    an input, which run() then refuses (an input may not have a step's name)."""
    flow = profile_flow()
    with pytest.raises(TypeError) as info:
        await flow.run(payment_id="p1", usr_id=1, orgid=2)
    message = str(info.value)
    assert message == (
        "unexpected inputs 'orgid' (did you mean 'org_id'?), 'usr_id' (did you mean "
        "'user_id'?): no step has a parameter of these names"
    )
    with pytest.raises(TypeError, match="unexpected input 'charg'") as info:
        await flow.run(payment_id="p1", user_id=1, org_id=2, charg="c")
    assert "did you mean 'charge'" not in str(info.value)  # a step: not an input
    with pytest.raises(TypeError, match="'charge' has the name of a step"):
        await flow.run(payment_id="p1", user_id=1, org_id=2, charge="c")


async def test_a_step_that_takes_self_is_given_it_as_the_message_says() -> None:
    """A method decorated in its class body takes ``self``: the message says to pass
    ``run(self=...)``, which raised "run() got multiple values for argument 'self'"."""
    flow = pk.Flow()

    class Billing:
        fee = 5

        @flow.step
        async def charge(self, amount: int) -> int:
            await anyio.lowlevel.checkpoint()
            return amount + self.fee

    with pytest.raises(pk.DefinitionError, match=r"Pass it as an input \(run\(self=\.\.\.\)\)"):
        await flow.run(amount=10)
    assert (await flow.run(self=Billing(), amount=10))["charge"] == 15


# -- result look-ups: a wrong key names the choices -------------------------------------
async def test_a_wrong_key_names_the_choices() -> None:
    flow = pk.Flow()

    async def load(user_id: int) -> int:
        return user_id

    flow.step(load)
    flow.step(name="load_again")(load)  # one function, two steps

    @flow.step
    async def record(load: int) -> int:
        return load

    async def refund() -> None: ...  # not a step of this flow

    result = await flow.run(user_id=1)
    with pytest.raises(KeyError, match=r"refund.* is not a step of this flow; steps: \['load'"):
        result.get(refund)
    with pytest.raises(KeyError, match=r"several names; look it up by name: \['load', 'load_"):
        result.get(load)
    with pytest.raises(KeyError, match=r"steps run: \[.*\]; did you mean 'record'\?"):
        result["recrod"]
    outcomes = await flow.run(user_id=1, settle=True)
    assert outcomes.get(record).unwrap() == 1
    with pytest.raises(KeyError, match=r"refund.* is not a step of this flow; steps: \["):
        outcomes.get(refund)
    with pytest.raises(pk.DefinitionError, match=r"targets: .*refund.*; steps: \['load'"):
        await flow.run(user_id=1, targets=refund)


# -- what held: cancellation at every await, steps added while a run runs ---------------
class Cancelling:
    """Cancels the run's scope at the k-th await of any step; counts what ran."""

    def __init__(self, k: int) -> None:
        self.k, self.awaits = k, 0
        self.scope = anyio.CancelScope()
        self.running: set[str] = set()
        self.started: list[str] = []
        self.finished: list[str] = []

    async def step(self, name: str, awaits: int) -> str:
        self.running.add(name)
        self.started.append(name)
        try:
            for _ in range(awaits):
                self.awaits += 1
                if self.awaits == self.k:
                    self.scope.cancel()
                await anyio.lowlevel.checkpoint()
        finally:
            self.running.discard(name)
            self.finished.append(name)
        return name

    def flow(self, step_limit: pk.Limiter) -> pk.Flow:
        flow = pk.Flow()
        shape = {"root": ([], 2), "a": (["root"], 3), "b": (["root"], 1),
                 "c": (["a", "b"], 2), "d": (["b"], 2), "e": ([], 1)}  # fmt: skip
        for name, (deps, awaits) in shape.items():
            namespace: dict[str, Any] = {"probe": self}
            source = f"async def {name}({', '.join(deps)}):\n"
            source += f"    return await probe.step({name!r}, {awaits})\n"
            exec(source, namespace)
            flow.step(limit=step_limit if name in ("a", "d") else None)(namespace[name])
        return flow


@pytest.mark.parametrize("settle", [False, True])
@pytest.mark.parametrize("limit", [None, 1, 2, "limiter"])
async def test_a_run_cancelled_at_any_await_leaves_nothing_running(
    settle: bool, limit: int | str | None
) -> None:
    for k in itertools.count(1):
        probe = Cancelling(k)
        step_limit = pk.Limiter(concurrency=1)
        run_limit = pk.Limiter(concurrency=2) if limit == "limiter" else cast("int | None", limit)
        result: Mapping[str, Any] | None = None
        with anyio.fail_after(GUARD), probe.scope:
            flow = probe.flow(step_limit)
            if settle:
                result = await flow.run(settle=True, limit=run_limit)
            else:
                result = await flow.run(limit=run_limit)
        assert probe.running == set()
        assert sorted(probe.started) == sorted(probe.finished)  # every finally ran
        assert step_limit.statistics().running == 0
        if isinstance(run_limit, pk.Limiter):
            assert run_limit.statistics().running == 0
        if not probe.scope.cancelled_caught:
            assert result is not None  # k is past the last await
            assert len(result) == 6
            break
        assert result is None


async def test_no_step_can_be_added_while_a_run_runs() -> None:
    flow = pk.Flow()
    started, go = anyio.Event(), anyio.Event()

    @flow.step
    async def first() -> int:
        started.set()
        await go.wait()
        return 1

    async def later(first: int) -> int:  # pragma: no cover - refused
        return first

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(flow.run)
            await started.wait()
            with pytest.raises(RuntimeError, match="immutable"):
                flow.step(later)
            go.set()
    assert flow.steps == ("first",)
