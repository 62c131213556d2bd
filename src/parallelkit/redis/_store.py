"""RedisStore: a Store for SWRCache shared by every process, with single flight."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from redis.asyncio import Redis
from typing_extensions import final

from .._cache.store import CacheEntry, MemoryStore
from .._core.check import number
from ._common import (
    OUTAGE_ERRORS,
    Outage,
    RedisUnavailable,
    is_outage,
    validate_client,
    validate_lease_seconds,
    validate_name,
)
from ._lock import Lease

__all__ = ["JSONSerializer", "PickleSerializer", "RedisStore", "RedisStoreStats", "Serializer"]

# one version byte, then loaded_at, fresh_until, stale_until (little-endian doubles)
_HEADER = struct.Struct("<Bddd")
_VERSION = 1
_MAX_KEY = 200  # longer key reprs are replaced by their SHA-256


@runtime_checkable
class Serializer(Protocol):
    """Turns cached values into bytes and back (``RedisStore(serializer=...)``)."""

    def dumps(self, value: Any, /) -> bytes:
        """Return ``value`` as bytes."""
        ...

    def loads(self, data: bytes, /) -> Any:
        """Return the value ``data`` was made from."""
        ...


@final
class JSONSerializer:
    """JSON (the default): safe with any Redis, readable with ``redis-cli``.

    Values must be JSON types (``dict`` with ``str`` keys, ``list``, ``str``,
    numbers, ``bool``, ``None``); tuples come back as lists. Convert your models
    (``model.model_dump()``, ``dataclasses.asdict``) in the loader, or use a custom
    serializer.
    """

    __slots__ = ()

    def dumps(self, value: Any, /) -> bytes:
        """Encode ``value`` as compact UTF-8 JSON."""
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(self, data: bytes, /) -> Any:
        """Decode JSON bytes."""
        return json.loads(data)

    def __repr__(self) -> str:
        return "JSONSerializer()"


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


@final
@dataclass(frozen=True, slots=True)
class RedisStoreStats:
    """Counters of a :class:`~parallelkit.redis.RedisStore`, for this process.

    Attributes:
        errors: Redis outage errors absorbed (or raised, with ``strict=True``).
        degraded: operations served by local memory because Redis was down.
        recoveries: times Redis answered again after an outage.
        lease_waits: loads that waited for another process's lease.
    """

    errors: int
    degraded: int
    recoveries: int
    lease_waits: int


def _serializer(value: object) -> Serializer:
    if value == "json":
        return JSONSerializer()
    if value == "pickle":
        return PickleSerializer()
    if isinstance(value, Serializer):
        return value
    msg = f"serializer must be 'json', 'pickle' or an object with dumps/loads, got {value!r}"
    raise TypeError(msg)


def encode_entry(entry: CacheEntry[Any], serializer: Serializer) -> bytes:
    """The bytes stored in Redis: a version byte, the three times, the value."""
    header = _HEADER.pack(_VERSION, entry.loaded_at, entry.fresh_until, entry.stale_until)
    return header + serializer.dumps(entry.value)


def decode_entry(raw: bytes | str, serializer: Serializer) -> CacheEntry[Any] | None:
    """The entry :func:`encode_entry` wrote, or ``None`` for another format version."""
    if not isinstance(raw, bytes):  # pragma: no cover - guarded in RedisStore.__init__
        raw = raw.encode()
    if len(raw) < _HEADER.size or raw[0] != _VERSION:
        return None  # another format: a miss, overwritten by the next load
    _, loaded_at, fresh_until, stale_until = _HEADER.unpack_from(raw)
    return CacheEntry(serializer.loads(raw[_HEADER.size :]), loaded_at, fresh_until, stale_until)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@final
class RedisStore:
    """A :class:`~parallelkit.Store` in Redis: one cache for every replica.

    With ``SWRCache(store=RedisStore(redis))``, all processes share the entries
    *and* their freshness (the times travel with the value and use the wall
    clock, ``clock = time.time``), so a value loaded by one replica is a fresh hit
    in all of them. Entries expire in Redis after ``fresh + stale``.

    **Single flight across processes.** The cache already runs one load per key
    per process; the store's :meth:`load_lock` extends that to all processes: the
    first to miss takes a lease on the key (``SET NX PX`` with a random token,
    renewed while its load runs), the others poll until it is released (at most
    ``poll`` seconds apart, never longer than the lease has left), then find the
    fresh value and do not load. The same holds for background refreshes: one
    refresh per stale key across processes. A lease holder that dies lets another
    process take over after ``lease`` seconds.

    **Redis outage.** When Redis cannot be reached, the store degrades instead of
    failing: reads and writes go to a bounded in-process memory
    (``local_maxsize`` entries), so the cache keeps serving by calling its loader
    and remembering locally; single flight is then per process only. Errors are
    counted in :attr:`stats`; for ``retry_after`` seconds after an error the
    store does not even try Redis; then the first success switches back (and
    forgets the local entries). With ``strict=True`` an outage raises
    :class:`~parallelkit.redis.RedisUnavailable` instead.

    Keys are ``{prefix}:{namespace}:v:{repr(key)}`` (a SHA-256 for reprs over 200
    characters): use keys whose ``repr`` is the same in every process (``str``,
    ``int``, tuples of them: what ``@cache.cached`` builds).

    Args:
        redis: a ``redis.asyncio.Redis`` client created with
            ``decode_responses=False`` (the default): values are bytes.
        namespace: separates caches sharing one Redis (and what :meth:`clear`
            deletes).
        prefix: the first part of every key.
        serializer: ``"json"`` (default), ``"pickle"`` (unsafe with an untrusted
            Redis) or an object with ``dumps(value) -> bytes`` and
            ``loads(bytes) -> value``.
        lease: seconds a dead loader's lease blocks other processes; renewed
            while the load runs.
        poll: the longest pause between two checks while waiting for a lease.
        strict: raise :class:`~parallelkit.redis.RedisUnavailable` on an outage
            instead of degrading to local memory.
        local_maxsize: entries kept in local memory during an outage.
        retry_after: seconds to stay degraded after an outage error.

    Example:
        ```python
        cache = pk.SWRCache(fresh=30, stale=300, store=RedisStore(redis, namespace="crm"))
        ```
    """

    clock: ClassVar[Callable[[], float]] = staticmethod(time.time)

    __slots__ = (
        "_lease",
        "_lease_prefix",
        "_lease_waits",
        "_local",
        "_namespace",
        "_outage",
        "_poll",
        "_redis",
        "_serializer",
        "_strict",
        "_value_prefix",
        "degraded",
    )

    def __init__(
        self,
        redis: Redis,
        /,
        *,
        namespace: str = "cache",
        prefix: str = "pk",
        serializer: Literal["json", "pickle"] | Serializer = "json",
        lease: float = 10.0,
        poll: float = 0.02,
        strict: bool = False,
        local_maxsize: int = 1000,
        retry_after: float = 1.0,
    ) -> None:
        validate_client(redis)
        pool = getattr(redis, "connection_pool", None)
        if getattr(pool, "connection_kwargs", {}).get("decode_responses"):
            msg = "RedisStore needs a client with decode_responses=False (values are bytes)"
            raise ValueError(msg)
        self._redis = redis
        self._namespace = validate_name(namespace, "namespace")
        validate_name(prefix, "prefix")
        self._value_prefix = f"{prefix}:{namespace}:v:"
        self._lease_prefix = f"{prefix}:{namespace}:l:"
        self._serializer = _serializer(serializer)
        self._lease = validate_lease_seconds(lease, "lease")
        poll_s = number("poll", poll, finite=True)
        retry_s = number("retry_after", retry_after, finite=True)
        self._poll = poll_s
        self._strict = bool(strict)
        self._local = MemoryStore(local_maxsize)
        self._outage = Outage(retry_s)
        self._lease_waits = 0
        self.degraded = 0

    # -- introspection ------------------------------------------------------------
    @property
    def errors(self) -> int:
        """Redis outage errors seen so far (also in :attr:`stats`)."""
        return self._outage.errors

    @property
    def stats(self) -> RedisStoreStats:
        """A frozen snapshot of the counters."""
        return RedisStoreStats(
            errors=self._outage.errors,
            degraded=self.degraded,
            recoveries=self._outage.recoveries,
            lease_waits=self._lease_waits,
        )

    @property
    def namespace(self) -> str:
        """The namespace of this store's keys."""
        return self._namespace

    @property
    def serializer(self) -> Serializer:
        """The value serializer."""
        return self._serializer

    def __repr__(self) -> str:
        state = "degraded" if self._outage.down else "ok"
        return (
            f"RedisStore(namespace={self._namespace!r}, serializer={self._serializer!r}, "
            f"{state}, errors={self._outage.errors})"
        )

    def redis_key(self, key: Hashable) -> str:
        """The Redis key holding the entry for ``key``."""
        text = repr(key)
        if len(text) > _MAX_KEY:
            text = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        return self._value_prefix + text

    # -- outage handling ------------------------------------------------------------
    def _failed(self, exc: BaseException, what: str) -> None:
        self._outage.failed(exc)
        if self._strict:
            msg = f"RedisStore: Redis unreachable during {what} (strict=True)"
            raise RedisUnavailable(msg) from exc
        self.degraded += 1

    def _skip(self, what: str) -> bool:
        """True when Redis is presumed down: serve from local memory."""
        if not self._outage.down:
            return False
        if self._strict:
            msg = f"RedisStore: Redis unreachable during {what} (strict=True)"
            raise RedisUnavailable(msg) from self._outage.last_error
        self.degraded += 1
        return True

    def _ok(self) -> None:
        if self._outage.succeeded():
            self._local = MemoryStore(self._local.maxsize)  # Redis is the truth again

    # -- Store protocol -------------------------------------------------------------
    async def get(self, key: Hashable) -> CacheEntry[Any] | None:
        """Return the entry for ``key`` or ``None`` (absent, expired or Redis down)."""
        if self._skip("get"):
            return await self._local.get(key)
        try:
            raw = await self._redis.get(self.redis_key(key))
        except OUTAGE_ERRORS as exc:
            if not is_outage(exc):
                raise
            self._failed(exc, "get")
            return await self._local.get(key)
        self._ok()
        if raw is None:
            return None
        return decode_entry(raw, self._serializer)

    async def set(self, key: Hashable, entry: CacheEntry[Any], *, ttl: float) -> None:
        """Store ``entry``; Redis drops it after ``ttl`` seconds."""
        data = encode_entry(entry, self._serializer)
        if self._skip("set"):
            await self._local.set(key, entry, ttl=ttl)
            return
        try:
            await self._redis.set(self.redis_key(key), data, px=max(1, round(ttl * 1000)))
        except OUTAGE_ERRORS as exc:
            if not is_outage(exc):
                raise
            self._failed(exc, "set")
            await self._local.set(key, entry, ttl=ttl)
            return
        self._ok()

    async def delete(self, key: Hashable) -> None:
        """Forget ``key`` in Redis (and in local memory)."""
        await self._local.delete(key)
        if self._skip("delete"):
            return
        try:
            await self._redis.delete(self.redis_key(key))
        except OUTAGE_ERRORS as exc:
            if not is_outage(exc):
                raise
            self._failed(exc, "delete")
            return
        self._ok()

    async def clear(self) -> None:
        """Forget every key of this store's namespace (``SCAN`` + ``UNLINK``)."""
        await self._local.clear()
        if self._skip("clear"):
            return
        pattern = _glob_escape(self._value_prefix) + "*"
        try:
            batch: list[bytes] = []
            async for name in self._redis.scan_iter(match=pattern, count=500):
                batch.append(name)
                if len(batch) >= 500:
                    await self._redis.unlink(*batch)
                    batch.clear()
            if batch:
                await self._redis.unlink(*batch)
        except OUTAGE_ERRORS as exc:
            if not is_outage(exc):
                raise
            self._failed(exc, "clear")
            return
        self._ok()

    def load_lock(self, key: Hashable) -> _LoadLock:
        """Hold ``key``'s lease across processes around one load (single flight).

        Waits while another process holds the lease: as long as that holder is
        alive (it renews the lease), and at most ``lease`` seconds after it died.
        If Redis is down, it is entered at once without a lease.
        """
        return _LoadLock(self, key)


@final
class _LoadLock:
    """``RedisStore.load_lock(key)``: the lease around one cross-process load."""

    __slots__ = ("_key", "_lease", "_store")

    def __init__(self, store: RedisStore, key: Hashable) -> None:
        self._store = store
        self._key = key
        self._lease: Lease | None = None

    async def __aenter__(self) -> None:
        store = self._store
        if store._skip("load_lock"):
            return
        name = store.redis_key(self._key)[len(store._value_prefix) :]
        lease = Lease(
            store._redis,
            name,
            store._lease_prefix + name,
            None,
            ttl=store._lease,
            blocking=True,
            timeout=None,
            poll=store._poll,
            cancel_on_loss=False,
        )
        try:
            waited = await lease._enter()
        except RedisUnavailable as exc:
            store._failed(exc.__cause__ or exc, "load_lock")
            return
        if waited:
            store._lease_waits += 1
        store._ok()
        self._lease = lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        lease, self._lease = self._lease, None
        if lease is None:
            return False
        return await lease.__aexit__(exc_type, exc, tb)
