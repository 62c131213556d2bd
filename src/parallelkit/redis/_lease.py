"""Leases, written once: take a Redis key with a token, renew it while held, give it back.

:class:`Lease` is the engine of :class:`~parallelkit.redis.RedisLock` (with a
fencing token, and "cancel the body when lost") and of ``RedisStore.load_lock``
(without either). :func:`keep_renewed` is the renewal loop both use, and
``RedisLimiter`` too for its sorted-set leases. :class:`Renewals` is the same
loop for many leases at once: an entered ``RedisStore`` renews all its load
leases with one task and one command per round, so a load starts no task.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType

import anyio
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError
from typing_extensions import Self, final

from .._core.owned import OwnedTaskGroup
from ._common import LockLost, LockNotAcquired, jittered, new_token
from ._outage import Down, Guard, refuses_writes

__all__ = [
    "Lease",
    "LeaseScripts",
    "Renewals",
    "give_back_once_answered",
    "keep_renewed",
    "left_to_expire",
    "renewal_failed",
    "timed_out",
]

logger = logging.getLogger("parallelkit.redis")

# KEYS[1] the lease, KEYS[2] (optional) the fencing counter; ARGV[1] token, ARGV[2]
# ttl (ms). Returns the new fencing token (or 1) when acquired, else minus the
# holder's remaining ttl (ms). The token is one more than the last, and never below
# the server's clock in ms: a Redis that lost the counter (a restart without
# persistence, a failover to a replica that missed the last write) starts it again
# above every token it gave before, not at 1.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if #KEYS > 1 then
    local now = redis.call('TIME')
    local floor = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    local last = tonumber(redis.call('GET', KEYS[2]) or '0')
    if last < floor then return redis.call('INCRBY', KEYS[2], floor - last) end
    return redis.call('INCR', KEYS[2])
  end
  return 1
end
local left = redis.call('PTTL', KEYS[1])
if left < 1 then left = 1 end
return -left
"""
# KEYS[1] the lease; ARGV[1] token, ARGV[2] ttl (ms). 1 if still ours and extended.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
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
# KEYS[1] the lease; ARGV[1] token. 1 if it was ours and is now released.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def renewal_failed(what: str, exc: Exception) -> None:
    """Log a renewal that Redis refused (not an outage: those the guard counts).

    Background work: raising it would cancel the holder's work (and, from a
    store's shared renewal task, everything in the store's ``async with``).
    """
    logger.warning("%s: renewing failed: %r", what, exc, exc_info=exc)


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
    return (
        isinstance(exc, Down)
        and exc.sent
        and isinstance(exc.cause, TimeoutError | RedisTimeoutError)
    )


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
    expires. ``give_back()`` (a command that removes it by the caller's token:
    nothing when the command never ran) is sent again every ``pause`` seconds
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


