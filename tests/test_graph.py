"""The graph engine itself (parallelkit._graph.graph), as the Orchestrator uses it."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk
from parallelkit._graph.graph import Graph, Node, Param, params_of
from parallelkit._graph.scheduler import Run

pytestmark = pytest.mark.anyio


def make_graph(spec: dict[str, list[str]], **kwargs: Any) -> Graph:
    graph = Graph(**kwargs)
    for name, deps in spec.items():
        graph.add(Node(name, tuple(Param(d) for d in deps)))
    return graph


# -- definition --------------------------------------------------------------------------
def test_params_of_reads_names_and_defaults() -> None:
    async def fn(a: int, b: int = 2, *, c: int, d: int = 4) -> None: ...

    assert params_of(fn) == (Param("a"), Param("b", True), Param("c"), Param("d", True))


@pytest.mark.parametrize("signature", ["*args", "**kwargs", "a, /"])
def test_params_of_rejects_what_cannot_be_wired_by_name(signature: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"async def fn({signature}): ...", namespace)
    with pytest.raises(pk.DefinitionError, match="fn"):
        params_of(namespace["fn"], node="fn")


def test_duplicate_and_reserved_names() -> None:
    graph = make_graph({"a": []}, reserved=("limit",))
    with pytest.raises(pk.DefinitionError, match="duplicate step name 'a'"):
        graph.add(Node("a"))
    with pytest.raises(pk.DefinitionError, match="'limit' is reserved"):
        graph.add(Node("limit"))
    with pytest.raises(pk.DefinitionError, match="parameter 'limit' is reserved"):
        graph.add(Node("b", (Param("limit"),)))


def test_cycle_detected_when_closed_with_path() -> None:
    graph = make_graph({"a": ["b"], "b": ["c"]})
    with pytest.raises(pk.CycleError) as info:
        graph.add(Node("c", (Param("x"), Param("a"))))
    assert info.value.cycle == ("c", "a", "b", "c")  # c needs a, a needs b, b needs c
    assert "c -> a -> b -> c" in str(info.value)
    assert "c" not in graph.nodes  # the graph is left unchanged


def test_self_cycle() -> None:
    with pytest.raises(pk.CycleError, match="a -> a"):
        make_graph({"a": ["a"]})


def test_frozen_graph_refuses_nodes() -> None:
    graph = make_graph({"a": []})
    graph.freeze()
    with pytest.raises(RuntimeError, match="immutable"):
        graph.add(Node("b"))


def test_plan_orders_topologically_and_is_cached() -> None:
    graph = make_graph({"d": ["b", "c"], "b": ["a"], "c": ["a"], "a": []})
    plan = graph.plan()
    order = plan.order
    assert order.index("a") < order.index("b") < order.index("d")
    assert order.index("c") < order.index("d")
    assert graph.plan() is plan
    assert graph.plan(targets=["b"]).order == ("a", "b")


def test_plan_errors_name_what_is_available() -> None:
    graph = make_graph({"charge": ["payment_id"], "record": ["chrage"]})
    with pytest.raises(pk.DefinitionError) as info:
        graph.plan({"payment_id"})
    text = str(info.value)
    assert "'record' needs 'chrage'" in text
    assert "['charge', 'record']" in text
    assert "did you mean 'charge'" in text
    with pytest.raises(TypeError, match=r"unexpected input 'paymentid'.*'payment_id'"):
        graph.plan({"paymentid"})
    with pytest.raises(TypeError, match="input 'charge' has the name of a step"):
        graph.plan({"charge"})
    with pytest.raises(pk.DefinitionError, match="unknown target 'recrd'"):
        graph.plan({"payment_id"}, ["recrd"])


# -- running --------------------------------------------------------------------------------
async def test_run_node_hook_values_and_spans() -> None:
    """The Orchestrator's shape: run_node returns the ready value, the node lives on."""
    graph = make_graph({"db": [], "cache": [], "http": ["db", "cache"]}, kind="service")
    plan = graph.plan()
    alive: list[str] = []

    async def serve(name: str, task_status: anyio.abc.TaskStatus[str]) -> None:
        alive.append(name)
        task_status.started(f"{name}-handle")
        try:
            await anyio.sleep_forever()
        finally:
            alive.remove(name)

    async with anyio.create_task_group() as services:
        seen: dict[str, dict[str, Any]] = {}

        async def run_node(node: Node, kwargs: dict[str, Any]) -> Any:
            seen[node.name] = kwargs
            return await services.start(serve, node.name)

        timeline = pk.Timeline(origin=anyio.current_time())
        run = Run(plan, {}, run_node=run_node, timeline=timeline, kind="start")
        await run.execute()
        assert seen["http"] == {"db": "db-handle", "cache": "cache-handle"}
        assert sorted(alive) == ["cache", "db", "http"]  # still running after execute()
        assert [s.name for s in timeline][-1] == "http"  # spans in the order nodes finished
        assert {s.kind for s in timeline} == {"start"}
        assert timeline["http"].start >= max(timeline["db"].end, timeline["cache"].end)
        services.cancel_scope.cancel()
    assert alive == []


async def test_fail_fast_names_the_failed_node() -> None:
    graph = make_graph({"a": [], "b": ["a"]})
    boom = KeyError("boom")

    async def run_node(node: Node, kwargs: dict[str, Any]) -> Any:
        if node.name == "a":
            raise boom
        return None  # pragma: no cover

    run = Run(graph.plan(), {}, run_node=run_node)
    with pytest.raises(KeyError) as info:
        await run.execute()
    assert info.value is boom
    assert run.failed == "a"
    assert run.results() == {}


async def test_shared_limiter_bounds_running_nodes() -> None:
    graph = make_graph({f"n{i}": [] for i in range(12)})
    limiter = pk.Limiter(concurrency=3)
    running = peak = done = 0

    async def run_node(node: Node, kwargs: dict[str, Any]) -> Any:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        while running < min(3, 12 - done):  # stay until the bound is reached
            await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        running -= 1
        done += 1

    with anyio.fail_after(60):
        await Run(graph.plan(), {}, run_node=run_node, limit=limiter).execute()
    assert (peak, done) == (3, 12)


async def test_empty_plan() -> None:
    run = Run(Graph().plan(), {})
    await run.execute()
    assert run.results() == {}
