"""RedisStore's writes: plain writes, and loads (single flight, "invalidation wins").

Everything a store changes in Redis is here, next to the Lua scripts that do it
(:mod:`._scripts`). A ``set`` gives the entry a new *generation*, a ``delete`` or
``clear`` removes it, and each publishes an invalidation for every near cache; a
load stores its value only if the generation it started from is still there, so
no invalidation is undone by an older load:

* :func:`write` and :func:`clear` (``RedisStore.set`` / ``delete`` / ``clear``),
  to local memory when Redis is down or refuses the write, and replayed
  (:func:`replay`) when it is back or accepts writes again;
* :class:`LoadLock` (``RedisStore.load_lock``): the key's lease around one load;
  the script that takes it (:class:`LoadLease`, ``LOAD_START``) also reads the
  entry and its generation, so the load needs no ``GET`` of its own;
* :func:`load_token` (``RedisStore.load_token``): the generation a load started
  from, when it runs without the lease;
* :func:`set_if_unchanged` (``RedisStore.set_if_unchanged``): the conditional
  write, which gives the load's lease back in the same script; the same rule
  holds in local memory while Redis is down.

When Redis answers but refuses writes (:mod:`._store_refusals`), a load runs
without a lease and its value, like a ``set``/``delete``/``clear``, is kept as
during an outage; :func:`masked` keeps this process from reading back from Redis
what it loaded or invalidated meanwhile.

Kept apart from :mod:`._store`, the store's face and read side: ``peek`` and
``get`` never enter this module, so the hit path reads in one place there, and
the load protocol (a lease, a generation, a conditional write: two round trips
per load) reads in one piece here. The functions take the store they work for;
``RedisStore``'s methods of the same names hold the documentation and call them.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from typing_extensions import final

from .._cache.store import CacheEntry, LoadStart
from .._core.check import number
from ._common import MAX_LEASE
from ._lease import Lease
from ._near import CLEAR, Ticket, invalidation
from ._outage import Down, refuses_writes
from ._scripts import (
    LOAD_START,
    TOKEN,
    TOKEN_TTL_MS,
    WRITE,
    WRITE_IF,
    WRITE_IF_RELEASE,
    Token,
)
from ._serializer import GENERATION, decode_entry, placeholder

if TYPE_CHECKING:
    from ._store import RedisStore

__all__ = [
    "LoadLease",
    "LoadLock",
    "Scripts",
    "clear",
    "load_token",
    "masked",
    "replay",
    "set_if_unchanged",
    "ttl_ms",
    "write",
]

Arg = bytes | str | int | float  # what a script argument may be


def ttl_ms(ttl: object) -> int:
    """``ttl`` (seconds, as ``Store.set`` takes it) as Redis's ``PX``: at least 1 ms,
    at most :data:`~._common.MAX_LEASE` seconds (a longer one, ``inf`` included, is
    kept that long: Redis refuses expiry times past its 64-bit milliseconds, and
    ``ttl`` is only a hint of when the entry is worthless).

    Raises:
        TypeError: ``ttl`` is not a number (or is a ``bool``).
        ValueError: ``ttl`` is negative or NaN.
    """
    seconds = number("ttl", ttl, zero=True, finite=False)
    return max(1, round(min(seconds, MAX_LEASE) * 1000))


@final
class Scripts:
    """The Lua scripts of a store's writes and loads, registered once per store."""

    __slots__ = ("load_start", "token", "write", "write_if", "write_if_release")

    def __init__(self, redis: Redis) -> None:
        self.write = redis.register_script(WRITE)
        self.write_if = redis.register_script(WRITE_IF)
        self.token = redis.register_script(TOKEN)
        self.load_start = redis.register_script(LOAD_START)
        self.write_if_release = redis.register_script(WRITE_IF_RELEASE)


# -- plain writes ----------------------------------------------------------------------
async def write(
    store: RedisStore, key: Hashable, entry: CacheEntry[Any] | None, data: bytes, ttl: float
) -> None:
    """Set (``data``) or delete (``b""``) in Redis; publish; local memory if down or refused."""
    name = store._name(key)
    store._local_epoch += 1
    store._near.drop(key, name)
    what = "set" if data else "delete"
    try:
        if store._refusals.error is not None and not await _writable(store, stores=bool(data)):
            store._refusals.write_refused(None, what)
            await _keep(store, key, name, entry, ttl)
            return
        args: list[Arg] = [data, ttl_ms(ttl), store._channel, invalidation(name)]
        command = store._scripts.write(keys=[store._value_prefix + name], args=args)
        await store._guard.call(what, command)
    except Down as down:
        store._degrade(down)
        await _keep(store, key, name, entry, ttl)
        return
    except ResponseError as exc:
        if not refuses_writes(exc):
            raise
        store._refusals.write_refused(exc, what)
        await _keep(store, key, name, entry, ttl)
        return
    if data:
        _accepted(store)


