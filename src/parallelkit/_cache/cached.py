"""``@cache.cached``: a function per decorated function, with the hit path inlined.

For each decorated function this module writes (and compiles once) an ``async
def`` with **the same parameters** as the original, the way :mod:`dataclasses`
writes ``__init__``. For ``async def get_conversation(conversation_id, deep=False)``
it is, in effect::

    async def get_conversation(conversation_id, deep=False):
        key = ("module.get_conversation", conversation_id, deep)
        entry = front.peek(key)
        if entry is not None and entry.loaded_at <= front.clock() < entry.fresh_until:
            front.hits += 1
            return entry.value
        return await front.slow(key, partial(fn, conversation_id, deep))

Python binds the arguments, so ``f(1)``, ``f(x=1)`` and ``f(1, y=<default>)``
give one key without :meth:`inspect.Signature.bind` on every call, and a hit
allocates nothing but the key tuple (no ``*args`` tuple, no ``**kwargs`` dict,
no closure). The cache is reached only through its :class:`~.front.Front`.

Keys are ``(name, *positional values)`` for functions whose parameters are all
positional (``*args`` included), else ``(name, (positional...), ((kw, value),
...))``: one shape per function, so two calls cannot collide across shapes.
With ``key=``, the user's function builds the key from the arguments as given.
A bound method (``cache.cached(obj.method)``) has its instance first in the
key, as a method decorated in its class body has ``self`` (unless ignored).

A function defined in a class body (a method) is wrapped in a descriptor, so
``obj.method.invalidate(...)`` knows ``obj``; any other function is returned as
the generated function itself, with ``.key`` and ``.invalidate`` attributes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import (
    Any,
    Concatenate,
    NamedTuple,
    Protocol,
    TypeVar,
    cast,
    overload,
    runtime_checkable,
)

from typing_extensions import ParamSpec, Self, final

from .front import Front, check_key

__all__ = ["CachedFunction", "decorate"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
S = TypeVar("S")

KeyFunction = Callable[..., Hashable]

_KIND = inspect.Parameter


@runtime_checkable
class CachedFunction(Protocol[P, R]):
    """An async function wrapped by :meth:`SWRCache.cached <parallelkit.SWRCache.cached>`.

    Call it like the original (same signature for type checkers and for
    :func:`inspect.signature`). It adds :meth:`key` and :meth:`invalidate`, and
    works as a method (``self`` is part of the key unless listed in ``ignore=``;
    ``obj.method.invalidate(...)`` forgets that instance's entry).
    """

    __wrapped__: Callable[P, Awaitable[R]]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        """Return the cached value, loading it if needed (see :meth:`SWRCache.get`)."""
        ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> Hashable:
        """The cache key a call with these arguments uses."""
        ...

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Forget the value cached for these arguments (``f(1)`` and ``f(x=1)`` alike)."""
        ...

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...
    @overload
    def __get__(
        self: CachedFunction[Concatenate[S, P2], R], instance: S, owner: type[Any] | None = None
    ) -> CachedFunction[P2, R]: ...
    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        """Bind a cached method to its instance."""
        ...


# ------------------------------------------------------------------ code generation
_TEMPLATE = """\
def {p}make({p}name, {p}front, {p}fn, {p}key_fn, {p}sorted, {p}partial, {p}check, {p}what, {p}self):
    async def {p}call({params}):
        {p}key = {key}
        try:
            {p}entry = {p}front.peek({p}key)
        except TypeError:
            {p}check({p}key, *{p}what)  # an unhashable argument: say which
            raise
        if {p}entry is not None and {p}entry.loaded_at <= {p}front.clock() < {p}entry.fresh_until:
            {p}front.hits += 1
            return {p}entry.value
        return await {p}front.slow({p}key, {p}partial({p}fn, {forward}))

    def {p}key({params}):
        return {key}

    return {p}call, {p}key
"""


_POSITIONAL_KINDS = (_KIND.POSITIONAL_ONLY, _KIND.POSITIONAL_OR_KEYWORD, _KIND.VAR_POSITIONAL)
_STARS: dict[object, str] = {_KIND.VAR_POSITIONAL: "*", _KIND.VAR_KEYWORD: "**"}


def _tuple(items: list[str]) -> str:
    return "(" + "".join(f"{item}, " for item in items) + ")"


class _Plan(NamedTuple):
    """The source pieces of one generated function."""

    params: str  # the parameter list, as in the original's ``def``
    forward: str  # the same arguments passed on to the original
    key: str  # the key expression
    defaults: tuple[Any, ...] | None
    kwdefaults: dict[str, Any] | None


def _plan(
    params: list[inspect.Parameter], ignore: frozenset[str], p: str, bound: str | None = None
) -> _Plan:
    """Spell ``params`` as a ``def``, a call, and a key (``p`` prefixes generated names).

    ``bound``: ``fn`` is a bound method and this is its ``__func__``'s first parameter
    (``self``): the instance (``{p}self``) leads the key unless ignored, as for a method
    decorated in its class body, so two instances never share entries.
    """
    names: list[str] = []
    forward: list[str] = []
    pos: list[str] = [f"{p}self"] if bound is not None and bound not in ignore else []
    kw: list[str] = []
    defaults: list[Any] = []
    kwdefaults: dict[str, Any] = {}
    for i, param in enumerate(params):
        n, kind = param.name, param.kind
        if kind is _KIND.KEYWORD_ONLY and not any(x.startswith("*") for x in names):
            names.append("*")
        star = _STARS.get(kind, "")
        names.append(f"{star}{n}")
        forward.append(f"{n}={n}" if kind is _KIND.KEYWORD_ONLY else f"{star}{n}")
        if kind is _KIND.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind != kind):
            names.append("/")
        if param.default is not _KIND.empty:
            if kind is _KIND.KEYWORD_ONLY:
                kwdefaults[n] = param.default
            else:
                defaults.append(param.default)
        if n in ignore:
            continue
        if kind in _POSITIONAL_KINDS:
            pos.append(f"{star}{n}")
        elif kind is _KIND.KEYWORD_ONLY:
            kw.append(f"({n!r}, {n})")
        else:
            kw.append(f"*{p}sorted({n}.items())")
    flat = all(param.kind in _POSITIONAL_KINDS for param in params)
    key = _tuple([f"{p}name", *pos]) if flat else f"({p}name, {_tuple(pos)}, {_tuple(kw)})"
    return _Plan(
        ", ".join(names), ", ".join(forward), key, tuple(defaults) or None, kwdefaults or None
    )


