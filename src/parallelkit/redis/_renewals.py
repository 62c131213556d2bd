"""Renewals of many leases at once: one task and one command per round.

:func:`~._lease.keep_renewed` renews one lease from a task of its own; an entered
``RedisStore`` renews all its load leases with :class:`Renewals` instead (the
same rules), so a load starts no task. :func:`renewal_failed` logs a renewal
Redis refused, for both.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
from redis.asyncio import Redis
from typing_extensions import final

from ._outage import Down, Guard

if TYPE_CHECKING:
    from ._lease import Lease

__all__ = ["Renewals", "renewal_failed"]

logger = logging.getLogger("parallelkit.redis")

# KEYS[i] a lease; ARGV[1] ttl (ms), ARGV[i + 1] its token. For each, 1 if still
# ours and extended, else 0.
_RENEW_MANY = """
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    out[i] = redis.call('PEXPIRE', KEYS[i], ARGV[1])
  else
    out[i] = 0
  end
end
return out
"""
#: At most this many leases per command of a :class:`Renewals` round.
_RENEW_BATCH = 500


def renewal_failed(what: str, exc: Exception) -> None:
    """Log a renewal that Redis refused (not an outage: those the guard counts).

    Background work: raising it would cancel the holder's work (and, from a
    store's shared renewal task, everything in the store's ``async with``).
    """
    logger.warning("%s: renewing failed: %r", what, exc, exc_info=exc)


@final
class Renewals:
    """Keeps many leases of one ``ttl`` renewed: :func:`keep_renewed`'s rules, with
    one task (:meth:`run`, in its owner's task group) and one command per round
    for all of them (at most 500 leases per command), instead of a task each.

    Leases are renewed every ``ttl / 3``: one taken just after a round is renewed
    by the next, with two thirds of its ttl to spare. A lease Redis says is gone
    or someone else's, or that could not be renewed for a whole ``ttl`` (an
    outage, or errors Redis answered with: logged and counted in :attr:`errors`),
    is marked lost (:meth:`Lease.lost`) and no longer renewed. Its owner's exit
    waits for the leases still held (:meth:`drain`) before it stops the task.
    """

    __slots__ = ("_guard", "_held", "_idle", "_script", "_ttl", "active", "errors")

    def __init__(self, redis: Redis, guard: Guard, ttl: float) -> None:
        self._script = redis.register_script(_RENEW_MANY)
        self._guard = guard
        self._ttl = ttl
        self._held: dict[Lease, float] = {}  # lease -> valid until (anyio's clock)
        self._idle: anyio.Event | None = None  # set when nothing is held (drain)
        self.active = False
        """Whether :meth:`run` runs (else a lease renews itself, in a task of its own)."""
        self.errors = 0
        """Rounds Redis refused for another reason than an outage (logged)."""

    def add(self, lease: Lease) -> None:
        """Keep ``lease`` (just taken) renewed until :meth:`discard`."""
        self._held[lease] = anyio.current_time() + self._ttl

    def discard(self, lease: Lease) -> None:
        self._held.pop(lease, None)
        if not self._held and self._idle is not None:
            self._idle.set()

    async def drain(self) -> None:
        """Wait until every lease held is given back (or lost), still renewing them
        (:meth:`run` goes on); leases taken meanwhile renew themselves (``active``
        is off). From the owner's exit, before it stops :meth:`run`: a load that
        outlives its store's ``async with`` keeps its lease until it ends, instead
        of losing it ``ttl`` later to another process that loads the key again.

        Cancelling the wait (a timeout around the owner's exit) stops it: the
        leases still held are then no longer renewed and expire after ``ttl``.
        """
        self.active = False
        if not self._held:
            return
        self._idle = idle = anyio.Event()
        try:
            await idle.wait()
        finally:
            self._idle = None

    async def run(self) -> None:
        """The one renewal task; background work: nothing it meets is raised."""
        self.active = True
        try:
            while True:
                await anyio.sleep(self._ttl / 3)
                held = list(self._held)
                for start in range(0, len(held), _RENEW_BATCH):
                    await self._round(held[start : start + _RENEW_BATCH])
        finally:
            self.active = False

    async def _round(self, leases: list[Lease]) -> None:
        keys, tokens, live = [], [], []
        for lease in leases:
            token = lease.token
            if token is None:  # given back, or lost
                self.discard(lease)
                continue
            keys.append(lease.key)
            tokens.append(token)
            live.append(lease)
        if not live:
            return
        started = anyio.current_time()
        held = self._held
        soonest = min(held.get(lease, started) for lease in live)
        limit = max(soonest - started, self._ttl / 3)  # as keep_renewed
        args: list[str | int] = [round(self._ttl * 1000), *tokens]
        try:
            replies = await self._guard.call(
                "renew", self._script(keys=keys, args=args), force=True, timeout=limit
            )
        except Exception as exc:  # Down (an outage), or Redis refused the command
            if not isinstance(exc, Down):
                self.errors += 1
                renewal_failed(f"{len(live)} load lease(s)", exc)
            now = anyio.current_time()
            for lease in live:  # transient, unless a lease ran out meanwhile
                if held.get(lease, now) <= now:
                    lease.lost()
                    self.discard(lease)
            return
        for lease, ok in zip(live, replies, strict=True):
            if lease not in held:
                continue  # given back meanwhile
            if ok:
                held[lease] = started + self._ttl
            else:
                lease.lost()
                self.discard(lease)
