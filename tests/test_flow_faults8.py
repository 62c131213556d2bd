"""pk.Flow faults, eighth round: a service author's odd steps, names and graphs.

Found by using Flow as a service author would: steps that are methods, partials and
callable objects, names that are not what Python reads, wrong keys and targets, a
10,000-step graph, and timelines of odd names rendered as text and as Mermaid.
Nothing here waits on time.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import anyio
import pytest

import parallelkit as pk
from parallelkit import Span
from parallelkit._graph.graph import Graph, Node, Param

GUARD = 30.0  # a hang guard only: nothing here waits on time


# -- definition ------------------------------------------------------------------------
def test_a_callable_object_whose_call_is_an_async_generator_is_named_as_one() -> None:
    class Stream:
        async def __call__(self, user_id: int):  # type: ignore[no-untyped-def]
            yield user_id

    flow = pk.Flow()
    for step in (Stream(), functools.partial(Stream())):
        with pytest.raises(pk.DefinitionError, match="async generator") as info:
            flow.step(name="stream")(step)
        assert "to_thread" not in str(info.value)  # not a blocking function


def test_a_name_python_would_read_differently_is_refused() -> None:
    # a parameter written ``ﬁle`` (a ligature) is named ``file`` by Python (NFKC): no
    # step could ever depend on a step named ``ﬁle``
    flow = pk.Flow()

    async def load() -> str:
        return "x"

    with pytest.raises(pk.DefinitionError, match="'file'"):
        flow.step(name="\ufb01le")(load)
    assert not flow.steps
    flow.step(name="café")(load)  # an NFKC-normal unicode name is fine
    assert flow.steps == ("café",)


def test_a_sync_wrapper_of_an_async_step_is_refused_with_a_fitting_hint() -> None:
    async def charge(payment_id: str) -> str:
        return payment_id

    @functools.wraps(charge)
    def logged(*args: object, **kwargs: object) -> object:  # a decorator's wrapper
        return charge(*args, **kwargs)  # type: ignore[arg-type]

    with pytest.raises(pk.DefinitionError, match="async def wrapper") as info:
        pk.Flow().step(logged)  # type: ignore[arg-type]
    assert "to_thread" not in str(info.value)  # it does not block: it is a wrapper


def test_adding_a_chain_below_a_step_that_names_it_all_is_linear() -> None:
    # a "report" step registered first names every step of a chain added after it:
    # each step added was referenced already, and the cycle check walked its whole
    # ancestry each time (quadratic: 10,000 steps took seconds to define)
    walked = 0

    class Counted(tuple):  # type: ignore[type-arg]
        def __iter__(self) -> Iterator[Param]:
            nonlocal walked
            walked += 1
            return super().__iter__()

    n = 2000
    graph = Graph()
    graph.add(Node("report", Counted(Param(f"s{i}") for i in range(n))))
    for i in range(n):
        graph.add(Node(f"s{i}", Counted((Param(f"s{i - 1}"),) if i else ())))
    assert walked < 10 * n, walked  # was about n * n / 2


@pytest.mark.parametrize("order", ["forward", "reverse", "sink-first"])
def test_the_cycle_check_finds_a_cycle_closed_from_either_side(order: str) -> None:
    names = [f"s{i}" for i in range(50)]
    nodes = [Node(n, (Param(names[i - 1]),) if i else (Param("s49"),)) for i, n in enumerate(names)]
    graph = Graph()
    if order == "sink-first":
        graph.add(Node("report", tuple(Param(n) for n in names)))
    ordered = nodes if order != "reverse" else nodes[::-1]
    for node in ordered[:-1]:
        graph.add(node)
    with pytest.raises(pk.CycleError) as info:
        graph.add(ordered[-1])
    cycle = info.value.cycle
    last = ordered[-1].name
    assert cycle[0] == cycle[-1] == last
    assert len(cycle) == 51
    needs = {node.name: [p.name for p in node.params] for node in nodes}
    for dependent, dependency in itertools.pairwise(cycle):  # each needs the next one
        assert dependency in needs[dependent]


# -- running -----------------------------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize("targets", [b"charge", bytearray(b"charge")])
async def test_targets_as_bytes_are_refused_as_a_whole(targets: object) -> None:
    flow = pk.Flow()

    @flow.step
    async def charge() -> int:
        return 1

    with pytest.raises(TypeError, match="got b") as info:
        await flow.run(targets=targets)  # type: ignore[call-overload]
    assert "99" not in str(info.value)  # not the first byte, as an int


@pytest.mark.anyio
async def test_a_result_indexed_by_a_step_function_says_how_to_look_it_up() -> None:
    flow = pk.Flow()

    @flow.step
    async def charge() -> str:
        return "ch_1"

    result = await flow.run()
    with pytest.raises(KeyError, match=r"result\.get\(charge\)") as info:
        result[charge]  # type: ignore[index]
    assert "'charge'" in str(info.value)
    outcomes = await flow.run(settle=True)
    with pytest.raises(KeyError, match=r"\.get\(charge\)"):
        outcomes[charge]  # type: ignore[index]
    assert result.get(charge) == "ch_1"  # what the message points to


@pytest.mark.anyio
async def test_a_step_raising_generator_exit_comes_out_as_itself_in_a_fork() -> None:
    # raised as itself by a step run in the caller's task (one ready step); two ready
    # steps put the second in a helper task, whose GeneratorExit came out of the task
    # group in a BaseExceptionGroup (the docs: never an ExceptionGroup)
    flow = pk.Flow()

    @flow.step
    async def first() -> None:
        await anyio.sleep_forever()

    @flow.step
    async def second() -> None:
        raise GeneratorExit("closed by hand")

    with anyio.fail_after(GUARD), pytest.raises(GeneratorExit):
        await flow.run()


# -- timeline renderings -----------------------------------------------------------------
@pytest.mark.anyio
async def test_to_mermaid_keeps_a_step_named_section() -> None:
    flow = pk.Flow(name="docs")

    @flow.step
    async def section() -> str:  # "section <text>" is Mermaid's section statement
        return "s"

    @flow.step
    async def publish(section: str) -> str:
        return section

    mermaid = (await flow.run()).timeline.to_mermaid()
    lines = [line.strip() for line in mermaid.splitlines()]
    assert [line for line in lines if line.startswith("section ")] == ["section step"]
    tasks = [line.partition(" :")[0] for line in lines[5:]]
    assert tasks == ["#115;ection", "publish"]  # Mermaid shows the entity as "s"


@pytest.mark.parametrize("name", ["%%x", "a%b", "%x"])
def test_to_mermaid_keeps_a_span_whose_name_mermaid_reads_as_a_comment(name: str) -> None:
    timeline = pk.Timeline([Span(name, 0, 0, 1)])
    task = timeline.to_mermaid().splitlines()[-1].strip()
    assert "%" not in task
    assert task.endswith(":crit, done, s0, 0, 1000")


def test_to_text_keeps_one_line_per_span_whatever_the_names() -> None:
    names = ["line\nbreak", "carriage\rreturn", "tab\tstop", "esc\x1b[31mred"]
    timeline = pk.Timeline(
        [Span(n, i, i, i + 1) for i, n in enumerate(names)], origin=0, name="flow\nnext"
    )
    lines = timeline.to_text(width=10).splitlines()
    assert len(lines) == 1 + len(names) + 1  # title, one row per span, critical path
    assert lines[0].startswith("flow\\nnext total")
    rows = lines[1:-1]
    assert [row.partition(" |")[0].rstrip() for row in rows] == [
        "line\\nbreak", "carriage\\rreturn", "tab\\tstop", "esc\\x1b[31mred",
    ]  # fmt: skip
    assert len({row.index("|") for row in rows}) == 1  # the bars line up
    for line in timeline.to_mermaid().splitlines():
        assert all(c >= " " for c in line), line
