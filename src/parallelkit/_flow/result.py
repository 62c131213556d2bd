"""What a :meth:`Flow.run <parallelkit.Flow.run>` returns: :class:`FlowResult` (values
by step name) and :class:`FlowOutcomes` (settle mode: outcomes by step name), each with
the run's ``timeline``; a step looked up by its function."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar, overload

from typing_extensions import final

from .._core.outcome import Outcome
from .._graph.graph import suggest
from .._graph.timeline import Timeline

__all__ = ["FlowOutcomes", "FlowResult"]

T = TypeVar("T")
D = TypeVar("D")

_AMBIGUOUS = "\x00ambiguous"  # a function registered under several step names


def _step_name(by_fn: Mapping[object, str], step: object, steps: Iterable[str]) -> str:
    try:
        name = by_fn[step]
    except (KeyError, TypeError):
        msg = f"{step!r} is not a step of this flow; steps: {list(steps)}"
        raise KeyError(msg) from None
    if name == _AMBIGUOUS:
        msg = f"{step!r} is registered under several names; look it up by name: {list(steps)}"
        raise KeyError(msg)
    return name


class _Result(Mapping[str, Any]):
    __slots__ = ("_by_fn", "_values", "timeline")

    def __init__(
        self, values: dict[str, Any], timeline: Timeline, by_fn: Mapping[object, str]
    ) -> None:
        self._values = values
        self._by_fn = by_fn
        self.timeline = timeline
        """The run's :class:`~parallelkit.Timeline`: one span per step."""

    def __getitem__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            names = list(self._values)
            msg = f"no step {name!r} in this result; steps run: {names}"
            key: object = name  # any key can be passed (``result[step_fn]``)
            if isinstance(key, str):
                msg += suggest(key, names)
            else:
                msg += _by_function_hint(self._by_fn, key)
            raise KeyError(msg) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._values!r})"

    def _lookup(self, step: object) -> Any:
        try:  # the usual case in one step (a handler reads each step it needs)
            name = self._by_fn[step]
            if name != _AMBIGUOUS:
                return self._values[name]
        except (KeyError, TypeError):
            pass
        return self[_step_name(self._by_fn, step, self._values)]  # the error, with its message


def _by_function_hint(by_fn: Mapping[object, str], step: object) -> str:
    """``result[step_fn]``: where the value of a step function is found."""
    try:
        name = by_fn.get(step)
    except TypeError:  # unhashable
        return ""
    if name is None:
        return ""
    fn = getattr(step, "__name__", "step_fn")
    if name == _AMBIGUOUS:
        return f"; result[...] takes a step name ({fn} is registered under several)"
    return f"; result[...] takes a step name: result.get({fn}) (typed) or result[{name!r}]"


@final
class FlowResult(_Result):
    """The values of a :meth:`Flow.run`, by step name, with the run's ``timeline``.

    ``result["record"]`` is untyped; ``result.get(record)`` (the step function)
    is typed with the step's return type.
    """

    __slots__ = ()

    @overload
    def get(self, key: Callable[..., Awaitable[T]], /) -> T: ...
    @overload
    def get(self, key: str, /) -> Any | None: ...
    @overload
    def get(self, key: str, /, default: D) -> Any | D: ...
    def get(self, key: Any, /, default: Any = None) -> Any:
        """The result of a step: ``get(step_fn)`` (typed) or ``get("name", default)``.

        Raises:
            KeyError: ``get(step_fn)`` for a step that did not run (``targets``) or
                is not part of this flow.
        """
        if isinstance(key, str):
            return self._values.get(key, default)
        return self._lookup(key)


@final
class FlowOutcomes(_Result):
    """The outcomes of a ``Flow.run(settle=True)``: an :class:`~parallelkit.Outcome`
    per step (skipped steps fail with :class:`~parallelkit.DependencyFailed`).
    """

    __slots__ = ()

    def __getitem__(self, name: str) -> Outcome[Any]:
        value: Outcome[Any] = super().__getitem__(name)
        return value

    @overload
    def get(self, key: Callable[..., Awaitable[T]], /) -> Outcome[T]: ...
    @overload
    def get(self, key: str, /) -> Outcome[Any] | None: ...
    @overload
    def get(self, key: str, /, default: D) -> Outcome[Any] | D: ...
    def get(self, key: Any, /, default: Any = None) -> Any:
        """The outcome of a step: ``get(step_fn)`` (typed) or ``get("name", default)``."""
        if isinstance(key, str):
            return self._values.get(key, default)
        return self._lookup(key)

    @property
    def ok(self) -> bool:
        """``True`` when every step succeeded."""
        return all(outcome.ok for outcome in self._values.values())

    @property
    def errors(self) -> dict[str, BaseException]:
        """The failed (and skipped) steps' errors, by step name."""
        return {name: o.error for name, o in self._values.items() if o.error is not None}
