"""fetch_peers() and load(): N+1 fixed when the paths are not known up front.

Django 6.1's ``FETCH_PEERS`` fetch mode, for SQLAlchemy (sync and asyncio): a
relationship missing on one instance of a query is loaded for every instance that
came from the same query, in one statement per hop (per chunk of peers).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import async_session
from sqlalchemy.orm import InstanceState, Mapper, RelationshipProperty, Session
from sqlalchemy.orm.exc import DetachedInstanceError
from typing_extensions import final

from .._core.check import count
from .._core.errors import ParallelkitError
from ._peers_events import PeersOption, install
from ._peers_group import DEFAULT_CHUNK_SIZE, REGISTRY, members, reached
from ._peers_hop import load_hop, pending, plan

__all__ = ["DEFAULT_CHUNK_SIZE", "RelationshipPathError", "fetch_peers", "load"]

_MISSING: Any = object()
_NOT_LOADABLE = ("dynamic", "write_only")


@final
class RelationshipPathError(ParallelkitError, ValueError):
    """A dotted path given to :func:`load` names something that is not a relationship.

    Raised before any statement is sent. It is also a :class:`ValueError` (a bad
    argument), the class :func:`eager` raises for the same mistake.

    Attributes:
        attribute: ``"Model.attr"``, the segment that does not resolve.
        path: the whole dotted path, as given.
        relationships: the relationship names ``Model`` does have.
    """

    def __init__(self, attribute: str, path: str, relationships: Sequence[str], why: str) -> None:
        self.attribute = attribute
        self.path = path
        self.relationships = tuple(relationships)
        self._why = why
        known = ", ".join(self.relationships) or "(none)"
        model = attribute.split(".", 1)[0]
        super().__init__(
            f"load(..., {path!r}): {attribute} {why}; {model}'s relationships are: {known}"
        )

    def __reduce__(self) -> tuple[object, ...]:
        # pickle and copy call the class with ``args`` (the message) by default
        args = (self.attribute, self.path, self.relationships, self._why)
        return (type(self), args, self.__dict__)


def fetch_peers(*, chunk_size: int = DEFAULT_CHUNK_SIZE) -> PeersOption:
    """A statement option: the rows of this query become *peers* of each other.

    Touching a relationship that is not loaded on one of them loads it for all of
    them, in one statement (per ``chunk_size`` peers): with ``await load(obj, path)``
    in async code, or plain attribute access in sync code (a sync ``Session`` or a
    function run through ``AsyncSession.run_sync``). The values loaded that way are
    peers of each other in turn, so a dotted path costs one statement per hop for the
    whole query, however many rows it returned. Django 6.1 calls this the
    ``FETCH_PEERS`` fetch mode.

    Peers are held by weak references; a query without the option creates no
    tracking state. The first call registers one ``do_orm_execute`` listener on
    :class:`sqlalchemy.orm.Session` (importing this module registers nothing); a
    statement without the option pays its fast path, a few microseconds (measured
    by ``python -m benchmarks peers``).

    Args:
        chunk_size: the most peers per statement (default 500, what SQLAlchemy's
            ``selectinload`` uses): a group of 1,200 rows loads a relationship in 3
            statements. Keeps the bound parameters under every database's limit; a
            larger value is lowered to what one statement can carry (asyncpg: 32,767
            bound parameters).

    Returns:
        A loader option for ``select(...).options(...)``, ``session.get(...,
        options=[...])`` or ``Query.options``.

    Raises:
        TypeError: ``chunk_size`` is not an int.
        ValueError: ``chunk_size`` is < 1.

    Example:
        ```python
        stmt = select(Conversation).options(fetch_peers())
        conversations = (await session.scalars(stmt)).all()     # 1 statement
        for conversation in conversations:                       # 2 more in all,
            company = await load(conversation, "contact.company")   # not 2 per row
        ```

    .. versionadded:: 0.1
    """
    size = count("chunk_size", chunk_size)
    install()
    return PeersOption(size)


async def load(instance: object, path: str, /) -> Any:
    """Return the value at the dotted relationship ``path`` of ``instance``, loading it.

    Safe in async code: what is missing is loaded through the instance's
    ``AsyncSession`` (never a ``MissingGreenlet``); what is loaded already costs no
    I/O. For an instance from a :func:`fetch_peers` query the path is loaded for
    **all its peers** at once: at most one statement per hop for the whole group
    (per ``chunk_size`` peers), for many-to-one, one-to-many and many-to-many alike;
    loading the rest of the group's path later sends nothing. Without
    ``fetch_peers()`` the path is loaded for this instance alone (still one
    statement per hop: through a collection, one for all its elements).

    Args:
        instance: a persistent mapped object (attached to a ``Session`` or an
            ``AsyncSession`` unless the path is loaded already).
        path: relationship names joined by dots, e.g. ``"contact.company"``.

    Returns:
        The related object (``None`` when a many-to-one along the path is empty).
        Through a collection, a list: one entry per object reached, in collection
        order (``load(company, "contacts.conversations")`` is every conversation of
        every contact), ``None`` left out.

    Raises:
        RelationshipPathError: a segment is not a relationship of its model (the
            message names ``Model.attr`` and lists the relationships it has), or is
            a ``dynamic`` / ``write_only`` one. Raised before any I/O.
        TypeError: ``instance`` is not a mapped object or ``path`` is not a str.
        sqlalchemy.orm.exc.DetachedInstanceError: something must be loaded and
            ``instance`` belongs to no session.

    Example:
        ```python
        conversations = (await session.scalars(
            select(Conversation).options(fetch_peers())
        )).all()
        for conversation in conversations:
            rules = await load(conversation, "contact.company.automation_rules")
        ```

    .. versionadded:: 0.1
    """
    state = inspect(instance, raiseerr=False)
    if not isinstance(state, InstanceState):
        if isinstance(instance, type):  # load(Conversation, ...): the class, not a row
            got = f"the class {instance.__name__}: pass one of its instances"
        else:
            got = f"{type(instance).__name__} {instance!r}"
        msg = f"instance must be a mapped object, got {got}"
        raise TypeError(msg)
    props = _resolve(state.mapper, path)
    value = _value(state, props)
    if value is not _MISSING:
        return value
    session = state.session
    if session is None:
        if state.key is None:  # transient: nothing in the database, no I/O possible
            return _value(state, props, io=True)
        msg = f"{state.class_.__name__} is not bound to a session: load(..., {path!r}) cannot run"
        raise DetachedInstanceError(msg)
    proxy = async_session(session)
    if proxy is not None:
        return await proxy.run_sync(_load_path, state, props)
    return _load_path(session, state, props)  # a sync Session: its own (blocking) I/O


def _resolve(mapper: Mapper[Any], path: object) -> tuple[RelationshipProperty[Any], ...]:
    if not isinstance(path, str):
        msg = f"path must be a str of relationship names joined by dots, got {path!r}"
        raise TypeError(msg)
    return _resolve_str(mapper, path)


@functools.lru_cache(maxsize=1024)
def _resolve_str(mapper: Mapper[Any], path: str) -> tuple[RelationshipProperty[Any], ...]:
    props: list[RelationshipProperty[Any]] = []
    for segment in path.split("."):
        if not segment:
            known = sorted(
                key for key, p in mapper.relationships.items() if p.lazy not in _NOT_LOADABLE
            )
            why = (
                "is not a relationship: the path has an empty segment (relationship "
                "names joined by single dots, e.g. 'contact.company')"
            )
            raise RelationshipPathError(f"{mapper.class_.__name__}.", path, known, why)
        prop = mapper.relationships.get(segment)
        if prop is None or prop.lazy in _NOT_LOADABLE:
            name = mapper.class_.__name__
            if prop is not None:
                why = f"is a lazy={prop.lazy!r} relationship (a query, not a loadable value)"
            elif segment in mapper.column_attrs:
                why = f"is a column, not a relationship: load the object, then read .{segment}"
            else:
                why = "is not a relationship"
            known = sorted(
                key for key, p in mapper.relationships.items() if p.lazy not in _NOT_LOADABLE
            )
            raise RelationshipPathError(f"{name}.{segment}", path, known, why)
        props.append(prop)
        mapper = prop.mapper
    return tuple(props)


def _value(
    state: InstanceState[Any], props: Sequence[RelationshipProperty[Any]], *, io: bool = False
) -> Any:
    """The value at ``props``: from what is loaded, or ``_MISSING`` if a load is needed.

    With ``io=True`` (sync code only) a missing value is read with ``getattr``:
    SQLAlchemy's own loading, for what a batch could not serve.
    """
    obj: Any = state.object
    loaded = state.dict
    last = len(props) - 1
    for index, prop in enumerate(props):
        if prop.key in loaded:
            value = loaded[prop.key]
        elif io:
            value = getattr(obj, prop.key)
        else:
            return _MISSING
        if value is None or index == last:
            return list(members(value)) if prop.uselist and value is not None else value
        if prop.uselist:
            out: list[Any] = []
            for item in members(value):
                found = _value(inspect(item), props[index + 1 :], io=io)
                if found is _MISSING:
                    return _MISSING
                if isinstance(found, list):
                    out.extend(found)
                elif found is not None:
                    out.append(found)
            return out
        obj, loaded = value, inspect(value).dict
    return obj  # pragma: no cover - the loop returns at the last segment


def _load_path(
    session: Session, state: InstanceState[Any], props: Sequence[RelationshipProperty[Any]]
) -> Any:
    """Load ``props`` hop by hop for ``state`` and its peers; sync (a greenlet under asyncio)."""
    group = REGISTRY.get(state)
    chunk = group.chunk_size if group is not None else DEFAULT_CHUNK_SIZE
    level = [state]
    for prop in props:
        step = plan(prop)
        peers = group.live() if group is not None else ()
        todo, settled = pending(session, step, level, peers)
        load_hop(session, todo, step, chunk)
        level = reached(level, prop)
        if group is not None:
            if todo or settled:
                group.forget(prop)  # the values reached changed: a fresh child group
            group = group.child(prop)
    return _value(state, props, io=True)
