"""RedisStore: a Store for SWRCache shared by every process, with a near cache.

This module is the store's public face (options, lifecycle, statistics, every
public method and its documentation) and the near-cache hit (``peek``). Past the
near cache, the read side (``get``'s one shared ``GET`` per key, a near-cache
renewal round) is in :mod:`._store_reads`; values <-> bytes in
:mod:`._store_codec`; what changes Redis, the plain writes in
:mod:`._store_writes` and the loads (single flight, "invalidation wins") in
:mod:`._store_loads`; what an entered store runs in the background is in
:mod:`._store_tasks`.
"""

from __future__ import annotations

import functools
import hashlib
import time
import uuid
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import anyio
from redis.asyncio import Redis
from typing_extensions import Self, final

from .._cache.front import check_key
from .._cache.store import CacheEntry, MemoryStore
from .._core.check import count, count_or_none, flag, number, number_or_none, text
from .._core.owned import OwnedTaskGroup
from . import _store_loads as loads
from . import _store_tasks as tasks
from . import _store_writes as writes
from ._common import lease_seconds, validate_client
from ._lease_scripts import LeaseScripts
from ._near import NearCache
from ._outage import Down, Guard
from ._renewals import Renewals
from ._serializer import Serializer, serializer_from
from ._serializer import decode_entry as decode_entry  # (tests read entries with them)
from ._serializer import encode_entry as encode_entry
from ._stats import RedisStoreStatistics
from ._store_codec import encode
from ._store_loads import LoadLock
from ._store_reads import _parts as _parts  # (tests cut batches with it)
from ._store_reads import renew, shared_get
from ._store_refusals import Refusals

if TYPE_CHECKING:
    from ._store_reads import _Read

__all__ = ["RedisStore"]


