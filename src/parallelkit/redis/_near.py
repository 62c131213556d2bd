"""The near cache: a bounded in-process tier in front of Redis, kept coherent by pub/sub.

Every write a :class:`~parallelkit.redis.RedisStore` makes (``set``, ``delete``,
``clear``, a load's conditional set) publishes an invalidation on the namespace's
channel in the same Lua script. Each entered store listens on that channel and
drops what it names. The tier only serves while that subscription is known to be
up, and every way a message can be lost ends in emptying it:

* entries are filled only while subscribed, and only by a read that no
  invalidation overtook (a sequence number is compared around the read);
* a broken subscription (a connection error, a Redis restart) empties the tier at
  once and turns it off until the subscription is back; re-subscribing (by us or
  by redis-py's own reconnect) empties it again;
* a subscription that hangs silently (a paused server) is caught by a ``PING``
  that must be answered within ``command_timeout``;
* and whatever happens, an entry is served from process memory for at most
  ``near_ttl`` seconds after it was read from Redis: the listening task sweeps
  the tier at least every ``min(1 s, near_ttl / 2)`` and drops what would pass
  ``near_ttl`` before the next sweep (so the hit path reads no clock).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from typing_extensions import final

from .._cache.store import CacheEntry
from .._core.limiter import Limiter
from ._common import jittered

__all__ = ["CLEAR", "NearCache", "invalidation"]

logger = logging.getLogger("parallelkit.redis")

#: The message that empties every near tier of a namespace.
CLEAR = b"*"
_KEY = b"k"
_MISSING: Any = object()


def invalidation(name: str) -> bytes:
    """The message that drops one key (``name``: the key's part of the Redis key)."""
    return _KEY + name.encode()


def _spare(slots: Limiter) -> bool:
    """Whether taking one slot of ``slots`` now leaves another free for commands."""
    stats = slots.statistics()
    return stats.concurrency is not None and stats.running + 2 <= stats.concurrency


@final
class NearCache:
    """The near tier of one store (see the module docs).

    ``entries`` maps a cache key to its entry: the store's ``peek`` is one lookup
    there, with no clock read. ``meta`` holds, in fill order, each key's expiry
    and its name (the Redis key's suffix, what messages carry); ``index`` maps the
    name back to the cache key. Oldest fills are dropped first when ``maxsize``
    is reached, and by :meth:`sweep` before they are ``ttl`` old.
    """

    __slots__ = (
        "channel",
        "entries",
        "index",
        "invalidations",
        "listening",
        "maxsize",
        "meta",
        "resets",
        "seq",
        "slack",
        "timer",
        "ttl",
    )

    def __init__(self, channel: str, maxsize: int | None, ttl: float) -> None:
        self.channel = channel
        self.maxsize = maxsize
        self.ttl = ttl
        self.slack = min(1.0, ttl / 2)  # the longest time between two sweeps
        self.timer: Callable[[], float] = time.monotonic
        self.entries: dict[Hashable, CacheEntry[Any]] = {}
        self.meta: dict[Hashable, tuple[float, str]] = {}
        self.index: dict[str, Hashable] = {}
        self.listening = False
        self.seq = 0
        self.invalidations = self.resets = 0

    @property
    def enabled(self) -> bool:
        """False with ``near_maxsize=None``."""
        return self.maxsize is not None

    # -- the tier ----------------------------------------------------------------------
    def put(self, key: Hashable, name: str, entry: CacheEntry[Any], seq: int) -> None:
        """Keep ``entry``, read from Redis when the sequence number was ``seq``."""
        if not self.listening or seq != self.seq or self.maxsize is None:
            return  # not subscribed, or an invalidation overtook the read
        self._forget(key)
        if len(self.meta) >= self.maxsize:
            self._forget(next(iter(self.meta)))
        self.entries[key] = entry
        self.meta[key] = (self.timer() + self.ttl, name)
        self.index[name] = key

    def _forget(self, key: Hashable) -> None:
        meta = self.meta.pop(key, None)
        if meta is not None:
            del self.entries[key]
            self.index.pop(meta[1], None)

    def sweep(self) -> None:
        """Drop the entries that would pass ``ttl`` before the next sweep."""
        meta = self.meta
        horizon = self.timer() + self.slack
        while meta:
            key = next(iter(meta))  # fill order is expiry order
            if meta[key][0] > horizon:
                return
            self._forget(key)

    def drop(self, key: Hashable, name: str) -> None:
        """Forget ``key`` (this process writes it); reads in flight will not fill it."""
        self.seq += 1
        self._forget(key)
        self.index.pop(name, None)

    def reset(self, *, listening: bool) -> None:
        """Forget everything (a clear, or the subscription changed)."""
        self.seq += 1
        self.entries.clear()  # in place: the store holds its ``get``
        self.meta.clear()
        self.index.clear()
        self.listening = listening

    def received(self, data: bytes) -> None:
        """Apply one invalidation message."""
        self.invalidations += 1
        if data == CLEAR:
            self.reset(listening=self.listening)
            return
        self.seq += 1
        key = self.index.pop(data[len(_KEY) :].decode(), _MISSING)
        if key is not _MISSING:
            self._forget(key)

    # -- the subscription --------------------------------------------------------------
    async def listen_forever(
        self,
        redis: Redis,
        *,
        timeout: float | None,
        retry_after: float,
        slots: Limiter | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the subscription up; ``task_status`` is set after the first attempt.

        ``slots``: the client pool's limiter (``_outage.pool_slots``); the
        subscription holds one of its slots (one connection) while it is open,
        if that leaves at least one for commands. Otherwise (a pool of one
        connection, or every other slot held by subscriptions) it holds none:
        commands then meet redis-py's ``MaxConnectionsError``, a clear error,
        rather than waiting forever for a slot no command gives back.
        """
        wait = timeout if timeout is not None else 5.0
        started = False

        def subscribed() -> None:
            nonlocal started
            if self.listening or self.entries:  # redis-py re-subscribed on its own
                self.resets += 1
            self.reset(listening=True)
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                if slots is None or not _spare(slots):
                    await self._listen(redis, wait, subscribed)
                else:
                    async with slots:  # no wait: _spare saw a free slot, and no await since
                        await self._listen(redis, wait, subscribed)
            except Exception as exc:  # background work: counted and logged, never raised
                if self.listening or self.entries:
                    self.resets += 1
                    logger.warning("RedisStore near cache off: subscription lost: %r", exc)
            finally:
                self.reset(listening=False)
            if not started:
                started = True
                task_status.started()
            # re-subscribing is cheap: try about once a second, at most every retry_after
            await anyio.sleep(jittered(min(max(retry_after, 0.05), 1.0)))

    async def _listen(self, redis: Redis, wait: float, subscribed: Callable[[], None]) -> None:
        ping_every = self.slack  # wakes at least this often: to sweep, and to ping
        pubsub = redis.pubsub()
        try:
            with anyio.fail_after(wait):
                await pubsub.subscribe(self.channel)
            pong_due: float | None = None
            while True:
                quiet = ping_every
                if pong_due is not None:
                    quiet = min(max(pong_due - anyio.current_time(), 0.0), quiet)
                with anyio.fail_after(quiet + wait):
                    message = await pubsub.get_message(timeout=quiet)
                self.sweep()
                if message is None:
                    if pong_due is None:
                        with anyio.fail_after(wait):
                            await pubsub.ping()
                        pong_due = anyio.current_time() + wait
                    elif anyio.current_time() >= pong_due:
                        msg = f"no answer to PING within {wait} s"
                        raise TimeoutError(msg)
                    continue
                pong_due = None  # any message shows the connection is alive
                if message["type"] == "message":
                    self.received(message["data"])
                elif message["type"] == "subscribe":  # (re)subscribed: start afresh
                    subscribed()
        finally:
            with anyio.move_on_after(wait, shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
