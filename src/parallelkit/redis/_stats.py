"""The counters the Redis primitives report (``statistics()``): RedisStoreStatistics
and RedisLimiterStatistics."""

from __future__ import annotations

from dataclasses import dataclass

from typing_extensions import final

__all__ = ["RedisLimiterStatistics", "RedisStoreStatistics", "RedisStoreStats"]


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
        hits: reads (``get``) that found an entry (in Redis, or local memory
            when degraded). The read a load makes with its lease is not counted
            again: one cache miss or stale hit counts once.
        near_hits: reads served from the near cache, with no round trip.
        misses: reads (``get``) that found no entry, one per cache miss.
        timeouts: Redis commands that did not answer within ``command_timeout``.
        near_size: entries in the near cache now.
        near_invalidations: invalidation messages received.
        near_resets: times the near cache was emptied because its subscription
            was lost or re-established (messages may have been missed).
        near_renewals: near entries found unchanged in Redis by the background
            check before they passed ``near_ttl``, and kept (no ``GET`` for
            their next readers).
        near_renewal_errors: background checks that failed for another reason
            than a Redis outage (logged; those entries just expire).
        listening: whether the near cache is subscribed (serving) now.
        lease_renewal_errors: rounds of the entered store's lease renewal that
            Redis refused for another reason than an outage (such as ``READONLY``
            after a failover; logged). A lease not renewed for ``lease`` seconds
            is given up: another process may load the key too.
        write_refusals: store operations whose write Redis refused for a reason
            that is no outage (``READONLY``, ``OOM``, ``MISCONF``, ``NOREPLICAS``:
            Redis answers and serves reads), or that were not tried while it
            refused: a load's value returned but not stored, an invalidation
            kept for when Redis accepts writes again.
        refusing: whether Redis refuses this store's writes now (from a refusal
            until a write that stores is accepted again; logged at both ends).
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
    near_renewals: int = 0
    near_renewal_errors: int = 0
    lease_renewal_errors: int = 0
    write_refusals: int = 0
    refusing: bool = False

    @property
    def redis_errors(self) -> int:
        """``errors``, under the name ``RedisLimiterStatistics`` uses."""
        return self.errors


#: The former name of :class:`RedisStoreStatistics` (``store.stats``), kept as an alias.
RedisStoreStats = RedisStoreStatistics


@final
@dataclass(frozen=True, slots=True)
class RedisLimiterStatistics:
    """A snapshot of a :class:`~parallelkit.redis.RedisLimiter`, for this process.

    Attributes:
        concurrency: the configured global bound, or ``None``.
        rate: the configured global starts per second, or ``None``.
        held: slots this process holds right now (Redis or fallback).
        waiting: tasks of this process waiting for a slot.
        redis_errors: Redis outage errors seen so far (timeouts included).
        fallbacks: acquisitions served by the ``fail=`` policy instead of Redis.
        lost_leases: leases that expired while held (the holder was unreachable
            for longer than ``lease``, or its lease was removed).
    """

    concurrency: int | None
    rate: float | None
    held: int
    waiting: int
    redis_errors: int
    fallbacks: int
    lost_leases: int