async def keep_renewed(
    guard: Guard,
    ttl: float,
    renew: Callable[[], Awaitable[object]],
    *,
    what: str,
    since: float | None = None,
) -> tuple[str, BaseException | None]:
    """Renew a lease every ``ttl / 3`` until it is lost; return why it was lost.

    ``renew()`` returns a truthy reply while the lease is still ours. A renewal
    that fails (an outage, or an error Redis answers with, such as ``READONLY``
    from a demoted primary: logged) is tried again at the next period as long as
    the lease is still valid. The lease is valid for ``ttl`` from when the command
    that took (or last renewed) it was *sent* (``since``; default: now), as Redis
    cannot have started its ``ttl`` earlier. After a failure nothing runs past
    that end: the next try comes at the next period or at the end, whichever is
    first, and is bounded by what is left of the lease; when the end comes first,
    the lease is lost then, not a period (and a ``command_timeout``) later, when
    another process may hold it already. The first try after a success is
    bounded by what is left of the lease, but at least ``ttl / 3`` (a process
    that ran late still asks: Redis says whether the lease is still ours), and
    at most the guard's ``command_timeout``.

    Args:
        what: the lease's owner, for the log (``"RedisLock 'job'"``).
        since: when the command that took the lease was sent (anyio's clock).

    Returns:
        ``("taken", None)`` (Redis says the lease is gone or someone else's), or
        ``("unreachable", error)`` (no renewal succeeded for a whole ``ttl``;
        ``error``: the last failure).
    """
    valid_until = (anyio.current_time() if since is None else since) + ttl
    error: BaseException | None = None  # the last failure since the last success
    while True:
        pause = ttl / 3
        if error is not None:  # failing: never wait past the lease's end
            pause = min(pause, valid_until - anyio.current_time())
        await anyio.sleep(pause)
        started = anyio.current_time()
        if error is not None and started >= valid_until:
            return "unreachable", error
        limit = valid_until - started
        if error is None:
            limit = max(limit, ttl / 3)
        try:
            ok = await guard.call("renew", renew(), force=True, timeout=limit)
        except Exception as exc:  # Down (an outage), or Redis refused the command
            error = exc
            if isinstance(exc, Down):
                error = exc.cause
            else:
                renewal_failed(what, exc)
            if anyio.current_time() < valid_until:
                continue  # transient: try again before the lease runs out
            return "unreachable", error
        if not ok:
            return "taken", None
        valid_until = started + ttl
        error = None


@final
class LeaseScripts:
    """The three Lua scripts of a lease, registered once per primitive."""

    __slots__ = ("acquire", "release", "renew")

    def __init__(self, redis: Redis) -> None:
        self.acquire = redis.register_script(_ACQUIRE)
        self.renew = redis.register_script(_RENEW)
        self.release = redis.register_script(_RELEASE)


