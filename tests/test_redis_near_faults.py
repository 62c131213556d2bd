"""RedisStore's near cache under faults, against a real Redis.

Each test injects one fault at an exact point (a reply held after Redis ran the
command, a subscription's connection killed with ``CLIENT KILL`` and its
reconnect held, the listening task stalled, a subscription Redis refuses) and
checks what the near cache promises: nothing invalidated is served past the
documented bound, the statistics count what happened, nothing runs after the
store is left. No assertion on elapsed time: events, counters, and the near
cache's injectable timer.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio as aredis

import parallelkit as pk
from parallelkit.redis import RedisStore

from .redis_helpers import FakeTimer, RedisServer, client, entry, eventually, heard

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    # redis-py's asyncio client runs on asyncio only (see test_redis_store.py)
    return "asyncio"


@pytest.fixture
async def named(redis_url: str) -> AsyncIterator[tuple[aredis.Redis, str]]:
    """A client whose connections carry a name of their own (to ``CLIENT KILL`` them)."""
    name = f"pknear-{uuid.uuid4().hex[:10]}"
    conn = client(redis_url, client_name=name)
    yield conn, name
    await conn.aclose()


async def subscription_id(r: aredis.Redis, name: str) -> str:
    """The id of the one subscription connection named ``name``."""
    ids: list[str] = []
    with anyio.fail_after(30):
        while len(ids) != 1:
            ids = [c["id"] for c in await r.client_list(_type="pubsub") if c["name"] == name]
            await anyio.sleep(0.005)
    return ids[0]


class HeldReply:
    """The first command ``matches`` accepts runs in Redis; its reply is read, then held
    until ``release`` is set (``replied`` is set meanwhile). Later commands pass."""

    def __init__(self, r: aredis.Redis, matches: Callable[[tuple[Any, ...]], bool]) -> None:
        self.replied = anyio.Event()
        self.release = anyio.Event()
        send: Any = r.execute_command

        async def holding(*args: Any, **options: Any) -> Any:
            result = await send(*args, **options)
            if not self.replied.is_set() and matches(args):
                self.replied.set()
                await self.release.wait()
            return result

        r.execute_command = holding  # type: ignore[method-assign]


class SlowReconnect:
    """Once the subscription's connection broke, redis-py's reconnect of it hangs until
    ``release`` (a network that drops new connections). ``reconnecting`` is set
    when it starts; ``waiting`` is true while it hangs."""

    def __init__(self, r: aredis.Redis) -> None:
        self.reconnecting = anyio.Event()
        self.release = anyio.Event()
        self.waiting = False
        make = r.pubsub

        def pubsub(**kwargs: Any) -> Any:
            ps = make(**kwargs)
            subscribe = ps.subscribe

            async def subscribing(*args: Any, **options: Any) -> None:
                await subscribe(*args, **options)
                self._gate(ps.connection)

            ps.subscribe = subscribing  # type: ignore[method-assign]
            return ps

        r.pubsub = pubsub  # type: ignore[method-assign]

    def _gate(self, conn: Any) -> None:
        if getattr(conn, "_pk_gated", False):
            return
        connect = conn.connect

        async def gated() -> None:
            if not conn.is_connected and not self.release.is_set():
                self.waiting = True
                self.reconnecting.set()
                try:
                    await self.release.wait()
                finally:
                    self.waiting = False
            await connect()

        conn.connect = gated
        conn._pk_gated = True


class Stall:
    """While closed, the subscription's reads wait before reading (the listening task
    does not get back to its loop); ``stalled`` is set once one waits."""

    def __init__(self, r: aredis.Redis) -> None:
        self.open = anyio.Event()
        self.open.set()
        self.stalled = anyio.Event()
        make = r.pubsub

        def pubsub(**kwargs: Any) -> Any:
            ps = make(**kwargs)
            read = ps.get_message

            async def get_message(*args: Any, **options: Any) -> Any:
                if not self.open.is_set():
                    self.stalled.set()
                    await self.open.wait()
                return await read(*args, **options)

            ps.get_message = get_message  # type: ignore[method-assign]
            return ps

        r.pubsub = pubsub  # type: ignore[method-assign]

    def close(self) -> None:
        self.open = anyio.Event()


# ------------------------------------------------------------------ the classic race
def _is_get(args: tuple[Any, ...]) -> bool:
    return bool(args[0] == "GET")


def _is_mget(args: tuple[Any, ...]) -> bool:
    return bool(args[0] == "MGET")


async def test_a_get_answered_before_another_replicas_delete_is_not_kept(
    redis_url: str, r: aredis.Redis, prefix: str
) -> None:
    """A's GET runs in Redis before B's delete, and the delete's message reaches A
    before A's GET reply does: A must not keep (and serve) the old value."""
    a_conn = client(redis_url)
    held = HeldReply(a_conn, _is_get)
    a, b = RedisStore(a_conn, prefix=prefix), RedisStore(r, prefix=prefix)
    try:
        async with a, b, anyio.create_task_group() as tg:
            await b.set("k", entry("old"), ttl=60)
            await heard(a, 1)
            got: list[Any] = []

            async def read() -> None:
                got.append(await a.get("k"))

            tg.start_soon(read)
            with anyio.fail_after(30):
                await held.replied.wait()  # A's GET ran: its reply holds "old"
            await b.delete("k")
            await heard(a, 2)  # the delete's message reached A first
            held.release.set()
            with anyio.fail_after(30):
                while not got:
                    await anyio.sleep(0.005)
            assert got[0] is not None
            assert got[0].value == "old"  # the read began before the delete: fine to return
            assert a.peek("k") is None  # but not kept: the invalidation overtook it
            assert await a.get("k") is None
    finally:
        await a_conn.aclose()


