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

from collections import deque
from collections.abc import Hashable

import anyio
from typing_extensions import final

__all__ = ["KeyedWrites"]


@final
class KeyedWrites:
    """One write at a time per key, in the order they asked (internal). Uncontended,
    nothing awaits.

    The turn is handed from one writer to the next one in line, never left free
    for a moment: a writer that asks later (``set`` then ``invalidate`` in one
    task, while another ``set`` waits) cannot go ahead of one already waiting.
    """

    __slots__ = ("_busy",)

    def __init__(self) -> None:
        # keys being written -> the events of the writers waiting, in order (on demand)
        self._busy: dict[Hashable, deque[anyio.Event] | None] = {}

    def __len__(self) -> int:
        return len(self._busy)

    async def acquire(self, key: Hashable) -> None:
        """Wait for the writes of ``key`` asked for earlier, then take the turn."""
        busy = self._busy
        if key not in busy:
            busy[key] = None
            return
        line = busy[key]
        if line is None:
            line = busy[key] = deque()
        turn = anyio.Event()
        line.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # handed the turn as it was cancelled: pass it on
                self.release(key)
            else:
                line.remove(turn)
            raise

    def release(self, key: Hashable) -> None:
        """End this write of ``key``: the next writer of that key in line goes."""
        line = self._busy[key]
        if line:
            line.popleft().set()  # the key stays busy: the turn passes directly
        else:
            del self._busy[key]

    async def idle(self) -> None:
        """Wait until the writes of every key asked for so far have landed (``clear``)."""
        for key in list(self._busy):
            if key in self._busy:
                await self.acquire(key)
                self.release(key)

    def __repr__(self) -> str:
        return f"<KeyedWrites in_flight={len(self._busy)}>"
