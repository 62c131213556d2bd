"""Peer groups: the instances of one ``fetch_peers()`` query, held by weak references.

A :class:`PeerGroup` remembers which instances came out of the same query so that a
relationship missing on one of them can be loaded for all of them in one statement
per chunk (:mod:`._peers_hop`). Membership lives in :data:`REGISTRY`, a
``WeakKeyDictionary`` keyed by each instance's ``InstanceState``: nothing here keeps
an instance alive, and an instance that no ``fetch_peers()`` query returned never
gets an entry (a query without the option creates no state at all).

The values reached from a group over one relationship (the contacts of a group of
conversations) form the group's *child* for that relationship, so a dotted path
costs one statement per hop for the whole group, however deep.
"""

from __future__ import annotations

import sqlite3
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import InstanceState, RelationshipProperty
from typing_extensions import final

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "REGISTRY",
    "PeerGroup",
    "keys_per_statement",
    "members",
    "reached",
]

DEFAULT_CHUNK_SIZE = 500
"""Peers per statement: bound parameters stay well under every database's limit."""

# the most bound parameters one statement may carry (asyncpg counts them in an int16;
# SQLite before 3.32 allowed 999); a dialect not listed: 32,766, SQLite's own default
_MAX_PARAMS = {"postgresql": 32_767, "mssql": 2_100}
_SLACK = 100  # parameters the statement may carry besides the keys (join criteria)
_PG_ROWS = 1_000  # PostgreSQL: a longer row-value IN list can exhaust its stack


def keys_per_statement(dialect: str, width: int, chunk: int) -> int:
    """``chunk``, lowered so that one ``IN`` of that many keys of ``width`` columns stays
    within the database's cap on bound parameters (else the driver fails the statement,
    every key of it with it: asyncpg at 32,767)."""
    if dialect == "sqlite":
        limit = 32_766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
    else:
        limit = _MAX_PARAMS.get(dialect, 32_766)
    most = max(1, (limit - _SLACK) // max(1, width))
    if width > 1 and dialect == "postgresql":
        most = min(most, _PG_ROWS)
    return min(chunk, most)


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


def members(collection: Iterable[Any]) -> Iterable[Any]:
    """The objects a loaded collection holds: a list's or set's items, a dict collection's
    values (``attribute_keyed_dict``: iterating it would give the keys)."""
    return collection.values() if isinstance(collection, Mapping) else collection


def reached(states: Iterable[InstanceState[Any]], prop: RelationshipProperty[Any]) -> list[Any]:
    """The states of the objects ``prop`` holds on ``states`` (loaded ones only), deduplicated."""
    key = prop.key
    out: dict[int, InstanceState[Any]] = {}
    for state in states:
        value = state.dict.get(key)
        if value is None:
            continue
        for obj in members(value) if prop.uselist else (value,):
            target: InstanceState[Any] = inspect(obj)
            out.setdefault(id(target), target)
    return list(out.values())