async def test_a_load_start_answered_before_a_delete_is_not_kept(
    redis_url: str, r: aredis.Redis, prefix: str
) -> None:
    """The same race through the script that takes a load's lease and reads the entry."""
    a_conn = client(redis_url)
    a, b = RedisStore(a_conn, prefix=prefix), RedisStore(r, prefix=prefix)
    try:
        async with a, b:
            await b.set("k", entry("old"), ttl=60)
            await heard(a, 1)
            sha = a._scripts.load_start.sha
            held = HeldReply(a_conn, lambda args: args[0] == "EVALSHA" and args[1] == sha)
            async with anyio.create_task_group() as tg:
                started: list[Any] = []

                async def load() -> None:
                    async with a.load_lock("k") as start:
                        started.append(start)

                tg.start_soon(load)
                with anyio.fail_after(30):
                    await held.replied.wait()
                await b.delete("k")
                await heard(a, 2)
                held.release.set()
            assert started[0] is not None
            assert started[0].entry.value == "old"
            assert a.peek("k") is None
    finally:
        await a_conn.aclose()


async def test_a_renewal_answered_before_a_delete_does_not_bring_the_entry_back(
    redis_url: str, r: aredis.Redis, prefix: str
) -> None:
    a_conn = client(redis_url)
    a, b = RedisStore(a_conn, prefix=prefix, near_ttl=5), RedisStore(r, prefix=prefix)
    timer = FakeTimer()
    a._near.timer = timer
    try:
        async with a, b:
            await b.set("k", entry("old"), ttl=60)
            await heard(a, 1)
            assert await a.get("k") is not None
            timer.now += 3.5  # due for a check
            held = HeldReply(a_conn, _is_mget)
            async with anyio.create_task_group() as tg:
                tg.start_soon(a._renew)
                with anyio.fail_after(30):
                    await held.replied.wait()  # the check read "old", unchanged
                await b.delete("k")
                await heard(a, 2)  # dropped by the message while the check was out
                held.release.set()
            assert a.peek("k") is None
            assert a.statistics().near_renewals == 0
    finally:
        await a_conn.aclose()


async def test_a_write_of_this_replica_voids_its_own_read_in_flight(
    redis_url: str, prefix: str
) -> None:
    a_conn = client(redis_url)
    held = HeldReply(a_conn, _is_get)
    a = RedisStore(a_conn, prefix=prefix)
    try:
        async with a, anyio.create_task_group() as tg:
            await a.set("k", entry("old"), ttl=60)
            await heard(a, 1)
            tg.start_soon(a.get, "k")
            with anyio.fail_after(30):
                await held.replied.wait()
            await a.set("k", entry("new"), ttl=60)  # this replica writes k meanwhile
            held.release.set()
            await anyio.lowlevel.checkpoint()
            with anyio.fail_after(30):
                while a._reads:
                    await anyio.sleep(0.005)
            assert a.peek("k") is None  # the old reply is not kept over the write
            got = await a.get("k")
            assert got is not None
            assert got.value == "new"
    finally:
        await a_conn.aclose()


