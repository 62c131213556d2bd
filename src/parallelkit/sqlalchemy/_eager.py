"""eager(): loader options that pick joined vs selectin per relationship, and raise on the rest.

The options are plain SQLAlchemy loader options. The one private piece is the
"raise with a useful message" strategy: a subclass of SQLAlchemy's lazy loader
registered as ``lazy="parallelkit_raise"`` that behaves exactly like
``lazy="raise"`` but raises :class:`NotLoadedError`, which names the attribute and
the ``eager(...)`` path that would have loaded it. If a future SQLAlchemy moves
the internals it relies on, :func:`eager` falls back to the stock ``raiseload``
(same behaviour, SQLAlchemy's generic message); the test suite checks the message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeAlias

from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Load, Mapper, RelationshipProperty
from sqlalchemy.orm.interfaces import MANYTOONE, ORMOption
from typing_extensions import final

from .._core.errors import ParallelkitError

__all__ = ["EagerPath", "NotLoadedError", "Strategy", "eager"]

Strategy: TypeAlias = Literal["joined", "selectin", "subquery", "immediate"]
"""A loader strategy name accepted in ``eager(..., strategies={path: name})``."""

EagerPath: TypeAlias = str | Mapping[str, Any]
"""A dotted path (``"contact.company"``) or a nested dict (``{"contact": {"company": None}}``)."""

_STRATEGIES: frozenset[str] = frozenset(("joined", "selectin", "subquery", "immediate"))
_RAISE_KEY = "parallelkit_raise"
_Tree: TypeAlias = dict[str, "_Tree"]


@final
class NotLoadedError(ParallelkitError, sa_exc.InvalidRequestError):
    """A relationship that ``eager(..., raise_others=True)`` did not load was touched.

    Raised on attribute access, *before* any I/O, instead of a lazy load (which
    would be an N+1 query in sync code and a ``MissingGreenlet`` in async code).
    It is also a :class:`sqlalchemy.exc.InvalidRequestError`, the class SQLAlchemy's
    own ``raiseload`` raises, so existing handlers keep working.

    Attributes:
        attribute: ``"Model.attr"``, the relationship that was touched.
        root: the class the loaded object graph starts from (``eager``'s first argument).
        path: the dotted path to pass to :func:`eager` to load it.
    """

    def __init__(self, attribute: str, root: str, path: str) -> None:
        self.attribute = attribute
        self.root = root
        self.path = path
        super().__init__(
            f"{attribute} was not loaded: it is not among the eager(...) paths and "
            f"raise_others=True forbids a lazy load (an extra query per object; in async "
            f"code a MissingGreenlet error). Ask for it: eager({root}, {path!r}, ...)"
        )


def _install_raise_strategy() -> bool:
    """Register ``lazy="parallelkit_raise"``; ``False`` if SQLAlchemy's internals moved."""
    try:
        from sqlalchemy.orm import strategies

        # the lazy loader class: `_LazyLoader` in SQLAlchemy 2.1, `LazyLoader` in 2.0
        names = ("_LazyLoader", "LazyLoader")
        base: Any = next(c for c in (getattr(strategies, n, None) for n in names) if c)
        if not callable(getattr(base, "_invoke_raise_load", None)):  # pragma: no cover
            return False

        class _RaiseLoader(base):  # type: ignore[misc]
            def __init__(self, parent: Any, strategy_key: Any) -> None:
                super().__init__(parent, strategy_key)
                self._raise_always = True

            def _invoke_raise_load(self, state: Any, passive: Any, lazy: Any) -> None:
                raise _not_loaded(state, self.key)

        RelationshipProperty.strategy_for(lazy=_RAISE_KEY)(_RaiseLoader)
    except Exception:  # pragma: no cover - fall back to stock raiseload
        return False
    return True


def _not_loaded(state: Any, key: str) -> NotLoadedError:
    """Build the error from the instance's load path (root -> ... -> this object)."""
    names: list[str] = []
    root = state.class_.__name__
    load_path = getattr(state, "load_path", None)
    elements = tuple(getattr(load_path, "path", ()) or ())
    if elements:
        root = elements[0].class_.__name__
        names = [e.key for e in elements if isinstance(e, RelationshipProperty)]
    names.append(key)
    return NotLoadedError(f"{state.class_.__name__}.{key}", root, ".".join(names))


_CUSTOM_RAISE = _install_raise_strategy()


def _raise_rest(load: Load) -> Load:
    if _CUSTOM_RAISE:
        return load._set_relationship_strategy("*", {"lazy": _RAISE_KEY})
    return load.raiseload("*")  # pragma: no cover - see _install_raise_strategy


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
    if prop is not None:
        return prop
    known = ", ".join(sorted(mapper.relationships.keys())) or "(none)"
    what = "a column, not a relationship" if key in mapper.columns else "not a relationship"
    msg = (
        f"eager({root}, {path!r}): {mapper.class_.__name__}.{key} is {what}; "
        f"{mapper.class_.__name__}'s relationships are: {known}"
    )
    raise ValueError(msg)


def default_strategy(prop: RelationshipProperty[Any]) -> str:
    """The strategy :func:`eager` picks for a relationship: collections -> selectin."""
    return "selectin" if prop.uselist else "joined"


def _inner(prop: RelationshipProperty[Any]) -> bool:
    """An inner join is safe only for many-to-one with every local FK column NOT NULL."""
    return (
        prop.direction is MANYTOONE
        and not prop.uselist
        and bool(prop.local_columns)
        and all(not column.nullable for column in prop.local_columns)
    )


def eager(
    model: Any,
    /,
    *paths: EagerPath,
    raise_others: bool = True,
    strategies: Mapping[str, Strategy] | None = None,
) -> tuple[ORMOption, ...]:
    """Loader options that load exactly the relationships you name, in few queries.

    Name the relationships a request needs, as dotted paths from ``model``;
    ``eager`` checks each name against the mappers now (a typo fails here, not at
    the first request) and picks the loader strategy per relationship:

    * many-to-one and one-to-one -> ``joinedload`` (an inner join when every
      foreign-key column is ``NOT NULL``, so the planner can use it freely);
    * collections (one-to-many, many-to-many) -> ``selectinload`` (one extra
      ``SELECT ... WHERE parent_id IN (...)`` per collection level, no row
      multiplication).

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

    Returns:
        A tuple of loader options: ``select(M).options(*eager(M, ...))`` or
        ``session.get(M, pk, options=eager(M, ...))``.

    Raises:
        ValueError: an unknown relationship name (the message lists the existing
            ones), a malformed path, an unknown strategy or a strategy for a path
            that was not requested.
        TypeError: ``model`` is not mapped or a path is not a str / dict.

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
    try:
        info = sa_inspect(model)
        mapper: Mapper[Any] = info.mapper
    except (sa_exc.NoInspectionAvailable, AttributeError):
        msg = f"model must be a mapped class, got {model!r}"
        raise TypeError(msg) from None
    root = mapper.class_.__name__
    tree: _Tree = {}
    for path in paths:
        _parse(tree, path, [], path)
    chosen = dict(strategies or {})
    requested = set(_paths(tree))
    for key, name in chosen.items():
        if name not in _STRATEGIES:
            msg = f"strategies[{key!r}] must be one of {sorted(_STRATEGIES)}, got {name!r}"
            raise ValueError(msg)
        if key not in requested:
            msg = f"strategies key {key!r} is not a requested path; requested: {sorted(requested)}"
            raise ValueError(msg)
    options: list[ORMOption] = []
    _walk(Load(model), model, mapper, tree, "", root, chosen, raise_others, options)
    return tuple(options)


def _walk(
    load: Load,
    entity: Any,
    mapper: Mapper[Any],
    tree: _Tree,
    prefix: str,
    root: str,
    chosen: Mapping[str, str],
    raise_others: bool,
    options: list[ORMOption],
) -> None:
    if raise_others:
        options.append(_raise_rest(load))
    for key, sub in tree.items():
        path = f"{prefix}{key}"
        prop = _relationship(mapper, key, root, path)
        attr = getattr(entity, key)  # through an aliased() root too
        strategy = chosen.get(path) or default_strategy(prop)
        if strategy == "joined":
            child = load.joinedload(attr, innerjoin=_inner(prop))
        elif strategy == "selectin":
            child = load.selectinload(attr)
        elif strategy == "subquery":
            child = load.subqueryload(attr)
        else:
            child = load.immediateload(attr)
        if not sub and not raise_others:  # else a deeper option carries this chain
            options.append(child)
        target = prop.mapper
        _walk(child, target.class_, target, sub, path + ".", root, chosen, raise_others, options)
