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
from typing import Any

import anyio
from typing_extensions import final

__all__ = ["KeyedWrites"]


_CLEAR: Any = object()  # a clear's place in the line behind a clear


@final
class KeyedWrites:
    """One write at a time per key, in the order they asked (internal). Uncontended,
    nothing awaits.

    The turn is handed from one writer to the next one in line, never left free
    for a moment: a writer that asks later (``set`` then ``invalidate`` in one
    task, while another ``set`` waits) cannot go ahead of one already waiting.
    While a clear runs, writes and clears asked for meanwhile wait in one line, in
    order; when it ends, the writes before the next clear in that line are given
    their keys' turns (or places in their keys' lines) at once, then that clear
    goes: it waits for them, and the writes after it wait for it. Nothing depends
    on which woken task the event loop runs first.
    """

    __slots__ = ("_behind", "_busy", "_clearing")

    def __init__(self) -> None:
        # keys being written -> the events of the writers waiting, in order (on demand)
        self._busy: dict[Hashable, deque[anyio.Event] | None] = {}
        # while a clear runs: the writes (their key) and clears (_CLEAR) asked for
        # meanwhile, in order, each with the event that hands it its turn
        self._clearing = False
        self._behind: deque[tuple[Any, anyio.Event]] = deque()

    def __len__(self) -> int:
        return len(self._busy)

    async def acquire(self, key: Hashable) -> None:
        """Wait for the writes of ``key`` asked for earlier (and for a clear under
        way), then take the turn."""
        if not self._clearing:
            await self._take(key)
            return
        turn = anyio.Event()
        entry = (key, turn)
        self._behind.append(entry)
        await self._wait_turn(key, turn, entry)

    async def _take(self, key: Hashable) -> None:
        busy = self._busy
        if key not in busy:
            busy[key] = None
            return
        turn = anyio.Event()
        self._queue(key, turn)
        await self._wait_turn(key, turn, None)

    def _queue(self, key: Hashable, turn: anyio.Event) -> None:
        """Put ``turn`` last in ``key``'s line (the key is busy)."""
        line = self._busy[key]
        if line is None:
            line = self._busy[key] = deque()
        line.append(turn)

    async def _wait_turn(
        self, key: Hashable, turn: anyio.Event, entry: tuple[Any, anyio.Event] | None
    ) -> None:
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # handed the turn as it was cancelled: pass it on
                self.release(key)
            elif entry is not None and _remove(self._behind, entry):
                pass  # still behind the clear
            else:
                line = self._busy[key]
                assert line is not None
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
        if self._clearing:  # another clear: after it, and after the writes before us
            turn = anyio.Event()
            entry = (_CLEAR, turn)
            self._behind.append(entry)
            try:
                await turn.wait()
            except BaseException:
                if turn.is_set():  # made the clear that runs: let the line go on
                    self._end_clear()
                else:
                    _remove(self._behind, entry)
                raise
        else:
            self._clearing = True
        try:
            busy = self._busy
            for key in list(busy):
                if key in busy:
                    await self._take(key)
                    self.release(key)
            yield
        finally:
            self._end_clear()

    def _end_clear(self) -> None:
        """The clear ends: the writes waiting before the next clear get their turns
        (or places in their keys' lines) now, in order; that clear goes next."""
        behind, busy = self._behind, self._busy
        while behind:
            key, turn = behind.popleft()
            if key is _CLEAR:
                turn.set()  # still clearing: that clear's turn
                return
            if key in busy:
                self._queue(key, turn)
            else:
                busy[key] = None
                turn.set()
        self._clearing = False

    def __repr__(self) -> str:
        return f"<KeyedWrites in_flight={len(self._busy)} clearing={self._clearing}>"


def _remove(line: deque[tuple[Any, anyio.Event]], entry: tuple[Any, anyio.Event]) -> bool:
    """Remove ``entry`` (by identity: keys compare by value) if it is in ``line``."""
    for index, other in enumerate(line):
        if other is entry:
            del line[index]
            return True
    return False
