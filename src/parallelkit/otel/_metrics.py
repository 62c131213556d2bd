"""The metrics: cache counters read at collection time, limiter waits, batch sizes.

The cache counters cost the caches nothing: every ``SWRCache`` is in a weak set
(:data:`parallelkit._core.instrument.caches`) and the observable counters read
their ``statistics()`` when a reader collects. The totals count what the caches
do while instrumented, from the moment
:meth:`~parallelkit.otel.ParallelkitInstrumentor.instrument` was called, and only
grow: instrumenting again with the same meter goes on from what was counted when
instrumentation stopped (the counters are monotonic: a lower value would be a
negative delta for a delta-temporality exporter), and a cache that is
garbage-collected keeps what it had counted when last collected.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation
from typing_extensions import final

from .._core import instrument

__all__ = ["CACHE_COUNTERS", "CacheTotals", "Instruments", "instruments_of"]

# CacheStats field -> (instrument name, description)
CACHE_COUNTERS: dict[str, tuple[str, str]] = {
    "hits": ("parallelkit.cache.hits", "SWRCache calls served fresh"),
    "stale_hits": ("parallelkit.cache.stale_hits", "SWRCache calls served a stale value"),
    "misses": ("parallelkit.cache.misses", "SWRCache calls that waited for a load"),
    "refreshes": ("parallelkit.cache.refreshes", "SWRCache background refreshes started"),
    "load_errors": ("parallelkit.cache.load_errors", "SWRCache miss loads that failed"),
    "refresh_errors": ("parallelkit.cache.refresh_errors", "SWRCache refreshes that failed"),
}

_SECONDS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0)


def _live_caches() -> list[Any]:
    """Every live cache. A metric reader's thread calls this while another thread may
    make a cache: iterating the weak set then raises ``RuntimeError`` (it changed
    size); take it again."""
    while True:
        try:
            return list(instrument.caches)
        except RuntimeError:  # noqa: PERF203 - a cache was added meanwhile: again
            continue


@final
class CacheTotals:
    """The caches' counters since instrumentation, summed over every live cache.

    Read by a metric reader's thread when it collects and by ``uninstrument()``: a
    lock (taken on collection only, never on a cache's path) keeps each growth
    counted once."""

    __slots__ = ("_lock", "_seen", "_totals")

    def __init__(self, start: Mapping[str, int] | None = None) -> None:
        self._lock = threading.Lock()
        self._seen: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()
        self._totals = dict.fromkeys(CACHE_COUNTERS, 0)
        if start is not None:  # what was counted before: a counter never goes down
            self._totals.update(start)
        for cache in _live_caches():  # counted from now on
            stats = cache.statistics()
            self._seen[cache] = {field: getattr(stats, field) for field in CACHE_COUNTERS}

    def total(self, field: str) -> int:
        """The total of ``field`` now (each cache's growth since it was last read)."""
        with self._lock:
            total = self._totals[field]
            for cache in _live_caches():
                now: int = getattr(cache.statistics(), field)
                seen = self._seen.setdefault(cache, {})
                total += now - seen.get(field, 0)
                seen[field] = now
            self._totals[field] = total
            return total

    def snapshot(self) -> dict[str, int]:
        """Every field's total now."""
        return {field: self.total(field) for field in CACHE_COUNTERS}


@final
class Instruments:
    """The instruments of one meter, made once: instrumenting again reuses them."""

    __slots__ = ("__weakref__", "_counted", "batch_size", "limiter_wait", "totals")

    def __init__(self, meter: Meter) -> None:
        self.totals: CacheTotals | None = None
        """The counters' state while instrumented; ``None`` reports nothing."""
        self._counted: dict[str, int] | None = None  # the totals when last stopped
        self.limiter_wait: Histogram = meter.create_histogram(
            "parallelkit.limiter.wait",
            unit="s",
            description="Seconds a Limiter caller waited for a slot or for the rate",
            explicit_bucket_boundaries_advisory=_SECONDS,
        )
        self.batch_size: Histogram = meter.create_histogram(
            "parallelkit.batch.size",
            unit="{key}",
            description="Keys per BatchLoader load_many call",
            explicit_bucket_boundaries_advisory=_SIZES,
        )
        for field, (name, description) in CACHE_COUNTERS.items():
            meter.create_observable_counter(
                name,
                callbacks=[functools.partial(self._observe, field)],
                unit="{call}",
                description=description,
            )

    def start(self) -> None:
        """Count the caches from now on, going on from the totals when last stopped."""
        self.totals = CacheTotals(self._counted)

    def stop(self) -> None:
        """Stop counting (and reporting); keep the totals for the next :meth:`start`."""
        totals, self.totals = self.totals, None
        if totals is not None:
            self._counted = totals.snapshot()

    def _observe(self, field: str, options: CallbackOptions) -> Iterable[Observation]:
        totals = self.totals
        if totals is None:  # not instrumented (any more)
            return ()
        return (Observation(totals.total(field)),)


_BY_METER: weakref.WeakKeyDictionary[Meter, Instruments] = weakref.WeakKeyDictionary()


def instruments_of(meter: Meter) -> Instruments:
    """The instruments of ``meter``, made on first use."""
    found = _BY_METER.get(meter)
    if found is None:
        found = _BY_METER[meter] = Instruments(meter)
    return found
