"""The start rate of :class:`~parallelkit.redis.RedisLimiter`: turns in Redis, a line here.

Every process keeps its callers in a line (:class:`Line`), first come, first
served; only the caller at the head holds a reservation in Redis (the GCRA
scripts of :mod:`._limiter_scripts`) and sleeps until it. So a caller that leaves
the line while it waits (cancelled, timed out) holds no start that the callers
behind it were spaced after: it leaves, and they keep their places. The head
that leaves gives its start back, then passes the head on: the next in line
reserves, and gets that start. A start given back while another process's
later reservation still stands stays in Redis as a *hole*, and the next
reservation of any process takes it if its time has not come yet (reservations
already made elsewhere do not move up: a hole nobody reserves in time is lost).
No two starts are ever closer than the rate allows.

Each reservation is recorded under its caller's token (:func:`turn_key`) until
its start has passed: a reservation whose reply never came (cancelled, timed out,
its connection reset) is given back from there, and a copy that redis-py sends
again after a reset finds it and gets the same start, not a second one. That
give-back leaves a tombstone in its place (for ``lease``), so a reservation it
overtook (held in a stall on another connection) takes nothing when it runs.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import anyio
from anyio.lowlevel import EventLoopToken, current_token
from redis.commands.core import AsyncScript
from typing_extensions import final

from ._common import new_token
from ._give_back import give_back_once_answered, left_to_expire, timed_out
from ._outage import Down, Guard

__all__ = ["Line", "Turn", "Turns", "turn_key"]


def turn_key(rate_key: str, token: str) -> str:
    """The record of the reservation ``token`` made (``"before after"``), or its
    tombstone (``"void"``): next to ``rate_key`` (the same Redis Cluster slot)."""
    return f"{rate_key}:turn:{token}"


class Turn(NamedTuple):
    """A reserved start: the wait for it (seconds), and how to give it back."""

    delay: float
    before: bytes
    after: bytes


@final
class Line:
    """This process's callers waiting for a start; the head alone holds a reservation.

    :meth:`join` returns when the caller is the head (at once when nobody is);
    the head calls :meth:`pass_on` once it has its start, gave it back, or found
    Redis down, and the next in line becomes the head.
    """

    __slots__ = ("_head", "_loop", "_waiting")

    def __init__(self) -> None:
        self._head = False
        self._waiting: deque[anyio.Event] = deque()
        self._loop: EventLoopToken | None = None  # the loop of the current head

    def __len__(self) -> int:
        """The callers waiting behind the head."""
        return len(self._waiting)

    async def join(self) -> None:
        """Wait until this caller is the head of the line."""
        loop = current_token()
        if not self._head or self._loop != loop:
            # free; or the head's event loop was closed while it waited (a limiter
            # made at module level serves each ``anyio.run`` in turn): it never comes back
            self._waiting.clear()
            self._head, self._loop = True, loop
            return
        turn = anyio.Event()
        self._waiting.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # made the head as it was cancelled: the next one's turn
                self.pass_on()
            else:
                self._waiting.remove(turn)
            raise

    def pass_on(self) -> None:
        """Make the next caller in line the head, if any."""
        if self._waiting:
            self._waiting.popleft().set()
        else:
            self._head = False


@final
class Turns:
    """The starts of one limiter name in Redis: reserve one, give one back.

    Args:
        reserve: the ``RESERVE`` script, registered.
        unreserve: the ``UNRESERVE`` script, registered.
        void: the ``VOID_TURN`` script, registered.
        rate_key: the GCRA arrival time's key (``...:rate``); the reservations'
            records (:func:`turn_key`) and the holes live next to it.
        line: this process's callers waiting for a start: :meth:`reserve` is
            called by its head, and passes it on when it fails.
        now: the scripts' clock argument (``""``: Redis ``TIME``).
        what: the limiter, for the log.
        lease: the bound of a give-back when the guard has no ``command_timeout``,
            and of the retries of a give-back after a timeout; a tombstone's life.
        poll: the pause between those retries.
    """

    __slots__ = (
        "_burst",
        "_guard",
        "_holes_key",
        "_interval_ms",
        "_lease",
        "_line",
        "_now",
        "_poll",
        "_rate_key",
        "_reserve",
        "_unreserve",
        "_void",
        "_what",
    )

    def __init__(
        self,
        guard: Guard,
        reserve: AsyncScript,
        unreserve: AsyncScript,
        void: AsyncScript,
        rate_key: str,
        *,
        line: Line,
        interval_ms: float,
        burst: int,
        now: Callable[[], str],
        what: str,
        lease: float,
        poll: float,
    ) -> None:
        self._guard = guard
        self._rate_key = rate_key
        self._holes_key = f"{rate_key}:holes"
        self._line = line
        self._interval_ms = interval_ms
        self._burst = burst
        self._now = now
        self._what = what
        self._lease = lease
        self._poll = poll
        self._reserve = reserve  # the scripts of _limiter_scripts, registered
        self._unreserve = unreserve
        self._void = void

    @property
    def _limit(self) -> float:
        return self._lease if self._guard.timeout is None else self._guard.timeout

    async def reserve(self) -> Turn:
        """Reserve the next start (a start given back first): the seconds to wait for
        it, and how to give it back. Called by the head of the line; raising, it has
        passed the line on (before the retries of a give-back after a timeout)."""
        token = new_token()
        keys = [self._rate_key, turn_key(self._rate_key, token), self._holes_key]
        sent = anyio.current_time()
        command = None  # the clock may raise before
        try:
            args: list[float | str] = [self._interval_ms, self._burst, self._now()]
            command = self._reserve(keys=keys, args=args)
            delay, before, after = await self._guard.call("reserve", command)
        except BaseException as exc:
            # cancelled (or timed out, or the connection reset) with the reply on its
            # way: the script may have reserved a start that every later caller would
            # wait behind, or run later (the tombstone: it takes nothing then); not
            # when the command was never sent. Timed out: a stalled Redis may run it
            # when it answers again: a give-back is tried until Redis answers one,
            # the line passed on first (the callers behind need not wait for that)
            passed = False
            try:
                if command is not None and (not isinstance(exc, Down) or exc.sent):
                    with contextlib.suppress(Exception):  # raise the reserve's error
                        if timed_out(exc):
                            self._line.pass_on()
                            passed = True
                            await give_back_once_answered(
                                self._guard,
                                lambda: self._void_command(keys),
                                until=sent + self._lease,
                                pause=self._poll,
                            )
                        else:
                            await self._give_back_lost(keys)
            finally:
                if not passed:
                    self._line.pass_on()
            raise
        return Turn(float(delay) / 1000, bytes(before), bytes(after))

    def _void_command(self, keys: list[str]) -> Awaitable[object]:
        """``VOID_TURN``: give back the start found in the reservation's record, and
        leave its tombstone (for ``lease``)."""
        command: Awaitable[object] = self._void(
            keys=keys, args=[round(self._lease * 1000), self._now()]
        )
        return command

    async def _give_back_lost(self, keys: list[str]) -> None:
        """Give back the start a reservation whose reply never came may have taken, and
        leave its tombstone: one try, shielded and bounded, as a slot's (down: the
        start stays taken, as after an outage)."""
        limit = self._limit
        with anyio.move_on_after(limit, shield=True):
            await self._guard.call("unreserve", self._void_command(keys), force=True, timeout=limit)

    async def give_back(self, turn: Turn) -> None:
        """Give back a start its caller will not take (shielded, bounded, as a slot):
        undone if it is the last, else a hole the next reservation takes."""
        limit = self._limit
        # down or refused: the start stays taken, later callers wait one interval longer
        with anyio.move_on_after(limit, shield=True), left_to_expire(self._what):
            args: list[bytes | str] = [turn.before, turn.after, self._now()]
            command = self._unreserve(keys=[self._rate_key, self._holes_key], args=args)
            await self._guard.call("unreserve", command, force=True, timeout=limit)
