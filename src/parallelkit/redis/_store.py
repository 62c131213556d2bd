"""RedisStore: a Store for SWRCache shared by every process, with a near cache."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal

from anyio.abc import TaskStatus
from redis.asyncio import Redis
from typing_extensions import Self, final

from .._cache.store import CacheEntry, MemoryStore
from .._core.check import count, count_or_none, flag, number, number_at_least, number_or_none, text
from .._core.owned import OwnedTaskGroup
from ._common import SerializationError, validate_client
from ._lease import Lease, LeaseScripts
from ._near import CLEAR, NearCache, invalidation
from ._outage import Down, Guard
from ._serializer import (
    GENERATION,
    Serializer,
    Unserializable,
    decode_entry,
    encode_entry,
    placeholder,
    serializer_from,
)

__all__ = ["RedisStore", "RedisStoreStatistics", "RedisStoreStats"]

Arg = bytes | str | int | float  # what a script argument may be
_MAX_KEY = 200  # longer key reprs are replaced by their SHA-256
_TOKEN_TTL_MS = 600_000  # a load's generation outlives any sane load (10 minutes)

# KEYS[1] the entry; ARGV[1] the value (or "" to delete), ARGV[2] ttl (ms), ARGV[3]
# the channel, ARGV[4] the message. Writes (or deletes) and tells every near cache.
_WRITE = """
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
# KEYS[1] the entry; ARGV[1] a fresh placeholder (version + generation), ARGV[2] its
# ttl (ms). Returns the entry's current version + generation, creating one if absent.
_TOKEN = """
local head = redis.call('GETRANGE', KEYS[1], 0, 16)
if string.len(head) == 17 and string.byte(head, 1) == string.byte(ARGV[1], 1) then
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return head
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""
# KEYS[1] the entry; ARGV[1] the expected version + generation, then as _WRITE's
# ARGV[1..4] shifted by one. 1 if stored, 0 if the generation changed meanwhile.
_WRITE_IF = """
if redis.call('GETRANGE', KEYS[1], 0, 16) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""


@final
@dataclass(frozen=True, slots=True)
class RedisStoreStatistics:
    """Counters of a :class:`~parallelkit.redis.RedisStore`, for this process.

    Attributes:
        errors: Redis outage errors (timeouts included) absorbed, or raised with
            ``strict=True``.
        degraded: operations served by local memory because Redis was down.
        recoveries: times Redis answered again after an outage.
        lease_waits: loads that had to wait for another process's lease.
        hits: reads that found an entry (in Redis, or local memory when degraded).
        near_hits: reads served from the near cache, with no round trip.
        misses: reads that found no entry.
        timeouts: Redis commands that did not answer within ``command_timeout``.
        near_size: entries in the near cache now.
        near_invalidations: invalidation messages received.
        near_resets: times the near cache was emptied because its subscription
            was lost or re-established (messages may have been missed).
        listening: whether the near cache is subscribed (serving) now.
    """

    errors: int
    degraded: int
    recoveries: int
    lease_waits: int
    hits: int = 0
    near_hits: int = 0
    misses: int = 0
    timeouts: int = 0
    near_size: int = 0
    near_invalidations: int = 0
    near_resets: int = 0
    listening: bool = False


#: The former name of :class:`RedisStoreStatistics` (``store.stats``), kept as an alias.
RedisStoreStats = RedisStoreStatistics


@final
class _Token:
    """What :meth:`RedisStore.load_token` hands out: the generation, or the local epoch."""

    __slots__ = ("epoch", "head")

    def __init__(self, head: bytes | None, epoch: int) -> None:
        self.head = head  # None: taken while Redis was down
        self.epoch = epoch


