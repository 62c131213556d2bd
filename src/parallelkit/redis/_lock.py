"""RedisLock: one holder across processes, renewed while held, with a fencing token."""

from __future__ import annotations

import contextlib
import sys
from types import TracebackType
from typing import cast

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from typing_extensions import Self, final

from .._core.check import number, number_or_none
from ._common import (
    OUTAGE_ERRORS,
    LockLost,
    LockNotAcquired,
    RedisUnavailable,
    is_outage,
    jittered,
    new_token,
    validate_client,
    validate_lease_seconds,
    validate_name,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["Lease", "RedisLock"]

# KEYS[1] the lock, KEYS[2] (optional) the fencing counter; ARGV[1] token, ARGV[2]
# ttl (ms). Returns the new fencing token (or 1) when acquired, else minus the
# holder's remaining ttl (ms).
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if #KEYS > 1 then return redis.call('INCR', KEYS[2]) end
  return 1
end
local left = redis.call('PTTL', KEYS[1])
if left < 1 then left = 1 end
return -left
"""
# KEYS[1] the lock; ARGV[1] token, ARGV[2] ttl (ms). 1 if still ours and extended.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] the lock; ARGV[1] token. 1 if it was ours and is now released.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """A ``SET NX PX`` lease on one Redis key, renewed while held (internal engine).

    :class:`RedisLock` is its public face (with a fencing token and "cancel the
    body when lost"); ``RedisStore.load_lock`` uses it without a fencing counter
    and without cancelling the load when the lease is lost.
    """

    __slots__ = (
        "_acquire_script",
        "_blocking",
        "_cancel_on_loss",
        "_fence",
        "_key",
        "_keys",
        "_lost",
        "_name",
        "_poll",
        "_redis",
        "_release_script",
        "_renew_script",
        "_tg",
        "_timeout",
        "_token",
        "_ttl",
    )

    def __init__(
        self,
        redis: Redis,
        name: str,
        key: str,
        fence_key: str | None,
        *,
        ttl: float,
        blocking: bool,
        timeout: float | None,
        poll: float,
        cancel_on_loss: bool,
    ) -> None:
        self._redis = redis
        self._name = name
        self._key = key
        self._keys = [key] if fence_key is None else [key, fence_key]
        self._ttl = ttl
        self._blocking = blocking
        self._timeout = timeout
        self._poll = poll
        self._cancel_on_loss = cancel_on_loss
        self._acquire_script = redis.register_script(_ACQUIRE)
        self._renew_script = redis.register_script(_RENEW)
        self._release_script = redis.register_script(_RELEASE)
        self._token: str | None = None
        self._fence: int | None = None
        self._tg: TaskGroup | None = None
        self._lost = False

    # -- introspection -----------------------------------------------------------
    @property
    def name(self) -> str:
        """The lock's name."""
        return self._name

    @property
    def ttl(self) -> float:
        """Seconds the lock outlives a dead holder."""
        return self._ttl

    @property
    def key(self) -> str:
        """The Redis key holding the lock."""
        return self._key

    @property
    def held(self) -> bool:
        """True inside ``async with`` while this object holds the lock."""
        return self._token is not None and not self._lost

    @property
    def fencing_token(self) -> int | None:
        """The fencing token of the current (or last) tenure; ``None`` before any.

        Strictly increasing across all acquisitions of this lock name, by any
        process.
        """
        return self._fence

    def __repr__(self) -> str:
        state = "held" if self.held else "free"
        return (
            f"{type(self).__name__}({self._name!r}, ttl={self._ttl!r}, "
            f"blocking={self._blocking!r}, {state}, fencing_token={self._fence!r})"
        )

    # -- acquire / release ---------------------------------------------------------
    async def _try_acquire(self, token: str) -> int:
        try:
            reply = await self._acquire_script(
                keys=self._keys, args=[token, round(self._ttl * 1000)]
            )
        except OUTAGE_ERRORS as exc:
            if not is_outage(exc):
                raise
            msg = f"could not reach Redis to acquire lock {self._name!r}: {exc}"
            raise RedisUnavailable(msg) from exc
        return int(reply)

    async def _acquire(self) -> bool:
        """Take the lease; return True if it had to wait for another holder."""
        token = new_token()
        deadline = None if self._timeout is None else anyio.current_time() + self._timeout
        waited = False
        while True:
            reply = await self._try_acquire(token)
            if reply > 0:
                self._token, self._fence, self._lost = token, reply, False
                return waited
            if not self._blocking:
                msg = f"lock {self._name!r} is held by another holder (blocking=False)"
                raise LockNotAcquired(self._name, msg)
            pause = jittered(min(self._poll, -reply / 1000))
            if deadline is not None:
                left = deadline - anyio.current_time()
                if left <= 0:
                    msg = f"lock {self._name!r} not acquired within timeout={self._timeout!r}s"
                    raise LockNotAcquired(self._name, msg)
                pause = min(pause, left)
            waited = True
            await anyio.sleep(pause)

    async def _renew_forever(self) -> None:
        """Extend the lease every ttl/3; raise LockLost when it cannot be kept."""
        token = self._token
        assert token is not None
        ttl_ms = round(self._ttl * 1000)
        valid_until = anyio.current_time() + self._ttl
        while True:
            await anyio.sleep(self._ttl / 3)
            started = anyio.current_time()
            try:
                with anyio.fail_after(max(valid_until - started, 0.001)):
                    ok = await self._renew_script(keys=[self._key], args=[token, ttl_ms])
            except OUTAGE_ERRORS as exc:  # (TimeoutError is an OSError)
                if anyio.current_time() < valid_until:
                    continue  # transient: try again before the lease runs out
                self._lost = True
                if not self._cancel_on_loss:
                    return
                msg = f"lock {self._name!r} expired: Redis unreachable for its whole ttl"
                raise LockLost(self._name, self._fence, msg) from exc
            if not int(ok):
                self._lost = True
                if not self._cancel_on_loss:
                    return
                msg = f"lock {self._name!r} was lost: it expired or was taken over"
                raise LockLost(self._name, self._fence, msg)
            valid_until = started + self._ttl

    async def _release(self) -> None:
        token, self._token = self._token, None
        if token is None or self._lost:
            return
        # shielded: a cancelled holder still gives the lock back at once
        with anyio.move_on_after(self._ttl, shield=True):
            # unreachable Redis: the lease expires on its own after ttl
            with contextlib.suppress(*OUTAGE_ERRORS):
                await self._release_script(keys=[self._key], args=[token])

    async def __aenter__(self) -> Self:
        await self._enter()
        return self

    async def _enter(self) -> bool:
        """What ``__aenter__`` does; returns True if it waited for another holder."""
        if self._tg is not None:
            msg = (
                f"RedisLock {self._name!r} is already held by this object; it is not "
                "re-entrant: create one RedisLock per concurrent holder"
            )
            raise RuntimeError(msg)
        waited = await self._acquire()
        tg = anyio.create_task_group()
        try:
            await tg.__aenter__()
            tg.start_soon(self._renew_forever, name=f"{self!r} renewal")
        except BaseException:
            await self._release()
            raise
        self._tg = tg
        return waited

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        tg, self._tg = self._tg, None
        assert tg is not None, "__aexit__ without __aenter__"
        tg.cancel_scope.cancel()  # stop the renewal
        # Only a cancellation is the task group's business (it may be the one the
        # failing renewal caused); the body's own error passes through unchanged.
        cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
        try:
            if cancelled:
                return bool(await tg.__aexit__(exc_type, exc, tb))
            await tg.__aexit__(None, None, None)
            return False
        except BaseExceptionGroup as group:
            lost, rest = group.split(LockLost)
            if lost is not None and rest is None:
                first: BaseException = lost
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from first.__cause__
            raise
        finally:
            await self._release()


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
    ``INCR`` that only grows. Pass it along with writes to a shared resource and
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
            holder may be unreachable before it loses the lock).
        blocking: ``True`` (default) waits for the lock; ``False`` makes one
            attempt and raises :class:`~parallelkit.redis.LockNotAcquired` if
            another process holds it: the body is skipped.
        timeout: with ``blocking=True``, give up (``LockNotAcquired``) after this
            many seconds; ``None`` waits forever.
        poll: the longest pause between two attempts while waiting (jittered).
        prefix: a namespace for the Redis keys (``{prefix}:lock:{name}``).

    Raises:
        LockNotAcquired: (from ``async with``) not acquired: held elsewhere with
            ``blocking=False``, or ``timeout`` ran out.
        LockLost: (from ``async with``) the lock was lost while held.
        RedisUnavailable: Redis could not be reached while acquiring.

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
    ) -> None:
        validate_client(redis)
        validate_name(name)
        ttl_s = validate_lease_seconds(ttl, "ttl")
        if not isinstance(cast(object, blocking), bool):
            msg = f"blocking must be a bool, got {blocking!r}"
            raise TypeError(msg)
        poll_s = number("poll", poll, finite=True)
        validate_name(prefix, "prefix")
        key = f"{prefix}:lock:{{{name}}}"  # hash tag: both keys in one cluster slot
        super().__init__(
            redis,
            name,
            key,
            f"{key}:fence",
            ttl=ttl_s,
            blocking=blocking,
            timeout=number_or_none("timeout", timeout, finite=True),
            poll=poll_s,
            cancel_on_loss=True,
        )
