"""Store writes ordered per key: an invalidation is never undone by a slower write.

A load ends with ``await store.set(key, ...)``; on a network store that await
takes a round trip. If ``invalidate(key)`` ran its ``delete`` meanwhile, the
delete could reach the store *before* the set, and the old value would come back.
:class:`KeyedWrites` makes writes of one key take turns in this process: a
delete (or set, or clear) waits for the write of that key still in flight, and a
load re-checks, once its turn comes, that it was not superseded meanwhile.

Across processes the same guarantee needs the store's help
(:class:`~parallelkit._cache.store.SupportsConditionalSet`).
"""

from __future__ import annotations

from collections.abc import Hashable

import anyio
from typing_extensions import final

__all__ = ["KeyedWrites"]


@final
class KeyedWrites:
    """One write at a time per key (internal). Uncontended, nothing awaits."""

    __slots__ = ("_busy",)

    def __init__(self) -> None:
        # keys being written -> the event their next writer waits on (made on demand)
        self._busy: dict[Hashable, anyio.Event | None] = {}

    def __len__(self) -> int:
        return len(self._busy)

    async def acquire(self, key: Hashable) -> None:
        """Wait for the write of ``key`` in flight, if any, then take the turn."""
        busy = self._busy
        while key in busy:
            event = busy[key]
            if event is None:
                event = busy[key] = anyio.Event()
            await event.wait()
        busy[key] = None

    def release(self, key: Hashable) -> None:
        """End this write of ``key``: the next writer of that key goes."""
        event = self._busy.pop(key)
        if event is not None:
            event.set()

    async def idle(self) -> None:
        """Wait until no write of any key is in flight (for ``clear``)."""
        busy = self._busy
        while busy:
            key = next(iter(busy))
            event = busy[key]
            if event is None:
                event = busy[key] = anyio.Event()
            await event.wait()

    def __repr__(self) -> str:
        return f"<KeyedWrites in_flight={len(self._busy)}>"
