"""The dependency-graph engine shared by :class:`~parallelkit.Flow` and the Orchestrator.

Engine API (for Flow and the Orchestrator)
==========================================

Three objects, used in this order::

    graph = Graph(kind="step", reserved=("limit", "settle", "targets"))
    graph.add(Node("charge", params_of(charge, kind="step", node="charge"), call=charge))
    graph.add(Node("record", params_of(record, ...), call=record))   # param "charge"
    plan = graph.plan(inputs={"payment_id"}, targets=None)           # cached per input set
    run = Run(plan, {"payment_id": "p1"}, limit=None, settle=False,
              timeline=Timeline(), run_node=None)
    await run.execute()           # fail-fast: raises the first original exception
    run.results()                 # {name: value}  (settle: {name: Outcome})

``Node(name, params, call=None, data=None)``
    One unit of work. ``params`` are :class:`Param` (name, optional) from
    :func:`params_of`, which analyses a function's signature **once**: each
    parameter names another node (a dependency) or a run input; a parameter with
    a default is an optional input. ``call`` is awaited as ``call(**kwargs)`` when
    no ``run_node`` is given; ``data`` is free for the owner (the Orchestrator can
    keep its service spec there).

``Graph.add(node)``
    Raises, before anything runs: :class:`~parallelkit.DefinitionError` for a
    duplicate or reserved name, :class:`~parallelkit.CycleError` (with the cycle
    path) as soon as the node that closes a cycle is added (an O(1) check in the
    usual case, where dependencies are added before their dependents).
    ``graph.freeze()`` makes further ``add`` calls fail (Flow freezes on first run).

``Graph.plan(inputs=(), targets=None) -> Plan``
    Resolves every parameter to a node or an input and raises, still before
    anything runs: an unknown target; a parameter that is neither a node nor a
    given input (the message lists the nodes and inputs and suggests a close
    name); ``TypeError`` for an input no node uses or that shadows a node. The
    plan is immutable and cached per ``(set of input names, set of targets)``
    (at most 256 plans per graph, the oldest dropped first), so repeated and
    concurrent runs share it. ``plan.order`` is a topological order of the names
    (dependencies first): tear down in ``reversed(plan.order)``, or better, in the
    reverse of the order things actually became ready.

``Run(plan, inputs, *, run_node=None, limit=None, settle=False, timeline=None, kind=None)``
    One execution; all per-run state lives here (never on the graph).
    ``await run.execute()`` starts every node the moment **all** of its
    dependencies have finished (not layer by layer), on the one worker pool
    (:mod:`parallelkit._fanout.pool`) fed by a ready queue with dependency
    counters: no task or event per node, and none at all while a single node is
    ready (it runs in the caller's task; at the first fork the caller becomes the
    pool's first worker).

    - ``run_node``: ``async (node, kwargs) -> value``. The value is what the
      dependents receive, and they start as soon as it returns. The Orchestrator
      uses this for "set up, become ready, stay alive": ``run_node`` starts the
      service's host in a task group the Orchestrator owns and returns its value
      once it is ready (the service keeps running there). The engine never owns a
      node's lifetime beyond ``run_node``.
    - ``limit``: an int (the most workers) or a shared :class:`~parallelkit.Limiter`
      / ``SupportsLimit`` (its ``concurrency`` is the most workers, and each node's
      ``run_node`` runs inside ``async with limit``); the one limit → workers rule
      of :mod:`parallelkit._fanout.options`.
    - fail-fast (``settle=False``): the first exception cancels the running nodes
      and ``execute`` raises **that original exception** (never an
      ``ExceptionGroup``); ``run.failed`` names the node that raised it. A node
      that fails later (its clean-up failed as it was cancelled) is put on that
      exception's ``__context__`` chain. A node failure also wins over the caller's
      cancellation (as in a task group): it is raised instead. On asyncio, a
      ``task.cancel()`` that no cancel scope made, in a helper task of the pool
      (not the caller's), is the node's failure, as for an item of ``map``.
    - ``settle=True``: every node gets an :class:`~parallelkit.Outcome`; nodes
      downstream of a failure are not run and their outcome's error is
      :class:`~parallelkit.DependencyFailed` naming the dependency, whose
      ``__cause__`` is the dependency's own error (a failure, or its
      ``DependencyFailed``): the chain ends with the original exception.
    - ``timeline``: a :class:`~parallelkit.Timeline`; one :class:`~parallelkit.Span`
      per node (``kind`` defaults to the graph's kind; the Orchestrator may pass
      ``kind="start"``: ``end`` is then the moment the node became ready, or
      ``kind="stop"``, which ``Timeline.critical_path()`` leaves out by default).
      Nodes cancelled by fail-fast or by the caller get ``status="cancelled"``. A
      run without ``limit`` has no slot to wait for: its spans have ``queued ==
      start``. Spans are recorded in the order the nodes finished.
    - ``clock=None``: the running backend's clock (:func:`parallelkit._core.backend.clock`),
      when the caller has looked it up already (default: looked up by ``execute``).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from typing_extensions import final

from .._core.check import is_async_callable
from .._core.errors import CycleError, DefinitionError

__all__ = ["Graph", "Node", "Param", "Plan", "RunNode", "not_async", "params_of", "suggest"]

_MAX_PLANS = 256  # plans kept per graph (one per set of input names and of targets)

RunNode = Callable[["Node", dict[str, Any]], Awaitable[Any]]


@final
@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of a node: the name it is wired by, and whether it has a default."""

    name: str
    optional: bool = False


