"""One hop: load one relationship for many instances in one statement per chunk.

Two statement shapes, both plain SQLAlchemy ``select()``:

* a plain **many-to-one** on the target's primary key (the common case:
  ``Conversation.contact``): the distinct foreign-key values of the instances,
  ``SELECT target WHERE target.pk IN (...)``; targets already in the session (and
  NULL foreign keys) need no SQL at all, as with SQLAlchemy's own lazy loader;
* anything else (one-to-many, many-to-many through ``secondary``, custom join
  conditions, self-referential): ``SELECT target, parent.pk FROM parent JOIN target``
  along the relationship itself, ``WHERE parent.pk IN (...)``; the relationship's
  ``order_by`` applies.

Values are set with ``set_committed_value``, as a loader sets them: no change
event, nothing to flush.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Select, and_, inspect, select, tuple_
from sqlalchemy.engine import FrozenResult
from sqlalchemy.orm import MANYTOONE, InstanceState, Mapper, RelationshipProperty, Session, aliased
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import UnmappedColumnError

from ._compat import carried, carry
from ._peers_group import keys_per_statement

__all__ = ["Plan", "load_hop", "pending", "plan"]

_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class Plan:
    """How to load one relationship for many instances (built once per relationship)."""

    prop: RelationshipProperty[Any]
    fk_keys: tuple[str, ...] | None  # a plain many-to-one: the parent's keys, in target-pk order
    direct: Select[Any] | None  # SELECT target (a plain many-to-one) ...
    target_keys: tuple[Any, ...]  # ... WHERE target.pk IN (...)
    joined: Select[Any]  # SELECT target, parent.pk FROM parent JOIN target ...
    parent_keys: tuple[Any, ...]  # ... WHERE parent.pk IN (...)


@functools.lru_cache(maxsize=512)
def plan(prop: RelationshipProperty[Any]) -> Plan:
    """The statements that load ``prop`` (cached: built once per relationship)."""
    parent: Mapper[Any] = prop.parent
    alias = aliased(parent.class_, flat=True)  # a self-referential join needs two names
    parent_keys = tuple(
        getattr(alias, parent.get_property_by_column(column).key) for column in parent.primary_key
    )
    joined = select(prop.entity.entity, *parent_keys).select_from(alias)
    joined = joined.join(getattr(alias, prop.key))
    if prop.order_by:
        joined = joined.order_by(*prop.order_by)
    fk_keys = _plain_many_to_one(prop)
    direct: Select[Any] | None = None
    target_keys: tuple[Any, ...] = ()
    if fk_keys is not None:
        target: Mapper[Any] = prop.mapper
        target_keys = tuple(
            getattr(target.class_, target.get_property_by_column(column).key)
            for column in target.primary_key
        )
        direct = select(target.class_)
    return Plan(prop, fk_keys, direct, target_keys, joined, parent_keys)


def _plain_many_to_one(prop: RelationshipProperty[Any]) -> tuple[str, ...] | None:
    """For a many-to-one on the target's primary key: the parent's keys that hold it.

    ``None`` for anything else: a collection, a ``secondary``, an aliased target,
    extra join criteria (the join must be exactly ``fk == pk`` per column).
    """
    if (
        prop.direction is not MANYTOONE
        or prop.uselist
        or prop.secondary is not None
        or not isinstance(prop.entity, Mapper)
    ):
        return None
    pairs = prop.local_remote_pairs or []
    by_remote = {remote: local for local, remote in pairs}
    target_pk = prop.mapper.primary_key
    if len(by_remote) != len(pairs) or set(by_remote) != set(target_pk):
        return None
    if not prop.primaryjoin.compare(and_(*(local == remote for local, remote in pairs))):
        return None
    try:
        return tuple(prop.parent.get_property_by_column(by_remote[col]).key for col in target_pk)
    except UnmappedColumnError:  # pragma: no cover - a foreign key that is not mapped
        return None


def _fk(state: InstanceState[Any], fk_keys: tuple[str, ...]) -> tuple[Any, ...] | None:
    """The target's identity held by ``state``'s foreign key; ``None`` if not loaded."""
    loaded = state.dict
    ident = tuple(loaded.get(key, _UNSET) for key in fk_keys)
    return None if _UNSET in ident else ident


def pending(
    session: Session, step: Plan, *groups: Iterable[InstanceState[Any]]
) -> tuple[list[InstanceState[Any]], bool]:
    """Members of ``groups`` that need a statement to load ``step.prop``, in order.

    Skipped: members with it loaded, not persistent, or in another session. A plain
    many-to-one whose target is in the session already (or whose foreign key is
    NULL) is set right here, without SQL, as SQLAlchemy's own lazy loader would.

    Returns:
        The members that need a statement, and whether any value was set here.
    """
    prop = step.prop
    key, parent, fk_keys = prop.key, prop.parent, step.fk_keys
    identity_map = session.identity_map
    mappers: dict[Mapper[Any], bool] = {}
    seen: set[int] = set()
    found: dict[tuple[Any, ...], Any] = {}
    out: list[InstanceState[Any]] = []
    settled = False
    for group in groups:
        for state in group:
            if key in state.dict or state.key is None or id(state) in seen:
                continue
            seen.add(id(state))
            mapper = state.mapper
            fits = mappers.get(mapper)
            if fits is None:
                fits = mappers[mapper] = mapper.isa(parent)
            if not fits or state.session is not session:
                continue
            ident = _fk(state, fk_keys) if fk_keys is not None else None
            obj = state.object
            if ident is not None and obj is not None:
                target = None if None in ident else found.get(ident, _UNSET)
                if target is _UNSET:
                    target = found[ident] = _in_session(session, prop, identity_map, ident)
                if target is not None or None in ident:
                    set_committed_value(obj, key, target)
                    settled = True
                    continue
            out.append(state)
    return out, settled


def _in_session(
    session: Session, prop: RelationshipProperty[Any], identity_map: Any, ident: tuple[Any, ...]
) -> Any:
    obj = identity_map.get(prop.mapper.identity_key_from_primary_key(ident))
    if obj is None or not isinstance(obj, prop.mapper.class_):
        return None
    target: InstanceState[Any] = inspect(obj)
    return None if target.expired or target.deleted else obj


def load_hop(
    session: Session,
    states: Sequence[InstanceState[Any]],
    step: Plan,
    chunk_size: int,
    *,
    want: InstanceState[Any] | None = None,
) -> FrozenResult[Any] | None:
    """Load ``step.prop`` for every state: one statement per ``chunk_size`` keys (fewer
    when the database caps a statement's bound parameters lower: :func:`keys_per_statement`).

    The statements carry the loader options of the query that loaded the states,
    as SQLAlchemy's lazy loader does: ``eager``'s raise guard (and eager loads) reach
    the targets, also when the hop re-loads them after a rollback or a commit
    expired them. States loaded with different options get statements of their own.

    Returns, when ``want`` is one of ``states``, a frozen result with only
    ``want``'s rows, the target entity in the first column: what a lazy loader's
    ``result.unique().scalars()`` reads.
    """
    if not states:
        return None
    dialect = session.get_bind(mapper=step.prop.parent).dialect.name
    parts: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any, list[InstanceState[Any]]]] = {}
    seen: dict[tuple[int, int], list[InstanceState[Any]]] = {}  # the rows of one query share both
    for state in states:
        mine = seen.get((id(state.load_options), id(state.load_path)))
        if mine is None:
            options, path = carried(state)
            # equal options (a hop's chunks each made a tuple of the same ones), one path
            key = (*map(id, options), path.path if options and path is not None else None)
            part = parts.get(key)
            if part is None:
                part = parts[key] = (options, path, [])
            mine = seen[id(state.load_options), id(state.load_path)] = part[2]
        mine.append(state)
    answer: FrozenResult[Any] | None = None
    for options, path, part_states in parts.values():
        here = step
        if options:
            direct = step.direct
            if direct is not None:
                direct = carry(direct, options, path, step.prop)
            joined = carry(step.joined, options, path, step.prop)
            here = replace(step, direct=direct, joined=joined)
        answer = _hop(session, dialect, part_states, here, chunk_size, want) or answer
    return answer


def _hop(
    session: Session,
    dialect: str,
    states: Sequence[InstanceState[Any]],
    step: Plan,
    chunk_size: int,
    want: InstanceState[Any] | None,
) -> FrozenResult[Any] | None:
    if step.direct is not None and step.fk_keys is not None:
        by_fk: dict[tuple[Any, ...], list[InstanceState[Any]]] = {}
        rest: list[InstanceState[Any]] = []
        for state in states:
            ident = _fk(state, step.fk_keys)
            if ident is None:  # the foreign key itself is expired: join from the parent
                rest.append(state)
            else:
                by_fk.setdefault(ident, []).append(state)
        size = keys_per_statement(dialect, len(step.target_keys), chunk_size)
        answer = _direct(session, by_fk, step, size, want)
        size = keys_per_statement(dialect, len(step.parent_keys), chunk_size)
        return _joined(session, rest, step, size, want) or answer
    size = keys_per_statement(dialect, len(step.parent_keys), chunk_size)
    return _joined(session, states, step, size, want)


def _in(keys: Sequence[Any], idents: Sequence[tuple[Any, ...]]) -> Any:
    if len(keys) > 1:
        return tuple_(*keys).in_(idents)
    return keys[0].in_([ident[0] for ident in idents])


def _direct(
    session: Session,
    by_fk: dict[tuple[Any, ...], list[InstanceState[Any]]],
    step: Plan,
    chunk_size: int,
    want: InstanceState[Any] | None,
) -> FrozenResult[Any] | None:
    assert step.direct is not None
    key = step.prop.key
    idents = list(by_fk)
    answer: FrozenResult[Any] | None = None
    for start in range(0, len(idents), chunk_size):
        chunk = idents[start : start + chunk_size]
        frozen = session.execute(step.direct.where(_in(step.target_keys, chunk))).unique().freeze()
        targets = {tuple(inspect(row[0]).identity or ()): row[0] for row in frozen()}
        for ident in chunk:
            target = targets.get(ident)
            for state in by_fk[ident]:
                obj = state.object
                if obj is not None:
                    set_committed_value(obj, key, target)
                if state is want:
                    rows: list[Any] = [(target,)] if target is not None else []
                    answer = frozen.with_new_rows(rows)
    return answer


def _joined(
    session: Session,
    states: Sequence[InstanceState[Any]],
    step: Plan,
    chunk_size: int,
    want: InstanceState[Any] | None,
) -> FrozenResult[Any] | None:
    key, uselist = step.prop.key, step.prop.uselist
    answer: FrozenResult[Any] | None = None
    for start in range(0, len(states), chunk_size):
        chunk = states[start : start + chunk_size]
        idents = [tuple(state.identity or ()) for state in chunk]
        where = _in(step.parent_keys, idents)
        frozen = session.execute(step.joined.where(where)).unique().freeze()
        rows = [tuple(row) for row in frozen()]
        found: dict[tuple[Any, ...], list[Any]] = {}
        for row in rows:
            found.setdefault(row[1:], []).append(row[0])
        for state, ident in zip(chunk, idents, strict=True):
            values = found.get(ident, [])
            obj = state.object
            if obj is not None:
                set_committed_value(
                    obj, key, values if uselist else (values[0] if values else None)
                )
            if state is want:
                mine: list[Any] = [row for row in rows if row[1:] == ident]
                answer = frozen.with_new_rows(mine)
    return answer
