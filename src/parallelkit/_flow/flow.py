"""Flow: dependency-aware fan-out. Steps say what they need by parameter name.

A :class:`Flow` is a set of async steps on the shared graph engine
(:mod:`parallelkit._graph.graph`). Each step starts the moment the steps it names have
finished, so independent steps overlap and dependent ones wait: the data race in
"run the charge, the insert that needs ``charge.id`` and the webhook in one
``gather``" cannot be written.
"""

from __future__ import annotations

import contextlib
import keyword
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar, cast, overload

from typing_extensions import ParamSpec, final

from .._core import backend, instrument
from .._core.check import flag, number_or_none, text_or_none
from .._core.errors import DefinitionError
from .._core.limiter import Limiter, SupportsLimit
from .._core.retry import RetryLike, validate_retry
from .._fanout.options import build_call, split_limit
from .._graph.graph import Graph, Node, Plan, not_async, params_of
from .._graph.scheduler import Run
from .._graph.timeline import Timeline
from .result import _AMBIGUOUS, _step_name
from .result import FlowOutcomes as FlowOutcomes
from .result import FlowResult as FlowResult

__all__ = ["Flow", "FlowOutcomes", "FlowResult", "NotAsyncError"]

P = ParamSpec("P")
T = TypeVar("T")

RESERVED = ("limit", "settle", "targets")
_BYTES = (bytes, bytearray, memoryview)  # iterable, but of ints: never a list of targets

StepFn = Callable[..., Awaitable[Any]]


class NotAsyncError(DefinitionError, TypeError):
    """A step is not an ``async def`` function.

    Both a :class:`~parallelkit.DefinitionError` (the flow is malformed) and a
    :class:`TypeError` (a sync function where an async one is needed).
    """


