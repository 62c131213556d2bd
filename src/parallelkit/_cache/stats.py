"""CacheStats: the counters an :class:`~parallelkit.SWRCache` reports (``cache.stats``)."""

from __future__ import annotations

from dataclasses import dataclass

from typing_extensions import final

__all__ = ["CacheStats", "store_counter"]


@final
@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of an :class:`SWRCache`'s counters (``cache.stats``).

    Attributes:
        hits: calls served fresh from the store.
        stale_hits: calls served a stale value (a refresh was started, running,
            or backing off after a failure).
        misses: calls that found nothing usable and waited for a load.
        loads: loader calls made for misses (one per flight, not per caller).
        refreshes: loader calls made to refresh stale entries.
        refresh_errors: refreshes whose failure reached no caller (the stale value
            kept being served; each one was handed to ``on_error``).
        load_errors: loads whose failure reached callers: failed miss loads, and
            failed refreshes that misses had joined (those callers got the
            exception, so it is neither logged nor handed to ``on_error``).
        evictions: entries the store dropped for room (``MemoryStore``: LRU).
        store_errors: errors the store absorbed on its own (its ``errors``
            attribute, e.g. ``RedisStore`` degrading during an outage), plus store
            writes that raised after a successful load (the callers got the value,
            not cached; each handed to ``on_error``), each counted once.
        hit_rate: ``(hits + stale_hits) / (hits + stale_hits + misses)``, 0.0 if idle.
    """

    hits: int
    stale_hits: int
    misses: int
    loads: int
    refreshes: int
    refresh_errors: int
    load_errors: int
    evictions: int
    store_errors: int
    hit_rate: float


def store_counter(store: object, name: str) -> int:
    """An optional int counter a store may expose (``evictions``, ``errors``)."""
    value = getattr(store, name, 0)
    return value if isinstance(value, int) else 0
