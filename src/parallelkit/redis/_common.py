"""Plumbing shared by ``parallelkit.redis``: the errors, client checks, tokens.

Nothing here is public on its own; :mod:`parallelkit.redis` re-exports the error
classes. How a Redis failure is classified and absorbed lives in
:mod:`._outage` (one :class:`~._outage.Guard` per primitive); how a lease is taken,
renewed and given back lives in :mod:`._lease`.
"""

from __future__ import annotations

import random
import uuid

import redis as sync_redis
from redis.asyncio import Redis

from .._core.check import number_at_least
from .._core.errors import ParallelkitError

__all__ = [
    "MAX_LEASE",
    "LockLost",
    "LockNotAcquired",
    "RedisUnavailable",
    "SerializationError",
    "jittered",
    "lease_seconds",
    "new_token",
    "validate_client",
]

#: The longest lease (a lock's ``ttl``, a limiter's ``lease``): 10**9 s (31.7 years);
#: far longer ones overflow the expiry times Redis (and its Lua numbers) can hold.
MAX_LEASE = 1e9


class RedisUnavailable(ParallelkitError):
    """Redis could not be reached (or did not answer in time) and the caller asked not to degrade.

    Raised by ``RedisStore(strict=True)``, ``RedisLimiter(fail="closed")`` and by a
    :class:`RedisLock` that cannot talk to Redis while acquiring. The redis-py
    exception (or a :class:`TimeoutError` when Redis did not answer within
    ``command_timeout``) is the ``__cause__``. ``RedisStore(strict=True)`` also
    raises it when Redis refuses a write (``READONLY``, ``OOM``, ``MISCONF``,
    ``NOREPLICAS``), with that error as the ``__cause__``.
    """


class SerializationError(ParallelkitError, TypeError):
    """A :class:`~parallelkit.redis.RedisStore` could not turn a value into bytes, or back.

    The message names the store, the key and the type that failed. It is also a
    :class:`TypeError` (what ``json.dumps`` raises for an unknown type). The
    serializer's own exception is the ``__cause__``.

    Attributes:
        namespace: the store's namespace.
        key: the cache key whose value failed.
        type_name: the qualified name of the type that could not be serialized
            (``""`` when reading bytes back failed).
    """

    def __init__(self, message: str, *, namespace: str, key: object, type_name: str) -> None:
        self.namespace = namespace
        self.key = key
        self.type_name = type_name
        super().__init__(message)


class LockNotAcquired(ParallelkitError):
    """A :class:`~parallelkit.redis.RedisLock` was not acquired.

    Raised by ``async with RedisLock(..., blocking=False)`` when another holder has
    the lock, and by ``timeout=`` when the wait ran out. The body does not run.

    Attributes:
        name: the lock's name.
    """

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)


class LockLost(ParallelkitError):
    """A held :class:`~parallelkit.redis.RedisLock` expired or was taken over.

    The body of the ``async with`` block was cancelled when the loss was noticed:
    continuing would break mutual exclusion. Use the fencing token to make the
    writes that may already have happened safe.

    Attributes:
        name: the lock's name.
        fencing_token: the fencing token of the lost tenure.
    """

    def __init__(self, name: str, fencing_token: int | None, message: str) -> None:
        self.name = name
        self.fencing_token = fencing_token
        super().__init__(message)


def new_token() -> str:
    """A unique holder token: 128 random bits, hex."""
    return uuid.uuid4().hex


def jittered(delay: float) -> float:
    """``delay`` scaled by a random factor in [0.5, 1.0): waiters do not stampede."""
    return delay * (0.5 + random.random() / 2)  # not cryptographic


def lease_seconds(name: str, value: object) -> float:
    """Check a lease's length (seconds): at least 0.01, at most :data:`MAX_LEASE`."""
    seconds = number_at_least(name, value, 0.01)
    if seconds > MAX_LEASE:
        msg = f"{name} must be <= {MAX_LEASE:g} (seconds), got {value!r}"
        raise ValueError(msg)
    return seconds


#: redis-py's synchronous clients: they have the asyncio client's methods, but each
#: call blocks the event loop and returns a reply, not something to await
_SYNC_CLIENTS: tuple[type, ...] = tuple(
    t
    for t in [getattr(sync_redis, "Redis", None), getattr(sync_redis, "RedisCluster", None)]
    if isinstance(t, type)
)


def validate_client(redis: object) -> None:
    """Raise ``TypeError`` unless ``redis`` looks like a redis-py asyncio client.

    Refused by name: the class instead of a client (``redis.asyncio.Redis``), and a
    synchronous client (``redis.Redis``), whose calls would block the event loop
    and fail only at the first ``await`` of a reply.
    """
    if isinstance(redis, Redis):
        return
    if isinstance(redis, type):
        msg = (
            f"redis must be a redis.asyncio.Redis client, got the class "
            f"{redis.__qualname__}: pass an instance (Redis.from_url(...))"
        )
        raise TypeError(msg)
    if isinstance(redis, _SYNC_CLIENTS):
        msg = (
            f"redis must be a redis.asyncio.Redis client, got the synchronous "
            f"{type(redis).__module__}.{type(redis).__qualname__} {redis!r}: its calls block "
            "the event loop; use redis.asyncio.Redis (from redis.asyncio import Redis)"
        )
        raise TypeError(msg)
    if callable(getattr(redis, "register_script", None)) and callable(
        getattr(redis, "evalsha", None)
    ):
        return  # a cluster client or a compatible fake
    msg = f"redis must be a redis.asyncio.Redis client, got {redis!r}"
    raise TypeError(msg)
