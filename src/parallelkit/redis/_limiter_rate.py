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
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import anyio
from anyio.lowlevel import EventLoopToken, current_token
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from typing_extensions import final

from ._common import new_token
from ._give_back import left_to_expire
from ._outage import Down, Guard

__all__ = ["Line", "Turn", "Turns"]


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
        rate_key: the GCRA arrival time's key (``...:rate``); the last
            reservation's record and the holes live next to it.
        now: the scripts' clock argument (``""``: Redis ``TIME``).
        what: the limiter, for the log.
        lease: the bound of a give-back when the guard has no ``command_timeout``.
    """

    __slots__ = (
        "_burst",
        "_guard",
        "_holes_key",
        "_interval_ms",
        "_last_key",
        "_lease",
        "_now",
        "_rate_key",
        "_redis",
        "_reserve",
        "_unreserve",
        "_what",
    )

    def __init__(
        self,
        redis: Redis,
        guard: Guard,
        reserve: AsyncScript,
        unreserve: AsyncScript,
        rate_key: str,
        *,
        interval_ms: float,
        burst: int,
        now: Callable[[], str],
        what: str,
        lease: float,
    ) -> None:
        self._redis = redis
        self._guard = guard
        self._rate_key = rate_key
        self._holes_key = f"{rate_key}:holes"
        self._last_key = f"{rate_key}:last"
        self._interval_ms = interval_ms
        self._burst = burst
        self._now = now
        self._what = what
        self._lease = lease
        self._reserve = reserve  # the scripts of _limiter_scripts, registered
        self._unreserve = unreserve

    @property
    def _limit(self) -> float:
        return self._lease if self._guard.timeout is None else self._guard.timeout

    async def reserve(self) -> Turn:
        """Reserve the next start (a start given back first): the seconds to wait for
        it, and how to give it back."""
        token = new_token()
        args: list[float | str] = [self._interval_ms, self._burst, token, self._now()]
        keys = [self._rate_key, self._last_key, self._holes_key]
        command = self._reserve(keys=keys, args=args)
        try:
            delay, before, after = await self._guard.call("reserve", command)
        except BaseException as exc:
            # cancelled (or timed out, or the connection reset) with the reply on its
            # way: the script may have reserved a start that every later caller would
            # wait behind; not when the command was never sent
            if not isinstance(exc, Down) or exc.sent:
                with contextlib.suppress(Exception):  # raise the reserve's error
                    await self._give_back_lost(token)
            raise
        return Turn(float(delay) / 1000, bytes(before), bytes(after))

    async def _give_back_lost(self, token: str) -> None:
        """Give back the start ``token`` reserved if its reply never came: found in the
        last reservation's record while no later one replaced it (then, the start
        stays taken, as after an outage). Shielded and bounded, as a slot."""
        limit = self._limit
        with anyio.move_on_after(limit, shield=True):
            try:
                command = self._redis.get(self._last_key)
                last = await self._guard.call("unreserve", command, force=True, timeout=limit)
            except Down:
                return
            parts = (last.encode() if isinstance(last, str) else last or b"").split(b" ")
            if len(parts) == 3 and parts[0] == token.encode():
                await self.give_back(Turn(0.0, parts[1], parts[2]))

    async def give_back(self, turn: Turn) -> None:
        """Give back a start its caller will not take (shielded, bounded, as a slot):
        undone if it is the last, else a hole the next reservation takes."""
        limit = self._limit
        # down or refused: the start stays taken, later callers wait one interval longer
        with anyio.move_on_after(limit, shield=True), left_to_expire(self._what):
            args: list[bytes | str] = [turn.before, turn.after, self._now()]
            command = self._unreserve(keys=[self._rate_key, self._holes_key], args=args)
            await self._guard.call("unreserve", command, force=True, timeout=limit)