# ------------------------------------------------------------------ the subscription lost
async def test_a_killed_subscription_empties_the_near_cache_and_counts_it(
    named: tuple[aredis.Redis, str], r: aredis.Redis, prefix: str
) -> None:
    a_conn, name = named
    a, b = RedisStore(a_conn, prefix=prefix), RedisStore(r, prefix=prefix)
    async with a, b:
        await b.set("k", entry("old"), ttl=60)
        await heard(a, 1)
        assert await a.get("k") is not None
        assert a.peek("k") is not None
        await r.client_kill_filter(_id=await subscription_id(r, name))
        await b.delete("k")  # its message may be lost with the subscription
        await eventually(lambda: a.statistics().near_resets == 1, "the reset counted")
        assert a.peek("k") is None
        await eventually(lambda: a.statistics().listening, "subscribed again")
        assert await a.get("k") is None
        await b.set("k", entry("new"), ttl=60)  # the new subscription hears the next write
        await eventually(lambda: a.statistics().near_invalidations >= 2, "heard after")
        got = await a.get("k")
        assert got is not None
        assert got.value == "new"
        assert a.statistics().near_resets == 1


async def test_a_subscription_whose_reconnect_hangs_stops_serving_at_once(
    named: tuple[aredis.Redis, str], r: aredis.Redis, prefix: str
) -> None:
    """The subscription's connection breaks and redis-py's reconnect of it hangs (a
    network dropping new connections): the messages of that time are lost, so the
    near cache must be emptied and off while it hangs (not for ``1 s +
    command_timeout``), and the reset counted."""
    a_conn, name = named
    slow = SlowReconnect(a_conn)
    a = RedisStore(a_conn, prefix=prefix, near_ttl=60, command_timeout=60)
    b = RedisStore(r, prefix=prefix)
    try:
        async with a, b:
            await b.set("k", entry("old"), ttl=60)
            await heard(a, 1)
            assert await a.get("k") is not None
            await r.client_kill_filter(_id=await subscription_id(r, name))
            with anyio.fail_after(30):
                await slow.reconnecting.wait()
            await b.delete("k")  # A is not subscribed: this message is lost
            await eventually(
                lambda: not a.statistics().listening and a.peek("k") is None,
                "near cache emptied and off while the reconnect hangs",
            )
            assert slow.waiting  # (still hanging: not the listener's timeout)
            assert a.statistics().near_resets == 1
            slow.release.set()
            await eventually(lambda: a.statistics().listening, "subscribed again")
            assert a.peek("k") is None
            assert await a.get("k") is None
            assert a.statistics().near_resets == 1  # one loss, counted once
    finally:
        slow.release.set()


async def test_near_ttl_holds_while_the_listening_task_is_stalled(
    redis_url: str, r: aredis.Redis, prefix: str
) -> None:
    """The bound on a lost message: an entry is served for at most ``near_ttl`` after it
    was read, even while the listening task is held up in a read (and the renewal's
    check cannot answer either)."""
    a_conn = client(redis_url)
    stall = Stall(a_conn)
    a = RedisStore(a_conn, prefix=prefix, near_ttl=5, command_timeout=60)
    b = RedisStore(r, prefix=prefix)
    timer = FakeTimer()
    a._near.timer = timer
    hung = HeldReply(a_conn, _is_mget)  # the renewal's check hangs too
    try:
        async with a, b:
            await b.set("k", entry("old"), ttl=60)
            await heard(a, 1)
            assert await a.get("k") is not None
            stall.close()
            with anyio.fail_after(30):
                await stall.stalled.wait()
            await b.delete("k")  # its message waits in the socket
            assert a.peek("k") is not None
            timer.now += 5.0  # near_ttl after the read
            await eventually(lambda: a.peek("k") is None, "dropped at near_ttl")
            stats = a.statistics()
            assert not stall.open.is_set()  # the listening task is still held up ...
            assert (stats.listening, stats.near_resets) == (True, 0)  # ... and did not time out
            stall.open.set()
            hung.release.set()
            await heard(a, 2)
            assert await a.get("k") is None
    finally:
        stall.open.set()
        hung.release.set()
        await a_conn.aclose()


