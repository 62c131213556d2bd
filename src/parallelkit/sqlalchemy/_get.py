"""eager_get(): ``session.get`` with eager paths that also loads what an identity-map copy lacks."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from sqlalchemy import and_, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session
from sqlalchemy.orm import Mapper

from .._core.check import flag
from ._eager import EagerPath, Strategy, _mapper, _parse, _Tree, eager
from ._peers_group import members

__all__ = ["eager_get"]

M = TypeVar("M")


async def eager_get(
    session: AsyncSession | async_scoped_session[Any],
    model: type[M],
    ident: Any,
    /,
    *paths: EagerPath,
    raise_others: bool = True,
    strategies: Mapping[str, Strategy] | None = None,
) -> M | None:
    """Load one row by primary key with the relationships you name, in one statement.

    ``session.get(Model, pk, options=eager(...))`` has two traps this avoids:

    * when the object is already in the session's identity map (an earlier
      query of the same request loaded it), ``session.get`` returns it without
      SQL and **ignores the options**: the relationships you asked for are not
      loaded, and the first access in async code raises ``MissingGreenlet``.
      ``eager_get`` returns the cached object only when every requested path is
      already loaded on it; otherwise it sends one statement that fills in what
      is missing (attributes already loaded are not overwritten, pending
      changes are flushed first, as for any query);
    * a single root makes joining collections cheap, so this is
      ``eager(..., one=True)``: the whole graph in **one** statement.

    Args:
        session: the ``AsyncSession``, or an ``async_scoped_session`` (its
            current scope's session is used, as its proxied methods would).
        model: the mapped class.
        ident: the primary key (a tuple for a composite key, or a dict of the
            primary key attributes, as ``session.get`` takes it).
        *paths: what :func:`eager` accepts.
        raise_others: as in :func:`eager`.
        strategies: as in :func:`eager`.

    Returns:
        The object, or ``None`` when no row has that key.

    Raises:
        TypeError, ValueError: what :func:`eager` raises for bad paths or flags;
            ``TypeError`` when ``session`` is neither an ``AsyncSession`` nor an
            ``async_scoped_session``.

    Example:
        ```python
        conversation = await eager_get(session, Conversation, 42,
                                       "contact.company.automation_rules")
        ```
    """
    given: object = session
    if not isinstance(given, (AsyncSession, async_scoped_session)):
        msg = (
            "session must be an AsyncSession (or an async_scoped_session), got "
            f"{type(session).__name__} {session!r}"
        )
        if callable(given):  # an async_sessionmaker: a factory, not a session
            msg += ": call it for a session (async with factory() as session: ...)"
        raise TypeError(msg)
    flag("raise_others", raise_others)  # before the cache: 1 == True would hit it
    if strategies is None and all(isinstance(path, str) for path in paths):
        options, mapper, tree = _plan(model, paths, raise_others)  # type: ignore[arg-type]
    else:
        options, mapper, tree = _make_plan(model, paths, raise_others, strategies)
    if isinstance(ident, Mapping):  # {attribute: value}, as session.get takes it
        ident = _from_mapping(model, mapper, ident)
    key = tuple(ident) if isinstance(ident, (tuple, list)) else (ident,)
    if len(key) != len(mapper.primary_key):
        size = len(mapper.primary_key)
        msg = f"ident must have {size} value(s) for {model.__name__}, got {ident!r}"
        raise ValueError(msg)
    # an async_scoped_session: its current scope's AsyncSession, what its proxied methods use
    real: AsyncSession = session() if isinstance(session, async_scoped_session) else session
    cached = real.identity_map.get(mapper.identity_key_from_primary_key(key))
    if cached is None:
        # not in the session: session.get applies the options (its cached by-key
        # statement, joined collections made unique)
        return await real.get(model, key, options=options)
    if isinstance(cached, model) and _loaded(cached, tree, mapper):
        return cached
    where = and_(*(column == value for column, value in zip(mapper.primary_key, key, strict=True)))
    result = await real.execute(select(model).where(where).options(*options))
    found: M | None = result.unique().scalar_one_or_none()
    return found


def _from_mapping(
    model: type[Any], mapper: Mapper[Any], ident: Mapping[Any, Any]
) -> tuple[Any, ...]:
    """The primary key given as ``{attribute: value}``, in the mapper's order."""
    names = [mapper.get_property_by_column(column).key for column in mapper.primary_key]
    if set(ident) != set(names):
        msg = f"ident for {model.__name__} must have the keys {names!r}, got {ident!r}"
        raise ValueError(msg)
    return tuple(ident[name] for name in names)


_Plan = tuple[tuple[Any, ...], Mapper[Any], _Tree]


def _make_plan(
    model: type[Any],
    paths: tuple[EagerPath, ...],
    raise_others: bool,
    strategies: Mapping[str, Strategy] | None,
) -> _Plan:
    """The loader options, the mapper and the path tree of one ``eager_get`` call."""
    options = eager(model, *paths, raise_others=raise_others, strategies=strategies, one=True)
    tree: _Tree = {}
    for path in paths:
        _parse(tree, path, [], path)
    return options, _mapper(model), tree


@functools.lru_cache(maxsize=256)
def _plan(model: type[Any], paths: tuple[str, ...], raise_others: bool) -> _Plan:
    """:func:`_make_plan` for dotted-string paths, computed once per model and paths.

    Loader options are immutable, so one tuple serves every call; the tree is only
    read. (Building them is most of the CPU an ``eager_get`` of a cached row costs.)
    """
    return _make_plan(model, paths, raise_others, None)


def _loaded(obj: object, tree: _Tree, loading: Mapper[Any]) -> bool:
    """Whether every path of ``tree`` is loaded on ``obj`` and on every object it reaches,
    leaves included (no attribute expired, no relationship unloaded).

    ``loading`` is the mapper the statement loads ``obj`` as (``model``, or the target
    of the relationship that reaches it): an attribute of a subclass of it (a joined
    inheritance subclass's own columns, which SQLAlchemy leaves expired when it loads
    the object through its base) is not one the statement would load (unless the
    mappers load subclasses with their base: ``with_polymorphic``,
    ``polymorphic_load``), so it does not count, or every call would send a statement
    that changes nothing.
    """
    state = sa_inspect(obj)
    if state.expired:
        return False
    expired = state.expired_attributes
    if expired and (
        state.mapper is loading
        or _polymorphic(loading, state.mapper)
        or any(key in loading.attrs for key in expired)
    ):
        return False
    unloaded = state.unloaded
    relationships = state.mapper.relationships
    for key, sub in tree.items():
        if key in unloaded:
            return False
        value = state.dict.get(key)
        if value is None:
            children: Iterable[Any] = ()
        elif relationships[key].uselist:  # any collection class: list, set, dict, custom
            children = members(value)
        else:
            children = (value,)
        # a leaf object too: an expired one (session.expire, a server-side default after a
        # flush) would refresh on first read, a MissingGreenlet in async code
        target = relationships[key].mapper
        if not all(_loaded(child, sub, target) for child in children):
            return False
    return True


def _polymorphic(loading: Mapper[Any], mapper: Mapper[Any]) -> bool:
    """Whether a statement loading ``loading`` also loads ``mapper``'s own columns
    (``with_polymorphic`` on the base, ``polymorphic_load`` on the subclass)."""
    return loading.with_polymorphic is not None or mapper.polymorphic_load is not None
