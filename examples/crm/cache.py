"""Scenario 6 - cached conversation lookups with :class:`parallelkit.SWRCache`.

The playbook's "fast" lookup returns the cached conversation and then fires a
database query **on every hit** to refresh it in the background (fire-and-forget:
no owner, errors only logged, no dedupe). A hot conversation read 1,000 times a
second costs 1,000 queries a second: the cache saves latency, not load.

``SWRCache`` keeps a value *fresh* for ``fresh`` seconds (no database call at
all), then *stale* for ``stale`` more seconds (returned at once, refreshed by
**one** background load per key, owned by the cache's task group); concurrent
misses share one load. Cache plain snapshots (:class:`ConversationView`), not ORM
objects bound to a closed session.

Example:
    ```python
    cache, get_conversation = conversation_lookups(db.sessions, fresh=30, stale=300)
    async with cache:                       # owns the background refreshes
        view = await get_conversation(42)   # miss: one SELECT
        view = await get_conversation(42)   # fresh hit: no SELECT
    ```
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

import parallelkit as pk

from .models import Conversation

__all__ = ["ConversationView", "conversation_lookups"]


@dataclass(frozen=True, slots=True)
class ConversationView:
    """An immutable snapshot of a conversation: safe to share between requests."""

    id: int
    contact_id: int
    status: str
    channel: str
    subject: str
    updated_at: datetime

    @classmethod
    def of(cls, row: Conversation) -> ConversationView:
        return cls(row.id, row.contact_id, row.status, row.channel, row.subject, row.updated_at)


def conversation_lookups(
    sessions: Callable[[], AsyncSession],
    *,
    fresh: float = 30.0,
    stale: float = 300.0,
    maxsize: int = 10_000,
    clock: Callable[[], float] | None = None,
) -> tuple[pk.SWRCache, pk.CachedFunction[[int], ConversationView | None]]:
    """A cache and a cached ``get_conversation(conversation_id)`` (one session per load).

    Args:
        sessions: an ``async_sessionmaker``.
        fresh: seconds a loaded conversation is served with no database call.
        stale: further seconds it is served while one background load refreshes it.
        maxsize: conversations kept (least recently used dropped first).
        clock: the cache's clock (tests pass a fake one to move time).

    Returns:
        ``(cache, get_conversation)``; enter ``cache`` with ``async with`` at
        start-up so it owns its refreshes.
    """
    cache = pk.SWRCache(fresh=fresh, stale=stale, maxsize=maxsize, clock=clock)

    @cache.cached
    async def get_conversation(conversation_id: int) -> ConversationView | None:
        async with sessions() as session:
            row = await session.get(Conversation, conversation_id)
            return None if row is None else ConversationView.of(row)

    return cache, get_conversation
