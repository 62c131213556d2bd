"""eager(): loader options that pick joined vs selectin per relationship, and raise on the rest.

The options are plain SQLAlchemy loader options (``joinedload``,
``selectinload``, ``raiseload``). Raising :class:`NotLoadedError`, which names the
attribute and the ``eager(...)`` path that would have loaded it, instead of
SQLAlchemy's generic ``raiseload`` message needs a few private names; they live
in :mod:`._compat`, which says which and how a moved name is caught.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeAlias

from sqlalchemy import and_
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Load, Mapper, RelationshipProperty
from sqlalchemy.orm.interfaces import MANYTOONE, ORMOption
from typing_extensions import final

from .._core.check import choice, flag
from .._core.errors import ParallelkitError
from ._compat import ends_on, merge, path_keys, raise_attr, raise_rest
from ._surface import note

__all__ = ["EagerPath", "NotLoadedError", "Strategy", "eager"]

Strategy: TypeAlias = Literal["joined", "selectin", "subquery", "immediate"]
"""A loader strategy name accepted in ``eager(..., strategies={path: name})``."""

EagerPath: TypeAlias = str | Mapping[str, Any]
"""A dotted path (``"contact.company"``) or a nested dict (``{"contact": {"company": None}}``)."""

_STRATEGY_NAMES = ("joined", "selectin", "subquery", "immediate")
_NOT_LOADABLE = ("dynamic", "write_only")  # a query, not a value: no loader strategy applies
_Tree: TypeAlias = dict[str, "_Tree"]


@final
class NotLoadedError(ParallelkitError, sa_exc.InvalidRequestError):
    """A relationship that ``eager(..., raise_others=True)`` did not load was touched.

    Raised on attribute access, *before* any I/O, instead of a lazy load (which
    would be an N+1 query in sync code and a ``MissingGreenlet`` in async code).
    It is also a :class:`sqlalchemy.exc.InvalidRequestError`, the class SQLAlchemy's
    own ``raiseload`` raises, so existing handlers keep working.

    A relationship that only a *subclass* of a level's class has (an
    inheritance hierarchy: ``Manager.reports`` on rows loaded as ``Employee``)
    is guarded too; ``eager`` paths cannot name it, so the message says which
    SQLAlchemy option loads it instead (``hint``).

    Attributes:
        attribute: ``"Model.attr"``, the relationship that was touched.
        root: the class the loaded object graph starts from (``eager``'s first argument).
        path: the dotted path to pass to :func:`eager` to load it (for a
            subclass's relationship: where it sits in the graph).
        hint: for a subclass's relationship, the loader options that load it;
            otherwise ``None``.
    """

    def __init__(self, attribute: str, root: str, path: str, hint: str | None = None) -> None:
        self.attribute = attribute
        self.root = root
        self.path = path
        self.hint = hint
        why = (
            "raise_others=True forbids a lazy load (an extra query per object; in async code "
            "a MissingGreenlet error)"
        )
        if hint is None:
            super().__init__(
                f"{attribute} was not loaded: it is not among the eager(...) paths and "
                f"{why}. Ask for it: eager({root}, {path!r}, ...)"
            )
        else:
            owner = attribute.split(".", 1)[0]
            super().__init__(
                f"{attribute} was not loaded: it is a relationship of the subclass {owner}, "
                f"which eager(...) paths cannot name, and {why}. Load it with SQLAlchemy "
                f"options next to eager's: {hint}"
            )

    def __reduce__(self) -> tuple[object, ...]:
        # pickle and copy call the class with ``args`` (the message) by default
        return (type(self), (self.attribute, self.root, self.path, self.hint), self.__dict__)


def _not_loaded(state: Any, key: str, path: Any, root_name: str | None = None) -> NotLoadedError:
    """Build the error from the loader path (root -> ... -> this object) of the raise option.

    ``root_name`` is ``eager``'s root class as the option carries it: the path may start
    at a base class instead (SQLAlchemy files ``Vip.manager`` under ``Person``).
    """
    root_class, names = path_keys(path)
    root = root_name or (root_class or state.class_).__name__
    hint = None
    explicit = ends_on(path) == key  # not a wildcard: _Walk's option on a subclass relationship
    if explicit:
        names = names[:-1]
    if explicit or not _reaches(root_class, names, key):
        owner = state.mapper.relationships[key].parent
        hint = _subclass_hint(root_class, names, owner, key)
    error = NotLoadedError(f"{state.class_.__name__}.{key}", root, ".".join([*names, key]), hint)
    note(error)
    return error


def _reaches(root: Any, names: list[str], key: str) -> bool:
    """Whether an ``eager`` path can name ``key`` after ``names`` (unknown: assume it can)."""
    if root is None:
        return True
    try:
        mapper: Mapper[Any] = sa_inspect(root).mapper
        for name in names:
            mapper = mapper.relationships[name].mapper
    except (KeyError, AttributeError, sa_exc.NoInspectionAvailable):
        return True
    return key in mapper.relationships


def _subclass_hint(root: Any, names: list[str], owner: Mapper[Any], key: str) -> str:
    """The options that load ``owner.key`` at the end of ``names`` from ``root`` (a class)."""
    sub = owner.class_.__name__
    if not names or root is None:
        base = owner.base_mapper.class_.__name__
        return f"selectin_polymorphic({base}, [{sub}]), selectinload({sub}.{key})"
    hops: list[str] = []
    mapper: Mapper[Any] = sa_inspect(root).mapper
    for index, name in enumerate(names):
        hop = f"{mapper.class_.__name__}.{name}"
        hops.append(hop if index < len(names) - 1 else f"{hop}.of_type({sub})")
        mapper = mapper.relationships[name].mapper
    return f"defaultload({').defaultload('.join(hops)}).selectinload({sub}.{key})"


# ---------------------------------------------------------------------------- paths
def _add(tree: _Tree, segments: list[str], raw: object) -> None:
    for segment in segments:
        if not segment or not segment.isidentifier():
            msg = f"eager path {raw!r} has an empty or invalid segment {segment!r}"
            raise ValueError(msg)
        tree = tree.setdefault(segment, {})


def _parse(tree: _Tree, path: object, prefix: list[str], raw: object) -> None:
    if isinstance(path, str):
        _add(tree, [*prefix, *path.split(".")], raw)
    elif isinstance(path, Mapping):
        for key, sub in path.items():
            if not isinstance(key, str):
                msg = f"eager path keys must be str, got {key!r} in {raw!r}"
                raise TypeError(msg)
            here = [*prefix, *key.split(".")]
            _add(tree, here, raw)
            if sub is None or sub is True or (isinstance(sub, Mapping) and not sub):
                continue
            _parse(tree, sub, here, raw)
    elif isinstance(path, (list, tuple)):
        for sub in path:
            _parse(tree, sub, prefix, raw)
    else:
        msg = f"eager paths are dotted strings or nested dicts, got {type(path).__name__} {path!r}"
        raise TypeError(msg)


def _paths(tree: _Tree, prefix: str = "") -> Iterable[str]:
    for key, sub in tree.items():
        here = f"{prefix}{key}"
        yield here
        yield from _paths(sub, here + ".")


def _relationship(mapper: Mapper[Any], key: str, root: str, path: str) -> RelationshipProperty[Any]:
    prop = mapper.relationships.get(key)
    if prop is not None and prop.lazy not in _NOT_LOADABLE:
        return prop
    known = ", ".join(
        sorted(name for name, p in mapper.relationships.items() if p.lazy not in _NOT_LOADABLE)
    )
    owners = [sub.class_.__name__ for sub in _subclasses(mapper) if key in sub.relationships]
    if prop is not None:
        what = f"a lazy={prop.lazy!r} relationship (a query, not a value to load)"
    elif key in mapper.columns:
        what = "a column, not a relationship"
    elif owners:
        what = (
            f"not a relationship (only its subclass {owners[0]} has it: eager paths cannot name it)"
        )
    else:
        what = "not a relationship"
    msg = (
        f"eager({root}, {path!r}): {mapper.class_.__name__}.{key} is {what}; "
        f"{mapper.class_.__name__}'s relationships are: {known or '(none)'}"
    )
    raise ValueError(msg)


def _subclasses(mapper: Mapper[Any]) -> list[Mapper[Any]]:
    """The mappers inheriting from ``mapper`` (an inheritance hierarchy), nearest first."""
    return [sub for sub in mapper.self_and_descendants if sub is not mapper]


def _own_relationships(mapper: Mapper[Any]) -> list[RelationshipProperty[Any]]:
    """The loadable relationships declared on ``mapper`` itself (not inherited)."""
    return [
        prop
        for prop in mapper.relationships.values()
        if prop.parent is mapper and prop.lazy not in _NOT_LOADABLE
    ]


def default_strategy(prop: RelationshipProperty[Any]) -> str:
    """The strategy :func:`eager` picks for a relationship: collections -> selectin."""
    return "selectin" if prop.uselist else "joined"


def _inner(prop: RelationshipProperty[Any]) -> bool:
    """Whether an inner join can never drop a root row: every row has exactly one target.

    That holds for a plain many-to-one whose join is exactly ``fk == pk`` over a
    real ``FOREIGN KEY`` to the target's primary key, every local column ``NOT
    NULL``. Anything more (a ``primaryjoin`` with extra criteria, a ``foreign()``
    annotation without a constraint, a target that is an inheritance *subclass*:
    the key may name a row of another class of the hierarchy, which the join to
    the subclass's table or discriminator does not match) can leave a row without
    a match: an inner join would silently drop it, so those stay outer joins.
    """
    if (
        prop.direction is not MANYTOONE
        or prop.uselist
        or prop.secondary is not None
        or not isinstance(prop.entity, Mapper)  # an aliased() target
        or prop.mapper.inherits is not None  # single- or joined-table subclass
    ):
        return False
    pairs = prop.local_remote_pairs or []
    if not pairs or {remote for _, remote in pairs} != set(prop.mapper.primary_key):
        return False
    if not all(
        not local.nullable and any(fk.column is remote for fk in local.foreign_keys)
        for local, remote in pairs
    ):
        return False
    return bool(prop.primaryjoin.compare(and_(*(local == remote for local, remote in pairs))))


def _strategies(strategies: object, requested: set[str]) -> dict[str, str]:
    if strategies is None:
        return {}
    if not isinstance(strategies, Mapping):
        msg = f"strategies must be a dict of {{path: strategy}} or None, got {strategies!r}"
        raise TypeError(msg)
    chosen: dict[str, str] = {}
    for key, name in strategies.items():
        chosen[key] = choice(f"strategies[{key!r}]", name, _STRATEGY_NAMES)
        if key not in requested:
            msg = f"strategies key {key!r} is not a requested path; requested: {sorted(requested)}"
            raise ValueError(msg)
    return chosen


def eager(
    model: Any,
    /,
    *paths: EagerPath,
    raise_others: bool = True,
    strategies: Mapping[str, Strategy] | None = None,
    one: bool = False,
) -> tuple[ORMOption, ...]:
    """Loader options that load exactly the relationships you name, in few queries.

    Name the relationships a request needs, as dotted paths from ``model``;
    ``eager`` checks each name against the mappers now (a typo fails here, not at
    the first request) and picks the loader strategy per relationship:

    * many-to-one and one-to-one -> ``joinedload`` (an inner join when every
      foreign-key column is ``NOT NULL``, so the planner can use it freely);
    * collections (one-to-many, many-to-many) -> ``selectinload`` (one extra
      ``SELECT ... WHERE parent_id IN (...)`` per collection level, no row
      multiplication), unless ``one=True``.

    ``one=True`` says the statement loads **one** root row (a primary-key
    lookup): joining a collection then costs rows equal to the collection's
    size, not roots x size, so collections are joined too and the whole graph
    is one statement. Only one chain of collections is joined (a second, sibling
    collection would multiply the first one's rows: it stays ``selectin``).
    SQLAlchemy requires ``.unique()`` on a ``select()`` result with a joined
    collection: ``(await session.scalars(stmt)).unique().one()``, or use
    :func:`eager_get`, which does that for you.

    With ``raise_others=True`` (the default) every *other* relationship, at every
    level of the loaded graph, raises :class:`NotLoadedError` when touched: it names
    ``Model.attr`` and the path that would load it, instead of a silent N+1
    query or an async ``MissingGreenlet``.

    Args:
        model: the mapped class (or ``aliased()`` class) the statement selects.
        *paths: dotted strings (``"contact.company.automation_rules"``) or nested
            dicts (``{"contact": {"company": ["automation_rules", "settings"]}}``;
            a leaf is ``None``, ``True``, ``{}``, a string or a list).
        raise_others: raise on access to relationships not named in ``paths``.
        strategies: per-path overrides, e.g. ``{"contact.conversations": "joined"}``;
            one of ``"joined"``, ``"selectin"``, ``"subquery"``, ``"immediate"``.
        one: the statement loads a single root row: join collections too.

    Returns:
        A tuple of loader options: ``select(M).options(*eager(M, ...))`` or
        ``session.get(M, pk, options=eager(M, ...))``.

    Raises:
        ValueError: an unknown relationship name (the message lists the existing
            ones), a malformed path, an unknown strategy or a strategy for a path
            that was not requested.
        TypeError: ``model`` is not mapped, a path is not a str / dict, a flag
            is not a bool.

    Example:
        ```python
        stmt = select(Conversation).where(Conversation.id == cid).options(
            *eager(Conversation, "contact.company.automation_rules")
        )
        conversation = (await session.scalars(stmt)).one()   # 2 queries in total
        conversation.contact.company.automation_rules        # loaded
        conversation.contact.conversations                   # NotLoadedError
        ```
    """
    mapper = _mapper(model)
    flag("raise_others", raise_others)
    flag("one", one)
    tree: _Tree = {}
    for path in paths:
        _parse(tree, path, [], path)
    chosen = _strategies(strategies, set(_paths(tree)))
    walk = _Walk(mapper.class_.__name__, chosen, raise_others, one)
    walk.repeats = _repeats(mapper, tree, walk.root)
    walk.run(Load(model), model, mapper, tree, "")
    return tuple(merge(walk.options))


def _repeats(mapper: Mapper[Any], tree: _Tree, root: str) -> bool:
    """Whether the loaded graph meets one class hierarchy at two places (the root
    included): then one row may reach the same object twice (``tags.people`` back to
    the root person), and the raise guard must keep what the other place loaded."""
    seen: set[Mapper[Any]] = set()

    def visit(m: Mapper[Any], sub: _Tree, prefix: str) -> bool:
        if m.base_mapper in seen:
            return True
        seen.add(m.base_mapper)
        for key, below in sub.items():
            prop = _relationship(m, key, root, prefix + key)
            if visit(prop.mapper, below, f"{prefix}{key}."):
                return True
        return False

    return visit(mapper, tree, "")


def _mapper(model: object) -> Mapper[Any]:
    """The mapper of a mapped class or ``aliased()`` class; ``TypeError`` for anything else
    (an instance, a ``Mapper``, a relationship attribute: each inspects to something with a
    ``.mapper`` too, and would fail later with an unrelated ``AttributeError``)."""
    try:
        info: Any = sa_inspect(model)
        mapper: Mapper[Any] | None = info.mapper
    except (sa_exc.NoInspectionAvailable, AttributeError):
        info, mapper = None, None
    if mapper is None or not (isinstance(model, type) or info.is_aliased_class):
        msg = f"model must be a mapped class, got {type(model).__name__} {model!r}"
        raise TypeError(msg)
    return mapper


class _Walk:
    """Turn the path tree into loader options, choosing a strategy per relationship."""

    __slots__ = ("chosen", "joined", "one", "options", "raise_others", "repeats", "root")

    def __init__(self, root: str, chosen: Mapping[str, str], raise_others: bool, one: bool):
        self.root = root
        self.repeats = False  # see _repeats
        self.chosen = chosen
        self.raise_others = raise_others
        self.one = one
        self.options: list[ORMOption] = []
        self.joined: list[str] = []  # joined collections (one=True): they must form a chain

    def strategy(self, path: str, prop: RelationshipProperty[Any], below_selectin: bool) -> str:
        named = self.chosen.get(path)
        if named is not None:
            return named
        if not prop.uselist:
            return "joined"
        # one root: join a collection if it extends the joined chain (no cartesian product)
        if (
            self.one
            and not below_selectin
            and all(path.startswith(f"{other}.") for other in self.joined)
        ):
            self.joined.append(path)
            return "joined"
        return "selectin"

    def run(
        self,
        load: Load,
        entity: Any,
        mapper: Mapper[Any],
        tree: _Tree,
        prefix: str,
        below: bool = False,
    ) -> None:
        if self.raise_others:
            self.options.append(raise_rest(load, _not_loaded, self.root, keep_loaded=self.repeats))
            if not prefix:
                self.guard_subclasses(entity, mapper)
        for key, sub in tree.items():
            path = f"{prefix}{key}"
            prop = _relationship(mapper, key, self.root, path)
            attr = getattr(entity, key)  # through an aliased() root too
            strategy = self.strategy(path, prop, below)
            if strategy == "joined":
                # SQLAlchemy cannot splice a nested inner join onto the outer join of a
                # single-table-inheritance target ("assertion failed attempting to produce
                # joined eager loads"): below one, a NOT NULL many-to-one joins outer too
                inner = _inner(prop) and not (prefix and mapper.single)
                child = load.joinedload(attr, innerjoin=inner)
            elif strategy == "selectin":
                child = load.selectinload(attr)
            elif strategy == "subquery":
                child = load.subqueryload(attr)
            else:
                child = load.immediateload(attr)
            if not sub and not self.raise_others:  # else a deeper option carries this chain
                self.options.append(child)
            target = prop.mapper
            self.run(child, target.class_, target, sub, path + ".", below or strategy != "joined")

    def guard_subclasses(self, entity: Any, mapper: Mapper[Any]) -> None:
        """Raise on the relationships that only subclasses of the root class have.

        SQLAlchemy's ``"*"`` wildcard on ``Load(Employee)`` covers ``Employee``'s
        relationships; a subclass's own (``Manager.reports`` on a row of a
        ``select(Employee)``) kept their lazy loading: a silent query per row (a
        ``MissingGreenlet`` in async code). So each gets a raise option of its
        own on ``Load(Sub)``, made to yield to any option the user gives for it
        (no conflict error, whatever the order). The statement is unchanged.

        Below the root the same needs ``relationship.of_type(Sub)``, which
        rewrites the eager load's SQL into a polymorphic subquery: those levels
        keep SQLAlchemy's behaviour (see docs/sqlalchemy.md).
        """
        if sa_inspect(entity).is_aliased_class:
            return  # Load(Sub) does not apply to an aliased root (with_polymorphic is covered)
        for sub in _subclasses(mapper):
            base = Load(sub.class_)
            for prop in _own_relationships(sub):
                attr = getattr(sub.class_, prop.key)
                option = raise_attr(base, attr, _not_loaded, self.root, keep_loaded=self.repeats)
                if option is None:  # pragma: no cover - a SQLAlchemy without it: as before
                    return
                self.options.append(option)
