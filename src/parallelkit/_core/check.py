"""The one argument checker: every option of every primitive goes through here.

DESIGN.md settles how bad arguments fail, before any work starts:

* a wrong **type** is a :class:`TypeError`, a wrong **value** a :class:`ValueError`;
* the message names the argument as the user wrote it and shows the value;
* counts (``limit``, ``max_batch``, ``attempts``, ``burst``, sizes) are integers: an
  ``int`` or any object with ``__index__`` (a NumPy integer), not ``bool``, returned
  as a plain ``int``; and positive;
* durations and rates are real numbers (``int``, ``float`` or any
  :class:`numbers.Real`, such as :class:`fractions.Fraction` or a NumPy scalar;
  not ``bool``, not :class:`decimal.Decimal`), returned as ``float``; finite (NaN
  and the infinities are refused) and positive unless the option says otherwise;
* flags are ``bool``; names are ``str``; choices list the allowed values; callables
  are callable, and
  where an async function is needed a sync one is refused *before it is called*;
  a callback that is called and not awaited (``on_error=``, ``progress=``) is a plain
  function that can be called with the arguments it will get.

Each function returns the checked value (normalized: a float for numbers, a plain
``int`` for counts) so a constructor reads ``self._limit = count("limit", limit)``;
callers store and use that value, never the object they were given.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import math
import numbers
import operator
from collections.abc import Callable, Collection, Iterable
from typing import Any, SupportsIndex, TypeVar, cast

__all__ = [
    "async_callable",
    "callable_",
    "callable_with",
    "choice",
    "clock_reading",
    "count",
    "count_at_most",
    "count_or_none",
    "counts",
    "flag",
    "fraction",
    "host_name",
    "implements",
    "is_async_callable",
    "not_a_call",
    "number",
    "number_at_least",
    "number_or_none",
    "real_or_none",
    "returns_coroutine",
    "strings",
    "sync_callable",
    "text",
    "text_or_none",
]

C = TypeVar("C", bound=str)
T = TypeVar("T")


# ------------------------------------------------------------------------------ numbers
def number(
    name: str, value: object, *, unit: str = "seconds", zero: bool = False, finite: bool = True
) -> float:
    """Return ``value`` as a float: > 0 (``>= 0`` with ``zero``), finite unless ``finite=False``.

    Example:
        ``number("timeout", 0)`` raises ``ValueError: timeout must be > 0 (seconds), got 0``.
    """
    return _number(name, value, unit=unit, zero=zero, finite=finite, none=False)


def number_or_none(
    name: str, value: object, *, unit: str = "seconds", zero: bool = False, finite: bool = True
) -> float | None:
    """Like :func:`number`, and ``None`` passes through (the option is off)."""
    if value is None:
        return None
    return _number(name, value, unit=unit, zero=zero, finite=finite, none=True)


def real_or_none(value: object) -> float | None:
    """``value`` as a float if it is a real number and not a ``bool``, else ``None``."""
    if type(value) is float:  # the common case, without an ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int (or Fraction) beyond a float's range: infinite
        return math.inf if cast("float", value) > 0 else -math.inf


def _number(name: str, value: object, *, unit: str, zero: bool, finite: bool, none: bool) -> float:
    real = real_or_none(value)
    if real is None:
        msg = f"{name} must be a number ({unit}){' or None' if none else ''}, got {value!r}"
        raise TypeError(msg)
    if math.isnan(real) or real < 0 or (real == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        msg = f"{name} must be {bound} ({unit}), got {value!r}"
        raise ValueError(msg)
    if finite and math.isinf(real):
        msg = f"{name} must be finite ({unit}), got {value!r}"
        raise ValueError(msg)
    return real + 0.0  # -0.0 (allowed with ``zero``) is stored and shown as 0.0


def fraction(name: str, value: object) -> float:
    """Return ``value`` as a float in ``[0, 1)``: a share of something (``jitter``)."""
    real = real_or_none(value)
    if real is None:
        msg = f"{name} must be a number (a fraction in [0, 1)), got {value!r}"
        raise TypeError(msg)
    if not 0 <= real < 1:  # NaN fails this too
        msg = f"{name} must be a fraction in [0, 1), got {value!r}"
        raise ValueError(msg)
    return real


def clock_reading(name: str, value: object) -> None:
    """Refuse a clock's reading unless it is a real, finite number of seconds.

    For a clock the user passed (``clock=``): it cannot be called when the object is
    built (``anyio.current_time`` needs a running loop), so its first reading is
    checked where it is taken, with this. ``name`` is the clock as the user wrote it.

    Example:
        ``clock_reading("clock", None)`` raises ``TypeError: clock must return seconds
        as a number (int or float), but it returned NoneType None``.
    """
    real = real_or_none(value)
    if real is None:
        msg = (
            f"{name} must return seconds as a number (int or float), but it returned "
            f"{type(value).__name__} {value!r}"
        )
        raise TypeError(msg)
    if not math.isfinite(real):
        msg = f"{name} must return a finite number of seconds, but it returned {value!r}"
        raise ValueError(msg)


# ------------------------------------------------------------------------------- counts
def count(name: str, value: object, *, minimum: int = 1, extra: str = "") -> int:
    """Return ``value`` as a plain ``int`` if it is an integer (not ``bool``) ``>= minimum``.

    An integer is an ``int`` or any object with ``__index__`` (a NumPy integer,
    ``len(df) // 4`` from pandas); a ``float``, even ``4.0``, is not. Store and use the
    returned ``int``, not ``value``: a NumPy port fails in ``getaddrinfo``.

    Args:
        name: the argument as the user wrote it.
        value: what was passed.
        minimum: the smallest allowed value (1: a positive count).
        extra: what else the argument accepts, for the type error's message
            (``"a Limiter or None"``).
    """
    checked = value if type(value) is int else _integer(name, value, extra)
    if checked < minimum:
        msg = f"{name} must be >= {minimum}, got {value!r}"
        raise ValueError(msg)
    return checked


def count_at_most(
    name: str, value: object, maximum: int, *, minimum: int = 1, what: str = ""
) -> int:
    """Like :func:`count`, and at most ``maximum`` (a port, an HTTP status code).

    ``what`` names the range in the message (``"an HTTP status code"``: ``status must
    be an HTTP status code (100..599), got 600``); without it the message gives the
    bound: ``count_at_most("port", 70000, 65535)`` raises
    ``ValueError: port must be <= 65535, got 70000``.
    """
    checked = count(name, value, minimum=minimum)
    if checked > maximum:
        bound = f"{what} ({minimum}..{maximum})" if what else f"<= {maximum}"
        msg = f"{name} must be {bound}, got {value!r}"
        raise ValueError(msg)
    return checked


def counts(name: str, value: object, each: Callable[[object], int]) -> frozenset[int]:
    """Return ``value`` as a set of plain ints: one integer or a non-empty collection
    of them, each checked by ``each`` (``status=200``, ``status=range(200, 400)``).

    An integer is anything with ``__index__`` (a NumPy one, a 0-d array of one), not
    ``bool``; a ``str`` or ``bytes`` is not a collection of them. Only the length of a
    collection is asked, never its truth (a NumPy array has none).
    """
    if not isinstance(value, (bool, str, bytes)):
        try:
            operator.index(cast("SupportsIndex", value))
        except TypeError:
            pass
        else:  # checked (and named in an error) as the user wrote it
            return frozenset((each(value),))
        if isinstance(value, Collection):
            items = list(value)
            if items:
                return frozenset(each(item) for item in items)
            msg = f"{name} must be an int or a non-empty collection of ints, got an empty one"
            raise ValueError(msg)
    msg = f"{name} must be an int or a non-empty collection of ints, got {value!r}"
    raise TypeError(msg)


def _integer(name: str, value: object, extra: str) -> int:
    """``value`` as a plain ``int`` (an int subclass, an ``__index__`` object), not a bool."""
    also = f", {extra}" if extra else ""
    msg = f"{name} must be an int{also}, got {value!r}"
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(msg)
    try:
        return operator.index(cast("SupportsIndex", value))
    except TypeError as exc:  # an __index__ that refuses (a NumPy bool, a 2-element array)
        raise TypeError(msg) from exc


def count_or_none(name: str, value: object, *, minimum: int = 1, extra: str = "") -> int | None:
    """Like :func:`count`, and ``None`` passes through (no bound)."""
    if value is None:
        return None
    return count(name, value, minimum=minimum, extra=extra or "or None")


# ---------------------------------------------------------------------- flags, choices
def flag(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool`` (``1`` and ``"yes"`` are refused)."""
    if not isinstance(value, bool):
        msg = f"{name} must be a bool (True or False), got {value!r}"
        raise TypeError(msg)
    return value


def text_or_none(name: str, value: object) -> str | None:
    """Return ``value`` if it is a ``str`` or ``None`` (a name, a title)."""
    if value is None or isinstance(value, str):
        return value
    msg = f"{name} must be a str or None, got {value!r}"
    raise TypeError(msg)


def choice(name: str, value: object, allowed: Collection[C]) -> C:
    """Return ``value`` if it is one of ``allowed``; the error lists them.

    Only a ``str`` is compared: an object whose ``==`` says yes to anything
    (``unittest.mock.ANY``, a NumPy array of strings) is not taken for a choice, and
    an unhashable one (a list) is refused by name, not with ``unhashable type``.
    """
    if isinstance(value, str) and value in allowed:
        return value  # type: ignore[return-value]
    listed = ", ".join(repr(a) for a in allowed)
    msg = f"{name} must be one of {listed}, got {value!r}"
    if not isinstance(value, str):
        raise TypeError(msg)
    raise ValueError(msg)


def strings(name: str, value: object, *, what: str = "names") -> tuple[str, ...]:
    """Return ``value`` as a tuple of ``str``: one ``str``, or an iterable of them.

    ``ignore="self"`` and ``ignore=("self", "db")`` both give a tuple; a bare
    non-string (``ignore=3``) or an iterable holding one is a :class:`TypeError`.
    """
    if isinstance(value, str):
        return (value,)
    items = tuple(value) if isinstance(value, Iterable) and not isinstance(value, bytes) else None
    if items is None or not all(isinstance(item, str) for item in items):
        msg = f"{name} must be a str or an iterable of str ({what}), got {value!r}"
        raise TypeError(msg)
    return items


def implements(name: str, value: T, protocol: type[Any], *, what: str) -> T:
    """Return ``value`` if it is an instance of ``protocol`` (a runtime-checkable one).

    A class is refused even if it has the protocol's methods (``store=MemoryStore``
    instead of ``store=MemoryStore()``).

    Args:
        name: the argument as the user wrote it.
        value: what was passed.
        protocol: the class or ``@runtime_checkable`` protocol required.
        what: what ``protocol`` asks for, for the message
            (``"a parallelkit.Store (async get/set/delete/clear)"``).
    """
    if isinstance(value, type):  # a class passes a protocol's attribute check: say so
        msg = f"{name} must be {what}, got the class {value.__qualname__}: pass an instance"
        raise TypeError(msg)
    if not isinstance(value, protocol):
        msg = f"{name} must be {what}, got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    return value


# ---------------------------------------------------------------------------- callables
def callable_(name: str, value: object, *, what: str = "a callable") -> Callable[..., Any]:
    """Return ``value`` if it is callable."""
    if not callable(value):
        msg = f"{name} must be {what}, got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    return value


def sync_callable(name: str, value: object, *, what: str) -> Callable[..., Any]:
    """Return ``value`` if it is callable and not an async function: a callback whose
    result is used as is (``on_error=``, ``key=``). An async one would return a
    coroutine that nothing awaits: its work never done, its result a coroutine object."""
    fn = callable_(name, value, what=what)
    if is_async_callable(fn) or inspect.isasyncgenfunction(fn):
        msg = (
            f"{name} must be {what}, got the async function {fn!r}: it is called, never "
            "awaited; pass a plain function"
        )
        raise TypeError(msg)
    return fn


def callable_with(name: str, value: object, args: int, *, what: str) -> Callable[..., Any]:
    """Return ``value`` if it is a plain (not async) callable that can be called with
    ``args`` positional arguments (a callback: ``on=`` gets the exception, ``on_error=``
    the key and the exception). A callable whose signature cannot be read (some
    builtins) is taken on trust."""
    fn = sync_callable(name, value, what=what)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn
    try:
        signature.bind(*(None,) * args)
    except TypeError:
        msg = (
            f"{name} must be {what}, got {_describe(fn).removeprefix('sync ')}{signature}, "
            f"which cannot be called with {args} argument{'' if args == 1 else 's'}"
        )
        raise TypeError(msg) from None
    return fn


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` gives a coroutine, as far as can be told without calling it.

    True for ``async def`` functions and methods, ``functools.partial`` of them,
    objects whose ``__call__`` is ``async def``, and functions marked with
    :func:`inspect.markcoroutinefunction` (Python 3.12+).
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn) or getattr(fn, _MARK, False):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's, not a callable check
    return call is not None and not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


_MARK = "_parallelkit_returns_coroutine"

F = TypeVar("F", bound=Callable[..., Any])


def returns_coroutine(fn: F) -> F:
    """Mark a plain function that returns a coroutine (or a coroutine-like future) as
    async for :func:`is_async_callable`, and for :func:`inspect.iscoroutinefunction`
    on Python 3.12+ (``BatchLoader.load``: ``pk.map(loader.load, ids)``)."""
    setattr(fn, _MARK, True)
    mark = getattr(inspect, "markcoroutinefunction", None)
    return mark(fn) if mark is not None else fn


def async_callable(name: str, fn: object, *, what: str = "an async function") -> Callable[..., Any]:
    """Return ``fn`` if calling it gives a coroutine; refuse a sync one before any call.

    Generator and async generator functions are refused too: they do not return
    one value.
    """
    callable_(name, fn, what=what)
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        msg = f"{name} must be {what} returning one value, got generator function {fn!r}"
        raise TypeError(msg)
    if not is_async_callable(fn):
        msg = (
            f"{name} must be {what} (async def), got {_describe(fn)}; a sync function "
            "cannot be awaited: write it with `async def`, or run blocking work with "
            "anyio.to_thread.run_sync"
        )
        raise TypeError(msg)
    return fn  # type: ignore[return-value]


def _describe(fn: object) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"sync {type(fn).__name__} {name}"


# ------------------------------------------------------------------ bounded numbers, text
def number_at_least(name: str, value: object, minimum: float, *, unit: str = "seconds") -> float:
    """Like :func:`number` (finite, > 0), and at least ``minimum``.

    Example:
        ``number_at_least("ttl", 0.001, 0.01)`` raises
        ``ValueError: ttl must be >= 0.01 (seconds), got 0.001``.
    """
    checked = number(name, value, unit=unit)
    if checked < minimum:
        msg = f"{name} must be >= {minimum} ({unit}), got {value!r}"
        raise ValueError(msg)
    return checked


def text(name: str, value: object) -> str:
    """Return ``value`` if it is a non-empty ``str`` (a name, a prefix)."""
    if not isinstance(value, str):
        msg = f"{name} must be a str, got {value!r}"
        raise TypeError(msg)
    if not value:
        msg = f"{name} must not be empty, got {value!r}"
        raise ValueError(msg)
    return value


#: what a host name never holds: a scheme's or a URL's separators, brackets, a port
_NOT_IN_HOSTS = frozenset("/\\@[]?#%:,;")


def host_name(name: str, value: object) -> str:
    """Return ``value`` if it is a host name or an IP address: a ``str`` without a
    scheme, port, path, brackets or spaces (``"db:5432"`` and URLs are refused, an
    IPv6 address with its colons and ``%zone`` is taken)."""
    host = text(name, value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if any(c.isspace() or not c.isprintable() or c in _NOT_IN_HOSTS for c in host):
            msg = (
                f"{name} must be a host name or an IP address (no scheme, port, path, "
                f"brackets or spaces), got {value!r}"
            )
            raise ValueError(msg) from None
    return host


def not_a_call(name: str, value: object) -> None:
    """Refuse ``ping()`` where ``ping`` was meant, closing it (no "never awaited")."""
    if inspect.iscoroutine(value):
        value.close()
        msg = f"{name} must be a function, not its call: pass {value.__qualname__}, got {value!r}"
        raise TypeError(msg)
