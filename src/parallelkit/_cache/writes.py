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
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

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

    __slots__ = ("_barrier", "_busy")

    def __init__(self) -> None:
        # keys being written -> the events of the writers waiting, in order (on demand)
        self._busy: dict[Hashable, deque[anyio.Event] | None] = {}
        # set while a clear runs: writes asked for after it wait for it to end
        self._barrier: anyio.Event | None = None

    def __len__(self) -> int:
        return len(self._busy)

    async def acquire(self, key: Hashable) -> None:
        """Wait for the writes of ``key`` asked for earlier (and for a clear under
        way), then take the turn."""
        while self._barrier is not None:
            await self._barrier.wait()
        await self._take(key)

    async def _take(self, key: Hashable) -> None:
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

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """For ``clear``: wait until the writes of every key asked for so far have
        landed, then hold off every write asked for from now on until the block ends
        (a ``set`` called while the store is being cleared lands after the clear,
        not before it, to be erased)."""
        while self._barrier is not None:  # another clear: after it
            await self._barrier.wait()
        barrier = self._barrier = anyio.Event()
        try:
            for key in list(self._busy):
                if key in self._busy:
                    await self._take(key)
                    self.release(key)
            yield
        finally:
            self._barrier = None
            barrier.set()

    def __repr__(self) -> str:
        return f"<KeyedWrites in_flight={len(self._busy)}>"
