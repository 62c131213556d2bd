"""Flow: makespan on a layered DAG against a hand-written scheduler, layer-by-layer
gather and the ideal; per-node engine cost on a 10,000-node graph against the
hand-written scheduler. Everything compared is measured in the same run,
interleaved (a shuffled order each round), and ratios are taken within a round.

The **ideal** makespan is computed, not measured: the sum of the step durations
along the critical chain (the longest path through the DAG), i.e. what the run
would take with zero overhead and every step starting the instant its inputs are
ready. No implementation can beat it. The **hand-written scheduler** (one task and
one ``asyncio.Event`` per node, no parallelkit) is the peer that pays the same
timer and event-loop latency as ``pk.Flow``.

Every step returns its name and checks that its inputs are its dependencies' names;
every run's results are checked (outside the timing): a scheduler that skips a step,
or starts one before its inputs exist, is reported as wrong (the run fails).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

import parallelkit as pk

from ._util import print_targets, table, target

TITLE = (
    "Flow makespan vs layer-by-layer gather and the floor; per-node cost vs task+Event;"
    " a flow per request vs a hand-written task group and gather"
)

Graph = dict[str, list[str]]


def layered(layers: int, width: int, deps: int, seed: int) -> Graph:
    """``layers`` x ``width`` nodes; a non-root needs ``deps`` random nodes of the layer above."""
    rng = random.Random(seed)
    graph: Graph = {}
    for layer in range(layers):
        for i in range(width):
            above = [f"n{layer - 1}_{j}" for j in rng.sample(range(width), deps)] if layer else []
            graph[f"n{layer}_{i}"] = above
    return graph


def make_step(name: str, deps: list[str], seconds: float | None) -> Callable[..., Awaitable[Any]]:
    """A step with real named parameters (as users write them): sleeps, or does nothing.

    It returns its own name, and raises unless each input is its dependency's name: a
    scheduler that skips a step, or starts one before what it needs has finished, gives
    a wrong result (checked by :func:`wrong_steps`), whatever its speed.
    """
    check = (
        f"    if ({', '.join(deps)},) != {tuple(deps)!r}:\n"
        f"        raise AssertionError('{name}: started without its inputs')\n"
        if deps
        else ""
    )
    wait = "" if seconds is None else f"    await sleep({seconds!r})\n"
    body = f"{check}{wait}    return {name!r}\n"
    namespace: dict[str, Any] = {"sleep": anyio.sleep}
    exec(f"async def {name}({', '.join(deps)}):\n{body}", namespace)
    step: Callable[..., Awaitable[Any]] = namespace[name]
    return step


def make_flow(graph: Graph, durations: dict[str, float] | None) -> pk.Flow:
    flow = pk.Flow()
    for name, deps in graph.items():
        flow.step(make_step(name, deps, None if durations is None else durations[name]))
    return flow


def wrong_steps(graph: Graph, results: Any) -> list[str]:
    """The steps of ``graph`` whose result is missing or not the step's (its name)."""
    return [name for name in graph if results.get(name) != name]


def critical_chain(graph: Graph, durations: dict[str, float]) -> list[str]:
    """The longest-duration path (graph is in topological order)."""
    finish: dict[str, float] = {}
    best: dict[str, str | None] = {}
    for name, deps in graph.items():
        prev = max(deps, key=lambda d: finish[d]) if deps else None
        finish[name] = (finish[prev] if prev else 0.0) + durations[name]
        best[name] = prev
    node: str | None = max(finish, key=lambda n: finish[n])
    chain = []
    while node is not None:
        chain.append(node)
        node = best[node]
    return chain[::-1]


# ------------------------------------------------------------------ part 1: makespan
def ideal_makespan(graph: Graph, durations: dict[str, float]) -> float:
    """The critical chain's total duration: a lower bound for any scheduler."""
    return sum(durations[name] for name in critical_chain(graph, durations))


async def makespan_once(
    graph: Graph,
    durations: dict[str, float],
    flow: pk.Flow,
    steps: dict[str, Callable[..., Awaitable[Any]]],
    wrong: list[str],
) -> dict[str, float]:
    layers: dict[str, list[str]] = {}
    for name in graph:
        layers.setdefault(name.split("_")[0], []).append(name)

    async def by_layer() -> None:
        for names in layers.values():
            await asyncio.gather(*(asyncio.sleep(durations[n]) for n in names))

    async def with_flow() -> Any:
        return await flow.run()

    async def hand() -> Any:
        return await hand_scheduler(graph, steps)

    out = {}
    contenders = {"hand task+Event": hand, "layer-by-layer gather": by_layer, "pk.Flow": with_flow}
    order = list(contenders)
    random.shuffle(order)
    for name in order:
        start = time.perf_counter()
        value = await contenders[name]()
        out[name] = time.perf_counter() - start
        if value is not None and wrong_steps(graph, value):  # checked outside the timing
            wrong.append(f"makespan: {name} did not run every step with its inputs")
    return out


