"""RedisStore's read side past the near cache: one shared ``GET`` per key, and the
near-cache renewal round.

:func:`shared_get` is what ``RedisStore.get`` runs when the near cache has no entry
(``RedisStore.peek``, the hit path, stays in :mod:`._store`, and never enters
here); :func:`renew` is one round of the renewal of near entries before
``near_ttl``, which an entered store runs every sweep interval
(:mod:`._store_tasks`). The functions take the store they work for.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import anyio
from typing_extensions import final

from .._cache.store import CacheEntry
from . import _store_writes as writes
from ._near import Ticket
from ._outage import Down
from ._store_codec import decode

if TYPE_CHECKING:
    from ._store import RedisStore

__all__ = ["renew", "shared_get"]

#: At most this many keys, and about this many bytes, per ``MGET`` of a near-cache
#: renewal round (a few large values must not make one slow command).
_RENEW_KEYS = 500
_RENEW_BYTES = 1 << 20


@final
class _Read:
    """A ``GET`` of one key in flight: concurrent readers of the key wait for it."""

    __slots__ = ("done", "entry", "name", "ok", "ticket")

    def __init__(self, name: str, ticket: Ticket) -> None:
        self.name = name
        self.ticket = ticket  # the near cache's ticket for it (see ._near)
        self.done: anyio.Event | None = None  # made by the first reader that waits
        self.entry: CacheEntry[Any] | None = None
        self.ok = False


async def shared_get(store: RedisStore, key: Hashable) -> CacheEntry[Any] | None:
    """Read ``key`` from Redis, shared by the concurrent readers of ``RedisStore.get``
    (one ``GET`` per key), and keep what it read in the near cache."""
    name = store._name(key)
    near = store._near
    read = store._reads[key] = _Read(name, near.begin(name))
    try:
        if store._refusals.error is not None and await writes.masked(store, name):
            # an invalidation Redis refused: its old entry is there, not the truth
            entry = await store._local.get(key)
            read.entry, read.ok = entry, True
            return entry
        try:
            raw = await store._guard.call("get", store._redis.get(store._value_prefix + name))
        except Down as down:
            store._degrade(down)
            entry = await store._local.get(key)
        else:
            entry = None
            if raw is not None:
                entry = decode(store, key, raw)
                if entry is not None:
                    near.put(key, name, entry, read.ticket, raw)
        read.entry, read.ok = entry, True
        return entry
    finally:
        near.end(name)
        if store._reads.get(key) is read:
            del store._reads[key]
        if read.done is not None:
            read.done.set()


async def renew(store: RedisStore) -> None:
    """One renewal round: check the entries about to pass ``near_ttl`` (the loop that
    runs it every sweep interval: :mod:`._store_tasks`)."""
    near = store._near
    if not near.listening:
        return
    for part in _parts(near.due()):
        sent = near.timer()
        names = [store._value_prefix + name for _, name, _ in part]
        now = await store._guard.call("renew", store._redis.mget(names))
        near.renew(part, now, sent)


def _parts(batch: list[tuple[Hashable, str, bytes | str]]) -> list[list[Any]]:
    """``batch`` cut into ``MGET``-sized parts: at most ``_RENEW_KEYS`` keys each, and
    no more than about ``_RENEW_BYTES`` of values (a larger value goes alone)."""
    parts: list[list[Any]] = []
    part: list[Any] = []
    size = 0
    for item in batch:
        if part and (len(part) >= _RENEW_KEYS or size + len(item[2]) > _RENEW_BYTES):
            parts.append(part)
            part, size = [], 0
        part.append(item)
        size += len(item[2])
    if part:
        parts.append(part)
    return parts
