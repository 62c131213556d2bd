"""``@cache.cached``: the wrapper, its normalizing key builder and its hit path."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import TYPE_CHECKING, Any, Concatenate, Generic, TypeVar, cast, overload

from typing_extensions import ParamSpec, Self, final

if TYPE_CHECKING:
    from .cache import SWRCache

__all__ = ["CachedFunction", "decorate"]

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
        # (see decorate): no forwarding frame on the hit path
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


def decorate(
    cache: SWRCache,
    fn: Callable[P, Awaitable[R]],
    *,
    key: Callable[..., Hashable] | None,
    ignore: frozenset[str],
) -> CachedFunction[P, R]:
    """Wrap ``fn`` for :meth:`SWRCache.cached <parallelkit.SWRCache.cached>`.

    The hit path is inlined here, specialized per function (key shape, store
    peek, clock): one key tuple, one store lookup, one clock read, two
    comparisons; stale hits and misses go through the cache's own methods.
    """
    if not inspect.iscoroutinefunction(fn):
        msg = f"@cache.cached needs an async function, got {fn!r}"
        raise TypeError(msg)
    name = f"{fn.__module__}.{fn.__qualname__}"
    if key is not None:
        if ignore:
            msg = "pass either key= or ignore=, not both"
            raise ValueError(msg)
        key_obj: object = key
        if not callable(key_obj):
            msg = f"key must be a callable (*args, **kwargs) -> Hashable, got {key!r}"
            raise TypeError(msg)
        user_key = key

        def custom_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
            return user_key(*args, **kwargs)

        make_key: Callable[[tuple[Any, ...], dict[str, Any]], Hashable] = custom_key
        n, skip = -1, 0
    else:
        make_key, n, skip = _key_builder(fn, name, ignore)
    peek = cache._peek
    store = cache._store
    clock = cache._clock
    one = n - skip == 1

    async def __call__(_: object, *args: Any, **kwargs: Any) -> R:  # noqa: N807
        if not kwargs and len(args) == n:
            k: Hashable = (name, args[skip]) if one else (name, *args[skip:])
        else:
            k = make_key(args, kwargs)
        entry = peek(k) if peek is not None else await store.get(k)
        if entry is not None:
            now = clock()
            if now < entry.fresh_until:
                cache._hits += 1
                value: R = entry.value
                return value
            if now < entry.stale_until:
                return await cache._stale_hit(k, entry, lambda _: fn(*args, **kwargs), now)
        return await cache._miss(k, lambda _: fn(*args, **kwargs))

    # a subclass per function whose __call__ *is* the coroutine function above
    cls = type("CachedFunction", (CachedFunction,), {"__call__": __call__})
    return cast("CachedFunction[P, R]", cls(make_key, cache, fn))
