"""RedisStore's loads: single flight across processes, and "invalidation wins".

A load stores its value only if the generation it started from is still there,
so no invalidation (:mod:`._store_writes`) is undone by an older load:

* :class:`LoadLock` (``RedisStore.load_lock``): the key's lease around one load;
  the script that takes it (:class:`LoadLease`, ``LOAD_START``) also reads the
  entry and its generation, so the load needs no ``GET`` of its own;
* :func:`load_token` (``RedisStore.load_token``): the generation a load started
  from, when it runs without the lease;
* :func:`set_if_unchanged` (``RedisStore.set_if_unchanged``): the conditional
  write, which gives the load's lease back in the same script; the same rule
  holds in local memory while Redis is down.

The load protocol (a lease, a generation, a conditional write: two round trips
per load) reads in one piece here. The functions take the store they work for;
``RedisStore``'s methods of the same names hold the documentation and call them.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError
from typing_extensions import final

from .._cache.store import CacheEntry, LoadStart
from ._give_back import void_key
from ._lease import Lease
from ._near import Ticket, invalidation
from ._outage import Down, refuses_writes
from ._scripts import TOKEN_TTL_MS, Token
from ._serializer import GENERATION, decode_entry, placeholder
from ._store_codec import decode, encode
from ._store_writes import Arg, _accepted, _keep, _writable, ttl_ms

if TYPE_CHECKING:
    from ._store import RedisStore

__all__ = ["LoadLease", "LoadLock", "load_token", "set_if_unchanged"]


class LoadLease(Lease):
    """The lease of one load, taken by ``LOAD_START``: the same script reads the
    entry (``raw``) and its version + generation (``head``), and honours the
    tombstone of a give-back that overtook it (see ``Lease._attempt``)."""

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
        keys = [self.key, self._value_key, void_key(self.key, token)]
        command = self._start(keys=keys, args=args)
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
        # the load's value is not stored (its token says so); not counted (see _started)
        return LoadStart(await store._read(key), Token(None, epoch, refused=True))

    async def _started(self, ticket: Ticket, epoch: int) -> LoadStart:
        """The lease is taken: what ``LOAD_START`` read with it."""
        store, key, name, lease = self._store, self._key, self._name, self._lease
        near = store._near
        self._held = True
        _accepted(store)  # the lease was written
        try:
            entry = None
            if lease.raw is not None:
                entry = decode(store, key, lease.raw)
                if entry is not None:
                    near.put(key, name, entry, ticket, lease.raw)
            # not counted in hits / misses: the read that started this load (the
            # cache's miss or stale hit, by get or peek) was counted already
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
            encode(store, key, entry, bytes(GENERATION - 1))  # unencodable: still raises
            return await _keep_load(store, key, name, entry, ttl, token)
        if not store._guard.down:
            return False
        store.degraded += 1
        return await _set_locally(store, key, entry, ttl, token)
    data = encode(store, key, entry, token.head[1:GENERATION])
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
