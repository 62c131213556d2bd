"""Leases, written once: take a Redis key with a token, renew it while held, give it back.

:class:`Lease` is the engine of :class:`~parallelkit.redis.RedisLock` (with a
fencing token, and "cancel the body when lost") and of ``RedisStore.load_lock``
(without either). :func:`keep_renewed` is the renewal loop both use, and
``RedisLimiter`` too for its sorted-set leases. :class:`Renewals` is the same
loop for many leases at once: an entered ``RedisStore`` renews all its load
leases with one task and one command per round, so a load starts no task.

Here: :class:`Lease` and :func:`keep_renewed`. Its Lua scripts
(:class:`LeaseScripts`) are in :mod:`._lease_scripts`, what a give-back does when
Redis is down or stalled in :mod:`._give_back`, :class:`Renewals` (and
:func:`renewal_failed`) in :mod:`._renewals`; all re-exported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from types import TracebackType

import anyio
from typing_extensions import Self

from .._core.owned import OwnedTaskGroup
from ._common import LockLost, LockNotAcquired, jittered, new_token
from ._give_back import (
    give_back_once_answered,
    left_to_expire,
    timed_out,
    timed_out_error,
    void_key,
)
from ._lease_scripts import LeaseScripts
from ._outage import Down, Guard
from ._renewals import Renewals, renewal_failed

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


class Lease:
    """A ``SET NX PX`` lease on one Redis key, renewed while held (see the module docs).

    ``async with`` acquires it (raising :class:`Down` if Redis cannot be reached),
    renews it in a task group it owns while the body runs, and gives it back on
    exit (unless Redis is presumed hung, or refuses: then it expires on its own).
    """

    __slots__ = (
        "_blocking",
        "_cancel_on_loss",
        "_fence",
        "_fence_keys",
        "_guard",
        "_key",
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
        # an acquire that timed out: give it back once Redis answers, within the ttl
        # (a lock); else within one ``command_timeout`` (a store's load, which then
        # degrades: it does not wait longer for Redis); see ``_attempt``
        self._retry_give_back = retry_give_back
        self._guard = guard
        self._name = name
        self._key = key
        self._fence_keys = [] if fence_key is None else [fence_key]
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
        included, would wait that long). Released by token, by ``VOID``, which also
        leaves a tombstone: if the script has not run yet (its bytes held on the
        way while the release got through on another connection), it takes
        nothing when it runs (every ``_try`` honours it: ``LOAD_START`` too).
        After a ``command_timeout`` (a Redis that stalled may run the script when
        it answers again; the circuit is open then, and the release is sent
        anyway) a release that cannot reach Redis is tried again until one does
        (:func:`give_back_once_answered`; ``sent``: when the script was sent):
        within the ttl for a lock (``retry_give_back``), within one
        ``command_timeout`` (without one, ``ttl / 3``) for a store's load, which
        then runs degraded.
        """
        try:
            return await self._try(token, ttl_ms)
        except BaseException as exc:
            if isinstance(exc, Down) and not exc.sent:
                raise  # never sent (an open circuit): nothing to give back
            with contextlib.suppress(Exception):  # what is raised is the attempt's error
                if timed_out(exc):
                    until = sent + self._ttl
                    if not self._retry_give_back:
                        limit = self._guard.timeout
                        limit = self._ttl / 3 if limit is None else limit
                        until = min(until, anyio.current_time() + limit)
                    await give_back_once_answered(
                        self._guard,
                        lambda: self._void(token, ttl_ms),
                        until=until,
                        pause=self._poll,
                    )
                else:
                    await self._give_back(token, log=False, void=True)
            raise

    async def _try(self, token: str, ttl_ms: int) -> int:
        """One attempt: the fencing token (or 1) if taken, else minus the holder's ttl
        (ms), or the tombstone's (a give-back of ``token`` came first: nothing taken)."""
        keys = [self._key, void_key(self._key, token), *self._fence_keys]
        command = self._scripts.acquire(keys=keys, args=[token, ttl_ms])
        return int(await self._guard.call("acquire", command))

    def _void(self, token: str, ttl_ms: int) -> Awaitable[object]:
        """Give back what an attempt with ``token`` took, or leave its tombstone."""
        keys = [self._key, void_key(self._key, token)]
        return self._scripts.void(keys=keys, args=[token, ttl_ms])

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

    async def _give_back(self, token: str, *, log: bool = True, void: bool = False) -> None:
        """Release the lease if Redis holds it with ``token`` (a release script;
        ``void``: and leave a tombstone, see :meth:`_attempt`).

        Shielded: a cancelled holder still gives the lease back at once; when Redis
        does not answer within ``command_timeout`` or ``ttl`` (a free connection
        included) or refuses the write, the lease expires on its own
        (:func:`left_to_expire`; ``log``: log a refusal, not when the caller raises
        an error of its own).

        Sent even while the guard's circuit is open, unless what opened it was a
        command that did not answer in time (Redis presumed hung: this one would
        wait as long, and the write that timed out gives the lease back itself if
        Redis runs it): after a reset or a refused connection (one blip, this
        caller's or another's) the lease would else be held by nobody for up to
        ``ttl``, and every other process would wait that long for the key.
        """
        limit = self._ttl if self._guard.timeout is None else min(self._ttl, self._guard.timeout)
        # not logged either for a store's load: the store logs refusals itself
        what = self._owner_name if log and self._cancel_on_loss else None
        force = not timed_out_error(self._guard.last_error)
        with anyio.move_on_after(limit, shield=True), left_to_expire(what):
            if void:
                command = self._void(token, round(self._ttl * 1000))
            else:
                command = self._scripts.release(keys=[self._key], args=[token])
            await self._guard.call("release", command, force=force, timeout=self._ttl)

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
