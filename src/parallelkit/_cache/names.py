"""The names in the keys of a cache's decorated functions: one function per name.

A ``@cache.cached`` key starts with ``module.qualname``. Two different functions
can have the same: a factory's inner function, made once per table. See
:class:`Names`.
"""

from __future__ import annotations

import weakref
from typing import Any

from typing_extensions import final

__all__ = ["Names"]

_SIMPLE = (type(None), bool, int, float, complex, str, bytes)


@final
class Names:
    """Who owns each ``module.qualname`` in the keys of one cache (internal).

    Two *different* functions with one name (a factory's inner function, made once
    per table: ``make_loader("users")``, ``make_loader("orgs")``) would build the
    same keys and serve each other's values. A name belongs to the first function
    decorated under it; a later one is accepted only when it is the same function
    again: the same code over the same closure values, plain ones (numbers,
    strings, bytes, tuples and frozensets of them) by equality, any other object by
    identity (an engine, a settings object). Anything else is refused at decoration
    (pass ``key=`` to tell them apart), never renamed: a counter (``name#2``) would
    depend on the order of decoration, which replicas sharing a store need not agree
    on.

    What is kept of the first function's closure: plain values, weak references to
    other objects (nothing here keeps them alive: once one is gone, a later function
    cannot be its same function), and the object itself only when it takes no weak
    reference (a list: one per name at most).
    """

    __slots__ = ("_owners",)

    def __init__(self) -> None:
        # name -> (code, what identifies its closure values: see _snapshot)
        self._owners: dict[str, tuple[object, tuple[tuple[int, Any], ...]]] = {}

    def claim(self, name: str, fn: object) -> str:
        """``name`` for ``fn``'s keys; ``ValueError`` when another function has it."""
        code = getattr(fn, "__code__", None)
        if code is None:  # a partial or callable object: its name says what it is
            return name
        cells = _cells(fn)
        owner = self._owners.get(name)
        if owner is None:
            self._owners[name] = (code, tuple(map(_kept, cells)))
            return name
        seen, kept = owner
        if seen == code and len(kept) == len(cells) and all(map(_same, kept, cells)):
            return name
        msg = (
            f"another function named {name!r} is cached on this cache already, with other "
            "code or closure values (a factory's inner function?): their keys would be "
            "the same and each would be served the other's values. Pass key= to tell "
            "them apart (e.g. key=lambda row_id: ('users', row_id)), or decorate once "
            "and pass what varies as an argument"
        )
        raise ValueError(msg)


_PLAIN, _WEAK, _HELD = 0, 1, 2
_EMPTY: Any = object()


def _cells(fn: object) -> tuple[Any, ...]:
    """The values ``fn`` closes over."""
    return tuple(map(_content, getattr(fn, "__closure__", None) or ()))


def _content(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # not assigned yet
        return _EMPTY


def _kept(value: Any) -> tuple[int, Any]:
    """How a closure value is kept to compare with later (see :class:`Names`)."""
    if _plain(value):
        return _PLAIN, value
    try:
        return _WEAK, weakref.ref(value)
    except TypeError:  # no weak reference (a list, a dict)
        return _HELD, value


def _same(kept: tuple[int, Any], value: Any) -> bool:
    how, first = kept
    if how == _PLAIN:
        return _plain(value) and type(first) is type(value) and bool(first == value)
    if how == _WEAK:
        first = first()  # None once gone: no live object is it
    return first is value


def _plain(value: Any) -> bool:
    """Numbers, strings, bytes, and tuples / frozensets of them (safe to keep)."""
    if isinstance(value, (tuple, frozenset)):
        return all(_plain(v) for v in value)
    return type(value) in _SIMPLE
