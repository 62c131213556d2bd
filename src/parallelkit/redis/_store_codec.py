"""RedisStore's values <-> bytes: the serializer's entry format, with errors that name
the store, the key and the type (:class:`~parallelkit.redis.SerializationError`)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from .._cache.store import CacheEntry
from ._common import SerializationError
from ._serializer import Unserializable, decode_entry, encode_entry

if TYPE_CHECKING:
    from ._store import RedisStore

__all__ = ["decode", "encode"]


def encode(store: RedisStore, key: Hashable, entry: CacheEntry[Any], generation: bytes) -> bytes:
    """``entry`` as the bytes ``store`` keeps in Redis, with ``generation``."""
    try:
        return encode_entry(entry, store._serializer, generation)
    except Exception as exc:
        kind = type(entry.value)
        name = exc.type_name if isinstance(exc, Unserializable) else kind.__qualname__
        msg = (
            f"RedisStore {store._namespace!r} cannot store key {key!r}: "
            f"{store._serializer!r} cannot serialize a value of type {name} ({exc}). "
            "Return JSON types, datetime/date/time/UUID/Decimal, dataclasses or "
            "pydantic models from the loader, or choose serializer='pickle' or a "
            "serializer of your own."
        )
        raise SerializationError(msg, namespace=store._namespace, key=key, type_name=name) from exc


def decode(store: RedisStore, key: Hashable, raw: bytes | str) -> CacheEntry[Any] | None:
    """The entry in ``raw`` (what Redis held for ``key``), or ``None``."""
    try:
        return decode_entry(raw, store._serializer)
    except Exception as exc:
        msg = (
            f"RedisStore {store._namespace!r} cannot read key {key!r}: "
            f"{store._serializer!r} failed on the stored bytes ({exc!r}); was it "
            "written with another serializer?"
        )
        raise SerializationError(msg, namespace=store._namespace, key=key, type_name="") from exc
