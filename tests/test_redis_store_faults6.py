"""RedisStore and its near cache, broken as a user would (round 6), against a real Redis.

Each test reproduces one defect found by trying the store the way a service uses
it: the staleness bound after a lost invalidation message, a message on the
channel the store cannot read, values the JSON serializer gave back as something
else. No assertion on elapsed time: events, counters, and the near cache's
injectable timer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

import anyio
import pydantic
import pytest
import redis.asyncio as aredis

from parallelkit.redis import JSONSerializer, RedisStore
from parallelkit.redis._near import NearCache

from .redis_helpers import FakeTimer, client, entry, heard

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    # redis-py's asyncio client runs on asyncio only (see test_redis_store.py)
    return "asyncio"


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


# ------------------------------------------------------------------ the staleness bound
async def test_a_slow_read_counts_near_ttl_from_when_it_was_sent(
    redis_url: str, r: aredis.Redis, prefix: str
) -> None:
    """A GET runs in Redis, then the key is deleted behind the store's back (no
    message: FLUSHALL, a DEL by hand, a lost message), and the GET's reply takes a
    while to come. The entry must not be served longer than ``near_ttl`` after the
    read was *sent* (which was before the delete), not ``near_ttl`` after the
    answer came (up to ``near_ttl + command_timeout`` after the delete)."""
    a_conn = client(redis_url)
    a = RedisStore(a_conn, prefix=prefix, near_ttl=5, command_timeout=60)
    timer = FakeTimer()
    a._near.timer = timer
    try:
        async with a, anyio.create_task_group() as tg:
            await a.set("k", entry("old"), ttl=60)
            await heard(a, 1)  # its own set's message: it would drop the copy read next
            held = HeldReply(a_conn, lambda args: args[0] == "GET")
            sent = timer.now
            tg.start_soon(a.get, "k")
            with anyio.fail_after(30):
                await held.replied.wait()  # the GET ran: its reply holds "old"
            await r.delete(a.redis_key("k"))  # behind the store's back: no message
            timer.now += 3.0  # the reply is slow (within command_timeout)
            held.release.set()
            with anyio.fail_after(30):
                while a._reads:
                    await anyio.sleep(0.005)
            timer.now = sent + 5.0  # near_ttl after the read was sent
            a._near.sweep()  # (the watching task sweeps at least every second)
            assert a.peek("k") is None  # stale for at most near_ttl after the delete
            assert await a.get("k") is None
    finally:
        await a_conn.aclose()


def test_reads_answered_out_of_order_each_keep_their_own_bound() -> None:
    """Reads answered in another order than they were sent: each entry is still
    dropped ``near_ttl`` after its own read was sent (the sweep relies on fill order
    being expiry order), and an answer that comes after that is not kept at all."""
    near = NearCache("chan", 10, 5.0)
    timer = FakeTimer(0.0)
    near.timer = timer
    near.reset(listening=True)
    first = near.begin("'a'")  # sent at 0
    timer.now = 0.5
    second = near.begin("'b'")  # sent at 0.5, answered first
    near.put("b", "'b'", entry("b"), second, b"b")
    near.end("'b'")
    timer.now = 0.9
    near.put("a", "'a'", entry("a"), first, b"a")  # answered last
    near.end("'a'")
    timer.now = 4.0  # a sweep: the next comes at 5.0 at the latest
    near.sweep()
    assert "a" not in near.entries  # near_ttl after its read was sent: 5.0
    timer.now = 0.0
    late = near.begin("'c'")
    timer.now = 5.0  # its answer comes near_ttl after it was sent
    near.put("c", "'c'", entry("c"), late, b"c")
    near.end("'c'")
    assert "c" not in near.entries
    assert near.meta == {}  # ("b", filled after "a" was sent, ended with it)

    timer.now = 10.0
    near.put("d", "'d'", entry("old"), near.begin("'d'"), b"old")
    near.end("'d'")
    write = near.begin("'d'")  # this process writes d; the reply comes too late
    timer.now = 15.0
    near.wrote("d", "'d'", entry("new"), write, b"new")
    near.end("'d'")
    assert (near.entries, near.own) == ({}, {})  # neither the old entry nor the new


# ------------------------------------------------------------------ what JSON gives back
def test_json_keeps_a_zoned_datetimes_instant_and_offset_not_its_zone() -> None:
    """What docs/redis.md states: a ``ZoneInfo`` datetime comes back as the same
    instant with the fixed UTC offset it had, and ``astimezone`` gives the zone back."""
    zoneinfo = pytest.importorskip("zoneinfo")
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    serializer = JSONSerializer()
    summer = dt.datetime(2024, 7, 1, 12, tzinfo=paris)
    back = serializer.loads(serializer.dumps(summer))
    assert back == summer
    assert back.utcoffset() == dt.timedelta(hours=2)
    assert back.tzinfo == dt.timezone(dt.timedelta(hours=2))
    assert back.astimezone(paris) == summer
    assert back.astimezone(paris).tzinfo is paris


class Address(pydantic.BaseModel):
    zip_code: str = pydantic.Field(alias="zipCode")


class Customer(pydantic.BaseModel):
    """An API model: camelCase aliases, as most services give them."""

    customer_id: int = pydantic.Field(alias="customerId")
    address: Address
    tags: tuple[str, ...] = ()


async def test_a_listed_model_with_aliased_fields_comes_back_in_every_replica(
    r: aredis.Redis, prefix: str
) -> None:
    """A listed pydantic model whose fields have aliases was stored by field name and
    validated by alias: every read of it, in every replica, raised SerializationError
    (blaming another serializer) until the entry expired."""
    customer = Customer(customerId=7, address=Address(zipCode="75001"), tags=("vip",))
    serializer = JSONSerializer(types=[Customer, Address])
    a = RedisStore(r, prefix=prefix, serializer=serializer)
    b = RedisStore(r, prefix=prefix, serializer=JSONSerializer(types=[Customer, Address]))
    await a.set("c7", entry(customer), ttl=60)
    got = await b.get("c7")
    assert got is not None
    assert got.value == customer
    assert isinstance(got.value, Customer)
    assert isinstance(got.value.address, Address)
    # not listed: a dict of its fields, by name (as model_dump gives it)
    plain = await RedisStore(r, prefix=prefix).get("c7")
    assert plain is not None
    assert plain.value == {"customer_id": 7, "address": {"zip_code": "75001"}, "tags": ["vip"]}


# ------------------------------------------------------------------ the channel
async def test_a_message_the_store_cannot_read_does_not_drop_its_subscription(
    r: aredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone may publish on the invalidation channel (another tool, another version of
    the library). A message that is no invalidation this store can read (bytes that are
    not UTF-8) used to raise in the listening task: the subscription was torn down, the
    near cache off until re-subscribed, and a "subscription lost" warning logged. Such a
    message may still have meant an invalidation: the near cache is emptied, the
    subscription stays."""
    store = RedisStore(r, prefix=prefix)
    caplog.set_level(logging.WARNING, logger="parallelkit.redis")
    async with store:
        await store.set("k", entry("v"), ttl=60)
        await heard(store, 1)
        for junk, count in ((b"k\xff\xfe", 2), (b"?", 3)):
            assert await store.get("k") is not None
            assert store.peek("k") is not None
            await r.publish(store._channel, junk)
            await heard(store, count)
            assert store.peek("k") is None  # not understood: emptied, to be safe
            stats = store.statistics()
            assert (stats.listening, stats.near_resets) == (True, 0)
        await store.delete("k")  # and the subscription still hears invalidations
        await heard(store, 4)
    assert not [rec for rec in caplog.records if "near cache off" in rec.getMessage()]


@dataclasses.dataclass(frozen=True)
class Slot:
    """An immutable value object: tuples, so it hashes."""

    day: str
    hours: tuple[int, ...]
    owners: tuple[str, str] | None = None


def test_a_listed_dataclass_gets_its_tuple_fields_back_as_tuples() -> None:
    """A listed dataclass is rebuilt with ``cls(**fields)``, which checks no types: its
    tuple fields came back as lists, so the instance was unequal to the one stored and
    a frozen one no longer hashed (``unhashable type: 'list'``)."""
    serializer = JSONSerializer(types=[Slot])
    slot = Slot("mon", (9, 10), ("ada", "bo"))
    back = serializer.loads(serializer.dumps(slot))
    assert back == slot
    assert hash(back) == hash(slot)
    assert isinstance(back.hours, tuple)
    assert isinstance(back.owners, tuple)
    none = Slot("tue", ())
    assert serializer.loads(serializer.dumps(none)) == none
    # not listed: a dict of its fields, tuples as lists (as every tuple)
    assert JSONSerializer().loads(JSONSerializer().dumps(slot)) == {
        "day": "mon",
        "hours": [9, 10],
        "owners": ["ada", "bo"],
    }
