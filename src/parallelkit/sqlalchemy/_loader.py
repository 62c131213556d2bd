"""loader_by_id: the DataLoader recipe for the ORM, on :class:`parallelkit.BatchLoader`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from enum import Enum
from typing import Any, TypeVar

from sqlalchemy import BigInteger, Integer, Numeric, SmallInteger, select, tuple_
from sqlalchemy import Enum as SAEnum
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session
from sqlalchemy.orm.interfaces import ORMOption

from .._batch.loader import BatchLoader
from .._core.check import callable_, count, flag
from ._eager import _mapper
from ._peers_group import keys_per_statement

__all__ = ["loader_by_id"]

M = TypeVar("M")
_NO_ROW: Any = object()


def loader_by_id(
    session_factory: Callable[[], AsyncSession],
    model: type[M],
    /,
    *,
    options: Sequence[ORMOption] = (),
    max_batch: int = 500,
    cache: bool = False,
) -> BatchLoader[Any, M | None]:
    """A :class:`~parallelkit.BatchLoader` that loads ``model`` rows by primary key.

    Every ``await loader.load(pk)`` issued in the same scheduling tick (by any
    number of concurrent tasks) becomes **one** ``SELECT ... WHERE id IN (...)``
    in a fresh session from ``session_factory``: 500 concurrent handlers asking
    for "their" contact send one query, not 500. Duplicate keys are loaded once;
    more than ``max_batch`` distinct keys are split into several queries. A key
    with no row loads as ``None`` (like ``session.get``). A key of the wrong
    type (``"2"`` for an integer key, a bare value for a composite key) fails
    its own callers with a :class:`TypeError`, before the query: it is not
    sent, so it can neither fail the whole batch in the driver nor come back as
    ``None`` when the database converted it and found the row. A key that no row
    can have (``2.5`` or ``2**70`` for an integer key, or an int past PostgreSQL's
    ``integer`` range) loads as ``None`` without being sent, for the same reason;
    ``2.0`` and ``Decimal(2)`` are sent as ``2``.

    The objects come back detached (their session is closed when the batch is
    done): load what you will read with ``options``, e.g.
    ``options=eager(Contact, "company")``; anything else raises on access.

    Args:
        session_factory: an ``async_sessionmaker`` (for an ``async_scoped_session``,
            its ``session_factory``: the scope's own session is left alone).
        model: the mapped class; a composite primary key takes tuples as keys.
        options: loader options for the query (``eager(...)``, ``load_only(...)``).
        max_batch: the most keys per batch; one batch is one query, or several when the
            database caps a statement's bound parameters lower (PostgreSQL: 32,767).
        cache: memoize rows for the loader's lifetime (per request, typically).

    Returns:
        A ``BatchLoader``; enter it with ``async with`` before calling ``load``.

    Raises:
        TypeError: ``model`` is not mapped, ``session_factory`` is not callable, or
            an option has the wrong type.
        ValueError: ``max_batch < 1``.

    Example:
        ```python
        async with loader_by_id(session_factory, Contact,
                                options=eager(Contact, "company")) as contacts:
            found = await pk.gather(*(contacts.load(i) for i in contact_ids))  # 1 query
        ```
    """
    callable_("session_factory", session_factory, what="callable (an async_sessionmaker)")
    if isinstance(session_factory, async_scoped_session):
        # calling it gives the scope's one session (the caller's), which a batch would
        # close: each batch gets a session of its own from the factory behind it
        session_factory = session_factory.session_factory
    max_batch = count("max_batch", max_batch)
    flag("cache", cache)
    mapper = _mapper(model)
    columns = mapper.primary_key
    composite = len(columns) > 1
    key_of = mapper.primary_key_from_instance
    opts = _options(options)
    bad_key = _key_check(model.__name__, [(str(c.key), _python_type(c)) for c in columns])
    kinds = [c.type for c in columns]
    canon = _canonical(kinds, composite)

    async def load_many(keys: list[Any]) -> dict[Any, M | TypeError | None]:
        found: dict[Any, M | TypeError | None] = {}
        for key in keys:
            error = bad_key(key)
            if error is not None:
                found[key] = error
        good = [key for key in keys if key not in found] if found else keys
        if not good:
            return found
        async with session_factory() as session:
            bits = _int_bits(session)
            sent: list[Any] = []
            for key in good:  # a key no row can have is answered None, not sent
                parts = key if composite else (key,)
                values = [_sendable(v, t, bits) for v, t in zip(parts, kinds, strict=True)]
                if any(value is _NO_ROW for value in values):
                    found[key] = None
                else:
                    sent.append(tuple(values) if composite else values[0])
            if not sent:
                return found
            if canon is not None:  # keys a row may answer under another spelling
                asked = [(key, canon(key)) for key in good if key not in found]
            # a max_batch past the database's cap on bound parameters: several statements
            size = keys_per_statement(_dialect(session), len(columns), len(sent))
            rows: list[M] = []
            for start in range(0, len(sent), size):
                part = sent[start : start + size]
                where = tuple_(*columns).in_(part) if composite else columns[0].in_(part)
                # unique(): SQLAlchemy refuses a joined collection (joinedload, eager's
                # strategies={path: "joined"}) without it, failing the whole batch
                result = await session.scalars(select(model).where(where).options(*opts))
                rows.extend(result.unique().all())
        for row in rows:
            found[tuple(key_of(row)) if composite else key_of(row)[0]] = row
        if canon is not None:
            # an Enum member's name, a float for a Numeric key: the row comes back
            # under the key SQLAlchemy gives it (the member, a Decimal)
            for key, same in asked:
                if key not in found and same in found:
                    found[key] = found[same]
        return found

    loader: BatchLoader[Any, M | None] = BatchLoader(
        load_many, max_batch=max_batch, cache=cache, default=None
    )
    return loader


def _dialect(session: AsyncSession) -> str:
    """The name of the session's database dialect (``""`` when it has no single bind)."""
    bind = session.bind
    return "" if bind is None else str(bind.dialect.name)


def _int_bits(session: AsyncSession) -> int:
    """The widest integer the session's database takes (PostgreSQL: by column type)."""
    bind = session.bind
    return 0 if bind is not None and bind.dialect.name == "postgresql" else 64


def _sendable(value: Any, kind: Any, bits: int) -> object:
    """``value`` as the driver takes it for an integer key column; ``_NO_ROW`` if no row has it.

    A non-integral number (``2.5``, NaN) or an integer out of the column's range
    would only make the driver fail the whole batch, every caller with it; an
    integral ``Decimal`` or float is sent as the ``int`` it equals.
    """
    number_like = isinstance(value, numbers.Number) and not isinstance(value, bool)
    if not number_like or not isinstance(kind, Integer):
        return value
    try:
        number: int = math.trunc(value)
        if number != value:
            return _NO_ROW
    except (ArithmeticError, ValueError, TypeError):  # NaN, infinity, a complex number
        return _NO_ROW
    if not bits:  # PostgreSQL: int2, int4 or int8 by the column's type
        bits = 16 if isinstance(kind, SmallInteger) else 64 if isinstance(kind, BigInteger) else 32
    return number if -(2 ** (bits - 1)) <= number < 2 ** (bits - 1) else _NO_ROW


def _canonical(kinds: list[Any], composite: bool) -> Callable[[Any], Any] | None:
    """The key as the row gives it back, for key columns that take other spellings:
    a name for an ``Enum`` column (what SQLAlchemy binds; the row has the member), a
    float for a ``Numeric`` one (the row has a ``Decimal``). ``None``: no such column."""
    parts: list[Callable[[Any], Any] | None] = [_spelling(kind) for kind in kinds]
    if not any(parts):
        return None

    def canon(key: Any) -> Any:
        values = key if composite else (key,)
        out = tuple(f(v) if f else v for f, v in zip(parts, values, strict=True))
        return out if composite else out[0]

    return canon


def _spelling(kind: Any) -> Callable[[Any], Any] | None:
    if isinstance(kind, SAEnum):
        members = kind.enum_class
        if members is None or kind.values_callable is not None:
            return None  # plain strings, or values stored: the row gives back what was sent
        names = members.__members__

        def member(value: Any) -> Any:
            return names.get(value, value) if isinstance(value, str) else value

        return member
    if isinstance(kind, Numeric) and not isinstance(kind, Integer) and kind.asdecimal:

        def decimal(value: Any) -> Any:
            return Decimal(repr(value)) if isinstance(value, float) else value

        return decimal
    return None


def _python_type(column: Any) -> type[Any] | None:
    """The Python type of a key column's values; ``None`` when the type does not say."""
    try:
        kind = column.type.python_type
    except NotImplementedError:
        return None
    return kind if isinstance(kind, type) else None


def _fits(value: object, kind: type[Any] | None) -> bool:
    """``value`` can stand for a key of type ``kind`` (any number for a numeric key)."""
    if value is None or kind is None or isinstance(value, kind) or issubclass(kind, Enum):
        return True  # an Enum column also takes its members' names and values
    return issubclass(kind, numbers.Number) and isinstance(value, numbers.Number)


def _key_check(
    model: str, parts: list[tuple[str, type[Any] | None]]
) -> Callable[[object], TypeError | None]:
    """A function giving the ``TypeError`` for a key that cannot be ``model``'s primary key."""
    names = ", ".join(name for name, _ in parts)

    def check(key: object) -> TypeError | None:
        if len(parts) > 1:
            if not isinstance(key, tuple) or len(key) != len(parts):
                msg = (
                    f"loader_by_id({model}): a key is a tuple of {len(parts)} values "
                    f"({names}), got {type(key).__name__} {key!r}"
                )
                return TypeError(msg)
            values: tuple[object, ...] = key
        else:
            values = (key,)
        for value, (name, kind) in zip(values, parts, strict=True):
            if not _fits(value, kind):
                assert kind is not None
                msg = (
                    f"loader_by_id({model}): {name} must be {kind.__name__}, got "
                    f"{type(value).__name__} {value!r} in key {key!r}"
                )
                return TypeError(msg)
        return None

    return check


def _options(options: object) -> tuple[ORMOption, ...]:
    """``options`` as a tuple, every item a statement option (checked now, not per batch)."""
    if isinstance(options, (str, bytes, ORMOption)) or not isinstance(options, Iterable):
        msg = (
            "options must be a sequence of loader options (eager(...), load_only(...)), "
            f"got {type(options).__name__} {options!r}"
        )
        raise TypeError(msg)
    opts = tuple(options)
    for index, option in enumerate(opts):
        if not isinstance(option, ORMOption):
            msg = (
                f"options[{index}] must be a loader option (eager(...), load_only(...)), "
                f"got {type(option).__name__} {option!r}"
            )
            raise TypeError(msg)
    return opts
