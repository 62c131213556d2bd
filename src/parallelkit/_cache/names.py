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
    again: the same code and equal closure values. Anything else is refused at
    decoration (pass ``key=`` to tell them apart), never renamed: a counter
    (``name#2``) would depend on the order of decoration, which replicas sharing a
    store need not agree on.

    The closure values compared with are the first function's while it lives (a
    weak reference: nothing here keeps it alive), and after it is gone a snapshot:
    plain values (numbers, strings, bytes, tuples and frozensets of them) by
    equality, other objects by identity through weak references. So a factory
    called again per request with the same table, or over the same engine, is still
    recognized; one whose values cannot be compared any more (an object gone, or
    one that takes no weak reference, such as a list) is refused.
    """

    __slots__ = ("_owners",)

    def __init__(self) -> None:
        # name -> (code, the function (weak) or None, its closure's snapshot or None)
        self._owners: dict[str, tuple[object, weakref.ref[Any] | None, Any]] = {}

    def claim(self, name: str, fn: object) -> str:
        """``name`` for ``fn``'s keys; ``ValueError`` when another function has it."""
        code = getattr(fn, "__code__", None)
        if code is None:  # a partial or callable object: its name says what it is
            return name
        cells = _cells(fn)
        owner = self._owners.get(name)
        if owner is None:
            ref = None if cells is None else weakref.ref(fn)
            self._owners[name] = (code, ref, None if cells is None else _snapshot(cells))
            return name
        seen, ref, snapshot = owner
        if seen == code:
            if cells is None and ref is None:
                return name
            first = None if ref is None else ref()
            if first is not None:
                if _same(_cells(first), cells):
                    return name
            elif snapshot is not None and _matches(snapshot, cells):
                return name
        msg = (
            f"another function named {name!r} is cached on this cache already, with other "
            "code or closure values (a factory's inner function?): their keys would be "
            "the same and each would be served the other's values. Pass key= to tell "
            "them apart (e.g. key=lambda row_id: ('users', row_id)), or decorate once "
            "and pass what varies as an argument"
        )
        raise ValueError(msg)


_EMPTY: Any = object()


def _cells(fn: object) -> tuple[Any, ...] | None:
    """The values ``fn`` closes over (``None``: no closure)."""
    closure = getattr(fn, "__closure__", None)
    if not closure:
        return None
    return tuple(map(_content, closure))


def _content(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # not assigned yet
        return _EMPTY


def _snapshot(cells: tuple[Any, ...]) -> tuple[tuple[bool, Any], ...] | None:
    """Per value: ``(True, value)`` for a plain one, ``(False, weakref)`` for another;
    ``None`` when a value is neither (it could not be compared later)."""
    taken = []
    for value in cells:
        if _plain(value):
            taken.append((True, value))
            continue
        try:
            taken.append((False, weakref.ref(value)))
        except TypeError:  # no weak reference (a list, a dict)
            return None
    return tuple(taken)


def _matches(snapshot: tuple[tuple[bool, Any], ...], cells: tuple[Any, ...] | None) -> bool:
    if cells is None or len(snapshot) != len(cells):
        return False
    for (plain, kept), value in zip(snapshot, cells, strict=True):
        if plain:
            if not _plain(value) or type(kept) is not type(value) or kept != value:
                return False
        elif kept() is not value:  # gone (None) or another object
            return False
    return True


def _plain(value: Any) -> bool:
    """Numbers, strings, bytes, and tuples / frozensets of them (safe to keep)."""
    if isinstance(value, (tuple, frozenset)):
        return all(_plain(v) for v in value)
    return type(value) in _SIMPLE


def _same(a: Any, b: tuple[Any, ...] | None) -> bool:
    if a is None or b is None or len(a) != len(b):
        return a is b
    for x, y in zip(a, b, strict=True):
        if x is y:
            continue
        try:
            if type(x) is not type(y) or not bool(x == y):
                return False
        except Exception:  # an == that cannot say (an array): not the same
            return False
    return True