def params_of(fn: Callable[..., Any], *, kind: str = "step", node: str = "") -> tuple[Param, ...]:
    """Analyse ``fn``'s signature once: the names its parameters are wired by.

    Raises:
        DefinitionError: a ``*args`` / ``**kwargs`` or positional-only parameter,
            which cannot be wired by name.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        msg = f"{kind} {node!r}: cannot read the signature of {fn!r}: {exc}"
        raise DefinitionError(msg) from exc
    params = []
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            star = "*" if p.kind is p.VAR_POSITIONAL else "**"
            msg = (
                f"{kind} {node!r}: parameter {star}{p.name} cannot be wired by name; "
                "name each dependency or input as its own parameter"
            )
            raise DefinitionError(msg)
        if p.kind is p.POSITIONAL_ONLY:
            msg = (
                f"{kind} {node!r}: parameter {p.name!r} is positional-only; dependencies "
                "are passed by keyword, so remove the '/'"
            )
            raise DefinitionError(msg)
        params.append(Param(p.name, p.default is not p.empty))
    return tuple(params)


def not_async(fn: object, *, kind: str = "step", node: object = "") -> str | None:
    """Why ``fn`` cannot be a node's async function, or ``None`` when it can: an async
    generator function (or a partial or an object whose ``__call__`` is one), a
    blocking function, or a plain wrapper of an async one (a decorator's)."""
    inner = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    call = getattr(type(inner), "__call__", None)  # noqa: B004 - the class's
    if inspect.isasyncgenfunction(inner) or inspect.isasyncgenfunction(call):
        return (
            f"{kind} {node!r} is an async generator function; a {kind} returns one "
            "value (for set-up / tear-down, use an Orchestrator service)"
        )
    if is_async_callable(fn):
        return None
    with contextlib.suppress(ValueError):  # a __wrapped__ cycle
        inner = inspect.unwrap(fn)  # type: ignore[arg-type]
    if inner is not fn and is_async_callable(inner):
        return (
            f"{kind} {node!r} is a plain function that wraps an async one ({fn!r} has "
            "__wrapped__, as a decorator's wrapper does): write the wrapper as "
            "'async def wrapper(...): return await fn(...)'"
        )
    return (
        f"{kind} {node!r} must be an async function (async def), got {fn!r}; wrap "
        "blocking work with anyio.to_thread.run_sync"
    )


@final
@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """One unit of work in a :class:`Graph`.

    Attributes:
        name: unique within the graph.
        params: what it needs, by name (other nodes or run inputs).
        call: awaited as ``call(**kwargs)`` when the run has no ``run_node``.
        data: anything the owner wants to keep with the node.
    """

    name: str
    params: tuple[Param, ...] = ()
    call: Callable[..., Awaitable[Any]] | None = None
    data: Any = None


@final
class Graph:
    """A growing set of nodes, validated as they are added; planned per run shape.

    Args:
        kind: the word used in messages (``"step"``, ``"service"``).
        reserved: names no node and no parameter may use (run options).
    """

    __slots__ = (
        "_frozen",
        "_kind",
        "_last",
        "_nodes",
        "_plans",
        "_referenced_by",
        "_reserved",
    )

    def __init__(self, *, kind: str = "step", reserved: Collection[str] = ()) -> None:
        self._kind = kind
        self._reserved = frozenset(reserved)
        self._nodes: dict[str, Node] = {}
        self._referenced_by: dict[str, list[str]] = {}
        self._plans: dict[tuple[frozenset[str], frozenset[str] | None], Plan] = {}
        self._frozen = False
        # the last plan without targets, by its input names: a run shape repeated (a
        # flow run per request) finds it with no key to build
        self._last: tuple[frozenset[str], Plan] | None = None

    @property
    def kind(self) -> str:
        """The word for a node in messages."""
        return self._kind

    @property
    def nodes(self) -> Mapping[str, Node]:
        """The nodes by name, in the order they were added."""
        return self._nodes

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` was called."""
        return self._frozen

    def freeze(self) -> None:
        """Refuse further :meth:`add` calls (the graph is being run)."""
        self._frozen = True

    def __repr__(self) -> str:
        return f"<Graph of {len(self._nodes)} {self._kind}s: {list(self._nodes)}>"

    def add(self, node: Node) -> None:
        """Add ``node``, raising at once if it is a duplicate or closes a cycle."""
        kind, name = self._kind, node.name
        if self._frozen:
            msg = f"cannot add {kind} {name!r}: the graph has already run and is immutable"
            raise RuntimeError(msg)
        if name in self._nodes:
            msg = f"duplicate {kind} name {name!r}: each {kind} needs a unique name"
            raise DefinitionError(msg)
        if name in self._reserved:
            msg = (
                f"{kind} name {name!r} is reserved (it is an option of run()); "
                f"reserved names: {sorted(self._reserved)}"
            )
            raise DefinitionError(msg)
        seen_params: set[str] = set()
        for param in node.params:
            if param.name in self._reserved:
                msg = (
                    f"{kind} {name!r}: parameter {param.name!r} is reserved (it is an "
                    f"option of run()); rename it. Reserved names: {sorted(self._reserved)}"
                )
                raise DefinitionError(msg)
            seen_params.add(param.name)
        if name in seen_params:
            raise CycleError((name, name))
        if name in self._referenced_by:
            cycle = self._find_cycle(node)
            if cycle is not None:
                raise CycleError(cycle)
        self._nodes[name] = node
        for param_name in seen_params:
            self._referenced_by.setdefault(param_name, []).append(name)
        self._plans.clear()  # a plan made before this node would miss it
        self._last = None

    def _find_cycle(self, new: Node) -> list[str] | None:
        """A path new -> ... -> new through existing nodes, if adding ``new`` closes one.

        What ``new`` needs (up its parameters) and what needs it (down
        ``_referenced_by``) are walked a node at a time, in turn, until a node is on
        both sides (a cycle) or either side is done: the cost is the smaller side's."""
        nodes, referenced_by, name = self._nodes, self._referenced_by, new.name
        up = {p.name: name for p in new.params if p.name in nodes}  # node: reached from
        down = dict.fromkeys(referenced_by.get(name, ()), name)
        up_stack, down_stack = list(up), list(down)
        meet = next((n for n in up if n in down), None)
        while meet is None and up_stack and down_stack:
            at = up_stack.pop()
            for dep in [p.name for p in nodes[at].params]:
                if dep in nodes and dep not in up:
                    up[dep] = at
                    up_stack.append(dep)
                    meet = dep if dep in down else meet
            at = down_stack.pop()
            for user in referenced_by.get(at, ()):
                if user not in down:
                    down[user] = at
                    down_stack.append(user)
                    meet = user if user in up else meet
        if meet is None:
            return None
        path = [meet]  # new -> ... -> meet, by the links of the walk up; then to new
        while path[-1] != name:
            path.append(up[path[-1]])
        path.reverse()
        while path[-1] != name:
            path.append(down[path[-1]])
        return path

    def plan(self, inputs: Collection[str] = (), targets: Iterable[str] | None = None) -> Plan:
        """Resolve the graph for a run with these input names (cached).

        Raises:
            DefinitionError: an unknown target, or a needed parameter that is
                neither a node nor a given input (and has no default).
            TypeError: an input that no node uses, or that has a node's name.
        """
        last = self._last
        if targets is None and last is not None and inputs == last[0]:
            return last[1]
        given = tuple(targets) if targets is not None else None
        # by the *set* of targets (the plan does not depend on their order), and a
        # bounded number of plans: targets chosen per request (the fields a client
        # asked for, in its order) must not grow the cache with every permutation
        key = (frozenset(inputs), None if given is None else frozenset(given))
        plans = self._plans
        plan = plans.get(key)
        if plan is None:
            plan = Plan(self, key[0], given)
            if len(plans) >= _MAX_PLANS:
                del plans[next(iter(plans))]  # the oldest
            plans[key] = plan
        if targets is None:
            self._last = (key[0], plan)
        return plan


@final
class Plan:
    """An immutable, validated execution plan: nodes in topological order, wired.

    Built by :meth:`Graph.plan`; shared by every run with the same input names and
    targets.
    """

    __slots__ = (
        "dep_args",
        "dependents",
        "input_args",
        "kind",
        "names",
        "nodes",
        "pending",
        "roots",
        "waited_for",
    )

    def __init__(
        self, graph: Graph, inputs: frozenset[str], targets: tuple[str, ...] | None
    ) -> None:
        kind, all_nodes = graph.kind, graph.nodes
        self.kind = kind
        for name in sorted(inputs):
            if name in all_nodes:
                msg = f"input {name!r} has the name of a {kind}; rename the input or the {kind}"
                raise TypeError(msg)
        unexpected = [name for name in sorted(inputs) if name not in graph._referenced_by]
        if unexpected:
            raise TypeError(_unexpected(kind, unexpected, graph, inputs))
        # the nodes needed: everything, or the targets and their ancestors
        if targets is None:
            needed = list(all_nodes)
        else:
            if not targets:
                msg = "targets must name at least one " + kind
                raise DefinitionError(msg)
            for target in targets:
                if target not in all_nodes:
                    msg = f"unknown target {target!r}; {kind}s: {list(all_nodes)}"
                    msg += suggest(target, list(all_nodes))
                    raise DefinitionError(msg)
            marked: set[str] = set()
            stack = list(targets)
            while stack:
                name = stack.pop()
                if name in marked:
                    continue
                marked.add(name)
                stack.extend(p.name for p in all_nodes[name].params if p.name in all_nodes)
            needed = [n for n in all_nodes if n in marked]
        # check every parameter resolves, then order topologically (Kahn, stable)
        deps_of: dict[str, list[str]] = {}
        missing: list[tuple[str, str]] = []  # (node, parameter): all named at once
        for name in needed:
            deps = []
            for param in all_nodes[name].params:
                if param.name in all_nodes:
                    deps.append(param.name)
                elif param.name not in inputs and not param.optional:
                    missing.append((name, param.name))
            deps_of[name] = deps
        if missing:
            raise DefinitionError(_missing(kind, missing, all_nodes, sorted(inputs)))
        indegree = {name: len(deps) for name, deps in deps_of.items()}
        users: dict[str, list[str]] = {name: [] for name in needed}
        for name, deps in deps_of.items():
            for dep in deps:
                users[dep].append(name)
        queue = deque(name for name in needed if not indegree[name])
        order: list[str] = []
        while queue:
            name = queue.popleft()
            order.append(name)
            for user in users[name]:
                indegree[user] -= 1
                if not indegree[user]:
                    queue.append(user)
        if len(order) != len(needed):  # pragma: no cover - Graph.add prevents cycles
            msg = "dependency cycle among: " + ", ".join(n for n in needed if indegree[n])
            raise DefinitionError(msg)
        index = {name: i for i, name in enumerate(order)}
        self.names: tuple[str, ...] = tuple(order)
        self.nodes: tuple[Node, ...] = tuple(all_nodes[n] for n in order)
        self.waited_for: tuple[tuple[str, ...], ...] = tuple(tuple(deps_of[n]) for n in order)
        self.pending: tuple[int, ...] = tuple(len(deps_of[n]) for n in order)
        self.roots: tuple[int, ...] = tuple(i for i, n in enumerate(order) if not deps_of[n])
        self.dependents: tuple[tuple[int, ...], ...] = tuple(
            tuple(index[u] for u in users[n]) for n in order
        )
        self.dep_args: tuple[tuple[tuple[str, int], ...], ...] = tuple(
            tuple((d, index[d]) for d in deps_of[n]) for n in order
        )
        self.input_args: tuple[tuple[str, ...], ...] = tuple(
            tuple(p.name for p in all_nodes[n].params if p.name in inputs) for n in order
        )

    @property
    def order(self) -> tuple[str, ...]:
        """Node names in a topological order (dependencies before dependents)."""
        return self.names

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"<Plan of {len(self.names)} {self.kind}s: {list(self.names)}>"


def suggest(name: str, candidates: list[str], form: str = "; did you mean {!r}?") -> str:
    """The close name among ``candidates`` in ``form``, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, candidates, n=1)
    return form.format(close[0]) if close else ""


def _unexpected(kind: str, names: list[str], graph: Graph, inputs: Collection[str]) -> str:
    # a close name that could be meant: a parameter no node supplies, not given yet
    usable = [n for n in graph._referenced_by if n not in graph.nodes and n not in inputs]
    if len(names) == 1:
        name = names[0]
        msg = f"unexpected input {name!r}: no {kind} has a parameter of that name"
        return msg + suggest(name, usable)
    hint = " (did you mean {!r}?)"
    listed = ", ".join(f"{name!r}" + suggest(name, usable, hint) for name in names)
    return f"unexpected inputs {listed}: no {kind} has a parameter of these names"


def _missing(
    kind: str, missing: list[tuple[str, str]], nodes: Mapping[str, Node], inputs: list[str]
) -> str:
    node, param = missing[0]
    # a close name that could be meant: not the node itself (a cycle) nor what it
    # already takes by another parameter
    own = {node, *(p.name for p in nodes[node].params)}
    candidates = [n for n in [*nodes, *inputs] if n not in own]
    msg = (
        f"{kind} {node!r} needs {param!r}, which is neither a {kind} nor a run input. "
        f"{kind.capitalize()}s: {list(nodes)}; inputs given: {inputs}. Pass it as an input "
        f"(run({param}=...)), give the parameter a default, or define a {kind} "
        f"named {param!r}" + suggest(param, candidates)
    )
    if len(missing) > 1:
        also = ", ".join(f"{p!r} ({kind} {n!r})" for n, p in missing[1:])
        msg += f". Also missing: {also}"
    return msg