async def _keep(
    store: RedisStore, key: Hashable, name: str, entry: CacheEntry[Any] | None, ttl: float
) -> None:
    """A write Redis did not get (down, or refused): in local memory, and replayed."""
    _missed(store, name)
    if entry is not None:
        await store._local.set(key, entry, ttl=ttl)


def _missed(store: RedisStore, name: str) -> None:
    """A write Redis did not get: delete it there when Redis is back (:func:`replay`)."""
    if not store._missed_all:
        store._missed[name] = None
        if len(store._missed) > store._local.maxsize:  # too many to replay one by one
            store._missed_all = True
            store._missed.clear()


async def replay(store: RedisStore) -> None:
    """Redis answers again: before it is read again (the guard's ``before_recovery``),
    delete there what this process wrote or deleted only locally during the outage,
    and tell every replica (an invalidation each; a ``clear`` if there were too many).

    Without it, every process would read from Redis again the entry invalidated
    during the outage, until its ``fresh`` window ran out. Deleting (rather than
    writing the local value) also makes a load that started before the outage
    fail its ``set_if_unchanged``: the invalidation still wins.

    If Redis answers but refuses the deletes (a failover brought the client back to
    a demoted primary), what is left stays kept (:func:`masked`) and the store
    goes on: the recovery is not failed, reads go to Redis again.
    """
    await _replay(store)


async def _replay(store: RedisStore) -> bool:
    """:func:`replay`; ``False`` if Redis refused the writes (kept for the next try)."""
    guard = store._guard
    if not (store._missed or store._missed_all):
        return True
    try:
        if store._missed_all:
            await _clear_redis(store, force=True)
            store._missed_all = False
            store._missed.clear()
        while store._missed:
            name = next(iter(store._missed))
            args: list[Arg] = [b"", 1, store._channel, invalidation(name)]
            command = store._scripts.write(keys=[store._value_prefix + name], args=args)
            await guard.call("replay", command, force=True)
            store._missed.pop(name, None)
    except ResponseError as exc:
        if not refuses_writes(exc):
            raise
        store._refusals.refused(exc, "replay")
        return False
    store._refusals.replayed()
    return True


async def _writable(store: RedisStore, *, stores: bool) -> bool:
    """While Redis refuses writes: whether to send this one. A write that ``stores``
    (a lease, a value) is skipped until its turn to try (``Refusals.waiting``); an
    invalidation is always tried. What is kept from before is replayed first."""
    if stores and store._refusals.waiting():
        return False
    if store._missed or store._missed_all:
        return await _replay(store)
    return True


async def masked(store: RedisStore, name: str) -> bool:
    """While Redis refuses writes: whether a read of ``name`` must be served from local
    memory, not Redis: this process's write of it was refused, and the entry Redis
    holds is older. Replays the kept writes first when it is their turn to try."""
    if not (store._missed or store._missed_all) or store._guard.down:
        return False
    if not store._refusals.waiting():
        try:
            await _replay(store)
        except Down:
            return False  # the read finds the circuit open: local memory (degraded)
    return store._missed_all or name in store._missed


def _accepted(store: RedisStore) -> None:
    """A write that stores was accepted: the refusal episode ends, unless writes it
    refused are still to be replayed (the next write's turn replays them)."""
    if store._refusals.error is not None and not (store._missed or store._missed_all):
        store._refusals.accepted()
        if not store._guard.down:
            store._recovered()  # local memory held only the refused writes: replayed


async def clear(store: RedisStore) -> None:
    """Forget every key of ``store``'s namespace (``SCAN`` + ``UNLINK``), and publish it."""
    store._local_epoch += 1
    store._near.reset(listening=store._near.listening)
    await store._local.clear()
    try:
        await _clear_redis(store)
    except Down as down:
        store._degrade(down)
        store._missed_all = True  # cleared when Redis is back (replay)
        store._missed.clear()
        return
    except ResponseError as exc:
        if not refuses_writes(exc):
            raise
        store._refusals.write_refused(exc, "clear")
        store._missed_all = True  # cleared when Redis accepts writes again
        store._missed.clear()
        return
    if store._missed or store._missed_all:  # older writes kept: this clear covers them
        store._missed_all = False
        store._missed.clear()


