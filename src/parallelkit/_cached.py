"""The ``@cache.cached`` wrapper and its normalizing key builder."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import TYPE_CHECKING, Any, Concatenate, Generic, TypeVar, overload

from typing_extensions import ParamSpec, Self, final

if TYPE_CHECKING:
    from ._cache import SWRCache

__all__ = ["CachedFunction"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
S = TypeVar("S")

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class CachedFunction(Generic[P, R]):
    """An async function wrapped by :meth:`SWRCache.cached`.

    Call it like the original (same signature for type checkers). It adds
    :meth:`invalidate`, and works as a method (``self`` is part of the key unless
    listed in ``ignore=``).
    """

    __wrapped__: Callable[P, Awaitable[R]]

    def __init__(
        self,
        make_key: Callable[[tuple[Any, ...], dict[str, Any]], Hashable],
        cache: SWRCache,
        fn: Callable[P, Awaitable[R]],
    ) -> None:
        self._make_key = make_key
        self._cache = cache
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        # replaced, per decorated function, by a specialized coroutine function
        # (see SWRCache._decorate): no forwarding frame on the hit path
        raise NotImplementedError  # pragma: no cover

    def key(self, *args: P.args, **kwargs: P.kwargs) -> Hashable:
        """The cache key a call with these arguments uses."""
        return self._make_key(args, kwargs)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Forget the value cached for these arguments (``f(1)`` and ``f(x=1)`` alike)."""
        await self._cache.invalidate(self._make_key(args, kwargs))

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...
    @overload
    def __get__(
        self: CachedFunction[Concatenate[S, P2], R], instance: S, owner: type[Any] | None = None
    ) -> CachedFunction[P2, R]: ...
    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        if instance is None:
            return self
        return _BoundCached(self, instance)

    def __repr__(self) -> str:
        return f"<cached {self.__wrapped__.__qualname__} in {self._cache!r}>"


@final
class _BoundCached:
    """A cached method bound to its instance (``obj.method``)."""

    __slots__ = ("_func", "_self")

    def __init__(self, func: CachedFunction[..., Any], instance: object) -> None:
        self._func = func
        self._self = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        return self._func(self._self, *args, **kwargs)

    def key(self, *args: Any, **kwargs: Any) -> Hashable:
        return self._func._make_key((self._self, *args), kwargs)

    async def invalidate(self, *args: Any, **kwargs: Any) -> None:
        await self._func._cache.invalidate(self._func._make_key((self._self, *args), kwargs))

    def __repr__(self) -> str:
        return f"<bound {self._func!r} of {self._self!r}>"


def _key_builder(
    fn: Callable[..., Any], name: str, ignore: frozenset[str]
) -> tuple[Callable[[tuple[Any, ...], dict[str, Any]], Hashable], int, int]:
    """Build the normalizing key function, and the fast-path shape.

    Keys are ``(name, *positional values)`` for functions whose parameters are all
    positional (``*args`` included), else ``(name, (positional...), ((kw, value),
    ...))``: one shape per function, so two calls cannot collide across shapes.

    Returns ``(make_key, n, skip)``: a call with exactly ``n`` positional
    arguments and no keywords has the key ``(name, *args[skip:])`` without
    binding. ``n == -1`` disables the fast path.
    """
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    unknown = ignore - set(sig.parameters)
    if unknown:
        msg = f"ignore names parameters {sorted(unknown)} that {name} does not have"
        raise ValueError(msg)
    flat = all(p.kind in _POSITIONAL or p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    n, skip = -1, 0
    if all(p.kind in _POSITIONAL for p in params):
        ignored = [i for i, p in enumerate(params) if p.name in ignore]
        if not ignored:
            n = len(params)
        elif ignored == [0]:
            n, skip = len(params), 1

    def make_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        pos: list[Any] = []
        kw: list[tuple[str, Any]] = []
        for p in params:
            if p.name in ignore:
                continue
            value = bound.arguments[p.name]
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                pos.extend(value)
            elif p.kind is inspect.Parameter.VAR_KEYWORD:
                kw.extend(sorted(value.items()))
            elif p.kind is inspect.Parameter.KEYWORD_ONLY:
                kw.append((p.name, value))
            else:
                pos.append(value)
        return (name, *pos) if flat else (name, tuple(pos), tuple(kw))

    return make_key, n, skip
