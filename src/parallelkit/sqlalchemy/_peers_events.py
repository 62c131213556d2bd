"""The one ORM event listener behind ``fetch_peers()``, registered on its first use.

``do_orm_execute`` on :class:`sqlalchemy.orm.Session` (every session, sync and the
one inside each ``AsyncSession``) does two things:

* a statement carrying the :class:`PeersOption`: run it, note its rows as one
  :class:`~parallelkit.sqlalchemy._peers_group.PeerGroup` per entity column, hand
  back the same rows;
* a **lazy load** fired by a member of a group (plain attribute access in sync code
  or inside ``AsyncSession.run_sync``): load that relationship for every member
  still missing it, one statement per chunk, and answer the lazy load from those
  rows (so the instance that fired it costs nothing extra).

Everything else returns at once (``None``: SQLAlchemy proceeds as usual). That fast
path reads two attributes and, for a non-lazy SELECT, scans the statement's
user-defined options; the benchmark measures it. Importing this module registers
nothing: :func:`install` does, once, from ``fetch_peers()``.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.engine import Result
from sqlalchemy.orm import (
    InstanceState,
    ORMExecuteState,
    RelationshipProperty,
    Session,
    UserDefinedOption,
)
from typing_extensions import final

from ._peers_group import REGISTRY, PeerGroup
from ._peers_hop import load_hop, pending, plan

__all__ = ["PeersOption", "install", "installed"]

_lock = threading.Lock()
_installed: list[bool] = []


@final
class PeersOption(UserDefinedOption):
    """The option ``fetch_peers()`` returns; ``payload`` is the chunk size."""

    __slots__ = ()

    payload: int

    def __repr__(self) -> str:
        return f"fetch_peers(chunk_size={self.payload})"


def install() -> None:
    """Register the listener on ``Session`` (once per process; thread-safe)."""
    if _installed:
        return
    with _lock:
        if not _installed:
            event.listen(Session, "do_orm_execute", _on_execute)
            _installed.append(True)


def installed() -> bool:
    """Whether :func:`install` ran (for tests and the benchmark)."""
    return bool(_installed)


def _on_execute(orm_state: ORMExecuteState) -> Result[Any] | None:
    if not orm_state.is_select:
        return None
    source = orm_state.lazy_loaded_from
    if source is not None:
        group = REGISTRY.get(source) if REGISTRY else None
        return None if group is None else _lazy_for_peers(orm_state, source, group)
    for option in orm_state.user_defined_options:
        if isinstance(option, PeersOption):
            if orm_state.is_relationship_load or orm_state.is_column_load:
                return None  # an eager loader's or a refresh's statement: not a new group
            return _group_rows(orm_state, option.payload)
    return None


def _group_rows(orm_state: ORMExecuteState, chunk_size: int) -> Result[Any]:
    """Run the statement, make one group per entity column of its rows, return the rows.

    The rows are buffered (``freeze``) to be read twice. ``unique()`` with a
    strategy that calls every row distinct keeps them all, exactly as the caller
    would have got them, even when joined eager collections would otherwise insist
    on ``unique()`` being called first: the caller's own ``.unique()`` still works.
    """
    rows = itertools.count()
    frozen = orm_state.invoke_statement().unique(lambda _row: next(rows)).freeze()
    columns: dict[int, dict[int, InstanceState[Any]]] = {}
    for row in frozen():
        for index, value in enumerate(row):
            if value is None:
                continue
            state = inspect(value, raiseerr=False)
            if isinstance(state, InstanceState):
                columns.setdefault(index, {})[id(state)] = state
    for states in columns.values():
        group = PeerGroup(states.values(), chunk_size)
        for state in states.values():
            REGISTRY[state] = group  # the latest query an instance came from is its group
    return frozen()


def _lazy_for_peers(
    orm_state: ORMExecuteState, source: InstanceState[Any], group: PeerGroup
) -> Result[Any] | None:
    """Load the relationship being lazy-loaded on ``source`` for all its peers at once."""
    path = orm_state.loader_strategy_path
    prop = path[-1] if path is not None and not path.is_root else None
    if (
        not isinstance(prop, RelationshipProperty)
        or prop.key in source.dict
        or not source.mapper.isa(prop.parent)
    ):
        return None  # not a relationship lazy load we can answer: SQLAlchemy's own way
    step = plan(prop)
    todo, settled = pending(orm_state.session, step, [source], group.live())
    if not todo or todo[0] is not source:
        if settled:
            group.forget(prop)
        return None
    answer = load_hop(orm_state.session, todo, step, group.chunk_size, want=source)
    group.forget(prop)
    group.child(prop)  # the values become a group: the next hop is batched too
    return None if answer is None else answer()
