"""How RedisStore turns values into bytes: the Serializer protocol, JSON, pickle.

The JSON serializer keeps the types a service's loaders commonly return faithful
across the trip through Redis (see :class:`JSONSerializer`); the entry codec
(:func:`encode_entry`, :func:`decode_entry`) puts the value behind a small binary
header with the entry's times and its generation (what ``set_if_unchanged``
compares).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import inspect
import json
import pickle
import struct
import types
import typing
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from typing_extensions import final

from .._cache.store import CacheEntry

__all__ = [
    "GENERATION",
    "JSONSerializer",
    "PickleSerializer",
    "Serializer",
    "decode_entry",
    "Unserializable",
    "encode_entry",
    "placeholder",
    "serializer_from",
]


@runtime_checkable
class Serializer(Protocol):
    """Turns cached values into bytes and back (``RedisStore(serializer=...)``)."""

    def dumps(self, value: Any, /) -> bytes:
        """Return ``value`` as bytes."""
        ...

    def loads(self, data: bytes, /) -> Any:
        """Return the value ``data`` was made from."""
        ...


class Unserializable(TypeError):
    """Internal: the JSON encoder met a value (or a dict key) of a type it cannot write."""

    def __init__(self, value: object, *, key: bool = False) -> None:
        kind = type(value)
        self.type_name = f"{kind.__module__}.{kind.__qualname__}"
        if key:  # JSON would write it as a str: it would come back as another key
            message = (
                f"a dict key of type {kind.__qualname__} ({value!r:.80}) is not a str; JSON "
                "object keys are strings, so it would come back as another key"
            )
        else:
            message = f"Object of type {kind.__qualname__} is not JSON serializable"
        super().__init__(message)


def _type_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _not_init_fields(kind: type) -> frozenset[str]:
    """The fields of a listed dataclass that ``kind(**fields)`` does not take (``init=False``).

    Refuses a class whose constructor needs an argument that is not a field (an
    ``InitVar`` without a default): it is never stored, so no read could rebuild it.
    """
    fields = dataclasses.fields(kind)
    taken = {f.name for f in fields if f.init}
    try:
        parameters = list(inspect.signature(kind).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - no signature to read: trust it
        parameters = []
    for parameter in parameters:
        if (
            parameter.default is parameter.empty
            and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
            and parameter.name not in taken
        ):
            msg = (
                f"types cannot list {_type_name(kind)}: {kind.__qualname__}() requires "
                f"{parameter.name!r}, which is not a field (an InitVar?), so it is never "
                "written to Redis and no read could rebuild the instance; give it a "
                "default or leave the class out of types="
            )
            raise TypeError(msg)
    return frozenset(f.name for f in fields if not f.init)


def _is_tuple(hint: object) -> bool:
    """Whether a field annotated ``hint`` holds a tuple (``tuple[int, ...]``, ``Tuple``,
    or either ``| None``): what JSON writes as a list, to make a tuple again."""
    if hint is tuple:
        return True
    origin = typing.get_origin(hint)
    if origin is tuple:
        return True
    if origin is typing.Union or origin is getattr(types, "UnionType", None):
        others = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return bool(others) and all(_is_tuple(arg) for arg in others)
    return False


def _tuple_fields(kind: type) -> frozenset[str]:
    """The fields of a listed dataclass annotated as tuples (see :func:`_is_tuple`):
    ``kind(**fields)`` checks no types, so they would come back as lists (unequal to
    what was stored, and a frozen instance would no longer hash)."""
    try:
        hints = typing.get_type_hints(kind)
    except Exception:  # annotations that do not resolve here: rebuilt as they are
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(kind) if _is_tuple(hints.get(f.name)))


def _by_field_names(kind: type) -> dict[str, bool]:
    """How to validate a listed pydantic model from the fields ``model_dump()`` gave (by
    field name, not alias): ``by_name=True`` where pydantic has it (2.11+), so a model
    with aliased fields (``Field(alias="customerId")``, nested models too) comes back.
    Older pydantic validates by alias only, unless the model sets ``populate_by_name``."""
    try:
        parameters = inspect.signature(getattr(kind, "model_validate")).parameters  # noqa: B009
    except (TypeError, ValueError):  # pragma: no cover - no signature to read
        return {}
    if "by_name" in parameters and "by_alias" in parameters:
        return {"by_alias": False, "by_name": True}
    return {}  # pragma: no cover - pydantic < 2.11


def _is_model(value: object) -> bool:
    """A pydantic (v2) model instance, recognised without importing pydantic."""
    return callable(getattr(value, "model_dump", None)) and not isinstance(value, type)


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "$datetime": dt.datetime.fromisoformat,
    "$date": dt.date.fromisoformat,
    "$time": dt.time.fromisoformat,
    "$uuid": uuid.UUID,
    "$decimal": decimal.Decimal,
}
_TAGS = frozenset([*_DECODERS, "$dict", "$type"])  # a one-key dict with one of these: escaped


@final
class JSONSerializer:
    """JSON (the default): safe with any Redis, readable with ``redis-cli``.

    What comes back from Redis:

    * JSON types as themselves (``dict`` with ``str`` keys, ``list``, ``str``,
      numbers, ``bool``, ``None``); tuples come back as lists;
    * ``datetime``, ``date``, ``time`` (UTC offset kept; a ``ZoneInfo`` zone comes
      back as that fixed offset), ``UUID`` and ``Decimal``
      as themselves: they are written as one-key objects such as
      ``{"$datetime": "2024-05-01T12:00:00+00:00"}`` (a dict of yours that looks
      like one is escaped, so it comes back unchanged);
    * dataclasses and pydantic models as a ``dict`` of their fields, unless their
      class is listed in ``types=``: then as an instance of that class (rebuilt
      with ``cls(**fields)`` or ``cls.model_validate(fields, by_name=True)``, so
      aliased fields come back too; a dataclass field annotated as a tuple is
      made a tuple again; a dataclass field
      with ``init=False`` is stored too and set back after ``cls(...)``, as a
      frozen dataclass's own ``__init__`` sets its fields). Only listed
      classes are ever built from Redis data, so a Redis writer cannot make a
      process instantiate anything else;
    * SQLAlchemy ``Row`` objects (anything with ``_asdict()``) as a ``dict``.

    Anything else raises :class:`~parallelkit.redis.SerializationError` naming the
    store, the key and the type: convert it in the loader, list it in ``types=``,
    or use ``serializer="pickle"`` / a serializer of your own. That includes a
    ``dict`` with a key that is not a ``str`` (``{101: "open"}``): JSON would
    write ``"101"``, so it would come back as another dict (and ``{1: "a", "1":
    "b"}`` with one entry); the error names the key's type.

    Args:
        types: dataclasses and pydantic model classes to rebuild faithfully.

    Raises:
        TypeError: ``types`` lists something else, or a dataclass whose
            constructor needs an argument that is not a field (an ``InitVar``
            without a default), which no read could pass back.

    Example:
        >>> import datetime, decimal
        >>> s = JSONSerializer()
        >>> s.loads(s.dumps({"at": datetime.date(2024, 5, 1), "total": decimal.Decimal("9.90")}))
        {'at': datetime.date(2024, 5, 1), 'total': Decimal('9.90')}
    """

    __slots__ = ("_by_field", "_by_name", "_names", "_not_init", "_tuples")

    def __init__(self, *, types: Iterable[type] = ()) -> None:
        names: dict[type, str] = {}
        not_init: dict[type, frozenset[str]] = {}
        by_field: dict[type, dict[str, bool]] = {}
        tuples: dict[type, frozenset[str]] = {}
        listed: object = types
        if isinstance(listed, (str, bytes, type)) or not isinstance(listed, Iterable):
            msg = "types must be an iterable of dataclasses or pydantic model classes "
            msg += f"(types=[Invoice]), got {listed!r}"
            raise TypeError(msg)
        for kind in listed:
            if not isinstance(kind, type) or not (
                dataclasses.is_dataclass(kind) or callable(getattr(kind, "model_validate", None))
            ):
                msg = f"types must list dataclasses or pydantic model classes, got {kind!r}"
                raise TypeError(msg)
            names[kind] = _type_name(kind)
            if dataclasses.is_dataclass(kind):
                if later := _not_init_fields(kind):
                    not_init[kind] = later
                if held := _tuple_fields(kind):
                    tuples[kind] = held
            else:
                by_field[kind] = _by_field_names(kind)
        self._names = names
        self._not_init = not_init
        self._by_field = by_field
        self._tuples = tuples
        self._by_name = {name: kind for kind, name in names.items()}

    def dumps(self, value: Any, /) -> bytes:
        """Encode ``value`` as compact UTF-8 JSON (see the class docs for the types)."""
        tagged: list[bool] = []
        text = json.dumps(self._prepare(value, tagged), separators=(",", ":"), ensure_ascii=False)
        # a leading space (still JSON) tells loads() that there are tags to rebuild
        return (" " + text).encode() if tagged else text.encode()

    def loads(self, data: bytes, /) -> Any:
        """Decode JSON bytes, rebuilding the tagged types."""
        if data[:1] == b" ":
            return json.loads(data, object_hook=self._hook)
        return json.loads(data)  # nothing tagged: the C decoder alone

    def _prepare(self, value: Any, tagged: list[bool]) -> Any:
        """``value`` in JSON types, tagged where needed (one walk, then the C encoder)."""
        if value is None or isinstance(value, (str, int, float)):
            return value  # bool is an int; enums on str/int are written as their value
        if isinstance(value, dict):
            prepared: dict[str, Any] = {}
            for key, item in value.items():
                if not isinstance(key, str):  # json.dumps would write str(key), or fail
                    raise Unserializable(key, key=True)
                prepared[key] = self._prepare(item, tagged)
            if len(prepared) == 1 and next(iter(prepared)) in _TAGS:
                tagged.append(True)
                return {"$dict": list(prepared.items())}  # your dict, not a tag
            return prepared
        if isinstance(value, (list, tuple)):
            return [self._prepare(item, tagged) for item in value]
        return self._tag(value, tagged)

    def _tag(self, value: Any, tagged: list[bool]) -> Any:
        if isinstance(value, (dt.date, dt.time, uuid.UUID, decimal.Decimal)):
            tagged.append(True)
            if isinstance(value, dt.datetime):  # before date: a datetime is a date
                return {"$datetime": value.isoformat()}
            if isinstance(value, dt.date):
                return {"$date": value.isoformat()}
            if isinstance(value, dt.time):
                return {"$time": value.isoformat()}
            if isinstance(value, uuid.UUID):
                return {"$uuid": str(value)}
            return {"$decimal": str(value)}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            return self._fields(value, fields, tagged)
        if _is_model(value):
            # a listed model is rebuilt by model_validate: not from its computed fields,
            # which an extra="forbid" model would refuse
            kind = type(value)
            computed = kind in self._names and getattr(kind, "model_computed_fields", None)
            fields = value.model_dump(mode="python", exclude=set(computed) if computed else None)
            return self._fields(value, fields, tagged)
        as_dict = getattr(value, "_asdict", None)
        if callable(as_dict):
            return self._prepare(dict(as_dict()), tagged)
        raise Unserializable(value)

    def _fields(self, value: object, fields: dict[str, Any], tagged: list[bool]) -> Any:
        prepared = self._prepare(fields, tagged)
        name = self._names.get(type(value))
        if name is None:
            return prepared
        tagged.append(True)
        return {"$type": [name, prepared]}

    def _hook(self, obj: dict[str, Any]) -> Any:
        if len(obj) != 1:
            return obj
        ((tag, raw),) = obj.items()
        decoder = _DECODERS.get(tag)
        if decoder is not None:
            return decoder(raw)
        if tag == "$dict":
            return dict(raw)
        if tag == "$type":
            kind = self._by_name.get(raw[0])
            if kind is None:
                return raw[1]  # a type this process does not list: its fields
            if kind in self._by_field:  # a pydantic model: its fields were stored by name
                validate = getattr(kind, "model_validate")  # noqa: B009 - typed as a type
                return validate(raw[1], **self._by_field[kind])
            return self._build(kind, raw[1])
        return obj

    def _build(self, kind: type, fields: dict[str, Any]) -> Any:
        """``kind(**fields)``, then the ``init=False`` fields set as its ``__init__`` would;
        the fields annotated as tuples made tuples again (JSON wrote lists)."""
        held = self._tuples.get(kind)
        if held is not None:
            fields = {
                name: tuple(item) if name in held and isinstance(item, list) else item
                for name, item in fields.items()
            }
        later = self._not_init.get(kind)
        if later is None:
            return kind(**fields)
        instance = kind(**{name: item for name, item in fields.items() if name not in later})
        for name in later & fields.keys():
            object.__setattr__(instance, name, fields[name])  # a frozen dataclass too
        return instance

    def __repr__(self) -> str:
        if not self._names:
            return "JSONSerializer()"
        listed = ", ".join(kind.__qualname__ for kind in self._names)
        return f"JSONSerializer(types=[{listed}])"


@final
class PickleSerializer:
    """pickle: any picklable value, **unsafe with a Redis you do not fully trust**.

    Unpickling runs code chosen by whoever wrote the bytes: anyone who can write
    to your Redis can then run code in every process that reads the cache. Opt in
    only when Redis is private to your service (``serializer="pickle"``).
    """

    __slots__ = ()

    def dumps(self, value: Any, /) -> bytes:
        """Pickle ``value`` with the highest protocol."""
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes, /) -> Any:
        """Unpickle ``data`` (only from a trusted Redis)."""
        return pickle.loads(data)

    def __repr__(self) -> str:
        return "PickleSerializer()"


_CHOICES = ("json", "pickle")


def serializer_from(value: object) -> Serializer:
    """``serializer=``: ``"json"``, ``"pickle"`` or an object with dumps/loads."""
    if isinstance(value, str):
        if value not in _CHOICES:
            listed = ", ".join(repr(c) for c in _CHOICES)
            msg = f"serializer must be one of {listed} or an object with dumps/loads, got {value!r}"
            raise ValueError(msg)
        return JSONSerializer() if value == "json" else PickleSerializer()
    if isinstance(value, type):  # the class has dumps/loads too, unbound: refused by name
        msg = "serializer must be 'json', 'pickle' or an object with dumps/loads, got the class "
        msg += f"{value.__qualname__}: pass an instance ({value.__qualname__}())"
        raise TypeError(msg)
    if isinstance(value, Serializer):
        return value
    msg = (
        "serializer must be 'json', 'pickle' or an object with dumps(value) -> bytes "
        f"and loads(bytes) -> value, got {value!r}"
    )
    raise TypeError(msg)


# one version byte, a 16-byte generation, then loaded_at, fresh_until, stale_until
# (little-endian doubles), then the serialized value
_HEADER = struct.Struct("<B16sddd")
_VERSION = 2
#: The bytes a generation occupies at the start of a stored value (version + 16).
GENERATION = 17
_NO_GENERATION = bytes(16)


def encode_entry(
    entry: CacheEntry[Any], serializer: Serializer, generation: bytes = _NO_GENERATION
) -> bytes:
    """The bytes stored in Redis: version, generation, the three times, the value."""
    header = _HEADER.pack(
        _VERSION, generation, entry.loaded_at, entry.fresh_until, entry.stale_until
    )
    data: object = serializer.dumps(entry.value)  # typed bytes; a user's may not be
    if not isinstance(data, (bytes, bytearray, memoryview)):
        msg = f"{serializer!r}.dumps returned {type(data).__qualname__}, not bytes"
        raise TypeError(msg)
    return header + data


def placeholder(generation: bytes) -> bytes:
    """A value that holds only a generation (a load in flight, nothing stored yet)."""
    return bytes([_VERSION]) + generation


def decode_entry(raw: bytes | str, serializer: Serializer) -> CacheEntry[Any] | None:
    """The entry :func:`encode_entry` wrote, or ``None`` (another format, a placeholder)."""
    if not isinstance(raw, bytes):  # pragma: no cover - guarded in RedisStore.__init__
        raw = raw.encode()
    if len(raw) < _HEADER.size or raw[0] != _VERSION:
        return None  # another format or a placeholder: a miss
    _, _, loaded_at, fresh_until, stale_until = _HEADER.unpack_from(raw)
    return CacheEntry(serializer.loads(raw[_HEADER.size :]), loaded_at, fresh_until, stale_until)
