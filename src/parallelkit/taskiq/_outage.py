"""Redis away for a moment (a restart, a failover): wait for it instead of failing.

Two forms, one schedule of waits:

* :class:`Outage`: a worker's read loop, which waits as long as it takes (50 ms
  doubling to 2 s, the first failure of each outage logged);
* :func:`patiently`: one command of a producer or a worker (a kick, a result read,
  a result write, the subscription to finished tasks), tried again after
  :data:`WAITS` (3.15 s in all), then failing with redis-py's own error.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import tenacity
from redis import exceptions as redis_exceptions
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from typing_extensions import ParamSpec, final

from .._core.retry import Retry

__all__ = ["WAITS", "Outage", "is_blip", "patiently"]

logger = logging.getLogger("parallelkit.taskiq")

P = ParamSpec("P")
T = TypeVar("T")

#: seconds between the tries of a command Redis failed (3.15 s in all, 7 tries)
WAITS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)

_POOL_FULL: tuple[type[BaseException], ...] = tuple(
    t for t in [getattr(redis_exceptions, "MaxConnectionsError", None)] if t is not None
)


def is_blip(exc: BaseException) -> bool:
    """True for "Redis is unreachable right now": worth waiting for.

    A full client connection pool is a ``ConnectionError`` too, but a local limit
    (waiting for it again would only multiply the pool's own wait): not a blip.
    """
    if not isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return False
    if isinstance(exc, _POOL_FULL):
        return False
    text = str(exc)  # redis-py's pools before MaxConnectionsError, and the blocking pool
    return "Too many connections" not in text and "No connection available" not in text


async def patiently(do: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``await do(*args, **kwargs)``, tried again after each of :data:`WAITS` while
    Redis is unreachable; then the last try's error, unwrapped.

    Only for commands that may run twice (a read, a ``SET``, an ``XADD`` under
    at-least-once delivery): a failed connection may have lost the reply of a
    command Redis did run. The retry adapter is the library's one
    (:class:`~parallelkit.Retry` on tenacity): never a cancellation.
    """
    try:  # the usual case costs one call (it is each poll of each item in flight)
        return await do(*args, **kwargs)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        if not is_blip(exc):
            raise
    waits = WAITS
    await anyio.sleep(waits[0])
    if len(waits) == 1:
        return await do(*args, **kwargs)

    async def attempt() -> T:  # (redis-py's commands are plain functions returning
        return await do(*args, **kwargs)  # an awaitable: tenacity would not await them)

    retrying = _policy(waits[1:]).copy()  # a copy per call: tenacity keeps state on it
    result: T = await retrying(attempt)
    return result


@functools.lru_cache(maxsize=4)
def _policy(waits: tuple[float, ...]) -> tenacity.AsyncRetrying:
    """Tries after each of ``waits`` (doubling) as a :class:`~parallelkit.Retry`'s policy."""
    return Retry(
        attempts=len(waits) + 1, backoff=waits[0], max_backoff=waits[-1], on=is_blip
    ).to_tenacity()


@final
class Outage:
    """The waits of a read loop while Redis is unreachable: 50 ms doubling to 2 s.

    The first failure of each outage is logged (a warning naming the error), not
    every try; :meth:`over` ends the outage once a read succeeds.
    """

    __slots__ = ("_tries",)

    def __init__(self) -> None:
        self._tries = 0

    async def wait(self, exc: Exception) -> None:
        if self._tries == 0:
            logger.warning(
                "Redis unreachable while reading the queue (%s: %s): waiting for it",
                type(exc).__name__,
                exc,
            )
        await anyio.sleep(min(0.05 * 2**self._tries, 2.0))
        self._tries = min(self._tries + 1, 6)

    def over(self) -> None:
        if self._tries:
            logger.info("Redis reachable again: reading the queue")
        self._tries = 0
