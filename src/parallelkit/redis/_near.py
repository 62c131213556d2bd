"""The near cache: a bounded in-process tier in front of Redis, kept coherent by pub/sub.

Every write a :class:`~parallelkit.redis.RedisStore` makes (``set``, ``delete``,
``clear``, a load's conditional set) publishes an invalidation on the namespace's
channel in the same Lua script. Each entered store listens on that channel and
drops what it names. The tier only serves while that subscription is known to be
up, and every way a message can be lost ends in emptying it:

* entries are filled only while subscribed, and only by a read that no
  invalidation of its key (nor a reset) overtook: a read takes a *ticket* when it
  is sent (:meth:`NearCache.begin`: the tier's reset count and how many
  invalidations of that key were seen while it is being read), and its answer
  is kept only if the ticket is still current. Per key: a burst of refreshes of
  other keys (each one a message) does not void the reads of this one;
* a broken subscription (a connection error, a Redis restart) empties the tier at
  once and turns it off until the subscription is back; re-subscribing (by us or
  by redis-py's own reconnect) empties it again. While redis-py reconnects the
  subscription inside a read (which may hang: a network dropping new
  connections), the listening task cannot see it: the *watching* task
  (:meth:`NearCache.watch_forever`) turns the tier off within one sweep interval
  when it finds the subscription's connection closed;
* a subscription that hangs silently (a paused server) is caught by a ``PING``
  that must be answered within ``command_timeout``;
* and whatever happens, an entry is served from process memory for at most
  ``near_ttl`` seconds after it was read from Redis (after the read was *sent*,
  which is before Redis ran it: a slow answer does not stretch the bound; reads
  answered out of order keep fill order expiry order by ending the later-sent
  ones' entries with theirs): the watching task, which
  awaits nothing but its clock (so no read held up by Redis delays it), sweeps
  the tier every ``min(1 s, near_ttl / 2)`` and drops what would pass
  ``near_ttl`` before the next sweep (so the hit path reads no clock).

**Renewal.** Dropping an entry at ``near_ttl`` would make its next readers pay a
``GET`` each, every ``near_ttl`` seconds, for a value that has not changed. So the
store's renewing task checks, once per sweep interval, the entries about to pass
``near_ttl``: one ``MGET`` for all of them, compared byte for byte with what was
read. (Every entry, not only those hit: tracking hits would cost the hit path a
second hash of the key, while checking costs at most ``maxsize`` keys per
``near_ttl``; an entry that expired in Redis comes back as missing, and goes.)
An unchanged entry counts as read again when the ``MGET`` was sent (a check is a
read from Redis: the bound above holds), a changed or missing one is dropped,
and an entry invalidated while the check was out is not renewed (the
invalidation removed it: the check finds it gone, or filled again by a newer
read).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from typing_extensions import final

from .._cache.store import CacheEntry
from .._core.limiter import Limiter
from ._common import jittered

__all__ = ["CLEAR", "NearCache", "Ticket", "invalidation"]

logger = logging.getLogger("parallelkit.redis")

#: The message that empties every near tier of a namespace.
CLEAR = b"*"
_KEY = b"k"
#: Seconds of silence on the subscription before a ``PING`` checks it (that one must
#: be answered within ``command_timeout``). Not tied to ``near_ttl``: the sweep
#: bounds what a short one promises, and a ``PING`` per sweep would flood Redis.
_PING_AFTER = 1.0
_MISSING: Any = object()

#: What a read of one key holds while it is out: (the tier's reset count, the key's
#: invalidations seen since its first read in flight began, the tier's clock when
#: the read was sent: what it keeps expires ``ttl`` after that).
Ticket = tuple[int, int, float]


def invalidation(name: str) -> bytes:
    """The message that drops one key (``name``: the key's part of the Redis key)."""
    return _KEY + name.encode()


def _spare(slots: Limiter) -> bool:
    """Whether taking one slot of ``slots`` now leaves another free for commands."""
    stats = slots.statistics()
    return stats.concurrency is not None and stats.running + 2 <= stats.concurrency


@final
class NearCache:
    """The near tier of one store (see the module docs).

    ``entries`` maps a cache key to its entry: the store's ``peek`` is one lookup
    there, with no clock read. ``meta`` holds, in fill order, each key's expiry,
    its name (the Redis key's suffix, what messages carry) and the bytes read;
    ``index`` maps the name back to the cache key. Oldest fills are dropped first
    when ``maxsize`` is reached, and by :meth:`sweep` before they are ``ttl`` old.
    """

    __slots__ = (
        "channel",
        "entries",
        "index",
        "invalidations",
        "link",
        "listening",
        "marks",
        "maxsize",
        "meta",
        "own",
        "renew_errors",
        "renewals",
        "resets",
        "seq",
        "slack",
        "timer",
        "ttl",
        "watchers",
    )

    def __init__(self, channel: str, maxsize: int | None, ttl: float) -> None:
        self.channel = channel
        self.maxsize = maxsize
        self.ttl = ttl
        self.slack = min(1.0, ttl / 2)  # the longest time between two sweeps
        self.timer: Callable[[], float] = time.monotonic
        self.entries: dict[Hashable, CacheEntry[Any]] = {}
        self.meta: dict[Hashable, tuple[float, str, bytes | str]] = {}
        self.index: dict[str, Hashable] = {}
        self.listening = False
        self.link: Any = None  # the subscription's connection while subscribed
        self.seq = 0  # resets so far: a reset voids every ticket
        self.marks: dict[str, int] = {}  # invalidations of each name being read
        self.watchers: dict[str, int] = {}  # reads (and checks) of each name in flight
        self.own: dict[str, int] = {}  # names filled by our own writes: messages to skip
        self.invalidations = self.resets = self.renewals = self.renew_errors = 0

    @property
    def enabled(self) -> bool:
        """False with ``near_maxsize=None``."""
        return self.maxsize is not None

    # -- reads in flight -------------------------------------------------------------
    def begin(self, name: str) -> Ticket:
        """A read (or check) of ``name`` is sent: its ticket. Pair with :meth:`end`."""
        count = self.watchers.get(name)
        if count is None:
            self.watchers[name] = 1
            self.marks[name] = 0
        else:
            self.watchers[name] = count + 1
        return (self.seq, self.marks[name], self.timer())

    def end(self, name: str) -> None:
        """The read (or check) of ``name`` that :meth:`begin` ticketed is over."""
        count = self.watchers[name] - 1
        if count:
            self.watchers[name] = count
        else:
            del self.watchers[name]
            del self.marks[name]

    def current(self, name: str, ticket: Ticket) -> bool:
        """Whether no reset and no invalidation of ``name`` came since ``ticket``."""
        return ticket[0] == self.seq and ticket[1] == self.marks.get(name)

    def _invalidated(self, name: str) -> None:
        marks = self.marks
        if name in marks:
            marks[name] += 1

    # -- the tier ----------------------------------------------------------------------
    def put(
        self, key: Hashable, name: str, entry: CacheEntry[Any], ticket: Ticket, raw: bytes | str
    ) -> None:
        """Keep ``entry`` (``raw``: its bytes), read from Redis with ``ticket``."""
        if not self.listening or self.maxsize is None or not self.current(name, ticket):
            return  # not subscribed, or an invalidation overtook the read
        self._keep(key, name, entry, raw, ticket[2] + self.ttl)

    def _keep(
        self, key: Hashable, name: str, entry: CacheEntry[Any], raw: bytes | str, expiry: float
    ) -> bool:
        """Keep ``entry`` until ``expiry`` (``ttl`` after its read or write was *sent*:
        Redis ran it later, so an invalidation that came after it, lost, is served
        for at most ``ttl``; counting from the answer would add the reply's time, up
        to ``command_timeout``). Not kept if that time comes before the next sweep
        (an answer that took ``ttl - slack`` or more): no sweep would drop it in time."""
        if expiry <= self.timer() + self.slack:
            return False
        self._forget(key)
        assert self.maxsize is not None  # callers keep nothing when the tier is off
        meta = self.meta
        if len(meta) >= self.maxsize:
            self._forget(next(iter(meta)))
        if meta and meta[next(reversed(meta))][0] > expiry:
            # answered after a read sent later than it: fill order must stay expiry
            # order (what sweep and due rely on), so the entries filled since that
            # later read was sent expire with this one (a little earlier: safe)
            later = []
            for other in reversed(meta):
                held = meta[other]
                if held[0] <= expiry:
                    break
                later.append((other, held))
            for other, (_, other_name, other_raw) in later:
                meta[other] = (expiry, other_name, other_raw)
        self.entries[key] = entry
        meta[key] = (expiry, name, raw)
        self.index[name] = key
        return True

    def due(self) -> list[tuple[Hashable, str, bytes | str]]:
        """The entries to check now: due to pass ``ttl`` within two sweep intervals
        (so a check has one interval to answer, and a second chance)."""
        horizon = self.timer() + 2 * self.slack
        batch = []
        for key, (expiry, name, raw) in self.meta.items():  # fill order is expiry order
            if expiry > horizon:
                break
            batch.append((key, name, raw))
        return batch

    def renew(
        self,
        batch: list[tuple[Hashable, str, bytes | str]],
        now: list[Any],
        sent: float,
    ) -> None:
        """Apply a check of ``batch`` sent at ``sent``: ``now`` is what Redis holds
        for each, in order."""
        if not self.listening:
            return
        meta = self.meta
        # the check read Redis after it was sent: counting from the send is the safe side
        expiry = sent + self.ttl
        if expiry <= self.timer() + self.slack:
            return  # the check took so long that no sweep would drop them in time
        if meta and meta[next(reversed(meta))][0] > expiry:
            # an entry filled while the check was out expires later: renewed entries,
            # moved behind it, would break "fill order is expiry order" (what sweep
            # relies on). The next round retries.
            return
        for (key, name, raw), current in zip(batch, now, strict=True):
            held = meta.get(key)
            if held is None or held[2] is not raw:
                continue  # invalidated (so dropped) or read again meanwhile
            if current != raw:  # changed behind our back (or gone): read it again
                self._forget(key)
                continue
            del meta[key]
            meta[key] = (expiry, name, raw)
            self.renewals += 1

    def _forget(self, key: Hashable) -> None:
        meta = self.meta.pop(key, None)
        if meta is not None:
            del self.entries[key]
            self.index.pop(meta[1], None)

    def sweep(self) -> None:
        """Drop the entries that would pass ``ttl`` before the next sweep."""
        meta = self.meta
        horizon = self.timer() + self.slack
        while meta:
            key = next(iter(meta))  # fill order is expiry order
            if meta[key][0] > horizon:
                return
            self._forget(key)

    def wrote(
        self, key: Hashable, name: str, entry: CacheEntry[Any], ticket: Ticket, raw: bytes
    ) -> None:
        """This process's write of ``entry`` (``raw``) is in Redis (its reply came):
        keep it, so its next readers need no ``GET``. ``ticket`` was taken before the
        write was sent.

        Kept only if no message about ``name`` came since ``ticket``: its own
        message has not arrived yet, nor has a newer write's. Then the message it
        published, when it arrives, is skipped (:meth:`received`): it invalidates
        exactly what is kept here. Reads of ``name`` sent before the write may
        still carry the old bytes: they are voided first.
        """
        if not self.listening or self.maxsize is None or not self.current(name, ticket):
            return
        self._invalidated(name)  # older reads in flight must not fill over it
        if self._keep(key, name, entry, raw, ticket[2] + self.ttl):
            self.own[name] = self.own.get(name, 0) + 1
        else:  # not kept (answered too late): what it replaces is outdated
            self._forget(key)

    def drop(self, key: Hashable, name: str) -> None:
        """Forget ``key`` (this process writes it); reads in flight will not fill it."""
        self._invalidated(name)
        self._forget(key)
        self.index.pop(name, None)

    def reset(self, *, listening: bool) -> None:
        """Forget everything (a clear, or the subscription changed)."""
        self.seq += 1
        self.entries.clear()  # in place: the store holds its ``get``
        self.meta.clear()
        self.index.clear()
        self.own.clear()
        self.listening = listening

    def received(self, data: bytes) -> None:
        """Apply one invalidation message.

        A message this store cannot read (anyone may publish on the channel: another
        tool, another version) may still have meant an invalidation: it empties the
        tier, as ``CLEAR`` does, and the subscription stays (not a lost one)."""
        self.invalidations += 1
        if data == CLEAR or not data.startswith(_KEY):
            self.reset(listening=self.listening)
            return
        try:
            name = data[len(_KEY) :].decode()
        except UnicodeDecodeError:  # no name of ours: every name is UTF-8
            self.reset(listening=self.listening)
            return
        own = self.own.get(name)
        if own is not None:  # the message of a write this process kept (``wrote``)
            if own == 1:
                del self.own[name]
            else:
                self.own[name] = own - 1
            return
        self._invalidated(name)
        key = self.index.pop(name, _MISSING)
        if key is not _MISSING:
            self._forget(key)

    # -- the subscription --------------------------------------------------------------
    async def watch_forever(self) -> None:
        """Sweep every ``slack``; turn the tier off if the subscription's connection is
        closed (redis-py reconnecting it: messages are lost meanwhile).

        A task of its own, awaiting nothing but its clock: the listening task may be
        held up in a read (a reconnect that hangs, a slow message) for up to
        ``command_timeout`` longer, and neither bound may wait for it.
        """
        while True:
            await anyio.sleep(self.slack)
            self.sweep()
            link = self.link
            if self.listening and link is not None and not link.is_connected:
                self.resets += 1  # the "subscribe" that ends the reconnect turns it on
                self.reset(listening=False)

    async def listen_forever(
        self,
        redis: Redis,
        *,
        timeout: float | None,
        retry_after: float,
        slots: Limiter | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the subscription up; ``task_status`` is set after the first attempt.

        ``slots``: the client pool's limiter (``_outage.pool_slots``); the
        subscription holds one of its slots (one connection) while it is open,
        if that leaves at least one for commands. Otherwise (a pool of one
        connection, or every other slot held by subscriptions) it holds none:
        commands then meet redis-py's ``MaxConnectionsError``, a clear error,
        rather than waiting forever for a slot no command gives back.
        """
        wait = timeout if timeout is not None else 5.0
        started = failing = False

        def subscribed() -> None:
            nonlocal started, failing
            if self.listening or self.entries:  # redis-py re-subscribed on its own
                self.resets += 1
            self.reset(listening=True)
            failing = False
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                if slots is None or not _spare(slots):
                    await self._listen(redis, wait, subscribed)
                else:
                    async with slots:  # no wait: _spare saw a free slot, and no await since
                        await self._listen(redis, wait, subscribed)
            except Exception as exc:  # background work: counted and logged, never raised
                # (type and text: redis-py 8's repr of its errors leaves the text out)
                if self.listening or self.entries:
                    self.resets += 1
                    logger.warning(
                        "RedisStore near cache off: subscription to %r lost: %s: %s",
                        self.channel,
                        type(exc).__name__,
                        exc,
                    )
                elif not failing:  # never up, or turned off by watch_forever: say why, once
                    logger.warning(
                        "RedisStore near cache off: subscription to %r failed: %s: %s",
                        self.channel,
                        type(exc).__name__,
                        exc,
                    )
                failing = True
            finally:
                self.reset(listening=False)
            if not started:
                started = True
                task_status.started()
            # re-subscribing is cheap: try about once a second, at most every retry_after
            await anyio.sleep(jittered(min(max(retry_after, 0.05), 1.0)))

    async def _listen(self, redis: Redis, wait: float, subscribed: Callable[[], None]) -> None:
        ping_every = _PING_AFTER  # silence this long: a PING (a short near_ttl: not sooner)
        pubsub = redis.pubsub()
        try:
            with anyio.fail_after(wait):
                await pubsub.subscribe(self.channel)
            self.link = pubsub.connection
            pong_due: float | None = None
            while True:
                quiet = ping_every
                if pong_due is not None:
                    quiet = min(max(pong_due - anyio.current_time(), 0.0), quiet)
                with anyio.fail_after(quiet + wait):
                    message = await pubsub.get_message(timeout=quiet)
                if message is None:
                    if pong_due is None:
                        with anyio.fail_after(wait):
                            await pubsub.ping()
                        pong_due = anyio.current_time() + wait
                    elif anyio.current_time() >= pong_due:
                        msg = f"no answer to PING within {wait} s"
                        raise TimeoutError(msg)
                    continue
                pong_due = None  # any message shows the connection is alive
                if message["type"] == "message":
                    self.received(message["data"])
                elif message["type"] == "subscribe":  # (re)subscribed: start afresh
                    subscribed()
        finally:
            self.link = None  # (closed below: not a loss for watch_forever to count)
            with anyio.move_on_after(wait, shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed in redis 8