@final
class RedisStore:
    """A :class:`~parallelkit.Store` in Redis: one cache for every replica.

    With ``SWRCache(store=RedisStore(redis))``, all processes share the entries
    *and* their freshness (the times travel with the value and use the wall
    clock, ``clock = time.time``), so a value loaded by one replica is a fresh hit
    in all of them. Entries expire in Redis after ``fresh + stale``.

    **Near cache.** Enter the store (``async with store:``, next to the cache) and
    it keeps the entries it read in process memory (at most ``near_maxsize``,
    oldest dropped first), so a hot key's hit costs no round trip. Every write of
    any replica (``set``, ``delete``/``invalidate``, ``clear``, a load) publishes
    an invalidation on a Redis channel that every entered store listens to, so an
    invalidation reaches every replica within milliseconds. When a message may
    have been lost (the subscription broke or was re-established, or a ``PING``
    went unanswered for ``command_timeout``) the near cache is emptied, and in any
    case an entry is served from memory for at most ``near_ttl`` seconds after it
    was read from Redis: that is the bound on staleness. Not entered, the store
    keeps no near cache (every read is one ``GET``).

    **Single flight across processes.** The cache already runs one load per key
    per process; the store's :meth:`load_lock` extends that to all processes: the
    first to miss takes a lease on the key (``SET NX PX`` with a random token,
    renewed while its load runs), the others poll until it is released (at most
    ``poll`` seconds apart, never longer than the lease has left), then find the
    fresh value and do not load. The same holds for background refreshes. A lease
    holder that dies lets another process take over after ``lease`` seconds.

    **Invalidation wins, across processes.** Every entry carries a generation that
    each ``set``, ``delete`` and ``clear`` replaces; a load stores its value with
    :meth:`set_if_unchanged` only if the generation it saw when it started is
    still there, so an invalidation by any process is never undone by a load
    that started before it.

    **Redis outage or hang.** When Redis cannot be reached, or a command does not
    answer within ``command_timeout``, the store degrades instead of failing:
    reads and writes go to a bounded in-process memory (``local_maxsize``
    entries), so the cache keeps serving by calling its loader and remembering
    locally; single flight is then per process only. For ``retry_after`` seconds
    the store does not even try Redis (a hung Redis costs one ``command_timeout``,
    not one per call); then one call tries again, and its success switches back
    (and forgets the local entries). With ``strict=True`` an outage raises
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
        serializer: ``"json"`` (default, see
            :class:`~parallelkit.redis.JSONSerializer` for the types it keeps),
            ``"pickle"`` (unsafe with an untrusted Redis) or an object with
            ``dumps(value) -> bytes`` and ``loads(bytes) -> value``.
        lease: seconds a dead loader's lease blocks other processes; renewed
            while the load runs (at least 0.01).
        poll: the longest pause between two checks while waiting for a lease.
        strict: raise :class:`~parallelkit.redis.RedisUnavailable` on an outage
            instead of degrading to local memory.
        local_maxsize: entries kept in local memory during an outage.
        retry_after: seconds to stay degraded after an outage error.
        near_maxsize: entries kept in the near cache; ``None`` turns it off.
        near_ttl: the longest an entry is served from the near cache.
        command_timeout: seconds one Redis command may take before Redis counts
            as down; ``None`` leaves it to the client's own timeouts.

    Example:
        ```python
        store = RedisStore(redis, namespace="crm")
        cache = pk.SWRCache(fresh=30, stale=300, store=store)
        async with store, cache:
            ...
        ```
    """

    clock: ClassVar[Callable[[], float]] = staticmethod(time.time)

    __slots__ = (
        "_channel",
        "_guard",
        "_hits",
        "_lease",
        "_lease_prefix",
        "_lease_scripts",
        "_lease_waits",
        "_local",
        "_local_epoch",
        "_misses",
        "_namespace",
        "_near",
        "_owner",
        "_poll",
        "_redis",
        "_serializer",
        "_strict",
        "_token_script",
        "_value_prefix",
        "_write_if_script",
        "_write_script",
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
        near_maxsize: int | None = 1000,
        near_ttl: float = 5.0,
        command_timeout: float | None = 1.0,
    ) -> None:
        validate_client(redis)
        pool = getattr(redis, "connection_pool", None)
        if getattr(pool, "connection_kwargs", {}).get("decode_responses"):
            msg = "RedisStore needs a client with decode_responses=False (values are bytes)"
            raise ValueError(msg)
        self._redis = redis
        self._namespace = text("namespace", namespace)
        text("prefix", prefix)
        self._serializer = serializer_from(serializer)
        self._lease = number_at_least("lease", lease, 0.01)
        self._poll = number("poll", poll)
        self._strict = flag("strict", strict)
        self._local = MemoryStore(count("local_maxsize", local_maxsize))
        retry_s = number("retry_after", retry_after)
        self._near = NearCache(
            f"{prefix}:{namespace}:inv",
            count_or_none("near_maxsize", near_maxsize),
            number("near_ttl", near_ttl),
        )
        self._guard = Guard(
            timeout=number_or_none("command_timeout", command_timeout),
            retry_after=retry_s,
            on_recovery=self._recovered,
        )
        self._value_prefix = f"{prefix}:{namespace}:v:"
        self._lease_prefix = f"{prefix}:{namespace}:l:"
        self._channel = self._near.channel
        self._lease_scripts = LeaseScripts(redis)
        self._write_script = redis.register_script(_WRITE)
        self._write_if_script = redis.register_script(_WRITE_IF)
        self._token_script = redis.register_script(_TOKEN)
        self._owner = OwnedTaskGroup(f"RedisStore {namespace!r}")
        self._local_epoch = 0
        self._lease_waits = self._hits = self._misses = 0
        self.degraded = 0

    # -- lifecycle (the near cache's subscription) -----------------------------------
    async def __aenter__(self) -> Self:
        """Start the near cache's subscription; returns once it is up (or has failed)."""
        tg = await self._owner.enter()
        if self._near.enabled:
            try:
                await tg.start(self._listen)
            except BaseException:
                await self._owner.exit(None, None, None, cancel=True)
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Stop the subscription and empty the near cache."""
        try:
            return await self._owner.exit(exc_type, exc, tb, cancel=True)
        finally:
            self._near.reset(listening=False)

    async def _listen(self, *, task_status: TaskStatus[None]) -> None:
        await self._near.listen_forever(
            self._redis,
            timeout=self._guard.timeout,
            retry_after=self._guard.retry_after,
            task_status=task_status,
        )

    # -- introspection ------------------------------------------------------------
    @property
    def errors(self) -> int:
        """Redis outage errors seen so far (also in :meth:`statistics`)."""
        return self._guard.errors

    def statistics(self) -> RedisStoreStatistics:
        """Return a frozen snapshot of the counters."""
        near = self._near
        return RedisStoreStatistics(
            errors=self._guard.errors,
            degraded=self.degraded,
            recoveries=self._guard.recoveries,
            lease_waits=self._lease_waits,
            hits=self._hits,
            near_hits=near.hits,
            misses=self._misses,
            timeouts=self._guard.timeouts,
            near_size=len(near.entries),
            near_invalidations=near.invalidations,
            near_resets=near.resets,
            listening=near.listening,
        )

    @property
    def stats(self) -> RedisStoreStatistics:
        """The same snapshot as :meth:`statistics` (the former spelling, kept)."""
        return self.statistics()

    @property
    def namespace(self) -> str:
        """The namespace of this store's keys."""
        return self._namespace

    @property
    def serializer(self) -> Serializer:
        """The value serializer."""
        return self._serializer

    def __repr__(self) -> str:
        state = "degraded" if self._guard.down else "ok"
        return (
            f"RedisStore(namespace={self._namespace!r}, serializer={self._serializer!r}, "
            f"{state}, errors={self._guard.errors})"
        )

    def redis_key(self, key: Hashable) -> str:
        """The Redis key holding the entry for ``key``."""
        return self._value_prefix + self._name(key)

    def _name(self, key: Hashable) -> str:
        text = repr(key)
        if len(text) > _MAX_KEY:
            text = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        return text

    # -- outage handling -------------------------------------------------------------
    def _degrade(self, down: Down) -> None:
        """Redis is down: raise (``strict=True``) or count a degraded operation."""
        if self._strict:
            error = down.unavailable(f"RedisStore {self._namespace!r}", "strict=True")
            raise error from down.cause
        self.degraded += 1

    def _recovered(self) -> None:
        self._local = MemoryStore(self._local.maxsize)  # Redis is the truth again

    # -- values <-> bytes --------------------------------------------------------------
    def _encode(self, key: Hashable, entry: CacheEntry[Any], generation: bytes) -> bytes:
        try:
            return encode_entry(entry, self._serializer, generation)
        except Exception as exc:
            kind = type(entry.value)
            name = exc.type_name if isinstance(exc, Unserializable) else kind.__qualname__
            msg = (
                f"RedisStore {self._namespace!r} cannot store key {key!r}: "
                f"{self._serializer!r} cannot serialize a value of type {name} ({exc}). "
                "Return JSON types, datetime/date/time/UUID/Decimal, dataclasses or "
                "pydantic models from the loader, or choose serializer='pickle' or a "
                "serializer of your own."
            )
            raise SerializationError(
                msg, namespace=self._namespace, key=key, type_name=name
            ) from exc

    def _decode(self, key: Hashable, raw: bytes | str) -> CacheEntry[Any] | None:
        try:
            return decode_entry(raw, self._serializer)
        except Exception as exc:
            msg = (
                f"RedisStore {self._namespace!r} cannot read key {key!r}: "
                f"{self._serializer!r} failed on the stored bytes ({exc!r}); was it "
                "written with another serializer?"
            )
            raise SerializationError(msg, namespace=self._namespace, key=key, type_name="") from exc

    # -- Store protocol -------------------------------------------------------------
    def peek(self, key: Hashable) -> CacheEntry[Any] | None:
        """The entry for ``key`` from the near cache, or ``None`` (then use :meth:`get`).

        No I/O: this is the hit path of a hot key.
        """
        near = self._near
        item = near.entries.get(key)
        if item is not None and near.timer() < item[1]:
            near.hits += 1
            return item[0]
        return None

    async def get(self, key: Hashable) -> CacheEntry[Any] | None:
        """Return the entry for ``key`` from Redis, or ``None`` (absent, expired).

        Reads Redis (never the near cache) and keeps what it read in the near
        cache. Redis down: local memory.
        """
        name = self._name(key)
        near = self._near
        seq = near.seq
        try:
            raw = await self._guard.call("get", self._redis.get(self._value_prefix + name))
        except Down as down:
            self._degrade(down)
            entry = await self._local.get(key)
        else:
            entry = None if raw is None else self._decode(key, raw)
            if entry is not None:
                near.put(key, name, entry, seq)
        if entry is None:
            self._misses += 1
        else:
            self._hits += 1
        return entry

    async def set(self, key: Hashable, entry: CacheEntry[Any], *, ttl: float) -> None:
        """Store ``entry`` (a new generation); Redis drops it after ``ttl`` seconds."""
        data = self._encode(key, entry, uuid.uuid4().bytes)
        await self._write(key, entry, data, ttl)

    async def delete(self, key: Hashable) -> None:
        """Forget ``key`` in Redis, in every near cache and in local memory."""
        await self._local.delete(key)
        await self._write(key, None, b"", 0)

    async def _write(
        self, key: Hashable, entry: CacheEntry[Any] | None, data: bytes, ttl: float
    ) -> None:
        """Set (``data``) or delete (``b""``) in Redis; publish; local memory if down."""
        name = self._name(key)
        self._local_epoch += 1
        self._near.drop(key, name)
        args: list[Arg] = [data, max(1, round(ttl * 1000)), self._channel, invalidation(name)]
        command = self._write_script(keys=[self._value_prefix + name], args=args)
        try:
            await self._guard.call("set" if data else "delete", command)
        except Down as down:
            self._degrade(down)
            if entry is not None:
                await self._local.set(key, entry, ttl=ttl)

    async def clear(self) -> None:
        """Forget every key of this store's namespace (``SCAN`` + ``UNLINK``)."""
        self._local_epoch += 1
        self._near.reset(listening=self._near.listening)
        await self._local.clear()
        pattern = _glob_escape(self._value_prefix) + "*"
        try:
            cursor = 0
            while True:
                scan = self._redis.scan(cursor, match=pattern, count=500)
                cursor, names = await self._guard.call("clear", scan)
                if names:
                    await self._guard.call("clear", self._redis.unlink(*names))
                if not cursor:
                    break
            await self._guard.call("clear", self._redis.publish(self._channel, CLEAR))
        except Down as down:
            self._degrade(down)

    # -- loads: single flight and "invalidation wins" ---------------------------------
    def load_lock(self, key: Hashable) -> _LoadLock:
        """Hold ``key``'s lease across processes around one load (single flight).

        Waits while another process holds the lease: as long as that holder is
        alive (it renews the lease), and at most ``lease`` seconds after it died.
        If Redis is down, it is entered at once without a lease.
        """
        return _LoadLock(self, key)

    async def load_token(self, key: Hashable) -> object:
        """Mark the start of a load of ``key``: pass the result to :meth:`set_if_unchanged`.

        The token is the entry's generation in Redis (created if the key is
        absent), so any ``set``, ``delete`` or ``clear`` by any process after this
        call makes the load's conditional set fail.
        """
        epoch = self._local_epoch
        name = self._name(key)
        fresh = placeholder(uuid.uuid4().bytes)
        command = self._token_script(keys=[self._value_prefix + name], args=[fresh, _TOKEN_TTL_MS])
        try:
            head = await self._guard.call("load_token", command)
        except Down as down:
            self._degrade(down)
            return _Token(None, epoch)
        return _Token(bytes(head), epoch)

    async def set_if_unchanged(
        self, key: Hashable, entry: CacheEntry[Any], *, ttl: float, token: object
    ) -> bool:
        """Store ``entry`` only if ``key`` was not written or deleted since ``token``.

        Returns:
            Whether the entry was stored. ``False`` when any process set, deleted
            or cleared the key after :meth:`load_token` (the load is outdated),
            and when the load started while Redis was down and Redis is back (its
            view of other processes' invalidations is unknown).
        """
        if not isinstance(token, _Token):
            msg = f"token must come from RedisStore.load_token, got {token!r}"
            raise TypeError(msg)
        name = self._name(key)
        if token.head is None:  # the load started while Redis was down
            if not self._guard.down:
                return False
            return await self._set_locally(key, entry, ttl, token)
        data = self._encode(key, entry, token.head[1:GENERATION])
        self._near.drop(key, name)
        ms = max(1, round(ttl * 1000))
        args: list[Arg] = [token.head, data, ms, self._channel, invalidation(name)]
        command = self._write_if_script(keys=[self._value_prefix + name], args=args)
        try:
            return bool(await self._guard.call("set", command))
        except Down as down:
            self._degrade(down)
            return await self._set_locally(key, entry, ttl, token)

    async def _set_locally(
        self, key: Hashable, entry: CacheEntry[Any], ttl: float, token: _Token
    ) -> bool:
        """Degraded: store unless this process wrote or deleted anything since the token."""
        if token.epoch != self._local_epoch:
            return False
        await self._local.set(key, entry, ttl=ttl)
        return True


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


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
        name = store._name(self._key)

        def waiting() -> None:
            store._lease_waits += 1

        lease = Lease(
            store._lease_scripts,
            store._guard,
            name,
            store._lease_prefix + name,
            None,
            ttl=store._lease,
            blocking=True,
            timeout=None,
            poll=store._poll,
            cancel_on_loss=False,
            on_wait=waiting,
        )
        try:
            await lease.__aenter__()
        except Down as down:
            store._degrade(down)
            return
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
