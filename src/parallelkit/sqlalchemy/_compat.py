"""The one place parallelkit touches SQLAlchemy internals: the "raise with a useful message" loader.

Everything else in :mod:`parallelkit.sqlalchemy` uses SQLAlchemy's public API
(loader options, events, sessions). SQLAlchemy's public ``raiseload`` raises its
own ``InvalidRequestError("'Contact.conversations' is not available due to
lazy='raise'")``; to raise :class:`~parallelkit.sqlalchemy.NotLoadedError`
instead (the attribute *and* the ``eager(...)`` path that would load it) takes
these private names, all here:

* the lazy loader class (``_LazyLoader`` in SQLAlchemy 2.1, ``LazyLoader`` in
  2.0), its ``_invoke_raise_load`` hook and its ``_load_for_state(state,
  passive, loadopt=...)``, subclassed as the ``lazy="parallelkit_raise"``
  strategy;
* ``Load._set_relationship_strategy``, the method behind the public
  ``Load.raiseload``, to select that strategy for ``"*"``, and, with its
  ``_reconcile_to_other=True`` (what SQLAlchemy's own ``selectin_polymorphic``
  uses), for one relationship of a subclass in a way that any other option for
  that relationship overrides (:func:`raise_attr`: a wildcard does not reach a
  relationship that only a subclass has);
* the lazy loader's ``create_row_processor(context, ..., populators)`` and its
  ``populators["new"]`` entries ``(key, fn(state, dict_, row))``: the raise callable
  is not installed over a value the same row already loaded along another path;
  and, where every object an entity's rows reach is new to the session (the
  ``QueryContext``'s ``populate_existing``, ``refresh_state``, ``yield_per``,
  ``load_options._is_user_refresh``, ``runid``, ``partials`` and
  ``session.identity_map``), one entry per entity puts every raise callable (the
  lazy loader's own ``_LoadLazyAttribute``) into ``InstanceState.callables`` at
  once, instead of one entry per relationship: one call per row, not one per row
  and relationship (with a ``populators["eager"]`` entry for an object the session
  got before the rows were read; not for a class with ``refresh`` listeners, which
  that entry would call). If these move, each relationship installs its
  own, as before;
* ``Load.context`` / ``path`` / ``additional_source_entities`` / ``_generate()``,
  for :func:`merge`: ``eager``'s options as one ``Load`` (each loader element
  once), which SQLAlchemy applies exactly as the separate ones;
* the ``path`` of the loader option SQLAlchemy hands to ``_load_for_state``
  (``Conversation -> contact -> Contact -> *``), for the message: it is the
  path of the query that applied the option, also for an object that an earlier
  query of the session had already loaded; ``InstanceState.load_path`` (the
  path of the query that loaded the object *first*) is only the fallback;
* ``InstanceState.load_options`` / ``load_path`` and the ``_current_path``
  compile option, for :func:`carry`: what SQLAlchemy's own lazy loader does so
  that a statement loading a relationship of an object carries the options of
  the query that loaded the object (``eager``'s raise guard among them).

One more, read-only, for the pool deadlock check of
:func:`~parallelkit.sqlalchemy.parallel` and the fan-outs on a lent slot
(:mod:`parallelkit.sqlalchemy._pool_deadlock`): ``QueuePool._max_overflow``
(:func:`pool_capacity`). The check needs the most connections the pool can ever give
(``pool_size + max_overflow``), and SQLAlchemy has no public reading of
``max_overflow``: ``Pool.size()``, ``checkedout()``, ``checkedin()``, ``overflow()``
(the overflow connections open *now*) and ``status()`` do not give it, and the
``create_engine()`` arguments are not kept. Who holds which connection, the other
half of the check, comes from the pool's public ``checkout`` / ``checkin`` /
``detach`` events (:mod:`parallelkit.sqlalchemy._pool_checkouts`). It is only read on
a rare path (a task holding a slot of the engine's limiter, the pool out of
connections); if it moves, :func:`pool_capacity` answers ``None``, the check refuses
nothing and the fan-out waits for the pool as before. And the pool's ``dispatch.checkout``
listeners (:func:`checkout_listeners`), read when a limiter is made, so that engines
made again over one pool (passing ``execution_options`` copies) share one watch
instead of adding listeners for good; if it moves, each adds its own, as before.

Nothing happens at import: the strategy is registered with SQLAlchemy the first
time :func:`raise_rest` is called (the first ``eager(..., raise_others=True)``),
and the registration is inert: it only applies to statements that carry the
option. If a SQLAlchemy release moves these names, :func:`raise_rest` falls back
to the stock ``raiseload("*")`` (same behaviour, SQLAlchemy's generic message)
and ``tests/test_sqlalchemy_compat.py`` fails on that release, loudly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Load, RelationshipProperty
from sqlalchemy.pool import Pool, QueuePool

__all__ = [
    "KEEP_OPT",
    "RAISE_KEY",
    "ROOT_OPT",
    "OnRaise",
    "available",
    "carried",
    "carry",
    "checkout_listeners",
    "ends_on",
    "merge",
    "path_keys",
    "pool_capacity",
    "raise_attr",
    "raise_rest",
]

RAISE_KEY = "parallelkit_raise"

ROOT_OPT = "parallelkit_root"
"""The raise option's local option naming ``eager``'s root class: SQLAlchemy files an
option under the class that *declares* a relationship (``Load(Vip).joinedload(Vip.manager)``
gives a path from ``Person``), so the loader path alone can lose a subclass root."""

KEEP_OPT = "parallelkit_keep_loaded"
"""The raise option's local option saying one row may reach the same object at two
places of the loaded graph (a class met twice): the raise callable must then not
replace a value the row already loaded along the other path."""

OnRaise = Callable[[Any, str, Any, "str | None"], BaseException]
"""``on_raise(state, key, path, root)``: the error for ``state.key`` (``path``: see
:func:`path_keys`; ``root``: the root class name the option carries, if any)."""

_lock = threading.Lock()
_state: dict[str, Any] = {"registered": None}  # None: not tried yet; then True / False
_on_raise: list[OnRaise] = []


class _Raise(Exception):
    """Internal: the raise-loader refused a load; ``_load_for_state`` turns it into the error."""


def _register() -> bool:
    from sqlalchemy.orm import strategies

    names = ("_LazyLoader", "LazyLoader")  # 2.1, 2.0
    base: Any = next((c for c in (getattr(strategies, n, None) for n in names) if c), None)
    if base is None or not all(
        callable(getattr(base, name, None)) for name in ("_invoke_raise_load", "_load_for_state")
    ):
        return False
    if not callable(getattr(Load, "_set_relationship_strategy", None)):
        return False
    # the per-object callable SQLAlchemy's own lazy loader installs (``None``: a release
    # that moved it; then every relationship installs its own, as SQLAlchemy does)
    lazy_attribute: Any = getattr(strategies, "_LoadLazyAttribute", None) or getattr(
        strategies, "LoadLazyAttribute", None
    )  # 2.1, 2.0

    class _RaiseLoader(base):  # type: ignore[misc]
        def __init__(self, parent: Any, strategy_key: Any) -> None:
            super().__init__(parent, strategy_key)
            self._raise_always = True

        def _load_for_state(self, state: Any, passive: Any, loadopt: Any = None, **kw: Any) -> Any:
            # ``loadopt`` is the option that put this strategy on ``state`` in the query
            # that loaded (or refreshed) it last: its path, not the object's first one
            try:
                return super()._load_for_state(state, passive, loadopt=loadopt, **kw)
            except _Raise:
                path = getattr(loadopt, "path", None) or getattr(state, "load_path", None)
                root = (getattr(loadopt, "local_opts", None) or {}).get(ROOT_OPT)
                raise _on_raise[0](state, self.key, path, root) from None

        def _invoke_raise_load(self, state: Any, passive: Any, lazy: Any) -> None:
            raise _Raise

        def create_row_processor(
            self,
            context: Any,
            query_entity: Any,
            path: Any,
            loadopt: Any,
            mapper: Any,
            result: Any,
            adapter: Any,
            populators: Any,
        ) -> None:
            # the lazy loader's row processor installs the raise callable on each new
            # object: one call per object *and* relationship. Where every object this
            # entity's rows reach is new (see _one_call), one call per object installs
            # them all instead
            local = getattr(loadopt, "local_opts", None) or {}
            new = populators["new"]
            if lazy_attribute is not None and not local.get(KEEP_OPT):
                installer = _install_all(populators, self.key, context, mapper)
                if installer is not None:
                    installer.callables[self.key] = lazy_attribute(self.key, self, loadopt, None)
                    return
            start = len(new)
            super().create_row_processor(
                context, query_entity, path, loadopt, mapper, result, adapter, populators
            )
            # when one row reaches the same object along two paths (``org.people`` back
            # to the root person), a requested path may have loaded that value already:
            # keep it. Only for the graphs where that can happen (KEEP_OPT: a class met
            # twice): elsewhere no call per row is added
            if not local.get(KEEP_OPT) or getattr(context, "populate_existing", False):
                return  # (a refresh resets what it does not load, as SQLAlchemy does)
            for index in range(start, len(new)):
                key, populate = new[index]
                if key == self.key:
                    new[index] = (key, _keep_loaded(key, populate))

    RelationshipProperty.strategy_for(lazy=RAISE_KEY)(_RaiseLoader)
    return True


def _one_call(context: Any, mapper: Any) -> bool:
    """Whether one call per object can install every raise callable of an entity's rows.

    SQLAlchemy calls a ``populators["new"]`` entry for every object this statement
    creates, but for an object the session already held (partly loaded) only if the
    entry's key is not loaded. So only when the session holds no object yet (its first
    statement, as in a request's fresh session), no ``yield_per``, and nothing is
    refreshed (``populate_existing``, a refresh) or met twice in one row (:data:`KEEP_OPT`,
    checked by the caller). Objects can still reach the session before the rows are
    read (the result read after another statement, a server-side cursor read in
    partitions, a ``subqueryload`` or a ``load`` handler's query): :class:`_InstallAll`
    covers them, with a ``populators["eager"]`` entry that makes SQLAlchemy partly
    populate even a fully loaded one, which fires its ``refresh`` event (with no
    attributes): so not for a class with ``refresh`` listeners. Anything else installs
    one callable per relationship, as SQLAlchemy does.
    """
    try:
        return not (
            context.populate_existing
            or mapper.always_refresh
            or context.refresh_state is not None
            or context.yield_per
            or context.load_options._is_user_refresh
            or mapper.class_manager.dispatch.refresh
            or len(context.session.identity_map)
        )
    except (AttributeError, TypeError):  # pragma: no cover - a SQLAlchemy that moved them
        return False


class _InstallAll:
    """The ``populators`` entries that install all of an entity's raise callables at once.

    ``populate``, in ``populators["new"]``, puts them on each object the statement
    creates: one call per row. An object the session got before the rows were read
    (another statement run first, a ``load`` event handler's: see :func:`_one_call`)
    gets, as from SQLAlchemy's own entries, a callable for each relationship it has not
    loaded: SQLAlchemy calls ``populate`` for it only if the entry's key is not loaded,
    and ``held`` (in ``populators["eager"]``, called only for such objects) only if it is.
    """

    __slots__ = ("callables", "held", "populate")

    def __init__(self, context: Any) -> None:
        callables: dict[str, Any] = {}
        runid = context.runid

        def held(state: Any, dict_: Any, row: Any) -> None:
            unloaded = context.partials.get(state, ())  # what it had not loaded
            for key, fn in callables.items():
                if key in unloaded and key not in dict_:
                    if "callables" not in state.__dict__:
                        state.callables = {}
                    state.callables[key] = fn

        def populate(state: Any, dict_: Any, row: Any) -> None:
            if state.runid != runid:  # an object held before
                held(state, dict_, row)
            elif "callables" in state.__dict__:
                state.callables.update(callables)
            else:
                state.callables = callables.copy()

        self.callables = callables
        self.held = held
        self.populate = populate


def _install_all(populators: Any, key: str, context: Any, mapper: Any) -> _InstallAll | None:
    """The entity's :class:`_InstallAll`, whose entries its first relationship added
    (under that one's key); ``None`` when :func:`_one_call` says no."""
    for _, populate in reversed(populators["new"]):
        installer = getattr(populate, "parallelkit_install_all", None)
        if installer is not None:
            return installer  # type: ignore[no-any-return]
    if not _one_call(context, mapper):
        return None
    installer = _InstallAll(context)
    installer.populate.parallelkit_install_all = installer  # type: ignore[attr-defined]
    populators["new"].append((key, installer.populate))
    populators["eager"].append((key, installer.held))
    return installer


def _keep_loaded(key: str, populate: Any) -> Any:
    """``populate`` (installs the raise callable) unless this row already loaded ``key``."""

    def keep_loaded(state: Any, dict_: Any, row: Any) -> None:
        if key not in dict_:
            populate(state, dict_, row)

    return keep_loaded


def available(on_raise: OnRaise) -> bool:
    """Register the strategy once (thread-safe); whether the custom message is available."""
    if _state["registered"] is None:
        with _lock:
            if _state["registered"] is None:
                _on_raise[:] = [on_raise]
                try:
                    _state["registered"] = _register()
                except Exception:  # pragma: no cover - a future SQLAlchemy: stock raiseload
                    _state["registered"] = False
    return bool(_state["registered"])


def _opts(root: str | None, keep_loaded: bool) -> dict[str, Any] | None:
    opts: dict[str, Any] = {}
    if root is not None:
        opts[ROOT_OPT] = root
    if keep_loaded:
        opts[KEEP_OPT] = True
    return opts or None


def _other_root(load: Load, root: str | None) -> str | None:
    """``root`` unless ``load``'s path starts at that class (the message then reads it from
    the path): an option without local options adds less to each statement's cache key."""
    start, _ = path_keys(getattr(load, "path", None))
    return None if start is not None and start.__name__ == root else root


def merge(options: list[Any]) -> list[Any]:
    """``options`` with each run of :class:`~sqlalchemy.orm.Load` objects that start at one
    entity made one ``Load`` holding each of their loader elements once, in order.

    ``eager`` builds one ``Load`` per branch and level of its tree, each repeating the
    elements of the levels above it (``contact``, then ``contact`` + ``company``, ...).
    SQLAlchemy applies the elements in turn either way (the same element twice is a
    no-op), so one ``Load`` is the same statement, whose cache key, computed at every
    execution (and for each ``selectin`` statement), covers each element once. The
    options are returned unchanged where a ``Load`` does not look as expected.
    """
    out: list[Any] = []
    lead: Any = None
    elements: dict[int, Any] = {}
    try:
        for option in options:
            if type(option) is not Load or option.additional_source_entities:
                out.append(option)
                lead = None
                continue
            if lead is None or option.path[0] is not lead:
                lead, elements = option.path[0], {}
                out.append(option._generate())
            merged = out[-1]
            for element in option.context:
                elements.setdefault(id(element), element)
            merged.context = tuple(elements.values())
            merged.propagate_to_loaders = merged.propagate_to_loaders or option.propagate_to_loaders
    except (
        AttributeError,
        TypeError,
        IndexError,
    ):  # pragma: no cover - a SQLAlchemy that moved them
        return list(options)
    return out


def raise_rest(
    load: Load, on_raise: OnRaise, root: str | None = None, *, keep_loaded: bool = False
) -> Load:
    """``load.raiseload("*")``, raising ``on_raise(state, key, path, root)`` when the strategy
    exists; ``root`` (the name of ``eager``'s root class) travels with the option, and
    ``keep_loaded`` (see :data:`KEEP_OPT`)."""
    if available(on_raise):
        opts = _opts(_other_root(load, root), keep_loaded)
        return load._set_relationship_strategy("*", {"lazy": RAISE_KEY}, opts=opts)
    return load.raiseload("*")  # pragma: no cover - see available()


def raise_attr(
    load: Load, attr: Any, on_raise: OnRaise, root: str | None = None, *, keep_loaded: bool = False
) -> Load | None:
    """``load`` raising ``on_raise(...)`` on the one relationship ``attr``; yields to other options.

    Any other option for the same relationship (the user's ``selectinload``)
    wins over this one, in whatever order they are given. ``None`` when the
    custom strategy or the private argument is not available (then nothing
    is added: the relationship keeps its own lazy loading, as before).
    """
    if not available(on_raise):  # pragma: no cover - see available()
        return None
    try:
        option: Load = load._set_relationship_strategy(
            attr,
            {"lazy": RAISE_KEY},
            opts=_opts(_other_root(load, root), keep_loaded),
            _reconcile_to_other=True,
        )
    except TypeError:  # pragma: no cover - a future SQLAlchemy without the argument
        return None
    return option


def carried(state: Any) -> tuple[tuple[Any, ...], Any]:
    """The loader options of the query that loaded ``state`` (the ones that propagate to
    its lazy loads: ``eager``'s among them) and its loader path; ``()`` when none.

    They survive an expiry (a rollback, a commit, ``session.expire``): SQLAlchemy's
    refresh of the object applies them again, and so must a statement that
    re-loads it.
    """
    return tuple(getattr(state, "load_options", ()) or ()), getattr(state, "load_path", None)


def carry(stmt: Any, options: tuple[Any, ...], path: Any, prop: RelationshipProperty[Any]) -> Any:
    """``stmt`` (loading ``prop``'s target) with ``options`` applied as if at ``path``
    ``-> prop``: what SQLAlchemy's lazy loader does for the same relationship (so
    ``eager``'s raise guard and eager loads reach the objects it loads)."""
    if not options or path is None:
        return stmt
    from sqlalchemy.orm import context

    names = ("_ORMCompileState", "ORMCompileState")  # 2.1, 2.0
    orm: Any = next((c for c in (getattr(context, n, None) for n in names) if c), None)
    if orm is None:  # pragma: no cover - a future SQLAlchemy: the statement as before
        return stmt
    stmt = stmt.options(*options)  # a copy: the cached plan's statement is untouched
    # a select() never run has Core's compile options; the ORM's take the loader path
    compile_options = orm.default_compile_options.safe_merge(stmt._compile_options)
    stmt._compile_options = compile_options + {"_current_path": path[prop]}
    return stmt


def ends_on(path: Any) -> str | None:
    """The relationship a loader path ends on (``A -> rel -> B``: ``"rel"``); ``None`` for
    a wildcard path (``A -> "relationship:*"``)."""
    for element in reversed(tuple(getattr(path, "path", ()) or ())):
        if isinstance(element, RelationshipProperty):
            return str(element.key)
        if isinstance(element, str):  # a token
            return None
    return None


def path_keys(path: Any) -> tuple[type[Any] | None, list[str]]:
    """The root class and the relationship keys of a loader path (empty if unknown)."""
    elements = tuple(getattr(path, "path", ()) or ())
    if not elements:
        return None, []
    root = getattr(elements[0], "class_", None)
    return root, [e.key for e in elements if isinstance(e, RelationshipProperty)]


def pool_capacity(pool: Pool) -> int | None:
    """Most connections ``pool`` ever has checked out at once: ``pool_size +
    max_overflow`` of a ``QueuePool``; ``None`` when there is no such bound (unlimited
    overflow, ``NullPool``) or it is one shared connection (``StaticPool``)."""
    if not isinstance(pool, QueuePool):
        return None
    overflow = getattr(pool, "_max_overflow", -1)
    if not isinstance(overflow, int) or overflow < 0:
        return None
    return pool.size() + overflow


def checkout_listeners(pool: Pool) -> list[Any]:
    """The functions listening to ``pool``'s ``checkout`` event (``pool.dispatch``, not
    public): how one watch per pool is kept (``_pool_checkouts``). Empty if it moves:
    then a new watch is added, as before."""
    try:
        return list(pool.dispatch.checkout)
    except (AttributeError, TypeError):  # pragma: no cover - a SQLAlchemy that moved it
        return []