def part_makespan(repeat: int, wrong: list[str]) -> dict[str, Any]:
    graph = layered(10, 20, 3, seed=1)
    rng = random.Random(2)
    durations = {n: 0.001 + 0.019 * rng.random() ** 3 for n in graph}  # skewed: mostly short
    flow = make_flow(graph, durations)
    steps = {name: make_step(name, deps, durations[name]) for name, deps in graph.items()}
    ideal = ideal_makespan(graph, durations)
    samples: list[dict[str, float]] = []

    async def main() -> None:
        if wrong_steps(graph, await flow.run()):  # warm up (plan cached, as in a service)
            wrong.append("makespan: pk.Flow did not run every step with its inputs")
        for _ in range(repeat):
            samples.append(await makespan_once(graph, durations, flow, steps, wrong))

    asyncio.run(main())
    names = ("pk.Flow", "hand task+Event", "layer-by-layer gather")
    to_hand = [s["pk.Flow"] / s["hand task+Event"] for s in samples]
    return {
        "ideal ms": ideal * 1000,
        "ms": {name: statistics.median(s[name] for s in samples) * 1000 for name in names},
        "x ideal": {name: statistics.median(s[name] for s in samples) / ideal for name in names},
        "pk.Flow / hand": {
            "median": statistics.median(to_hand),
            "min": min(to_hand),
            "max": max(to_hand),
        },
        "critical chain": len(critical_chain(graph, durations)),
        "repeat": repeat,
    }


# ------------------------------------------------------------------ part 2: per-node cost
async def hand_scheduler(
    graph: Graph, steps: dict[str, Callable[..., Awaitable[Any]]]
) -> dict[str, Any]:
    """The simplest correct hand-written scheduler: one task and one Event per node."""
    events = {name: asyncio.Event() for name in graph}
    results: dict[str, Any] = {}

    async def one(name: str) -> None:
        deps = graph[name]
        for dep in deps:
            await events[dep].wait()
        results[name] = await steps[name](**{d: results[d] for d in deps})
        events[name].set()

    await asyncio.gather(*(asyncio.create_task(one(n)) for n in graph))
    return results


def part_per_node(
    layers: int, repeat: int, wrong: list[str], seconds: float | None = None
) -> dict[str, Any]:
    graph = layered(layers, 100, 2, seed=3)
    steps = {name: make_step(name, deps, seconds) for name, deps in graph.items()}
    started = time.perf_counter()
    flow = pk.Flow()
    for step in steps.values():
        flow.step(step)
    define_us = (time.perf_counter() - started) / len(graph) * 1e6
    samples: dict[str, list[float]] = {"pk.Flow": [], "hand task+Event": [], "pk.Flow (trio)": []}

    def checked(name: str, value: Any) -> None:  # outside the timing
        if wrong_steps(graph, value) and not any(w.startswith(f"{label}{name}") for w in wrong):
            wrong.append(f"{label}{name} did not run every step with its inputs")

    label = f"{len(graph):,} nodes{'' if seconds is None else ', suspending'}: "

    async def asyncio_main() -> None:
        checked("pk.Flow", await flow.run())  # first run: wiring resolved once and cached
        for _ in range(repeat):
            for name in random.sample(["pk.Flow", "hand task+Event"], 2):
                start = time.process_time()
                value: Any
                if name == "pk.Flow":
                    value = await flow.run()
                else:
                    value = await hand_scheduler(graph, steps)
                samples[name].append(time.process_time() - start)
                checked(name, value)

    async def trio_main() -> None:
        for _ in range(repeat):
            start = time.process_time()
            value = await flow.run()
            samples["pk.Flow (trio)"].append(time.process_time() - start)
            checked("pk.Flow (trio)", value)

    asyncio.run(asyncio_main())
    anyio.run(trio_main, backend="trio")
    per_node = {k: statistics.median(v) / len(graph) * 1e6 for k, v in samples.items()}
    ratios = [a / b for a, b in zip(samples["pk.Flow"], samples["hand task+Event"], strict=True)]
    return {
        "nodes": len(graph),
        "define µs/node": define_us,
        "µs/node": per_node,
        "pk.Flow / hand": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        },
    }


