"""Redis-backed primitives: the same guarantees across processes and replicas.

An in-process cache dedupes loads only inside one process; a local limiter cannot
keep a partner API's global rate; "run the scheduler once" needs a lock that
survives a replica dying. This module gives each of them a Redis-backed form:

* :class:`RedisStore`: a store for :class:`~parallelkit.SWRCache` shared by every
  process, with a near cache in process memory (kept coherent by pub/sub),
  cross-process single flight (one load per cold key, one refresh per stale
  key), invalidations that no older load undoes, and graceful degradation when
  Redis is down or hangs;
* :class:`RedisLimiter`: a :class:`~parallelkit.Limiter` whose concurrency bound
  and start rate hold across processes;
* :class:`RedisLock`: one holder across processes, renewed while held, released
  only by its holder, with a fencing token.

Needs the ``redis`` extra (``pip install "parallelkit[redis]"``) and a
``redis.asyncio.Redis`` client. redis-py's asyncio client runs on asyncio only, so
these primitives do too (everything else in parallelkit also runs on trio).

Errors::

    ParallelkitError
    ├── RedisUnavailable     Redis unreachable (or silent, or refusing a store's write) and
    │                        the caller asked not to degrade
    ├── SerializationError   a value could not be stored (names store, key, type); a TypeError
    ├── LockNotAcquired      a RedisLock was not acquired (blocking=False / timeout)
    └── LockLost             a held RedisLock expired or was taken over
"""

from __future__ import annotations

from .._core.public import export
from ._common import LockLost as LockLost
from ._common import LockNotAcquired as LockNotAcquired
from ._common import RedisUnavailable as RedisUnavailable
from ._common import SerializationError as SerializationError
from ._limiter import RedisLimiter as RedisLimiter
from ._lock import RedisLock as RedisLock
from ._serializer import JSONSerializer as JSONSerializer
from ._serializer import PickleSerializer as PickleSerializer
from ._serializer import Serializer as Serializer
from ._stats import RedisLimiterStatistics as RedisLimiterStatistics
from ._stats import RedisStoreStatistics as RedisStoreStatistics
from ._stats import RedisStoreStats as RedisStoreStats
from ._store import RedisStore as RedisStore

__all__ = [
    "JSONSerializer",
    "LockLost",
    "LockNotAcquired",
    "PickleSerializer",
    "RedisLimiter",
    "RedisLimiterStatistics",
    "RedisLock",
    "RedisStore",
    "RedisStoreStatistics",
    "RedisStoreStats",
    "RedisUnavailable",
    "SerializationError",
    "Serializer",
]


export(globals())