class Lease:
    """A ``SET NX PX`` lease on one Redis key, renewed while held (see the module docs).

    ``async with`` acquires it (raising :class:`Down` if Redis cannot be reached),
    renews it in a task group it owns while the body runs, and gives it back on
    exit (unless Redis is presumed down: then it expires on its own).
    """

    __slots__ = (
        "_blocking",
        "_cancel_on_loss",
        "_fence",
        "_guard",
        "_key",
        "_keys",
        "_lost",
        "_name",
        "_on_wait",
        "_owner",
        "_poll",
        "_renewals",
        "_retry_give_back",
        "_scripts",
        "_shared",
        "_since",
        "_timeout",
        "_token",
        "_ttl",
    )

    def __init__(
        self,
        scripts: LeaseScripts,
        guard: Guard,
        name: str,
        key: str,
        fence_key: str | None,
        *,
        ttl: float,
        blocking: bool,
        timeout: float | None,
        poll: float,
        cancel_on_loss: bool,
        on_wait: Callable[[], None] | None = None,
        renewals: Renewals | None = None,
        retry_give_back: bool = False,
    ) -> None:
        self._scripts = scripts
        # an acquire that timed out: give it back once Redis answers (within the ttl),
        # not only once (a store's load degrades at once instead: its lease expires)
        self._retry_give_back = retry_give_back
        self._guard = guard
        self._name = name
        self._key = key
        self._keys = [key] if fence_key is None else [key, fence_key]
        self._ttl = ttl
        self._blocking = blocking
        self._timeout = timeout
        self._poll = poll
        self._cancel_on_loss = cancel_on_loss
        self._on_wait = on_wait
        self._token: str | None = None
        self._fence: int | None = None
        self._owner = OwnedTaskGroup(self._owner_name)
        self._lost = False
        self._since = 0.0  # when the command that took it was sent (anyio's clock)
        # while ``renewals`` runs (its owner is entered) it renews this lease: no task
        # of its own (a lease that must cancel its body when lost keeps its own task)
        self._renewals = None if cancel_on_loss else renewals
        self._shared = False

    # -- introspection -----------------------------------------------------------
    @property
    def _owner_name(self) -> str:
        return f"RedisLock {self._name!r}" if self._cancel_on_loss else f"the lease of {self._key}"

    @property
    def name(self) -> str:
        """The lock's name."""
        return self._name

    @property
    def ttl(self) -> float:
        """Seconds the lock outlives a dead holder."""
        return self._ttl

    @property
    def key(self) -> str:
        """The Redis key holding the lock."""
        return self._key

    @property
    def held(self) -> bool:
        """True inside ``async with`` while this object holds the lock."""
        return self._token is not None and not self._lost

    @property
    def token(self) -> str | None:
        """The holder's random token while held (what ``release`` checks), else ``None``."""
        return self._token if not self._lost else None

    @property
    def fencing_token(self) -> int | None:
        """The fencing token of the current (or last) tenure; ``None`` before any.

        Strictly increasing across all acquisitions of this lock name, by any
        process, also after Redis lost its data: it is never below the Redis
        server's clock in milliseconds (store it in a 64-bit column).
        """
        return self._fence

    def __repr__(self) -> str:
        state = "held" if self.held else "free"
        return (
            f"{type(self).__name__}({self._name!r}, ttl={self._ttl!r}, "
            f"blocking={self._blocking!r}, {state}, fencing_token={self._fence!r})"
        )

    # -- acquire / renew / release ---------------------------------------------------
    async def _acquire(self) -> None:
        token = new_token()
        ttl_ms = round(self._ttl * 1000)
        deadline = None if self._timeout is None else anyio.current_time() + self._timeout
        waited = False
        while True:
            sent = anyio.current_time()  # Redis starts the ttl after this
            reply = await self._attempt(token, ttl_ms, sent)
            if reply > 0:
                self._token, self._fence, self._lost = token, reply, False
                self._since = sent
                return
            if not self._blocking:
                msg = f"lock {self._name!r} is held by another holder (blocking=False)"
                raise LockNotAcquired(self._name, msg)
            pause = jittered(min(self._poll, -reply / 1000))
            if deadline is not None:
                left = deadline - anyio.current_time()
                if left <= 0:
                    msg = f"lock {self._name!r} not acquired within timeout={self._timeout!r}s"
                    raise LockNotAcquired(self._name, msg)
                pause = min(pause, left)
            if not waited and self._on_wait is not None:
                self._on_wait()
            waited = True
            await anyio.sleep(pause)

    async def _attempt(self, token: str, ttl_ms: int, sent: float) -> int:
        """:meth:`_try`, giving back what it may have taken if its reply never came.

        A cancellation (or a ``command_timeout``) while the script's reply is on its
        way does not undo the script: Redis may hold the lease with ``token``, and
        nobody would release it before ``ttl`` (every other holder, this process
        included, would wait that long). Released by token, so it costs nothing
        when the script did not run. After a ``command_timeout`` (a Redis that
        stalled may run the script when it answers again) a release that cannot
        reach Redis is tried again until one does, within the ttl
        (:func:`give_back_once_answered`; ``sent``: when the script was sent).
        """
        try:
            return await self._try(token, ttl_ms)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # what is raised is the attempt's error
                if self._retry_give_back and timed_out(exc):
                    await give_back_once_answered(
                        self._guard,
                        lambda: self._scripts.release(keys=[self._key], args=[token]),
                        until=sent + self._ttl,
                        pause=self._poll,
                    )
                else:
                    await self._give_back(token, log=False)
            raise

    async def _try(self, token: str, ttl_ms: int) -> int:
        """One attempt: the fencing token (or 1) if taken, else minus the holder's ttl (ms)."""
        command = self._scripts.acquire(keys=self._keys, args=[token, ttl_ms])
        return int(await self._guard.call("acquire", command))

    def lost(self) -> None:
        """Its renewal found it gone or someone else's, or Redis unreachable for a ttl."""
        self._lost = True

    def given_back(self) -> None:
        """The lease was released by a script of its holder's own (a write that also
        releases it): nothing is left to give back on exit."""
        self._token = None

    async def _renew_forever(self) -> None:
        token = self._token
        if token is None:  # given back already (``given_back``)
            return
        ttl_ms = round(self._ttl * 1000)
        why, error = await keep_renewed(
            self._guard,
            self._ttl,
            lambda: self._scripts.renew(keys=[self._key], args=[token, ttl_ms]),
            what=self._owner_name,
            since=self._since,
        )
        self._lost = True
        if not self._cancel_on_loss:
            return
        if why == "unreachable":
            msg = f"lock {self._name!r} expired: not renewed for its whole ttl ({error!r})"
        else:
            msg = f"lock {self._name!r} was lost: it expired or was taken over"
        raise LockLost(self._name, self._fence, msg) from error

    async def _release(self) -> None:
        token, self._token = self._token, None
        if token is None or self._lost:
            return
        await self._give_back(token)

    async def _give_back(self, token: str, *, log: bool = True) -> None:
        """Release the lease if Redis holds it with ``token`` (a release script).

        Shielded: a cancelled holder still gives the lease back at once; when Redis
        is presumed down (or does not answer within ``command_timeout`` or ``ttl``,
        a free connection included) or refuses the write, the lease expires on its
        own (:func:`left_to_expire`; ``log``: log a refusal, not when the caller
        raises an error of its own).
        """
        limit = self._ttl if self._guard.timeout is None else min(self._ttl, self._guard.timeout)
        # not logged either for a store's load: the store logs refusals itself
        what = self._owner_name if log and self._cancel_on_loss else None
        with anyio.move_on_after(limit, shield=True), left_to_expire(what):
            command = self._scripts.release(keys=[self._key], args=[token])
            await self._guard.call("release", command, timeout=self._ttl)

    async def __aenter__(self) -> Self:
        if self._owner.entered or self._shared:
            msg = (
                f"RedisLock {self._name!r} is already held by this object; it is not "
                "re-entrant: create one RedisLock per concurrent holder"
            )
            raise RuntimeError(msg)
        await self._acquire()
        renewals = self._renewals
        if renewals is not None and renewals.active:
            renewals.add(self)
            self._shared = True
            return self
        try:
            tg = await self._owner.enter()
            tg.start_soon(self._renew_forever, name=f"{self!r} renewal")
        except BaseException:
            await self._release()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._shared:
            assert self._renewals is not None
            self._shared = False
            self._renewals.discard(self)
            await self._release()
            return False
        try:
            # the renewal's LockLost comes out as itself (the owner unwraps a lone failure)
            return bool(await self._owner.exit(exc_type, exc, tb, cancel=True))
        finally:
            await self._release()