def part_request(runs: int, repeat: int) -> dict[str, Any]:
    """A flow per request, the reference payment's shape: ``charge``, then ``record``
    and ``notify`` side by side (``record`` ends last), 16 runs at once. CPU µs per run
    for ``pk.Flow``, a hand-written anyio task group (the caller runs ``record``, one
    task ``notify``) and ``asyncio.gather``."""

    async def checkpoint() -> None:
        await asyncio.sleep(0)

    async def charge_(payment: int) -> str:
        await checkpoint()
        return f"ch_{payment}"

    async def record_(charge: str, payment: int) -> str:
        await checkpoint()
        await checkpoint()  # ends after notify, as the database insert does
        return charge

    async def notify_(charge: str, payment: int) -> None:
        await checkpoint()

    flow = pk.Flow(name="payment")
    flow.step(name="charge")(charge_)
    flow.step(name="record")(record_)
    flow.step(name="notify")(notify_)

    async def with_flow(payment: int) -> str:
        result = await flow.run(payment=payment)
        return str(result["record"])

    async def task_group(payment: int) -> str:
        charge = await charge_(payment)
        async with anyio.create_task_group() as tg:
            tg.start_soon(notify_, charge, payment)
            recorded = await record_(charge, payment)
        return recorded  # noqa: RET504 - returned once the task group has waited for notify

    async def gather(payment: int) -> str:
        charge = await charge_(payment)
        recorded, _ = await asyncio.gather(record_(charge, payment), notify_(charge, payment))
        return recorded

    contenders = {"pk.Flow": with_flow, "hand anyio task group": task_group,
                  "asyncio.gather": gather}  # fmt: skip
    samples: dict[str, list[float]] = {name: [] for name in contenders}

    async def drive(fn: Callable[[int], Awaitable[str]]) -> None:
        payments = iter(range(runs))

        async def client() -> None:
            for payment in payments:
                if await fn(payment) != f"ch_{payment}":
                    raise AssertionError(payment)  # every answer checked

        await asyncio.gather(*(client() for _ in range(16)))

    async def main() -> None:
        for fn in contenders.values():
            await drive(fn)  # warm-up (the flow's wiring is resolved once)
        for _ in range(repeat):
            for name in random.sample(list(contenders), len(contenders)):
                start = time.process_time()
                await drive(contenders[name])
                samples[name].append(time.process_time() - start)

    asyncio.run(main())
    per_run = {k: statistics.median(v) / runs * 1e6 for k, v in samples.items()}
    ratios = {
        other: statistics.median(
            a / b for a, b in zip(samples["pk.Flow"], samples[other], strict=True)
        )
        for other in ("hand anyio task group", "asyncio.gather")
    }
    return {"runs": runs, "µs/run": per_run, "pk.Flow / other": ratios}


def _range(stats: dict[str, float]) -> str:
    return f"{stats['median']:.3f} [{stats['min']:.2f}-{stats['max']:.2f}]"


def run(*, quick: bool, database: str | None) -> dict[str, Any]:
    wrong: list[str] = []  # every run's result is checked: a wrong one fails the run
    makespan = part_makespan(3 if quick else 15, wrong)
    print("1. 200-node layered DAG (10 x 20, 3 deps, 1-20 ms skewed sleeps), asyncio")
    print(
        f"   ideal = the critical chain's {makespan['critical chain']} step durations summed"
        f" = {makespan['ideal ms']:.1f} ms (computed: zero overhead, a lower bound)"
    )
    rows = [
        [name, makespan["ms"][name], makespan["x ideal"][name]]
        for name in ("pk.Flow", "hand task+Event", "layer-by-layer gather")
    ]
    print(table(["contender", "makespan ms", "x ideal"], rows))
    print(f"   pk.Flow / hand task+Event, per round: {_range(makespan['pk.Flow / hand'])}")

    per_node = part_per_node(20 if quick else 100, 3 if quick else 7, wrong)
    print(f"2. {per_node['nodes']:,}-node graph (100 per layer, 2 deps), no-op steps (CPU time)")
    print(table(["contender", "µs/node"], [[k, v] for k, v in per_node["µs/node"].items()]))
    print(f"   pk.Flow / hand task+Event, per round: {_range(per_node['pk.Flow / hand'])}")
    define = per_node["define µs/node"]
    print(f"   (defining the flow, signatures analysed once: {define:.1f} µs/node)")

    # informational: the same graph, but every step suspends once (await sleep(0)), so
    # the engine's workers really switch; no target, shown so the no-op case is not
    # mistaken for the whole story
    suspending = part_per_node(20 if quick else 100, 3 if quick else 5, wrong, seconds=0)
    print("   the same graph, each step awaiting one checkpoint (informational):")
    print(table(["contender", "µs/node"], [[k, v] for k, v in suspending["µs/node"].items()]))
    print(f"   pk.Flow / hand task+Event, per round: {_range(suspending['pk.Flow / hand'])}")

    # informational: what a flow per request costs (a service's case: few steps, many
    # runs), against the two ways an expert writes the same fork by hand; no target
    # (the task group is anyio's: its task handles and cancel scopes cost what they cost)
    request = part_request(runs=2_000 if quick else 20_000, repeat=3 if quick else 7)
    print("3. a flow per request: charge, then record || notify, 16 runs at once (CPU time):")
    print(table(["contender", "µs/run"], [[k, v] for k, v in request["µs/run"].items()]))
    for other, ratio in request["pk.Flow / other"].items():
        print(f"   pk.Flow / {other}, median of paired rounds: {ratio:.2f}")

    targets = [
        target("makespan pk.Flow / hand task+Event", makespan["pk.Flow / hand"]["median"], 1.02),
        target(
            "per-node cost pk.Flow / hand task+Event (asyncio, CPU)",
            per_node["pk.Flow / hand"]["median"],
            1.0,
        ),
    ]
    print_targets(targets)
    return {
        "wrong": wrong,
        "makespan": makespan,
        "per_node": per_node,
        "per_node_suspending": suspending,
        "request": request,
        "targets": targets,
    }
