"""RedisStore: SWRCache across processes, single flight, outage and recovery."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import decimal
import functools
import math
import time
import uuid
from typing import Any

import anyio
import anyio.lowlevel
import pydantic
import pytest
import redis.asyncio as aredis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

import parallelkit as pk
from parallelkit._cache.store import CacheEntry
from parallelkit.redis import (
    JSONSerializer,
    PickleSerializer,
    RedisLimiter,
    RedisStore,
    RedisStoreStats,
    RedisUnavailable,
    SerializationError,
)
from parallelkit.redis._store import decode_entry, encode_entry

from .conftest import need_service
from .redis_helpers import (
    Commands,
    LostReply,
    RedisServer,
    Refused,
    bad_arguments,
    client,
    entry,
    renewals,
    start_workers,
    stop_workers,
    wait_workers,
)

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    # redis-py's asyncio client is built on asyncio streams and locks: it cannot run
    # under trio, so the Redis-backed primitives (and these tests) are asyncio-only.
    return "asyncio"


class Counter:
    """A loader that counts its calls."""

    def __init__(self, delay: float = 0.0, value: Any = "v") -> None:
        self.calls = 0
        self.delay = delay
        self.value = value

    async def __call__(self, key: Any) -> Any:
        self.calls += 1
        await anyio.sleep(self.delay)
        return self.value


# ------------------------------------------------------------------ the Store protocol
async def test_roundtrip_expiry_and_delete(r: aredis.Redis, prefix: str) -> None:
    store = RedisStore(r, prefix=prefix)
    assert isinstance(store, pk.Store)
    assert store.clock is time.time  # shared stores use the wall clock
    assert await store.get("k") is None
    stored = entry({"id": 1, "tags": ["a"]})
    await store.set("k", stored, ttl=90)
    assert await store.get("k") == stored
    assert 89_000 < await r.pttl(store.redis_key("k")) <= 90_000
    await store.delete("k")
    await store.delete("k")  # absent: no error
    assert await store.get("k") is None


async def test_json_is_the_default_and_readable(r: aredis.Redis, prefix: str) -> None:
    store = RedisStore(r, prefix=prefix)
    assert isinstance(store.serializer, JSONSerializer)
    await store.set(("crm.get", "c1"), entry({"name": "Ada"}), ttl=10)
    raw = await r.get(f"{prefix}:cache:v:('crm.get', 'c1')")
    assert raw is not None
    assert raw.endswith(b'{"name":"Ada"}')
    with pytest.raises(TypeError):  # not JSON: a loud error (SerializationError)
        await store.set("obj", entry(object()), ttl=10)


async def test_pickle_and_custom_serializers(r: aredis.Redis, prefix: str) -> None:
    pickled = RedisStore(r, prefix=prefix, namespace="p", serializer="pickle")
    assert isinstance(pickled.serializer, PickleSerializer)
    value = {"when": (1, 2), "ids": {3, 4}}
    await pickled.set("k", entry(value), ttl=10)
    got = await pickled.get("k")
    assert got is not None
    assert got.value == value

    class Upper:
        def dumps(self, value: Any, /) -> bytes:
            return str(value).upper().encode()

        def loads(self, data: bytes, /) -> Any:
            return data.decode()

    custom = RedisStore(r, prefix=prefix, namespace="c", serializer=Upper())
    await custom.set("k", entry("hello"), ttl=10)
    got = await custom.get("k")
    assert got is not None
    assert got.value == "HELLO"


@dataclasses.dataclass(frozen=True)
class Owner:
    name: str
    since: dt.date


@dataclasses.dataclass
class Conversation:
    id: uuid.UUID
    opened: dt.datetime
    owner: Owner
    total: decimal.Decimal
    tags: list[str] = dataclasses.field(default_factory=list)


class Contact(pydantic.BaseModel):
    id: int
    seen: dt.datetime
    owner: Owner | None = None


NOW = dt.datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
CONVERSATION = Conversation(
    id=uuid.UUID("12345678-1234-5678-1234-567812345678"),
    opened=NOW,
    owner=Owner("ada", dt.date(2020, 1, 2)),
    total=decimal.Decimal("19.90"),
    tags=["vip"],
)


def roundtrip(value: Any, serializer: JSONSerializer | None = None) -> Any:
    s = serializer or JSONSerializer()
    return s.loads(s.dumps(value))


@pytest.mark.parametrize(
    "value",
    [
        NOW,
        NOW.replace(tzinfo=None),
        dt.date(2024, 2, 29),
        dt.time(23, 59, 1, 5),
        dt.time(8, 0, tzinfo=dt.timezone.utc),
        uuid.uuid4(),
        decimal.Decimal("0.1000"),
        decimal.Decimal("-1E+3"),
        {"at": [NOW, {"d": dt.date(2024, 1, 1)}], "n": None},
        {"$date": "not a date"},  # looks like a tag: escaped, comes back unchanged
        {"$dict": [["a", 1]]},
        {"$type": ["x", {}]},
    ],
    ids=repr,
)
def test_json_keeps_the_common_types(value: Any) -> None:
    back = roundtrip(value)
    assert back == value
    assert type(back) is type(value)


class Invoice(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    net: decimal.Decimal
    vat: decimal.Decimal

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def gross(self) -> decimal.Decimal:
        return self.net + self.vat


def test_json_rebuilds_a_listed_model_without_its_computed_fields() -> None:
    invoice = Invoice(net=decimal.Decimal("10.00"), vat=decimal.Decimal("2.10"))
    back = roundtrip(invoice, JSONSerializer(types=[Invoice]))  # extra="forbid" reads it
    assert back == invoice
    assert back.gross == decimal.Decimal("12.10")
    # not listed: the dict a reader gets keeps what model_dump gives, computed included
    assert roundtrip(invoice)["gross"] == decimal.Decimal("12.10")


def test_json_dataclasses_and_pydantic_models() -> None:
    contact = Contact(id=7, seen=NOW, owner=Owner("bo", dt.date(2021, 3, 4)))
    # not listed: their fields, as dicts (with the common types kept)
    assert roundtrip(CONVERSATION) == {
        "id": CONVERSATION.id,
        "opened": NOW,
        "owner": {"name": "ada", "since": dt.date(2020, 1, 2)},
        "total": decimal.Decimal("19.90"),
        "tags": ["vip"],
    }
    assert roundtrip(contact) == {
        "id": 7,
        "seen": NOW,
        "owner": {"name": "bo", "since": dt.date(2021, 3, 4)},
    }
    # listed in types=: the instances themselves, nested ones included
    listed = JSONSerializer(types=[Conversation, Owner, Contact])
    assert roundtrip(CONVERSATION, listed) == CONVERSATION
    assert roundtrip([contact, CONVERSATION], listed) == [contact, CONVERSATION]
    assert repr(listed) == "JSONSerializer(types=[Conversation, Owner, Contact])"
    # a class the reading process does not list comes back as its fields
    assert roundtrip(CONVERSATION.owner, JSONSerializer(types=[Owner])) == Owner(
        "ada", dt.date(2020, 1, 2)
    )
    assert JSONSerializer().loads(listed.dumps(Owner("x", dt.date(2000, 1, 1)))) == {
        "name": "x",
        "since": dt.date(2000, 1, 1),
    }


def test_json_rows_come_back_as_dicts() -> None:
    row = collections.namedtuple("Row", ["id", "at"])  # tuples are JSON arrays ...

    class SqlRow:  # ... SQLAlchemy's Row is not a tuple: it has _asdict()
        def _asdict(self) -> dict[str, Any]:
            return {"id": 1, "at": NOW}

    assert roundtrip(row(1, NOW)) == [1, NOW]
    assert roundtrip({"rows": [SqlRow()]}) == {"rows": [{"id": 1, "at": NOW}]}


@dataclasses.dataclass
class Totals:
    lines: list[decimal.Decimal]
    total: decimal.Decimal = dataclasses.field(init=False)  # computed in __post_init__
    reads: int = dataclasses.field(init=False, default=0)  # changed after construction

    def __post_init__(self) -> None:
        self.total = sum(self.lines, decimal.Decimal(0))


@dataclasses.dataclass(frozen=True)
class Span:
    start: int
    end: int
    length: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "length", self.end - self.start)


def test_json_rebuilds_listed_dataclasses_with_init_false_fields() -> None:
    totals = Totals([decimal.Decimal("1.50"), decimal.Decimal("2")])
    totals.reads = 3
    listed = JSONSerializer(types=[Totals, Span])
    back = roundtrip(totals, listed)
    assert type(back) is Totals
    assert back == totals
    assert (back.total, back.reads) == (decimal.Decimal("3.50"), 3)
    assert roundtrip([Span(2, 7)], listed) == [Span(2, 7)]
    # not listed: every field, as before
    assert roundtrip(totals) == {"lines": totals.lines, "total": totals.total, "reads": 3}


def test_json_refuses_a_listed_dataclass_it_could_not_rebuild() -> None:
    @dataclasses.dataclass
    class Seeded:
        seed: dataclasses.InitVar[int]  # required by __init__, never stored
        value: int = 0

        def __post_init__(self, seed: int) -> None:
            self.value += seed

    with pytest.raises(TypeError, match=r"Seeded\(\) requires 'seed', which is not a field"):
        JSONSerializer(types=[Seeded])

    @dataclasses.dataclass
    class Defaulted:
        seed: dataclasses.InitVar[int] = 0  # a default: Defaulted(**fields) works
        value: int = 0

    assert roundtrip(Defaulted(value=4), JSONSerializer(types=[Defaulted])) == Defaulted(value=4)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ({101: "open", 102: "closed"}, "int"),  # would come back as {"101": ...}
        ({1: "int key", "1": "str key"}, "int"),  # would lose an entry
        ({"rows": [{2.5: "x"}]}, "float"),
        ({None: 1}, "NoneType"),
        ({True: 1}, "bool"),
        ({uuid.UUID(int=1): 1}, "UUID"),
        ({(1, 2): 1}, "tuple"),
    ],
    ids=repr,
)
def test_json_refuses_dict_keys_that_are_not_str(value: Any, kind: str) -> None:
    with pytest.raises(TypeError, match=rf"^a dict key of type {kind} \("):
        JSONSerializer().dumps(value)


async def test_a_dict_key_json_would_change_names_store_key_and_type(
    r: aredis.Redis, prefix: str
) -> None:
    store = RedisStore(r, prefix=prefix, namespace="crm")
    with pytest.raises(SerializationError) as info:
        await store.set("counts", entry({101: "open", 102: "closed"}), ttl=10)
    message = str(info.value)
    assert "RedisStore 'crm' cannot store key 'counts'" in message
    assert "a dict key of type int (101) is not a str" in message
    assert (info.value.key, info.value.type_name) == ("counts", "builtins.int")
    assert await r.exists(store.redis_key("counts")) == 0  # nothing was sent
    assert await store.get("counts") is None


async def test_what_json_cannot_store_names_store_key_and_type(
    r: aredis.Redis, prefix: str
) -> None:
    class Unknown:
        pass

    store = RedisStore(r, prefix=prefix, namespace="crm")
    with pytest.raises(SerializationError) as info:
        await store.set(("get_conversation", "c1"), entry({"row": [Unknown()]}), ttl=10)
    message = str(info.value)
    assert "RedisStore 'crm'" in message
    assert "('get_conversation', 'c1')" in message
    assert "Unknown" in message
    assert info.value.key == ("get_conversation", "c1")
    assert info.value.namespace == "crm"
    assert info.value.type_name.endswith("Unknown")
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, pk.ParallelkitError)
    assert isinstance(info.value.__cause__, TypeError)
    assert await store.get(("get_conversation", "c1")) is None  # nothing was written


async def test_bytes_another_serializer_wrote_name_store_and_key(
    r: aredis.Redis, prefix: str
) -> None:
    await RedisStore(r, prefix=prefix, serializer="pickle").set("k", entry({1, 2}), ttl=10)
    with pytest.raises(SerializationError, match="cannot read key 'k'") as info:
        await RedisStore(r, prefix=prefix).get("k")
    assert info.value.key == "k"


async def test_clear_forgets_only_its_namespace(r: aredis.Redis, prefix: str) -> None:
    a = RedisStore(r, prefix=prefix, namespace="a")
    b = RedisStore(r, prefix=prefix, namespace="b")
    for i in range(30):
        await a.set(i, entry(i), ttl=10)
    await b.set(0, entry("kept"), ttl=10)
    await a.clear()
    assert [await a.get(i) for i in range(30)] == [None] * 30
    kept = await b.get(0)
    assert kept is not None
    assert kept.value == "kept"


async def test_long_keys_are_hashed(r: aredis.Redis, prefix: str) -> None:
    store = RedisStore(r, prefix=prefix)
    key = ("f", "x" * 500)
    assert store.redis_key(key).startswith(f"{prefix}:cache:v:sha256:")
    await store.set(key, entry(1), ttl=10)
    got = await store.get(key)
    assert got is not None
    assert got.value == 1


@settings(max_examples=60, deadline=None)
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=20,
    ),
    times=st.tuples(*[st.floats(0, 4e9, allow_nan=False)] * 3),
)
def test_codec_roundtrips_json_values_and_times(value: Any, times: tuple[float, ...]) -> None:
    stored = CacheEntry(value, *times)
    back = decode_entry(encode_entry(stored, JSONSerializer()), JSONSerializer())
    assert back == stored


def test_codec_treats_other_formats_as_a_miss() -> None:
    assert decode_entry(b"", JSONSerializer()) is None
    raw = encode_entry(entry(1), JSONSerializer())
    assert decode_entry(b"\x07" + raw[1:], JSONSerializer()) is None


BAD_ARGUMENTS = [
    ({"local_maxsize": 0}, ValueError, r"^local_maxsize must be >= 1, got 0$"),
    ({"local_maxsize": 1.5}, TypeError, r"^local_maxsize must be an int, got 1.5$"),
    ({"near_maxsize": 0}, ValueError, r"^near_maxsize must be >= 1, got 0$"),
    ({"near_maxsize": True}, TypeError, r"^near_maxsize must be an int, or None, got True$"),
    ({"near_ttl": 0}, ValueError, r"^near_ttl must be > 0 \(seconds\), got 0$"),
    ({"near_ttl": math.inf}, ValueError, r"^near_ttl must be finite"),
    ({"near_ttl": None}, TypeError, r"^near_ttl must be a number \(seconds\), got None$"),
    ({"command_timeout": 0}, ValueError, r"^command_timeout must be > 0"),
    ({"command_timeout": math.nan}, ValueError, r"^command_timeout must be > 0"),
    ({"command_timeout": "1"}, TypeError, r"^command_timeout must be a number \(seconds\) or None"),
    ({"lease": 0}, ValueError, r"^lease must be > 0 \(seconds\), got 0$"),
    ({"lease": 0.001}, ValueError, r"^lease must be >= 0.01 \(seconds\), got 0.001$"),
    ({"poll": -1}, ValueError, r"^poll must be > 0 \(seconds\), got -1$"),
    ({"poll": math.inf}, ValueError, r"^poll must be finite"),
    ({"retry_after": 0}, ValueError, r"^retry_after must be > 0 \(seconds\), got 0$"),
    ({"strict": 1}, TypeError, r"^strict must be a bool \(True or False\), got 1$"),
    ({"namespace": ""}, ValueError, r"^namespace must not be empty, got ''$"),
    ({"namespace": 7}, TypeError, r"^namespace must be a str, got 7$"),
    ({"prefix": ""}, ValueError, r"^prefix must not be empty"),
    (
        {"serializer": "yaml"},
        ValueError,
        r"^serializer must be one of 'json', 'pickle' or an object with dumps/loads, got 'yaml'$",
    ),
    ({"serializer": 3}, TypeError, r"^serializer must be 'json', 'pickle' or an object with dumps"),
]


@bad_arguments(BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument(
    redis_url: str, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        RedisStore(client(redis_url), **kwargs)


def test_arguments_are_validated(redis_url: str) -> None:
    conn = client(redis_url)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore(client(redis_url, decode_responses=True))
    with pytest.raises(TypeError, match=r"^redis must be a redis.asyncio.Redis client"):
        RedisStore("redis://")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^types must list dataclasses or pydantic"):
        JSONSerializer(types=[dict])
    assert repr(RedisStore(conn, namespace="crm")) == (
        "RedisStore(namespace='crm', serializer=JSONSerializer(), ok, errors=0)"
    )
    store = RedisStore(conn, near_maxsize=None, command_timeout=None)
    assert store.statistics() == store.stats == RedisStoreStats(0, 0, 0, 0)


# ------------------------------------------------------------------ single flight
async def test_two_caches_share_one_load(r: aredis.Redis, prefix: str) -> None:
    # two SWRCache objects on one store namespace behave like two processes
    loader = Counter(delay=0.2, value={"v": 1})
    caches = [pk.SWRCache(fresh=30, stale=60, store=RedisStore(r, prefix=prefix)) for _ in "ab"]
    async with caches[0], caches[1]:
        calls = [c.get("cold", loader) for c in caches for _ in range(50)]
        values = await pk.gather(*calls)
    assert values == [{"v": 1}] * 100
    assert loader.calls == 1


async def test_a_load_takes_two_round_trips_and_gives_its_lease_back(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(r, prefix=prefix)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    loader = Counter(value={"v": 1})
    assert await cache.get("warm", loader) == {"v": 1}  # Redis has the scripts now
    commands = Commands(r, monkeypatch)
    assert await cache.get("k", loader) == {"v": 1}
    # the miss's GET; then one script takes the lease and reads the entry and its
    # generation, and one stores the value and gives the lease back (it was six:
    # acquire, GET, token, conditional set, release)
    assert commands.count == 3
    assert loader.calls == 2
    assert await r.exists(f"{prefix}:cache:l:'k'") == 0
    assert (store.statistics().hits, store.statistics().misses) == (0, 2)
    got = await store.get("k")
    assert got is not None
    assert got.value == {"v": 1}


async def test_a_load_overtaken_by_a_write_stores_nothing_and_gives_its_lease_back(
    r: aredis.Redis, prefix: str
) -> None:
    store = RedisStore(r, prefix=prefix)
    other = RedisStore(r, prefix=prefix)  # another process
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    lease = f"{prefix}:cache:l:'k'"

    async def load(key: str) -> str:
        assert await r.exists(lease) == 1
        await other.delete(key)  # an invalidation while the load runs
        return "from the load"

    # a miss: the load answers its caller, but stores nothing over the invalidation
    assert await cache.get("k", load) == "from the load"
    assert await store.get("k") is None
    assert await r.exists(lease) == 0  # and the lease is given back all the same
    # a refresh of a stale entry: the same
    await store.set("k", entry("old", fresh=-1), ttl=60)
    with pytest.warns(RuntimeWarning, match="not entered"):  # it refreshes inline
        assert await cache.get("k", load) == "from the load"
    assert await store.get("k") is None
    assert await r.exists(lease) == 0


async def test_a_load_cancelled_with_its_lease_reply_on_the_way_gives_the_lease_back(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(r, prefix=prefix)
    lease = f"{prefix}:cache:l:'k'"
    lost = LostReply(r, monkeypatch)

    async def load() -> None:
        async with store.load_lock("k"):
            pytest.fail("the reply never came: the lease was not taken")

    async with anyio.create_task_group() as tg:
        tg.start_soon(load)
        await lost.ran.wait()
        assert await r.exists(lease) == 1  # Redis gave it the lease
        tg.cancel_scope.cancel()
    assert await r.exists(lease) == 0  # the next load of k does not wait 10 s for nobody
    loader = Counter(value=1)
    with anyio.fail_after(5):
        assert await pk.SWRCache(store=store).get("k", loader) == 1
    assert store.statistics().lease_waits == 0


@pytest.mark.parametrize("entered", [False, True], ids=["own-task", "store-renews"])
async def test_a_lease_renewal_redis_refuses_is_logged_not_raised_into_the_app(
    r: aredis.Redis,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    entered: bool,
) -> None:
    # READONLY (a failover demoted the primary) is no outage; raised from the renewal
    # it cancelled the load, or, from an entered store's one renewal task, the whole
    # `async with store` block
    store = RedisStore(r, prefix=prefix, lease=0.06)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    script = store._renewals._script if entered else store._lease_scripts.renew
    refused = Refused(r, monkeypatch, script.sha)
    go = anyio.Event()

    async def load(key: str) -> str:
        await go.wait()
        return "v"

    async with contextlib.AsyncExitStack() as stack:
        if entered:
            await stack.enter_async_context(store)
        async with anyio.create_task_group() as tg:
            got: list[str] = []

            async def call() -> None:
                got.append(await cache.get("k", load))

            tg.start_soon(call)
            with anyio.fail_after(10):
                while refused.refused < 2:
                    await anyio.sleep(0.01)
            go.set()
        assert got == ["v"]
        assert await cache.get("k2", load) == "v"  # the store still serves
    assert store.statistics().lease_renewal_errors == (refused.refused if entered else 0)
    assert "ReadOnlyError" in caplog.text


async def test_one_refresh_per_stale_key_across_caches(r: aredis.Redis, prefix: str) -> None:
    stores = [RedisStore(r, prefix=prefix, poll=0.01) for _ in "ab"]
    now = time.time()
    await stores[0].set("hot", CacheEntry("old", now - 10, now - 5, now + 60), ttl=60)
    release = anyio.Event()
    calls = 0

    async def refresh(key: str) -> str:
        nonlocal calls
        calls += 1
        await release.wait()  # held until the other cache waits for the lease
        return "new"

    caches = [pk.SWRCache(fresh=30, stale=60, store=s) for s in stores]
    async with stores[0], stores[1], caches[0], caches[1]:
        with anyio.fail_after(30):  # stale hits never wait for the refresh
            served = await pk.gather(*(c.get("hot", refresh) for c in caches for _ in range(20)))
        assert set(served) == {"old"}  # stale is served at once
        with anyio.fail_after(30):  # one cache refreshes, the other waits for its lease
            while sum(s.statistics().lease_waits for s in stores) < 1:
                await anyio.sleep(0.01)
        release.set()
        with anyio.fail_after(30):
            while (got := await stores[0].get("hot")) is None or got.value != "new":
                await anyio.sleep(0.01)
    assert calls == 1
    assert sum(s.statistics().lease_waits for s in stores) == 1


async def test_a_dead_lease_holder_is_taken_over(r: aredis.Redis, prefix: str) -> None:
    store = RedisStore(r, prefix=prefix, lease=5, poll=0.02)
    lease_key = f"{prefix}:cache:l:'k'"
    await r.set(lease_key, "a-process-that-died", px=300)  # nobody renews it
    loader = Counter(value=1)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    assert await cache.get("k", loader) == 1  # after the dead holder's lease expired
    assert loader.calls == 1
    assert store.stats.lease_waits == 1
    assert await r.exists(lease_key) == 0


@pytest.mark.parametrize("entered", [False, True], ids=["own-task", "store-renews"])
async def test_leases_are_renewed_during_a_long_load(
    r: aredis.Redis, prefix: str, entered: bool
) -> None:
    store = RedisStore(r, prefix=prefix, lease=1.5, poll=0.02)
    lease_key = f"{prefix}:cache:l:'k'"
    done = anyio.Event()
    async with contextlib.AsyncExitStack() as stack:
        if entered:  # an entered store renews every load's lease from one task
            await stack.enter_async_context(store)
        await long_load(r, store, lease_key, done, entered)


async def long_load(
    r: aredis.Redis, store: RedisStore, lease_key: str, done: anyio.Event, entered: bool
) -> None:
    """A load longer than the lease keeps it; a second cache waits instead of loading."""

    async def slow(key: str) -> str:
        await renewals(r, lease_key, 4)  # > 1 lease: only renewal keeps it
        await done.wait()
        return "slow"

    other = Counter(value="dup")
    caches = [pk.SWRCache(fresh=30, stale=60, store=store) for _ in "ab"]
    async with anyio.create_task_group() as tg:
        tg.start_soon(caches[0].get, "k", slow)
        with anyio.fail_after(30):
            while not await r.exists(lease_key):
                await anyio.sleep(0.01)

        def renewing() -> int:
            return len([t for t in asyncio.all_tasks() if t.get_name().endswith(" renewal")])

        if not entered:  # the lease is in Redis a moment before its renewal task starts
            with anyio.fail_after(30):
                while not renewing():
                    await anyio.sleep(0.01)
        assert renewing() == (0 if entered else 1)  # a task per load only when not entered

        async def second() -> None:
            assert await caches[1].get("k", other) == "slow"  # waited past 4 renewals

        tg.start_soon(second)
        with anyio.fail_after(30):
            while store.statistics().lease_waits < 1:
                await anyio.sleep(0.01)
        done.set()
    assert other.calls == 0


# ------------------------------------------------------------------ outages
async def test_outage_degrades_to_loader_and_local_memory(dead: aredis.Redis) -> None:
    store = RedisStore(dead, retry_after=60)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    loader = Counter(value="v")
    async with cache:
        assert await cache.get("k", loader) == "v"
        assert await cache.get("k", loader) == "v"  # from local memory
        await cache.invalidate("k")
        assert await cache.get("k", loader) == "v"
    assert loader.calls == 2
    stats = store.statistics()
    assert stats.errors >= 1
    assert stats.redis_errors == stats.errors
    assert stats.degraded >= 4
    assert store.errors == stats.errors
    assert "degraded" in repr(store)


async def test_commands_wait_for_a_connection_of_a_small_pool(redis_url: str, prefix: str) -> None:
    # redis-py's default pool raises MaxConnectionsError past max_connections (100 since
    # redis-py 6); a burst of one store's commands waits for a free connection instead.
    tiny = aredis.Redis.from_url(redis_url, max_connections=2)
    store = RedisStore(tiny, prefix=prefix)
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    loader = Counter(delay=0.01)
    try:
        async with store, cache:  # the near cache's subscription holds one of the 2
            async with anyio.create_task_group() as tg:
                for i in range(40):  # distinct keys: 40 GETs, leases, writes at once
                    tg.start_soon(cache.get, f"k{i}", loader)
            assert store.statistics().listening
        assert loader.calls == 40
        assert store.errors == 0
        assert store.degraded == 0
        assert store._guard.slots is not None
        assert store._guard.slots.statistics().running == 0  # every slot given back
    finally:
        await tiny.aclose()


async def test_a_subscription_never_takes_the_last_connection(redis_url: str, prefix: str) -> None:
    # a pool of one connection: the subscription holds it; a command must fail clearly
    # (redis-py's MaxConnectionsError), not wait forever for a slot no command gives back
    tiny = aredis.Redis.from_url(redis_url, max_connections=1)
    store = RedisStore(tiny, prefix=prefix)
    try:
        async with store:
            assert store.statistics().listening
            with anyio.fail_after(10), pytest.raises(RedisConnectionError, match="Too many"):
                await store.get("k")
        assert store._guard.slots is not None
        assert store._guard.slots.statistics().running == 0
    finally:
        await tiny.aclose()


async def test_the_pool_bound_is_shared_by_every_primitive_on_one_client(
    redis_url: str, prefix: str
) -> None:
    tiny = aredis.Redis.from_url(redis_url, max_connections=3)
    blocking = aredis.Redis.from_pool(
        aredis.BlockingConnectionPool.from_url(redis_url, max_connections=3)
    )
    try:
        one, two = RedisStore(tiny, prefix=prefix), RedisStore(tiny, prefix=prefix + "b")
        limiter = RedisLimiter(tiny, f"{prefix}-l", concurrency=2)
        assert one._guard.slots is two._guard.slots is limiter._guard.slots
        assert one._guard.slots is not None
        assert one._guard.slots.concurrency == 3
        # a pool that waits by itself, or an unbounded one, needs no bound of ours
        assert RedisStore(blocking, prefix=prefix)._guard.slots is None
        huge = aredis.Redis.from_url(redis_url, max_connections=2**31)
        assert RedisStore(huge, prefix=prefix)._guard.slots is None
        await huge.aclose()

        async def hold() -> None:
            async with limiter:
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(functools.partial(one.set, f"a{i}", entry(i), ttl=30))
                tg.start_soon(functools.partial(two.set, f"b{i}", entry(i), ttl=30))
                tg.start_soon(hold)
        assert one.errors == two.errors == 0
        assert limiter.statistics().redis_errors == 0
    finally:
        await tiny.aclose()
        await blocking.aclose()


async def test_a_pool_filled_by_other_code_is_not_an_outage(redis_url: str, prefix: str) -> None:
    tiny = aredis.Redis.from_url(redis_url, max_connections=1)
    store = RedisStore(tiny, prefix=prefix)
    held = await tiny.connection_pool.get_connection()  # the application's own use
    try:
        with pytest.raises(RedisConnectionError, match="Too many connections"):
            await store.get("k")
        assert store.errors == 0  # raised unchanged, not counted, no degradation
        assert store.degraded == 0
    finally:
        await tiny.connection_pool.release(held)
        await tiny.aclose()


async def test_strict_mode_raises_on_outage(dead: aredis.Redis) -> None:
    cache = pk.SWRCache(fresh=30, stale=60, store=RedisStore(dead, strict=True))
    for _ in range(2):  # from Redis, then from the open breaker
        with pytest.raises(RedisUnavailable, match="strict=True") as info:
            await cache.get("k", Counter())
        assert info.value.__cause__ is not None


@pytest.mark.slow
async def test_redis_stopped_mid_test_then_recovery(prefix: str) -> None:
    server = RedisServer()
    if server.binary is None:
        need_service("redis-server (the binary, for the outage test)", "not on PATH")
    server.start()
    conn = client(server.url, retry=None, socket_connect_timeout=0.5, socket_timeout=0.5)
    raw = client(server.url)  # retries once: its pooled connection dies with the server
    try:
        store = RedisStore(conn, prefix=prefix, retry_after=0.2)
        cache = pk.SWRCache(fresh=30, stale=60, store=store)
        limiter = RedisLimiter(conn, "api", concurrency=2, prefix=prefix, retry_after=0.2)
        holders = f"{prefix}:limiter:{{api}}:holders"
        loader = Counter(value={"ok": True})
        async with cache:
            assert await cache.get("before", loader) == {"ok": True}
            assert await raw.exists(store.redis_key("before")) == 1
            async with limiter:
                assert await raw.zcard(holders) == 1

            server.kill()  # ---- outage
            for key in ("before", "during", "during"):
                assert await cache.get(key, loader) == {"ok": True}  # no exception
            assert loader.calls == 3  # "before" again (Redis gone), "during" once
            assert store.stats.errors >= 1
            assert store.stats.degraded >= 3
            async with limiter, limiter:  # fail="local": the local bound of 2
                with anyio.move_on_after(0.1) as scope:
                    async with limiter:
                        pytest.fail("a third holder must wait")
                assert scope.cancelled_caught
            # the third waited for one of the process's two slots: it never reached
            # Redis nor the fallback
            assert limiter.statistics().fallbacks == 2

            server.start()  # ---- recovery, same port
            await anyio.sleep(0.25)  # past retry_after
            assert await cache.get("after", loader) == {"ok": True}
            assert await raw.exists(store.redis_key("after")) == 1
            assert await cache.get("after", loader) == {"ok": True}
            assert loader.calls == 4
            assert store.stats.recoveries == 1
            assert await raw.exists(store.redis_key("during")) == 0  # local only
            async with limiter:
                assert await raw.zcard(holders) == 1  # back on Redis
            assert limiter.statistics().fallbacks == 2
    finally:
        await conn.aclose()
        await raw.aclose()
        server.kill()


@pytest.mark.parametrize("how", ["delete", "clear", "overflow"])
async def test_invalidations_made_while_redis_hangs_are_replayed_before_it_is_read(
    prefix: str, how: str
) -> None:
    # a delete (or set, or clear) that Redis did not get reached only local memory:
    # after the outage both replicas read the old entry back from Redis, until its
    # fresh window ran out. Now the first command that reaches Redis again replays
    # them first (a delete and an invalidation each; a clear if too many).
    server = RedisServer()
    if server.binary is None:
        need_service("redis-server (the binary, for the outage test)", "not on PATH")
    server.start()
    a_conn = client(server.url, retry=None, socket_connect_timeout=0.5, socket_timeout=2)
    b_conn = client(server.url, retry=None, socket_connect_timeout=0.5, socket_timeout=2)
    try:
        options: dict[str, Any] = {"prefix": prefix, "command_timeout": 1.0, "retry_after": 0.2}
        a = RedisStore(a_conn, local_maxsize=2 if how == "overflow" else 1000, **options)
        b = RedisStore(b_conn, **options)
        for key in ("k", "j", "x", "y", "z"):
            await a.set(key, entry(f"{key}1"), ttl=60)
        got = await b.get("k")
        assert got is not None
        assert got.value == "k1"

        server.pause()  # ---- Redis hangs: A's writes reach its local memory only
        if how == "clear":
            await a.clear()
        else:
            await a.delete("k")
            await a.set("j", entry("j2"), ttl=60)
            if how == "overflow":  # more than local_maxsize names: a clear on recovery
                await a.delete("x")
                await a.delete("y")
        assert a.statistics().degraded >= 1
        server.resume()  # ---- Redis answers again
        await anyio.sleep(0.3)  # past retry_after

        assert await a.get("k") is None  # the probe: the replay ran before its read
        assert a.statistics().recoveries == 1
        assert await b.get("k") is None  # the other replica reads the invalidation
        assert await b.get("j") is None  # a local write: deleted in Redis, reloaded
        z = await b.get("z")  # untouched by the outage: kept, unless cleared
        if how == "delete":
            assert z is not None
            assert z.value == "z1"
        else:
            assert z is None
    finally:
        await a_conn.aclose()
        await b_conn.aclose()
        server.kill()


# ------------------------------------------------------------------ processes
@pytest.mark.slow
async def test_four_processes_times_100_callers_load_once(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    procs = start_workers("cold", redis_url, prefix, 4, "--callers", "100")
    try:
        results = wait_workers(procs)
    finally:
        stop_workers(procs)
    assert int(await r.get(f"{prefix}:loads") or 0) == 1
    assert [res["values"] for res in results] == [100] * 4
    assert [res["distinct"] for res in results] == [1] * 4


@pytest.mark.slow
async def test_one_refresh_per_stale_key_across_processes(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    store = RedisStore(r, prefix=prefix, namespace="cache")
    now = time.time()
    await store.set("hot", CacheEntry("old", now - 10, now - 5, now + 60), ttl=60)
    procs = start_workers("stale", redis_url, prefix, 4, "--callers", "50")
    try:
        results = wait_workers(procs)
    finally:
        stop_workers(procs)
    assert int(await r.get(f"{prefix}:refreshes") or 0) == 1
    assert all(res["served"] == ["old"] for res in results)
    got = await store.get("hot")
    assert got is not None
    assert got.value == "new"
    assert math.isclose(got.fresh_until - got.loaded_at, 30, rel_tol=0.2)
