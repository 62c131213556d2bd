"""RedisLock: one holder across processes, renewed while held, with a fencing token."""

from __future__ import annotations

from redis.asyncio import Redis
from typing_extensions import Self, final

from .._core.check import flag, number, number_or_none, text
from ._common import lease_seconds, validate_client
from ._lease import Lease
from ._lease_scripts import LeaseScripts
from ._outage import Down, Guard

__all__ = ["RedisLock"]


@final
class RedisLock(Lease):
    """A mutual-exclusion lock shared by every process that uses the same Redis.

    Use it when exactly one replica may do something at a time: run the cadence
    scheduler, migrate a table, rotate a key. ``async with`` acquires it (waiting
    while another process holds it), renews it in the background while the body
    runs, and releases it on exit, even when the body fails or is cancelled.

    How it works: the lock is one Redis key set with ``SET NX PX`` to a random
    token; it expires after ``ttl`` seconds unless renewed, so a holder that dies
    (``SIGKILL``, a lost VM) frees it after at most ``ttl``. While held, a small
    task in a task group owned by the ``async with`` block renews it every
    ``ttl / 3``. Renewal and release are Lua scripts that check the token first:
    only the holder can extend or release its tenure.

    Every successful acquisition gets a **fencing token**: a number from a Redis
    counter that only grows, also across a Redis that lost its data (it never goes
    below the server's clock in milliseconds: a 64-bit number). Pass it along with
    writes to a shared resource and
    let the resource reject a token older than the last one it saw: this is what
    keeps a holder that was paused past its ttl (a long GC, a frozen VM) from
    clobbering the new holder's work.

    If the lease is lost while held (it expired during a network partition, or
    someone deleted the key), the body is **cancelled** and ``async with`` raises
    :class:`~parallelkit.redis.LockLost`: continuing would break the "one holder"
    promise.

    A ``RedisLock`` object is not re-entrant; use one object per ``async with``
    at a time (it may be re-used sequentially).

    Args:
        redis: a ``redis.asyncio.Redis`` client.
        name: the lock's name; every process using this name shares the lock.
        ttl: seconds the lock survives its holder's death (also how long the
            holder may be unreachable before it loses the lock); at least 0.01, at
            most ``1e9`` (31.7 years).
        blocking: ``True`` (default) waits for the lock; ``False`` makes one
            attempt and raises :class:`~parallelkit.redis.LockNotAcquired` if
            another process holds it: the body is skipped.
        timeout: with ``blocking=True``, give up (``LockNotAcquired``) after this
            many seconds; ``None`` waits forever. With ``blocking=False`` it is a
            ``ValueError`` (one attempt never waits).
        poll: the longest pause between two attempts while waiting (jittered).
        prefix: a namespace for the Redis keys (``{prefix}:lock:{name}``).
        command_timeout: seconds one Redis command may take before Redis counts
            as unreachable (a paused server keeps the socket open); ``None``
            leaves it to the client's own timeouts.

    Raises:
        LockNotAcquired: (from ``async with``) not acquired: held elsewhere with
            ``blocking=False``, or ``timeout`` ran out.
        LockLost: (from ``async with``) the lock was lost while held.
        RedisUnavailable: Redis could not be reached (or did not answer within
            ``command_timeout``) while acquiring.

    Example:
        ```python
        from parallelkit.redis import LockNotAcquired, RedisLock

        async with RedisLock(redis, "nightly-export", ttl=30) as lock:
            await export(fence=lock.fencing_token)

        with contextlib.suppress(LockNotAcquired):       # skip if running elsewhere
            async with RedisLock(redis, "nightly-export", blocking=False):
                await export()
        ```
    """

    __slots__ = ()

    def __init__(
        self,
        redis: Redis,
        name: str,
        /,
        *,
        ttl: float = 30.0,
        blocking: bool = True,
        timeout: float | None = None,
        poll: float = 0.1,
        prefix: str = "pk",
        command_timeout: float | None = 1.0,
    ) -> None:
        validate_client(redis)
        text("name", name)
        ttl_s = lease_seconds("ttl", ttl)
        flag("blocking", blocking)
        timeout_s = number_or_none("timeout", timeout)
        if not blocking and timeout_s is not None:  # one try never waits: a timeout means nothing
            msg = "timeout applies to blocking=True only, got blocking=False and "
            msg += f"timeout={timeout!r}"
            raise ValueError(msg)
        poll_s = number("poll", poll)
        text("prefix", prefix)
        guard = Guard(
            timeout=number_or_none("command_timeout", command_timeout), retry_after=0.0, redis=redis
        )
        key = f"{prefix}:lock:{{{name}}}"  # hash tag: both keys in one cluster slot
        super().__init__(
            LeaseScripts(redis),
            guard,
            name,
            key,
            f"{key}:fence",
            ttl=ttl_s,
            blocking=blocking,
            timeout=timeout_s,
            poll=poll_s,
            cancel_on_loss=True,
            retry_give_back=True,
        )

    async def __aenter__(self) -> Self:
        try:
            return await super().__aenter__()
        except Down as down:
            error = down.unavailable(f"RedisLock {self.name!r}", "acquiring the lock")
            raise error from down.cause
