"""Peer groups: the instances of one ``fetch_peers()`` query, held by weak references.

A :class:`PeerGroup` remembers which instances came out of the same query so that a
relationship missing on one of them can be loaded for all of them in one statement
per chunk (:func:`load_hop`). Membership lives in :data:`REGISTRY`, a
``WeakKeyDictionary`` keyed by each instance's ``InstanceState``: nothing here keeps
an instance alive, and an instance that no ``fetch_peers()`` query returned never
gets an entry (a query without the option creates no state at all).

The values reached from a group over one relationship (the contacts of a group of
conversations) form the group's *child* for that relationship, so a dotted path
costs one statement per hop for the whole group, however deep.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Select, and_, inspect, select, tuple_
from sqlalchemy.engine import FrozenResult
from sqlalchemy.orm import InstanceState, RelationshipProperty, Session, aliased
from sqlalchemy.orm import MANYTOONE
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import UnmappedColumnError
from typing_extensions import final

__all__ = ["DEFAULT_CHUNK_SIZE", "REGISTRY", "PeerGroup", "load_hop", "pending", "reached"]

DEFAULT_CHUNK_SIZE = 500
"""Peers per statement: bound parameters stay well under every database's limit."""

REGISTRY: weakref.WeakKeyDictionary[InstanceState[Any], PeerGroup] = weakref.WeakKeyDictionary()
"""Instance state -> the group it belongs to (only instances from ``fetch_peers()`` queries)."""


@final
class PeerGroup:
    """Instances that came from one query, or were reached from such a group.

    Holds weak references only: a member that is garbage-collected drops out.
    """

    __slots__ = ("__weakref__", "_children", "_refs", "chunk_size")

    def __init__(self, states: Iterable[InstanceState[Any]], chunk_size: int) -> None:
        self._refs = [weakref.ref(state) for state in states]
        self.chunk_size = chunk_size
        self._children: dict[RelationshipProperty[Any], PeerGroup] = {}

    def live(self) -> list[InstanceState[Any]]:
        """The members still alive (dead references are pruned as a side effect)."""
        alive: list[InstanceState[Any]] = []
        refs: list[weakref.ref[InstanceState[Any]]] = []
        for ref in self._refs:
            state = ref()
            if state is not None and state.object is not None:
                alive.append(state)
                refs.append(ref)
        if len(refs) < len(self._refs):
            self._refs = refs
        return alive

    def child(self, prop: RelationshipProperty[Any]) -> PeerGroup:
        """The group of the values reached over ``prop`` from the members that have it loaded.

        Its members join :data:`REGISTRY` unless they already belong to a group (a
        query's own group is never taken away from its rows).
        """
        group = self._children.get(prop)
        if group is None:
            states = reached(self.live(), prop)
            group = PeerGroup(states, self.chunk_size)
            for state in states:
                REGISTRY.setdefault(state, group)
            self._children[prop] = group
        return group

    def forget(self, prop: RelationshipProperty[Any]) -> None:
        """Drop the cached child for ``prop`` (its values just changed)."""
        self._children.pop(prop, None)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"<PeerGroup of {len(self._refs)} (chunk_size={self.chunk_size})>"


def reached(states: Iterable[InstanceState[Any]], prop: RelationshipProperty[Any]) -> list[Any]:
    """The states of the objects ``prop`` holds on ``states`` (loaded ones only), deduplicated."""
    key = prop.key
    out: dict[int, InstanceState[Any]] = {}
    for state in states:
        value = state.dict.get(key)
        if value is None:
            continue
        for obj in value if prop.uselist else (value,):
            target: InstanceState[Any] = inspect(obj)
            out.setdefault(id(target), target)
    return list(out.values())


