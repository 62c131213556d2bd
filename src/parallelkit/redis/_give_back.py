"""Giving back what a command may have taken, written once: a lease, a slot, a start.

A give-back (a lock's release, a limiter's slot or rate start given back) is
shielded and never raises what Redis answers while it is down or refusing writes:
what was taken then expires on its own (:func:`left_to_expire`). A command that
timed out (:func:`timed_out`) may still run when a stalled Redis answers again,
so what it may have taken is given back once Redis answers
(:func:`give_back_once_answered`). Used by :class:`~._lease.Lease` and by
``RedisLimiter``.

Such a give-back may reach Redis *before* the command it undoes (that command's
bytes held on one connection, the give-back sent on another that gets through
first): it finds nothing. So it also leaves a *tombstone* for the caller's token
(:func:`void_key`, expiring when what the command would have taken would), and
the acquire scripts refuse a token that has one: the late command takes nothing
(nor does a copy redis-py sends again after a reset). Best effort still: a
command held for longer than that finds no tombstone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

import anyio
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._common import jittered
from ._outage import Down, Guard, refuses_writes

__all__ = [
    "give_back_once_answered",
    "left_to_expire",
    "timed_out",
    "timed_out_error",
    "void_key",
]

logger = logging.getLogger("parallelkit.redis")


def void_key(key: str, token: str) -> str:
    """The tombstone of ``token`` on ``key``: what the give-back of an acquire whose
    reply never came leaves, so that acquire takes nothing if it runs later. Next
    to ``key`` (its hash tag: the same Redis Cluster slot), one small key per such
    give-back (none on the normal paths), expiring with what it guards."""
    return f"{key}:void:{token}"


@contextlib.contextmanager
def left_to_expire(what: str | None) -> Iterator[None]:
    """Around a give-back (a release, a start given back): when Redis is down, or
    refuses the write (``READONLY`` from a primary demoted by a failover, ``OOM``…),
    what was taken expires on its own. Nothing is raised: the holder's own outcome
    (its body's error, its cancellation, its success) is what it raises.

    Args:
        what: the owner, to log a refusal as; ``None``: not logged (a store logs
            refusals itself, once per episode).
    """
    try:
        yield
    except Down:
        pass
    except Exception as exc:
        if not refuses_writes(exc):
            raise
        if what is not None:
            logger.warning("%s: giving back failed, it expires: %r", what, exc, exc_info=exc)


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a command Redis did not answer in time: it was sent, so a
    Redis that stalled may still run it when it answers again."""
    return isinstance(exc, Down) and exc.sent and timed_out_error(exc.cause)


def timed_out_error(error: BaseException | None) -> bool:
    """Whether ``error`` (an outage's cause) is a command that did not answer in time."""
    return isinstance(error, TimeoutError | RedisTimeoutError)


async def give_back_once_answered(
    guard: Guard,
    give_back: Callable[[], Awaitable[object]],
    *,
    until: float,
    pause: float,
) -> None:
    """Give back what a command that timed out may have taken, once Redis answers.

    A Redis that stalled longer than ``command_timeout`` may run the command when
    it answers again (its bytes held on the way: a proxy, the network), after a
    first give-back could not reach it either (refused or reset, as by a proxy or
    a restarting server): what it took would stay taken, by nobody, until it
    expires. ``give_back()`` (a command that removes it by the caller's token,
    and leaves a tombstone that the command honours if it runs later: see the
    module docs) is sent again every ``pause`` seconds
    (jittered), even while the guard's circuit is open, until Redis answers it,
    or until one is sent and not answered in time (it waits behind the command it
    undoes, and runs after it), or until ``until`` (anyio's clock: when what was
    taken expires anyway). A refusal (``READONLY``...) is raised. Each try is
    shielded and bounded by ``command_timeout``; the pauses are not: a cancelled
    caller stops trying.
    """
    while True:
        left = until - anyio.current_time()
        if left <= 0:
            return
        limit = left if guard.timeout is None else min(guard.timeout, left)
        with anyio.move_on_after(limit, shield=True) as scope:  # a free connection included
            try:
                await guard.call("release", give_back(), force=True, timeout=left)
            except Down as down:
                if timed_out(down):
                    return  # sent (redis-py's own timeout): it runs after the command
            else:
                return
        if scope.cancelled_caught:
            return  # sent and not answered in time: as above
        left = until - anyio.current_time()
        if left <= 0:
            return
        await anyio.sleep(min(jittered(pause), left))