@final
class Renewals:
    """Keeps many leases of one ``ttl`` renewed: :func:`keep_renewed`'s rules, with
    one task (:meth:`run`, in its owner's task group) and one command per round
    for all of them (at most 500 leases per command), instead of a task each.

    Leases are renewed every ``ttl / 3``: one taken just after a round is renewed
    by the next, with two thirds of its ttl to spare. A lease Redis says is gone
    or someone else's, or that could not be renewed for a whole ``ttl`` (an
    outage, or errors Redis answered with: logged and counted in :attr:`errors`),
    is marked lost (:meth:`Lease.lost`) and no longer renewed.
    """

    __slots__ = ("_guard", "_held", "_script", "_ttl", "active", "errors")

    def __init__(self, redis: Redis, guard: Guard, ttl: float) -> None:
        self._script = redis.register_script(_RENEW_MANY)
        self._guard = guard
        self._ttl = ttl
        self._held: dict[Lease, float] = {}  # lease -> valid until (anyio's clock)
        self.active = False
        """Whether :meth:`run` runs (else a lease renews itself, in a task of its own)."""
        self.errors = 0
        """Rounds Redis refused for another reason than an outage (logged)."""

    def add(self, lease: Lease) -> None:
        """Keep ``lease`` (just taken) renewed until :meth:`discard`."""
        self._held[lease] = anyio.current_time() + self._ttl

    def discard(self, lease: Lease) -> None:
        self._held.pop(lease, None)

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