def pending(
    session: Session,
    prop: RelationshipProperty[Any],
    *groups: Iterable[InstanceState[Any]],
) -> list[InstanceState[Any]]:
    """Members of ``groups`` that need a statement to load ``prop``.

    Skipped: members with ``prop`` loaded, not persistent, or in another session.
    A many-to-one whose target is already in the session (or whose foreign key is
    NULL) is set right here, without SQL, as SQLAlchemy's own lazy loader would.
    """
    key, parent = prop.key, prop.parent
    direct = _direct(prop)
    identity_map = session.identity_map
    seen: set[int] = set()
    out: list[InstanceState[Any]] = []
    for group in groups:
        for state in group:
            if id(state) in seen or key in state.dict or state.key is None:
                continue
            seen.add(id(state))
            if state.session is not session or not state.mapper.isa(parent):
                continue
            if direct is not None:
                ident = [state.dict.get(attr, _UNSET) for attr in direct]
                obj = state.object
                if _UNSET not in ident and obj is not None:
                    if None in ident:
                        set_committed_value(obj, key, None)
                        continue
                    found = identity_map.get(prop.mapper.identity_key_from_primary_key(ident))
                    if found is not None and _usable(found, prop):
                        set_committed_value(obj, key, found)
                        continue
            out.append(state)
    return out


_UNSET: Any = object()


def _usable(found: object, prop: RelationshipProperty[Any]) -> bool:
    target: InstanceState[Any] = inspect(found)
    return isinstance(found, prop.mapper.class_) and not (target.expired or target.deleted)


def _direct(prop: RelationshipProperty[Any]) -> list[str] | None:
    """For a plain many-to-one on the target's primary key: the parent's keys holding it.

    ``None`` for anything else (a collection, a ``secondary``, extra join criteria).
    """
    if prop.direction is not MANYTOONE or prop.uselist or prop.secondary is not None:
        return None
    pairs = prop.local_remote_pairs or []
    by_remote = {remote: local for local, remote in pairs}
    target_pk = prop.mapper.primary_key
    if len(by_remote) != len(pairs) or set(by_remote) != set(target_pk):
        return None
    if not prop.primaryjoin.compare(and_(*(local == remote for local, remote in pairs))):
        return None
    try:
        return [prop.parent.get_property_by_column(by_remote[col]).key for col in target_pk]
    except UnmappedColumnError:
        return None


def _statement(prop: RelationshipProperty[Any]) -> tuple[Select[Any], list[Any]]:
    """``SELECT target, parent.pk FROM parent JOIN target`` along ``prop`` (no WHERE yet).

    Joining through the relationship itself handles many-to-one, one-to-many,
    many-to-many (``secondary``) and custom join conditions alike; the parent is an
    alias so a self-referential relationship works too.
    """
    parent = prop.parent
    alias = aliased(parent.class_, flat=True)
    keys = [parent.get_property_by_column(column).key for column in parent.primary_key]
    pk_attrs = [getattr(alias, key) for key in keys]
    stmt = select(prop.entity.entity, *pk_attrs).select_from(alias)
    stmt = stmt.join(getattr(alias, prop.key))
    if prop.order_by:
        stmt = stmt.order_by(*prop.order_by)
    return stmt, pk_attrs


def load_hop(
    session: Session,
    states: Sequence[InstanceState[Any]],
    prop: RelationshipProperty[Any],
    chunk_size: int,
    *,
    want: InstanceState[Any] | None = None,
) -> FrozenResult[Any] | None:
    """Load ``prop`` for every state in ``states``: one statement per ``chunk_size`` of them.

    Each value is set with ``set_committed_value`` (as a loader would: no change
    event, nothing to flush). Returns, when ``want`` is one of ``states``, a frozen
    result holding only ``want``'s rows, with the target entity in the first column:
    what a lazy loader's ``result.unique().scalars()`` expects.
    """
    if not states:
        return None
    base, pk_attrs = _statement(prop)
    composite = len(pk_attrs) > 1
    key, uselist = prop.key, prop.uselist
    answer: FrozenResult[Any] | None = None
    for start in range(0, len(states), chunk_size):
        chunk = states[start : start + chunk_size]
        idents = [state.identity for state in chunk]
        if composite:
            where = tuple_(*pk_attrs).in_(idents)
        else:
            where = pk_attrs[0].in_([ident[0] for ident in idents if ident is not None])
        frozen = session.execute(base.where(where)).freeze()
        rows = [tuple(row) for row in frozen()]
        found: dict[tuple[Any, ...], list[Any]] = {}
        for row in rows:
            found.setdefault(row[1:], []).append(row[0])
        for state in chunk:
            obj = state.object
            if obj is None:
                continue
            values = found.get(tuple(state.identity or ()), [])
            set_committed_value(obj, key, values if uselist else (values[0] if values else None))
            if state is want:
                mine = tuple(want.identity or ())
                answer = frozen.with_new_rows([row for row in rows if row[1:] == mine])
    return answer