@final
class Flow:
    """A set of async steps wired by parameter name, run with maximal overlap.

    Register steps with :meth:`step`. Each parameter of a step names either
    another step (it receives that step's result and the step waits for it) or a
    run input passed to :meth:`run`; a parameter with a default is an optional
    input. Definition errors (a cycle, a duplicate name, a non-async function, a
    reserved name) are raised by the decorator; wiring errors (a parameter that is
    neither a step nor an input, a missing input) by :meth:`run` before any step
    starts.

    A flow holds no per-run state: once run it is frozen (no more steps) and can be
    run many times, also concurrently. Signatures are analysed once, when a step is
    registered, and the wiring once per set of input names.

    Args:
        name: a title for timelines and reprs.

    Example:
        ```python
        flow = pk.Flow(name="payment")

        @flow.step
        async def charge(payment_id: str) -> Charge: ...

        @flow.step
        async def record(charge: Charge) -> Payment: ...      # waits for charge

        @flow.step
        async def notify(charge: Charge) -> None: ...         # overlaps record

        result = await flow.run(payment_id="p1")
        payment = result.get(record)                           # typed: Payment
        print(result.timeline.to_text())
        ```
    """

    __slots__ = ("_by_fn", "_graph", "_last", "_limiters", "name")

    def __init__(self, name: str | None = None) -> None:
        text_or_none("name", name)
        self.name = name
        self._graph = Graph(kind="step", reserved=RESERVED)
        self._by_fn: dict[object, str] = {}
        self._limiters: dict[str, SupportsLimit] = {}  # a step's limit=, by step name
        # the last plan run without targets, by its input names, once the graph is
        # frozen (it cannot change): a run per request finds it with no call
        self._last: tuple[frozenset[str], Plan] | None = None

    def __repr__(self) -> str:
        title = f"{self.name!r} " if self.name else ""
        return f"<Flow {title}steps={list(self._graph.nodes)}>"

    @property
    def steps(self) -> tuple[str, ...]:
        """The step names, in the order they were registered."""
        return tuple(self._graph.nodes)

    # -- definition ------------------------------------------------------------------
    @overload
    def step(self, fn: Callable[P, Awaitable[T]], /) -> Callable[P, Awaitable[T]]: ...
    @overload
    def step(
        self,
        fn: None = ...,
        /,
        *,
        name: str | None = ...,
        timeout: float | None = ...,
        retry: RetryLike | None = ...,
        limit: int | SupportsLimit | None = ...,
    ) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]: ...
    def step(
        self,
        fn: Any = None,
        /,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retry: RetryLike | None = None,
        limit: int | SupportsLimit | None = None,
    ) -> Any:
        """Register an async function as a step (a decorator, with or without options).

        The function is returned unchanged, so it stays callable and testable on its
        own, and can be passed to :meth:`FlowResult.get` for a typed result.

        Args:
            fn: the async function. Its parameters name the steps and inputs it needs.
            name: the step's name (default: the function's ``__name__``); other steps
                depend on it by this name.
            timeout: seconds allowed for each attempt; over it the step fails with
                :class:`TimeoutError`.
            retry: a :class:`~parallelkit.Retry` or ``tenacity.AsyncRetrying``.
            limit: a bound on this step's concurrent executions across all runs of
                the flow: an int, or a shared :class:`~parallelkit.Limiter` (e.g. the
                partner API's limiter, shared with other code).

        Raises:
            TypeError: an option of the wrong type (``timeout="5"``, ``limit=1.5``,
                ``retry=3``, ``name=3``), raised by the decorator.
            ValueError: an option out of range (``timeout=0``, ``limit=0``).
            NotAsyncError: ``fn`` is not an ``async def`` function (also a TypeError).
            DefinitionError: a duplicate or reserved name, a ``*args``,
                ``**kwargs`` or positional-only parameter.
            CycleError: this step closes a dependency cycle.
            RuntimeError: the flow has already run (it is immutable).

        Example:
            ```python
            @flow.step(timeout=5, retry=pk.Retry(attempts=3), limit=stripe_limiter)
            async def charge(payment_id: str) -> Charge: ...
            ```
        """
        timeout = number_or_none("timeout", timeout)
        retry = validate_retry(retry)
        workers, limiter = split_limit(limit)
        if workers is not None and limiter is None:  # an int: one bound for all runs
            limiter = Limiter(concurrency=workers)
        text_or_none("name", name)

        def register(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
            self._register(fn, name, timeout, retry, limiter)
            return fn

        if fn is not None:
            return register(fn)
        return register

    def _register(
        self,
        fn: object,
        name: str | None,
        timeout: float | None,
        retry: RetryLike | None,
        limiter: SupportsLimit | None,
    ) -> None:
        step_name = name if name is not None else getattr(fn, "__name__", None)
        if not callable(fn):
            msg = f"a step must be an async function, got {type(fn).__name__} {fn!r}"
            raise NotAsyncError(msg)
        refused = not_async(fn, kind="step", node=step_name)
        if refused is not None:
            raise NotAsyncError(refused)
        if not isinstance(step_name, str) or not step_name.isidentifier():
            msg = f"step name must be a Python identifier (pass name=...), got {step_name!r}"
            raise DefinitionError(msg)
        if keyword.iskeyword(step_name):
            msg = f"step name {step_name!r} is a Python keyword; pass another name=..."
            raise DefinitionError(msg)
        normal = unicodedata.normalize("NFKC", step_name)
        if normal != step_name:  # a parameter written so is named ``normal`` by Python
            msg = (
                f"step name {step_name!r} is read by Python as {normal!r} in a parameter "
                f"list (NFKC), so no step could depend on it; pass name={normal!r}"
            )
            raise DefinitionError(msg)
        step = cast(StepFn, fn)
        params = params_of(step, kind="step", node=step_name)
        self._graph.add(Node(step_name, params, _build_call(step, timeout, retry, limiter), fn))
        if limiter is not None:
            self._limiters[step_name] = limiter
        with contextlib.suppress(TypeError):  # an unhashable callable: by name only
            self._by_fn[fn] = _AMBIGUOUS if fn in self._by_fn else step_name

    # -- running -----------------------------------------------------------------------
    @overload
    async def run(
        self,
        /,
        *,
        limit: int | SupportsLimit | None = ...,
        settle: Literal[False] = ...,
        targets: Iterable[str | StepFn] | str | StepFn | None = ...,
        **inputs: Any,
    ) -> FlowResult: ...
    @overload
    async def run(
        self,
        /,
        *,
        limit: int | SupportsLimit | None = ...,
        settle: Literal[True],
        targets: Iterable[str | StepFn] | str | StepFn | None = ...,
        **inputs: Any,
    ) -> FlowOutcomes: ...
    async def run(
        self,
        /,
        *,
        limit: int | SupportsLimit | None = None,
        settle: bool = False,
        targets: Iterable[str | StepFn] | str | StepFn | None = None,
        **inputs: Any,
    ) -> FlowResult | FlowOutcomes:
        """Run the steps: each starts the moment all the steps it names have finished.

        Args:
            **inputs: the run inputs, by parameter name.
            limit: most steps running at once: an int or a shared
                :class:`~parallelkit.Limiter` (``None``: no bound).
            settle: give every step an :class:`~parallelkit.Outcome` instead of
                raising the first failure. Steps downstream of a failure are not
                run; their outcome's error is :class:`~parallelkit.DependencyFailed`,
                whose ``__cause__`` chain leads to the failure.
            targets: run only these steps (names or step functions) and what they
                need.

        Returns:
            A :class:`FlowResult` (values by step name, ``.timeline``), or with
            ``settle=True`` a :class:`FlowOutcomes` (outcomes by step name).

        Raises:
            TypeError: ``limit`` not an int or a limiter, ``settle`` not a bool
                (before any step starts).
            ValueError: ``limit`` below 1, or a limiter that is also the ``limit=``
                of a step of the run (each step would wait for a second slot while
                holding one: a deadlock).
            DefinitionError: before any step starts: a parameter that is neither a
                step nor an input (the message lists both, and every other missing
                input), a missing input, an unknown target.
            TypeError: an input that no step uses (all such inputs are named), or
                that has a step's name; a target that is neither a name nor a
                function.
            Exception: fail-fast: the first failing step's exception, unchanged
                (never an ``ExceptionGroup``); the other running steps are
                cancelled and have finished before it is raised. A step whose
                clean-up fails as it is cancelled is not lost: after a first
                failure its exception is on that one's ``__context__`` chain; when
                the caller cancelled the run, it is raised itself (as a task group
                would), in place of the cancellation.
        """
        checked: object = settle  # typed, but a user's call is checked (no call for a bool)
        if checked is not True and checked is not False:
            flag("settle", checked)
        last = self._last
        if targets is None and last is not None and inputs.keys() == last[0]:
            plan, frozen = last[1], True
        else:
            target_names = None if targets is None else self._target_names(targets)
            plan, frozen = self._graph.plan(inputs.keys(), target_names), False
        if self._limiters and limit is not None and not isinstance(limit, int):
            self._check_run_limiter(limit, plan.names)
        clock = backend.clock()
        timeline = Timeline(origin=clock(), name=self.name)
        hook = instrument.current
        if hook is None:
            run = Run(plan, inputs, limit=limit, settle=settle, timeline=timeline, clock=clock)
            if not frozen:
                self._freeze(plan, targets, inputs)
            await run.execute()
        else:
            workers = split_limit(limit)[0]
            trace = hook.graph("flow", timeline, workers)
            run = Run(
                plan,
                inputs,
                run_node=trace.run_node(None),
                limit=limit,
                settle=settle,
                timeline=timeline,
                clock=clock,
            )
            if not frozen:
                self._freeze(plan, targets, inputs)
            with trace:
                await run.execute()
        if settle:
            return FlowOutcomes(run.results(), timeline, self._by_fn)
        return FlowResult(run.results(), timeline, self._by_fn)

    def _freeze(self, plan: Plan, targets: object, inputs: Mapping[str, Any]) -> None:
        """The flow runs: no more steps; a plan without targets is kept for the next run."""
        self._graph.freeze()
        if targets is None:
            self._last = (frozenset(inputs), plan)

    def _check_run_limiter(self, limit: object, names: Iterable[str]) -> None:
        """Refuse a run ``limit=`` that is also a running step's ``limit=`` (a hang)."""
        for name in names:
            if self._limiters.get(name) is limit:
                msg = (
                    f"limit: the run's limiter is also step {name!r}'s limit=; each "
                    "running step would hold one of its slots while it waits for another, "
                    "a deadlock once every slot is held: give the run a bound of its own "
                    "(an int), or the limiter to the step only"
                )
                raise ValueError(msg)

    def _target_names(self, targets: object) -> list[str]:
        if isinstance(targets, str) or callable(targets):
            targets = [targets]
        if not isinstance(targets, Iterable) or isinstance(targets, _BYTES):
            msg = f"targets must be step names or step functions, got {targets!r}"
            raise TypeError(msg)
        names = []
        for target in targets:
            if isinstance(target, str):
                names.append(target)
            elif not callable(target):
                msg = f"targets must be step names or step functions, got {target!r}"
                raise TypeError(msg)
            else:
                try:
                    names.append(_step_name(self._by_fn, target, self._graph.nodes))
                except KeyError as exc:  # not a step of this flow: as an unknown name is
                    raise DefinitionError(f"targets: {exc.args[0]}") from None
        return names


def _build_call(
    fn: StepFn, timeout: float | None, retry: RetryLike | None, limiter: SupportsLimit | None
) -> StepFn:
    """The step's options on the one option builder; the call takes the kwargs."""
    if timeout is None and retry is None and limiter is None:
        return fn

    async def attempt(kwargs: dict[str, Any]) -> Any:
        return await fn(**kwargs)

    inner = build_call(attempt, timeout=timeout, limiter=limiter, retry=retry)

    async def call(**kwargs: Any) -> Any:
        return await inner(kwargs)

    return call