async def _clear_redis(store: RedisStore, *, force: bool = False) -> None:
    """``SCAN`` + ``UNLINK`` the namespace's entries, then publish ``CLEAR``."""
    guard, redis = store._guard, store._redis
    pattern = _glob_escape(store._value_prefix) + "*"
    cursor = 0
    while True:
        cursor, names = await guard.call(
            "clear", redis.scan(cursor, match=pattern, count=500), force=force
        )
        if names:
            await guard.call("clear", redis.unlink(*names), force=force)
        if not cursor:
            break
    await guard.call("clear", redis.publish(store._channel, CLEAR), force=force)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


# -- loads: single flight and "invalidation wins" --------------------------------------
class LoadLease(Lease):
    """The lease of one load, taken by ``LOAD_START``: the same script reads the
    entry (``raw``) and its version + generation (``head``)."""

    __slots__ = ("_start", "_value_key", "head", "raw")

    def __init__(self, start: Any, value_key: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start = start
        self._value_key = value_key
        self.head = b""
        self.raw: bytes | None = None

    async def _try(self, token: str, ttl_ms: int) -> int:
        fresh = placeholder(uuid.uuid4().bytes)
        args: list[Arg] = [token, ttl_ms, fresh, TOKEN_TTL_MS]
        command = self._start(keys=[self.key, self._value_key], args=args)
        reply = await self._guard.call("acquire", command)
        taken = int(reply[0])
        if taken > 0:
            self.raw = bytes(reply[1]) or None
            self.head = bytes(reply[2])
        return taken


@final
class LoadLock:
    """``RedisStore.load_lock``: the key's lease, entered as a :class:`LoadStart`
    holding what ``LOAD_START`` read with it; when Redis is down, no lease and
    ``None`` (the load runs at once: single flight is then per process, unless
    the store is ``strict``, whose degrade raises)."""

    __slots__ = ("_held", "_key", "_lease", "_name", "_store")

    def __init__(self, store: RedisStore, key: Hashable) -> None:
        name = store._name(key)
        self._store = store
        self._key = key
        self._name = name
        self._lease = LoadLease(
            store._scripts.load_start,
            store._value_prefix + name,
            store._lease_scripts,
            store._guard,
            name,
            store._lease_prefix + name,
            None,
            ttl=store._lease,
            blocking=True,
            timeout=None,
            poll=store._poll,
            cancel_on_loss=False,
            on_wait=store._waiting,
            renewals=store._renewals,
        )
        self._held = False

    async def __aenter__(self) -> LoadStart | None:
        store, key, name, lease = self._store, self._key, self._name, self._lease
        near = store._near
        epoch = store._local_epoch
        refused = False
        ticket = near.begin(name)  # before the read is sent (see ._near)
        try:
            try:
                if store._refusals.error is not None and not await _writable(store, stores=True):
                    store._refusals.write_refused(None, "load")
                    refused = True
                else:
                    await lease.__aenter__()
            except Down as down:
                store._degrade(down)
                return None  # the cache asks get / load_token (local memory)
            except ResponseError as exc:
                if not refuses_writes(exc):
                    raise
                store._refusals.write_refused(exc, "load")
                refused = True
            if not refused:
                return await self._started(ticket, epoch)
        finally:
            near.end(name)
        # Redis refuses writes: no lease (single flight per process), a plain GET, and
        # the load's value is not stored (its token says so)
        return LoadStart(await store.get(key), Token(None, epoch, refused=True))

    async def _started(self, ticket: Ticket, epoch: int) -> LoadStart:
        """The lease is taken: what ``LOAD_START`` read with it."""
        store, key, name, lease = self._store, self._key, self._name, self._lease
        near = store._near
        self._held = True
        _accepted(store)  # the lease was written
        try:
            entry = None
            if lease.raw is not None:
                entry = store._decode(key, lease.raw)
                if entry is not None:
                    near.put(key, name, entry, ticket, lease.raw)
            store._count_read(entry)
            return LoadStart(entry, Token(lease.head, epoch, lease))
        except BaseException:
            await self.__aexit__(*sys.exc_info())
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if not self._held:
            return False
        self._held = False
        try:
            return await self._lease.__aexit__(exc_type, exc, tb)
        except ResponseError as error:
            if not refuses_writes(error):
                raise
            return False  # not given back: it expires after ``lease`` seconds


async def load_token(store: RedisStore, key: Hashable) -> Token:
    """The entry's generation in Redis (created if absent); see ``RedisStore.load_token``."""
    epoch = store._local_epoch
    name = store._name(key)
    try:
        if store._refusals.error is not None and not await _writable(store, stores=True):
            store._refusals.write_refused(None, "load")
            return Token(None, epoch, refused=True)
        fresh = placeholder(uuid.uuid4().bytes)
        args: list[Arg] = [fresh, TOKEN_TTL_MS]
        command = store._scripts.token(keys=[store._value_prefix + name], args=args)
        head = await store._guard.call("load_token", command)
    except Down as down:
        store._degrade(down)
        return Token(None, epoch)
    except ResponseError as exc:
        if not refuses_writes(exc):
            raise
        store._refusals.write_refused(exc, "load")
        return Token(None, epoch, refused=True)
    return Token(bytes(head), epoch)


async def set_if_unchanged(
    store: RedisStore, key: Hashable, entry: CacheEntry[Any], ttl: float, token: object
) -> bool:
    """Store ``entry`` unless ``key`` was written since ``token``; see ``RedisStore``'s."""
    if not isinstance(token, Token):
        msg = f"token must come from RedisStore.load_token, got {token!r}"
        raise TypeError(msg)
    ttl_ms(ttl)  # a bad ttl raises before anything is written, here or in Redis
    name = store._name(key)
    if token.head is None:  # the load started while Redis was down, or refused writes
        if token.refused:  # Redis refuses writes: kept here, like a refused set
            store._encode(key, entry, bytes(GENERATION - 1))  # unencodable: still raises
            return await _keep_load(store, key, name, entry, ttl, token)
        if not store._guard.down:
            return False
        store.degraded += 1
        return await _set_locally(store, key, entry, ttl, token)
    data = store._encode(key, entry, token.head[1:GENERATION])
    near = store._near  # its entry still serves while the write is out (see wrote)
    ms = ttl_ms(ttl)
    args: list[Arg] = [token.head, data, ms, store._channel, invalidation(name)]
    lease = token.lease
    held = None if lease is None else lease.token
    ticket = near.begin(name)
    try:
        if held is None:
            command = store._scripts.write_if(keys=[store._value_prefix + name], args=args)
            stored = await store._guard.call("set", command)
        else:  # the load's own lease: given back by the same script (one trip)
            assert lease is not None
            args.append(held)
            keys = [store._value_prefix + name, lease.key]
            stored = await store._guard.call("set", store._scripts.write_if_release(keys, args))
            lease.given_back()
        if stored:  # its readers need no GET: keep what a GET would return
            kept = _as_read(store, data)
            if kept is None:
                near.drop(key, name)
            else:
                near.wrote(key, name, kept, ticket, data)
    except Down as down:
        near.drop(key, name)  # written or not: the entry may be outdated
        store._degrade(down)
        return await _set_locally(store, key, entry, ttl, token)
    except ResponseError as exc:
        if not refuses_writes(exc):
            raise
        near.drop(key, name)
        store._refusals.write_refused(exc, "set")  # a lease: given back by the lock's exit
        return False
    finally:
        near.end(name)
    if stored:
        _accepted(store)
    return bool(stored)


async def _keep_load(
    store: RedisStore, key: Hashable, name: str, entry: CacheEntry[Any], ttl: float, token: Token
) -> bool:
    """A value loaded while Redis refuses writes: kept in local memory and read back
    from there (:func:`masked`) until the episode ends, as a refused ``set`` is, so
    the key is not loaded again at every read (a miss) or every hit (a stale entry in
    Redis); replayed as a delete. Not if this process wrote since: that write wins."""
    if token.epoch != store._local_epoch:
        return False
    store._near.drop(key, name)  # its older entry, read from Redis, must not serve
    await _keep(store, key, name, entry, ttl)
    return True


def _as_read(store: RedisStore, data: bytes) -> CacheEntry[Any] | None:
    """The entry a ``GET`` of ``data`` returns, as every other replica reads it (JSON: a
    tuple comes back a list, an unlisted dataclass a dict), and not the loader's own
    object, which its caller may change; ``None`` if the serializer cannot read it."""
    try:
        return decode_entry(data, store._serializer)
    except Exception:  # the next GET raises the SerializationError itself
        return None


async def _set_locally(
    store: RedisStore, key: Hashable, entry: CacheEntry[Any], ttl: float, token: Token
) -> bool:
    """Degraded: store unless this process wrote or deleted anything since the token."""
    if token.epoch != store._local_epoch:
        return False
    await store._local.set(key, entry, ttl=ttl)
    return True
