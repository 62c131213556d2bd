"""Plumbing shared by ``parallelkit.redis``: errors, key names, outage tracking.

Nothing here is public on its own; :mod:`parallelkit.redis` re-exports the error
classes. Every Redis-backed primitive classifies failures the same way:

* an *outage* (connection refused or reset, a timeout, the server loading) is what
  the ``fail=`` / ``strict=`` options are about, and what :class:`Outage` counts;
* any other Redis error (a wrong type at a key, a script error) is a bug or a
  misconfiguration and is raised unchanged.
"""

from __future__ import annotations

import math
import random
import uuid

import anyio
from redis import exceptions as redis_exceptions
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from typing_extensions import final

from .._core.check import number
from .._core.errors import ParallelkitError

__all__ = [
    "OUTAGE_ERRORS",
    "LockLost",
    "LockNotAcquired",
    "Outage",
    "is_outage",
    "RedisUnavailable",
    "jittered",
    "new_token",
    "validate_client",
    "validate_lease_seconds",
    "validate_name",
]

#: The exceptions that mean "Redis is unreachable right now" (not "you misused it").
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
)


_POOL_FULL: tuple[type[BaseException], ...] = tuple(
    t for t in [getattr(redis_exceptions, "MaxConnectionsError", None)] if t is not None
)


def is_outage(exc: BaseException) -> bool:
    """True unless ``exc`` is a full client connection pool (a local limit, not an outage).

    redis-py raises ``MaxConnectionsError`` (a ``ConnectionError``) when more
    commands run at once than the pool allows; degrading would hide the real fix
    (a ``BlockingConnectionPool`` or a larger ``max_connections``), so callers
    re-raise it.
    """
    if isinstance(exc, _POOL_FULL):
        return False
    return "Too many connections" not in str(exc)  # redis-py < 6 says only this


class RedisUnavailable(ParallelkitError):
    """Redis could not be reached and the caller asked not to degrade.

    Raised by ``RedisStore(strict=True)``, ``RedisLimiter(fail="closed")`` and by a
    :class:`RedisLock` that cannot talk to Redis while acquiring. The redis-py
    exception is the ``__cause__``.
    """


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


@final
class Outage:
    """Counts Redis outages and tells whether to try Redis again yet.

    After an outage error the primitive stops calling Redis for ``retry_after``
    seconds (using its fallback directly, without a connection attempt per call),
    then tries again: the first success closes the circuit.
    """

    __slots__ = ("_until", "errors", "last_error", "recoveries", "retry_after")

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        self.errors = 0
        self.recoveries = 0
        self.last_error: BaseException | None = None
        self._until = -math.inf

    @property
    def down(self) -> bool:
        """True while Redis is presumed down (inside the back-off window)."""
        return self._until != -math.inf and anyio.current_time() < self._until

    def failed(self, exc: BaseException) -> None:
        """Record one outage error and open the circuit for ``retry_after`` seconds."""
        self.errors += 1
        self.last_error = exc
        self._until = anyio.current_time() + self.retry_after

    def succeeded(self) -> bool:
        """Close the circuit after a successful call; True if it was open (recovery)."""
        if self._until == -math.inf:
            return False
        self._until = -math.inf
        self.recoveries += 1
        return True


def new_token() -> str:
    """A unique holder token: 128 random bits, hex."""
    return uuid.uuid4().hex


def jittered(delay: float) -> float:
    """``delay`` scaled by a random factor in [0.5, 1.0): waiters do not stampede."""
    return delay * (0.5 + random.random() / 2)  # not cryptographic


def validate_client(redis: object) -> None:
    """Raise ``TypeError`` unless ``redis`` looks like a redis-py asyncio client."""
    if isinstance(redis, Redis):
        return
    if callable(getattr(redis, "register_script", None)) and callable(
        getattr(redis, "evalsha", None)
    ):
        return  # a cluster client or a compatible fake
    msg = f"redis must be a redis.asyncio.Redis client, got {redis!r}"
    raise TypeError(msg)


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a non-empty ``str``, else raise naming the argument."""
    if not isinstance(name, str):
        msg = f"{what} must be a str, got {name!r}"
        raise TypeError(msg)
    if not name:
        msg = f"{what} must not be empty, got {name!r}"
        raise ValueError(msg)
    return name


def validate_lease_seconds(value: object, name: str) -> float:
    """A positive, finite number of seconds, at least 0.01 (Redis expiries are in ms)."""
    seconds = number(name, value, finite=True)
    if seconds < 0.01:
        msg = f"{name} must be at least 0.01 seconds, got {value!r}"
        raise ValueError(msg)
    return seconds
