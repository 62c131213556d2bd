"""A RedisStore's write refusals: Redis answers, serves reads, but will not write.

A replica (a primary demoted by a failover: ``READONLY``), ``maxmemory`` reached
with ``noeviction`` (``OOM``), a failed background save with
``stop-writes-on-bgsave-error`` (``MISCONF``) or ``min-replicas-to-write`` not
met (``NOREPLICAS``) refuse the store's writes (:func:`._outage.refuses_writes`).
That is no outage: reads keep going to Redis. The store then serves each load's
value and keeps it in local memory (not in Redis), and keeps an invalidation it
could not write (as during an outage) to write it when Redis accepts writes again
(:mod:`._store_writes`, :mod:`._store_loads`).

:class:`Refusals` is the *episode*: from the first refusal until a write is
accepted again. It is logged once when it starts and once when it ends, not per
miss; while it lasts, the store tries a write that stores (a load's lease and
value, a ``set``) at most once every ``retry_after`` seconds (the others are
skipped without a round trip), and an invalidation every time.
"""

from __future__ import annotations

import logging
import math

from typing_extensions import final

from ._common import RedisUnavailable
from ._outage import Guard

__all__ = ["Refusals"]

logger = logging.getLogger("parallelkit.redis")


@final
class Refusals:
    """The write refusals of one store (internal; see the module docs).

    Attributes:
        count: store operations whose write Redis refused, or that were not
            tried because it refuses writes (``write_refusals``).
        error: the last refusal of the episode under way, else ``None``.
    """

    __slots__ = ("_guard", "_owner", "_strict", "_until", "count", "error")

    def __init__(self, owner: str, guard: Guard, *, strict: bool) -> None:
        self._owner = owner
        self._guard = guard  # its clock (``timer``) and ``retry_after``
        self._strict = strict
        self._until = -math.inf
        self.count = 0
        self.error: BaseException | None = None

    def write_refused(self, exc: BaseException | None, what: str) -> None:
        """A store operation's write (``what``) was refused (``exc``), or skipped
        (``None``) during an episode: count it; raise if ``strict``, else go on."""
        self.count += 1
        if exc is None:
            return
        if self._strict:
            msg = f"{self._owner}: Redis refused {what} (strict=True): {exc}"
            raise RedisUnavailable(msg) from exc
        self.refused(exc, what)

    def refused(self, exc: BaseException, what: str) -> None:
        """Redis refused a write (``what``): start the episode (logged) or go on with it."""
        if self.error is None:
            logger.warning(
                "%s: Redis refuses writes (%s during %s: %s); loaded values are served "
                "and kept in this process's memory, not in Redis; invalidations are "
                "kept and written when it accepts writes again",
                self._owner,
                type(exc).__name__,
                what,
                exc,
            )
        self.error = exc
        guard = self._guard
        self._until = guard.timer() + guard.retry_after

    def waiting(self) -> bool:
        """During an episode: whether a write that stores is skipped now (no round
        trip). Once every ``retry_after`` seconds it is not: that caller tries Redis."""
        if self.error is None:
            return False
        guard = self._guard
        now = guard.timer()
        if now < self._until:
            return True
        self._until = now + guard.retry_after  # this caller tries; the others wait again
        return False

    def replayed(self) -> None:
        """Redis accepted the kept invalidations: the next write that stores tries it at
        once (a replica promoted again takes both; under ``OOM`` only deletes pass)."""
        self._until = -math.inf

    def accepted(self) -> None:
        """A write that stores was accepted, nothing is left to replay: the episode ends."""
        if self.error is None:
            return
        self.error = None
        self._until = -math.inf
        logger.info("%s: Redis accepts writes again", self._owner)

    def __repr__(self) -> str:
        state = "refusing" if self.error is not None else "accepting"
        return f"<Refusals {state} count={self.count}>"