_MAX_KEY = 200  # longer key reprs are replaced by their SHA-256


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
    holder that dies lets another process take over after ``lease`` seconds. A
    load costs two round trips: one script takes the lease and reads the entry
    and its generation, one stores the value and gives the lease back; an
    entered store renews every load's lease from one task, and keeps what its
    own loads stored in its near cache.

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

    **Redis refuses writes** (``READONLY``, ``OOM``, ``MISCONF``, ``NOREPLICAS``):
    no outage, reads go on in Redis. A load's value is returned and, like a
    refused invalidation, kept as during an outage (this process reads the key
    from local memory, so it is not loaded again at every read) and replayed as a
    delete once Redis accepts writes again. Logged once per episode, counted in
    ``write_refusals``; ``strict=True`` raises instead.

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
            while the load runs (at least 0.01, at most ``1e9``).
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
        "_missed",
        "_missed_all",
        "_misses",
        "_namespace",
        "_near",
        "_near_get",
        "_near_hits",
        "_owner",
        "_poll",
        "_reads",
        "_redis",
        "_refusals",
        "_renewals",
        "_scripts",
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
        self._lease = lease_seconds("lease", lease)
        self._poll = number("poll", poll)
        self._strict = flag("strict", strict)
        self._local = MemoryStore(count("local_maxsize", local_maxsize))
        retry_s = number("retry_after", retry_after)
        self._near = NearCache(
            f"{prefix}:{namespace}:inv",
            count_or_none("near_maxsize", near_maxsize),
            number("near_ttl", near_ttl),
        )
        self._near_get = self._near.entries.get  # the hit path: one dict lookup
        self._near_hits = 0
        self._guard = Guard(
            timeout=number_or_none("command_timeout", command_timeout),
            retry_after=retry_s,
            on_recovery=self._recovered,
            before_recovery=functools.partial(writes.replay, self),
            redis=redis,
        )
        self._value_prefix = f"{prefix}:{namespace}:v:"
        self._lease_prefix = f"{prefix}:{namespace}:l:"
        self._channel = self._near.channel
        self._lease_scripts = LeaseScripts(redis)
        self._scripts = writes.Scripts(redis)
        self._owner = OwnedTaskGroup(f"RedisStore {namespace!r}")
        self._renewals = Renewals(redis, self._guard, self._lease)
        self._local_epoch = 0
        self._missed: dict[str, None] = {}  # names written while Redis was down or refusing
        self._missed_all = False  # a clear() while down, or more than local_maxsize names
        self._reads: dict[Hashable, _Read] = {}
        self._refusals = Refusals(f"RedisStore {namespace!r}", self._guard, strict=strict)
        self._lease_waits = self._hits = self._misses = 0
        self.degraded = 0

    # -- lifecycle (the background tasks: see ._store_tasks) ---------------------------
    async def __aenter__(self) -> Self:
        """Start the near cache's subscription; returns once it is up (or has failed)."""
        await tasks.start(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Wait for the loads whose leases the store renews, then stop the
        subscription and empty the near cache.

        A load still running (in a task that outlives the store's ``async with``)
        keeps its lease renewed until it ends; loads that start meanwhile renew
        their own. Cancelling the exit stops the wait: those leases expire after
        ``lease`` seconds.
        """
        try:
            await self._renewals.drain()
        finally:
            try:
                left = await self._owner.exit(exc_type, exc, tb, cancel=True)
            finally:
                self._near.reset(listening=False)
        return left

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
            near_hits=self._near_hits,
            misses=self._misses,
            timeouts=self._guard.timeouts,
            near_size=len(near.meta),
            near_invalidations=near.invalidations,
            near_resets=near.resets,
            near_renewals=near.renewals,
            near_renewal_errors=near.renew_errors,
            lease_renewal_errors=self._renewals.errors,
            listening=near.listening,
            write_refusals=self._refusals.count,
            refusing=self._refusals.error is not None,
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
        if self._refusals.error is not None:
            state += ", refusing writes"
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

    # -- Store protocol -------------------------------------------------------------
    def peek(self, key: Hashable) -> CacheEntry[Any] | None:
        """The entry for ``key`` from the near cache, or ``None`` (then use :meth:`get`).

        No I/O and no clock: this is the hit path of a hot key.
        """
        entry = self._near_get(key)
        if entry is not None:
            self._near_hits += 1
        return entry

    async def get(self, key: Hashable) -> CacheEntry[Any] | None:
        """Return the entry for ``key`` from Redis, or ``None`` (absent, expired).

        Reads Redis (never the near cache) and keeps what it read in the near
        cache. Concurrent reads of one key share one ``GET``, unless a write or an
        invalidation came in since it was sent. Redis down: local memory.
        Counted in :meth:`statistics` as a hit or a miss.
        """
        entry = await self._read(key)
        self._count_read(entry)
        return entry

    async def _read(self, key: Hashable) -> CacheEntry[Any] | None:
        """:meth:`get` without counting it (a load's own read: its cache counted the
        miss, or the stale hit, that started the load)."""
        read = self._reads.get(key)
        if read is not None and self._near.current(read.name, read.ticket):
            if read.done is None:
                read.done = anyio.Event()
            await read.done.wait()
            entry = read.entry if read.ok else await shared_get(self, key)
        else:
            entry = await shared_get(self, key)
        return entry

    def _count_read(self, entry: CacheEntry[Any] | None) -> None:
        if entry is None:
            self._misses += 1
        else:
            self._hits += 1

    async def _renew(self) -> None:
        """One near-cache renewal round (:func:`._store_reads.renew`)."""
        await renew(self)

    async def set(self, key: Hashable, entry: CacheEntry[Any], *, ttl: float) -> None:
        """Store ``entry`` (a new generation); Redis drops it after ``ttl`` seconds.

        ``ttl`` is at least a millisecond and at most ``1e9`` seconds (a longer one,
        ``inf`` included, is kept that long: Redis refuses expiry times past that
        range). A ``ttl`` that is not a number is a ``TypeError``; a negative or
        NaN one a ``ValueError``, both raised before anything is written.
        """
        check_key(key)  # an unhashable key, an entry that is none, a bad ttl: refused
        given: object = entry
        if not isinstance(given, CacheEntry):  # before anything is written
            msg = f"entry must be a CacheEntry, got {type(given).__name__} {given!r}"
            raise TypeError(msg)
        writes.ttl_ms(ttl)
        data = encode(self, key, entry, uuid.uuid4().bytes)
        await writes.write(self, key, entry, data, ttl)

    async def delete(self, key: Hashable) -> None:
        """Forget ``key`` in Redis, in every near cache and in local memory."""
        await self._local.delete(key)
        await writes.write(self, key, None, b"", 0)

    async def clear(self) -> None:
        """Forget every key of this store's namespace (``SCAN`` + ``UNLINK``)."""
        await writes.clear(self)

    # -- loads: single flight and "invalidation wins" (see ._store_loads) -------------
    def load_lock(self, key: Hashable) -> LoadLock:
        """Hold ``key``'s lease across processes around one load (single flight).

        Waits while another process holds the lease: as long as that holder is
        alive (it renews the lease), and at most ``lease`` seconds after it died.
        If Redis is down, it is entered at once without a lease.

        Enters as a :class:`~parallelkit._cache.store.LoadStart`: the entry and its
        generation are read by the same script that takes the lease, and the
        load's :meth:`set_if_unchanged` gives the lease back in its own script,
        so a load costs two round trips, not six (``None`` when Redis is down).
        """
        return LoadLock(self, key)

    def _waiting(self) -> None:
        self._lease_waits += 1

    async def load_token(self, key: Hashable) -> object:
        """Mark the start of a load of ``key``: pass the result to :meth:`set_if_unchanged`.

        The token is the entry's generation in Redis (created if the key is
        absent), so any ``set``, ``delete`` or ``clear`` by any process after this
        call makes the load's conditional set fail.
        """
        return await loads.load_token(self, key)

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
        return await loads.set_if_unchanged(self, key, entry, ttl, token)