async def test_a_subscription_refused_from_the_start_is_logged(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis refuses the subscription (an ACL without the channel): the store serves
    from Redis, but says why its near cache is off, once (not every retry)."""
    admin = client(redis_url)
    user = f"pknear-{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    await admin.acl_setuser(  # every key and command, no channel
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys="~*",
        commands=["+@all"],
        reset_channels=True,
    )
    conn = client(redis_url, username=user, password=password)
    store = RedisStore(conn, prefix=prefix, retry_after=0.05)
    caplog.set_level(logging.WARNING, logger="parallelkit.redis")
    try:
        async with store:
            assert not store.statistics().listening
            # (the user may not publish either: another store writes)
            await RedisStore(admin, prefix=prefix).set("k", entry("v"), ttl=60)
            got = await store.get("k")  # the store itself works
            assert got is not None
            assert got.value == "v"
            await anyio.sleep(0.3)  # several retries
        refused = [rec for rec in caplog.records if "NoPermissionError" in rec.getMessage()]
        assert len(refused) == 1, caplog.text
        assert refused[0].levelno == logging.WARNING
    finally:
        await conn.aclose()
        await admin.acl_deluser(user)
        keys = [k async for k in admin.scan_iter(match=f"{prefix}:*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


@pytest.mark.slow
async def test_client_pause_turns_the_near_cache_off_then_on(
    server: RedisServer, prefix: str
) -> None:
    """``CLIENT PAUSE``: the subscription's ``PING`` goes unanswered, the near cache
    goes off (counted); once Redis answers again it comes back, empty."""
    conn = client(server.url, socket_timeout=30)
    admin = client(server.url)
    try:
        store = RedisStore(conn, prefix=prefix, near_ttl=0.4, command_timeout=0.2)
        async with store:
            await store.set("k", entry("v"), ttl=60)
            await heard(store, 1)
            assert await store.get("k") is not None
            await admin.client_pause(3000, all=True)
            await eventually(lambda: not store.statistics().listening, "off")
            assert store.peek("k") is None
            assert store.statistics().near_resets == 1
            await admin.client_unpause()
            await eventually(lambda: store.statistics().listening, "on again")
            assert store.peek("k") is None
    finally:
        await conn.aclose()
        await admin.aclose()


# ------------------------------------------------------------------ what a load keeps
@dataclasses.dataclass
class Order:
    id: int
    status: str


async def test_a_load_keeps_its_value_as_redis_returns_it_to_every_replica(
    r: aredis.Redis, prefix: str
) -> None:
    """The replica that loaded a key serves, from its near cache, what every other
    replica reads from Redis (JSON: a tuple comes back a list, an unlisted dataclass
    a dict), and not the loader's own object, which its first caller may mutate."""
    a, b = RedisStore(r, prefix=prefix), RedisStore(r, prefix=prefix)
    cache_a = pk.SWRCache(fresh=30, stale=60, store=a)
    cache_b = pk.SWRCache(fresh=30, stale=60, store=b)
    made: list[Any] = []

    async def load(key: str) -> Any:
        value: Any = ("open", 1) if key == "t" else {"order": Order(1, "open"), "tags": ["a"]}
        made.append(value)
        return value

    async with a, b, cache_a, cache_b:
        first = await cache_a.get("t", load)
        assert first == ("open", 1)  # the loader's caller gets the loader's value
        assert a.peek("t") is not None  # kept by the load: no GET for the next readers
        assert await cache_a.get("t", load) == ["open", 1]
        assert await cache_b.get("t", load) == ["open", 1]

        mine = await cache_a.get("d", load)
        mine["tags"].append("mutated by the first caller")
        expected = {"order": {"id": 1, "status": "open"}, "tags": ["a"]}
        assert await cache_a.get("d", load) == expected
        assert await cache_b.get("d", load) == expected
    assert len(made) == 2


# ------------------------------------------------------------------ leaving
async def test_leaving_the_store_stops_everything_it_started(
    named: tuple[aredis.Redis, str], r: aredis.Redis, prefix: str
) -> None:
    a_conn, name = named
    store = RedisStore(a_conn, prefix=prefix)
    before = {t.id for t in anyio.get_running_tasks()}
    for round_ in range(2):  # and it can be entered again
        async with store:
            await store.set("k", entry("v"), ttl=60)
            await heard(store, round_ + 1)
            assert await store.get("k") is not None
            assert store.peek("k") is not None
            await subscription_id(r, name)
        assert {t.id for t in anyio.get_running_tasks()} <= before  # nothing left running
        stats = store.statistics()
        assert (stats.listening, stats.near_size) == (False, 0)
        assert store.peek("k") is None
        subs = [c for c in await r.client_list(_type="pubsub") if c["name"] == name]
        assert subs == []  # the subscription is closed
        got = await store.get("k")  # not entered: a plain GET, nothing kept
        assert got is not None
        assert store.peek("k") is None
        await store.delete("k")
