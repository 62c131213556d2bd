"""RedisStore and its near cache met as a service meets them, against a real Redis.

Each test breaks one thing a deployed service sees: an invalidation Redis never got
(``CLIENT PAUSE WRITE`` longer than ``command_timeout``, a refused write) while
the process that made it stays idle, ``ttl`` and ``lease`` values at the edges
of what Redis accepts, a subscription kept alive by ``PING``. Faults that stop a
server run on a private ``redis-server``; the rest use database 12 of the test
Redis, under a random key prefix. No assertion on elapsed time: events,
counters and generous ``eventually`` polls.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest
import redis.asyncio as aredis

import parallelkit as pk
from parallelkit.redis import RedisStore, SerializationError

from .conftest import need_service
from .redis_helpers import (
    RedisServer,
    Refused,
    cleaned,
    client,
    entry,
    eventually,
    heard,
    new_prefix,
)

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def anyio_backend() -> str:
    # redis-py's asyncio client runs on asyncio only (see test_redis_store.py)
    return "asyncio"


@pytest.fixture
def prefix() -> str:
    return new_prefix()


@pytest.fixture
def url12(redis_url: str) -> str:
    """The test Redis, database 12 (this module's)."""
    parts = urlsplit(redis_url)
    return urlunsplit(parts._replace(path="/12"))


@pytest.fixture
async def r(url12: str, prefix: str) -> AsyncIterator[aredis.Redis]:
    """A client on database 12; the test's keys are deleted afterwards."""
    async with cleaned(url12, prefix) as conn:
        yield conn


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private ``redis-server``: to pause its writes (``CLIENT PAUSE``) without
    stopping the shared one."""
    srv = RedisServer()
    if srv.binary is None:
        need_service("redis-server (the binary, for pause tests)", "not on PATH")
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


async def holds(r: aredis.Redis, key: str) -> bool:
    return bool(await r.exists(key))


async def until_gone(r: aredis.Redis, key: str, what: str) -> None:
    """Poll until ``key`` is gone from Redis; fail after a generous timeout."""
    with anyio.move_on_after(30):
        while await holds(r, key):
            await anyio.sleep(0.01)
        return
    pytest.fail(f"not within 30 s: {what}")


# ------------------------------------------------------- invalidations Redis never got
async def test_an_invalidation_lost_in_a_write_pause_is_replayed_by_an_idle_store(
    server: RedisServer, prefix: str
) -> None:
    """Replica A invalidates a key while Redis holds writes longer than
    ``command_timeout`` (``CLIENT PAUSE WRITE``): the delete times out and never runs.
    A then serves no more calls (a worker that did one job). Its entered store must
    still write the invalidation once Redis takes writes again: otherwise replica B
    reads (and its near cache renews) the invalidated entry until it expires."""
    admin = client(server.url)
    a_conn, b_conn = client(server.url), client(server.url)
    a = RedisStore(a_conn, prefix=prefix, command_timeout=0.2, retry_after=0.05)
    b = RedisStore(b_conn, prefix=prefix)
    try:
        async with a, b:
            await b.set("k", entry("old"), ttl=600)
            await heard(b, 1)
            assert await b.get("k") is not None
            assert b.peek("k") is not None
            await admin.client_pause(60_000, all=False)  # writes wait, reads go on
            await a.delete("k")  # times out: kept in A, for when Redis is back
            assert a.statistics().timeouts == 1
            await admin.client_unpause()
            # A makes no call from here on
            await until_gone(admin, b.redis_key("k"), "A's invalidation written by A's store")
            await eventually(lambda: b.peek("k") is None, "B's near entry dropped")
            assert await b.get("k") is None
            assert a.statistics().recoveries == 1
    finally:
        await admin.client_unpause()
        for conn in (admin, a_conn, b_conn):
            await conn.aclose()


async def test_an_invalidation_redis_refused_is_replayed_by_an_idle_store(
    r: aredis.Redis, url12: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with a write Redis refused (``READONLY`` during a failover): the
    entered store writes the kept invalidation once Redis accepts writes, without
    waiting for another call of this process."""
    a_conn = client(url12)
    a = RedisStore(a_conn, prefix=prefix, retry_after=0.05)
    b = RedisStore(r, prefix=prefix)
    refused = Refused(a_conn, monkeypatch, a._scripts.write.sha)
    try:
        async with a, b:
            await b.set("k", entry("old"), ttl=600)
            await heard(b, 1)
            assert await b.get("k") is not None
            await a.delete("k")  # refused: kept in A
            assert refused.refused == 1
            assert await holds(r, b.redis_key("k"))
            refused.on = False  # Redis accepts writes again; A makes no call
            await until_gone(r, b.redis_key("k"), "A's refused invalidation written")
            await eventually(lambda: b.peek("k") is None, "B's near entry dropped")
    finally:
        await a_conn.aclose()


# ------------------------------------------------------- ttl and lease at the edges
@pytest.mark.parametrize(
    "ttl", [1e16, 1e300, math.inf, 10**400], ids=["1e16", "1e300", "inf", "10**400"]
)
async def test_a_ttl_past_what_redis_accepts_is_kept_as_long_as_it_can(
    r: aredis.Redis, prefix: str, ttl: Any
) -> None:
    """``ttl`` is a hint (when the entry is worthless). One past Redis's 64-bit
    milliseconds (``SWRCache(fresh=1e16, ...)``, ``inf``) must not make every
    write fail with a Redis script error: kept as long as Redis can keep it."""
    store = RedisStore(r, prefix=prefix)
    await store.set("k", entry("v"), ttl=ttl)
    got = await store.get("k")
    assert got is not None
    assert got.value == "v"
    assert await r.pttl(store.redis_key("k")) > 10**11  # years, not gone at once


async def test_a_cache_whose_fresh_and_stale_pass_what_redis_accepts_still_stores(
    r: aredis.Redis, prefix: str
) -> None:
    store = RedisStore(r, prefix=prefix)
    cache = pk.SWRCache(fresh=1e16, stale=1e16, store=store)
    loads = 0

    async def load(key: str) -> str:
        nonlocal loads
        loads += 1
        return key.upper()

    async with store, cache:
        assert await cache.get("k", load) == "K"
        assert await cache.get("k", load) == "K"
        assert await RedisStore(r, prefix=prefix).get("k") is not None  # in Redis
    assert loads == 1


@pytest.mark.parametrize(
    ("ttl", "error"),
    [(math.nan, ValueError), (-1, ValueError), ("5", TypeError), (True, TypeError)],
)
async def test_a_ttl_that_is_no_duration_is_refused_naming_it(
    r: aredis.Redis, prefix: str, ttl: Any, error: type[Exception]
) -> None:
    store = RedisStore(r, prefix=prefix)
    with pytest.raises(error, match="ttl"):
        await store.set("k", entry("v"), ttl=ttl)
    token = await store.load_token("k")
    with pytest.raises(error, match="ttl"):
        await store.set_if_unchanged("k", entry("v"), ttl=ttl, token=token)
    assert await store.get("k") is None  # nothing was written
    assert store.statistics().errors == 0


async def test_a_lease_longer_than_redis_can_hold_is_refused_at_the_door(
    r: aredis.Redis, prefix: str
) -> None:
    """``lease=1e17`` used to be accepted, and then every load failed with a Redis
    script error; refused like ``RedisLock``'s ``ttl`` instead."""
    with pytest.raises(ValueError, match="lease"):
        RedisStore(r, prefix=prefix, lease=1e17)
    store = RedisStore(r, prefix=prefix, lease=1e9)  # the longest: works
    cache = pk.SWRCache(fresh=30, stale=60, store=store)

    async def load(key: str) -> str:
        return key

    assert await cache.get("k", load) == "k"


# ------------------------------------------------------- the subscription's keep-alive
async def test_a_short_near_ttl_does_not_flood_redis_with_pings(
    url12: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subscription is checked with a ``PING`` after a second of silence (the
    docs' "about ``1 s + command_timeout``"); a short ``near_ttl`` (sweeps and
    renewal rounds every ``near_ttl / 2``) must not turn that into a ``PING`` per
    sweep: with ``near_ttl=0.002`` that was hundreds a second, per process."""
    conn = client(url12)
    pings = rounds = 0
    make = conn.pubsub

    def pubsub(**kwargs: Any) -> Any:
        ps = make(**kwargs)
        ping = ps.ping

        async def counting(*args: Any, **options: Any) -> Any:
            nonlocal pings
            pings += 1
            return await ping(*args, **options)

        ps.ping = counting  # type: ignore[method-assign]
        return ps

    renew = RedisStore._renew

    async def counted(self: RedisStore) -> None:
        nonlocal rounds
        rounds += 1
        await renew(self)

    monkeypatch.setattr(conn, "pubsub", pubsub)
    monkeypatch.setattr(RedisStore, "_renew", counted)
    store = RedisStore(conn, prefix=prefix, near_ttl=0.002)
    try:
        async with store:
            assert store.statistics().listening
            # each round is one sweep interval (near_ttl / 2) of silence on the channel
            await eventually(lambda: rounds >= 300, "300 renewal rounds")
            assert store.statistics().listening
        assert pings * 10 <= rounds, (pings, rounds)
    finally:
        await conn.aclose()


# ------------------------------------------------------- values a serializer cannot handle
class _TextSerializer:
    """A serializer of the user's with a bug: ``dumps`` returns ``str``, not bytes."""

    def dumps(self, value: Any, /) -> bytes:
        return str(value)  # type: ignore[return-value]

    def loads(self, data: bytes, /) -> Any:
        return data.decode()


async def test_a_serializer_that_returns_no_bytes_is_named_in_the_error(
    r: aredis.Redis, prefix: str
) -> None:
    """The error names the store, the key and the type, and says what is wrong: the
    serializer's ``dumps`` returned ``str`` (not "can't concat str to bytes")."""
    store = RedisStore(r, prefix=prefix, namespace="orders", serializer=_TextSerializer())
    with pytest.raises(SerializationError) as info:
        await store.set(("order", 7), entry(7), ttl=60)
    message = str(info.value)
    assert "'orders'" in message
    assert "('order', 7)" in message
    assert "dumps returned str, not bytes" in message
    assert info.value.key == ("order", 7)
    assert await store.get(("order", 7)) is None  # nothing was written


# ------------------------------------------------------- already right: kept that way
async def test_two_stores_on_one_client_survive_killed_connections(
    server: RedisServer, prefix: str
) -> None:
    """Two entered stores share one client (one pool). ``CLIENT KILL TYPE pubsub``
    kills both subscriptions: both near caches are emptied and off at once, come
    back, and hear the next invalidation; ``CLIENT KILL TYPE normal`` (every command
    connection) costs a reconnect, not an outage."""
    admin = client(server.url)
    shared = client(server.url)
    other = client(server.url)
    a, b = RedisStore(shared, prefix=prefix), RedisStore(shared, prefix=prefix, namespace="b")
    writer = RedisStore(other, prefix=prefix)
    try:
        async with a, b, writer:
            await writer.set("k", entry("old"), ttl=600)
            await heard(a, 1)
            await RedisStore(other, prefix=prefix, namespace="b").set("k", entry("b"), ttl=600)
            await heard(b, 1)
            assert await a.get("k") is not None
            assert await b.get("k") is not None
            assert (a.peek("k"), b.peek("k")) != (None, None)
            await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            await writer.delete("k")  # its message may be lost with A's subscription
            await eventually(
                lambda: a.statistics().near_resets == b.statistics().near_resets == 1,
                "both near caches reset",
            )
            assert (a.peek("k"), b.peek("k")) == (None, None)
            await eventually(
                lambda: a.statistics().listening and b.statistics().listening, "both back"
            )
            assert await a.get("k") is None
            before = a.statistics().near_invalidations
            await writer.set("k", entry("new"), ttl=600)
            await heard(a, before + 1)  # on the new subscription
            got = await a.get("k")
            assert got is not None
            assert got.value == "new"

            await admin.execute_command("CLIENT", "KILL", "TYPE", "normal")
            got = await a.get("k")  # the client reconnects (its one retry)
            assert got is not None
            assert got.value == "new"
            assert (a.statistics().errors, b.statistics().errors) == (0, 0)
    finally:
        for conn in (admin, shared, other):
            await conn.aclose()