def _compile(
    fn: Callable[..., Awaitable[Any]],
    name: str,
    front: Front,
    *,
    user_key: KeyFunction | None,
    ignore: frozenset[str],
) -> tuple[Callable[..., Coroutine[Any, Any, Any]], KeyFunction]:
    """Write, compile and return ``(call, key)`` for ``fn`` (see the module docs)."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    # a bound method (``cache.cached(obj.method)``): its instance is part of the key
    instance, first = _bound_self(fn) if user_key is None else (None, None)
    unknown = ignore - set(sig.parameters) - {first}
    if unknown:
        msg = f"ignore names parameters {sorted(unknown)} that {name} does not have"
        raise ValueError(msg)
    p = "_pk_"  # a prefix no parameter name starts with: the generated names cannot clash
    while any(param.name.startswith(p) for param in params):
        p = "_" + p
    if user_key is None:
        plan = _plan(params, ignore, p, first)
    else:  # the user's key sees the arguments as given
        given = f"*{p}args, **{p}kwargs"
        plan = _Plan(given, given, f"{p}key_fn({given})", None, None)
    source = _TEMPLATE.format(p=p, params=plan.params, key=plan.key, forward=plan.forward)
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<@cache.cached {name}>", "exec"), namespace)
    short = getattr(fn, "__name__", "cached")
    if user_key is None:
        what = (
            f"the arguments of {name} must be hashable (they make its cache key)",
            ": pass key= to build a hashable key, or ignore= to leave the argument out",
        )
    else:
        what = (f"key must be hashable (the key= of {short} returned it)", "")
    call, make_key = namespace[f"{p}make"](
        name, front, fn, user_key, sorted, functools.partial, check_key, what, instance
    )
    for generated in (call, make_key):
        generated.__defaults__ = plan.defaults
        generated.__kwdefaults__ = plan.kwdefaults
    call.__code__ = call.__code__.replace(co_name=short)  # tracebacks show the function
    return call, make_key


def _bound_self(fn: object) -> tuple[object, str | None]:
    """A bound method's instance and its function's first parameter (``self``), else
    ``(None, None)``: the instance belongs in the key, as for a method decorated in its
    class body (``cache.cached(a.method)`` and ``cache.cached(b.method)`` share a name
    and code, but not their values)."""
    if not inspect.ismethod(fn):
        return None, None
    params = list(inspect.signature(fn.__func__).parameters.values())
    if not params or params[0].kind not in _POSITIONAL_KINDS[:2]:
        return None, None  # (self taken by *args: it is in the key already)
    return fn.__self__, params[0].name


# ------------------------------------------------------------------------ wrappers
def _class_lost(qualname: str) -> TypeError:
    """The error for ``Cls.method.key`` / ``.invalidate`` that reached the function
    without its class (``@classmethod`` above ``@cache.cached`` on Python 3.13+)."""
    msg = (
        f"{qualname}.key/.invalidate were called without the class: `@classmethod` "
        "written above `@cache.cached` no longer passes it to them (Python 3.13 stopped "
        "binding what a classmethod wraps), so they would name another key. Write "
        "@cache.cached above @classmethod (works on every Python), or pass the class "
        "first: Cls.method.invalidate(Cls, ...)"
    )
    return TypeError(msg)


@final
class _CachedMethod:
    """A cached function defined in a class body: binds like a method."""

    def __init__(
        self,
        call: Callable[..., Coroutine[Any, Any, Any]],
        key: KeyFunction,
        front: Front,
        cls_param: str | None = None,
    ) -> None:
        self._call = call
        self._key = key
        self._front = front
        # the first parameter's name when it is ``cls`` (a class method in the
        # making): key/invalidate reached without a class are refused (_class_lost)
        self._cls_param = cls_param

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        return self._call(*args, **kwargs)

    def _unbound_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        """The key of a call through the class (``self`` / ``cls`` given first)."""
        if self._cls_param is not None:
            first = args[0] if args else kwargs.get(self._cls_param)
            if not isinstance(first, type):
                raise _class_lost(getattr(self, "__qualname__", "the method"))
        return self._key(*args, **kwargs)

    def key(self, *args: Any, **kwargs: Any) -> Hashable:
        return self._unbound_key(args, kwargs)

    async def invalidate(self, *args: Any, **kwargs: Any) -> None:
        await self._front.invalidate(self._unbound_key(args, kwargs))

    def __get__(self, instance: object, owner: type[Any] | None = None) -> Any:
        if instance is None:
            return self
        return _BoundCached(self, instance)

    def __repr__(self) -> str:
        return f"<cached method {self.__wrapped__.__qualname__}>"  # type: ignore[attr-defined]


@final
class _CachedClassMethod:
    """``@cache.cached`` above ``@classmethod``: binds to the class, from the class
    or an instance alike (the class is part of the key, as ``self`` is for a method)."""

    def __init__(self, method: _CachedMethod) -> None:
        self._method = method

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        return self._method._call(*args, **kwargs)

    def key(self, *args: Any, **kwargs: Any) -> Hashable:
        return self._method._key(*args, **kwargs)

    async def invalidate(self, *args: Any, **kwargs: Any) -> None:
        await self._method.invalidate(*args, **kwargs)

    def __get__(self, instance: object, owner: type[Any] | None = None) -> Any:
        return _BoundCached(self._method, owner if owner is not None else type(instance))

    def __repr__(self) -> str:
        return f"<cached classmethod {self.__wrapped__.__qualname__}>"  # type: ignore[attr-defined]


@final
class _BoundCached:
    """A cached method bound to its instance (``obj.method``)."""

    __slots__ = ("_func", "_self")

    def __init__(self, func: _CachedMethod, instance: object) -> None:
        self._func = func
        self._self = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        return self._func._call(self._self, *args, **kwargs)

    def key(self, *args: Any, **kwargs: Any) -> Hashable:
        return self._func._key(self._self, *args, **kwargs)

    async def invalidate(self, *args: Any, **kwargs: Any) -> None:
        func = self._func
        await func._front.invalidate(func._key(self._self, *args, **kwargs))

    @property
    def __wrapped__(self) -> Any:
        return self._func.__wrapped__  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<bound {self._func!r} of {self._self!r}>"


def _in_class_body(fn: object) -> bool:
    """Whether ``fn`` was defined by a ``def`` in a class body (so it is a method)."""
    parts = str(getattr(fn, "__qualname__", "")).split(".")
    return len(parts) >= 2 and parts[-2] != "<locals>"


def _name(fn: object) -> str:
    """The first item of every key: ``module.qualname`` (a partial adds its bound arguments)."""
    if isinstance(fn, functools.partial):
        bound = [*map(repr, fn.args), *(f"{k}={v!r}" for k, v in fn.keywords.items())]
        return f"{_name(fn.func)}({', '.join(bound)})"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{qualname}"


def decorate(
    fn: Callable[P, Awaitable[R]],
    front: Front,
    *,
    key: KeyFunction | None,
    ignore: frozenset[str],
    on_class: bool = False,
) -> CachedFunction[P, R]:
    """Wrap ``fn`` for :meth:`SWRCache.cached <parallelkit.SWRCache.cached>` (checked there).

    ``on_class``: ``fn`` is a classmethod's function (bound to the class).
    """
    # with the user's key, the name is in no key: only the default key needs it alone
    name = _name(fn) if key is not None else front.names.claim(_name(fn), fn)
    call, make_key = _compile(fn, name, front, user_key=key, ignore=ignore)
    if on_class or (_in_class_body(fn) and not inspect.ismethod(fn)):
        first = next(iter(inspect.signature(fn).parameters), None)
        lost = "cls" if first == "cls" and not on_class else None
        method = _CachedMethod(call, make_key, front, lost)
        functools.update_wrapper(method, fn)
        if on_class:
            bound = _CachedClassMethod(method)
            functools.update_wrapper(bound, fn)
            return cast("CachedFunction[P, R]", bound)
        return cast("CachedFunction[P, R]", method)
    functools.update_wrapper(call, fn)

    async def invalidate(*args: Any, **kwargs: Any) -> None:
        await front.invalidate(make_key(*args, **kwargs))

    call.key = make_key  # type: ignore[attr-defined]
    call.invalidate = invalidate  # type: ignore[attr-defined]
    return cast("CachedFunction[P, R]", call)
