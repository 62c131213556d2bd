"""An adversarial review of ``parallelkit.redis``'s fault paths: bad arguments refused
at the door naming them, a holder cancelled at every Redis command leaking nothing,
and a Redis killed and restarted under an entered store, a held lock and a held
limiter slot."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio as aredis

import parallelkit as pk
from parallelkit.redis import (
    JSONSerializer,
    LockLost,
    PickleSerializer,
    RedisLimiter,
    RedisLock,
    RedisStore,
)
from parallelkit.redis._outage import Guard
from parallelkit.redis._scripts import WRITE_IF_RELEASE

from .redis_helpers import RedisServer, client, entry, eventually

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client cannot run under trio


@dataclasses.dataclass
class Invoice:
    id: int


async def keys_under(r: aredis.Redis, prefix: str) -> list[bytes]:
    return [key async for key in r.scan_iter(match=f"{prefix}:*")]


# -- bad arguments -----------------------------------------------------------------------
MAKERS: list[tuple[str, Callable[[Any], object]]] = [
    ("RedisStore", lambda conn: RedisStore(conn)),
    ("RedisLock", lambda conn: RedisLock(conn, "job")),
    ("RedisLimiter", lambda conn: RedisLimiter(conn, "api", concurrency=1)),
]


@pytest.mark.parametrize(("what", "make"), MAKERS, ids=[name for name, _ in MAKERS])
def test_the_client_class_instead_of_a_client_is_refused_naming_redis(
    what: str, make: Callable[[Any], object]
) -> None:
    with pytest.raises(TypeError, match=r"^redis must be .*the class Redis: pass an instance"):
        make(aredis.Redis)


@pytest.mark.parametrize(("what", "make"), MAKERS, ids=[name for name, _ in MAKERS])
def test_a_synchronous_client_is_refused_naming_redis(
    what: str, make: Callable[[Any], object], redis_url: str
) -> None:
    """``redis.Redis`` has the asyncio client's methods: accepted, its calls ran (and
    blocked the event loop) and failed only when their reply was awaited."""
    sync = redis.Redis.from_url(redis_url)
    try:
        with pytest.raises(TypeError, match=r"^redis must be .*synchronous .*redis\.asyncio"):
            make(sync)
    finally:
        sync.close()


async def test_an_async_clock_is_refused_at_the_door(r: aredis.Redis, prefix: str) -> None:
    async def clock() -> float:
        return 1.0

    async_refused = r"^clock must be a callable, got the async function .*never awaited"
    with pytest.raises(TypeError, match=async_refused):
        RedisLimiter(r, "api", rate=10, clock=clock, prefix=prefix)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^clock must be .*cannot be called with 0 arguments"):
        RedisLimiter(r, "api", rate=10, clock=lambda now: now, prefix=prefix)  # type: ignore[arg-type,misc]


@pytest.mark.parametrize(
    ("reading", "error"),
    [(None, TypeError), ("12", TypeError), (math.nan, ValueError), (math.inf, ValueError)],
    ids=["None", "str", "nan", "inf"],
)
@pytest.mark.parametrize("bound", ["concurrency", "rate"])
async def test_a_clock_that_returns_no_number_is_named_before_anything_is_sent(
    r: aredis.Redis, prefix: str, reading: object, error: type[Exception], bound: str
) -> None:
    """Before: ``TypeError: unsupported operand ... 'NoneType' and 'int'``, or a Lua
    ``ResponseError`` from inside the script (or a slot taken on a nonsense time)."""
    limits: dict[str, Any] = {"concurrency": 1} if bound == "concurrency" else {"rate": 10}

    def clock() -> Any:
        return reading

    limiter = RedisLimiter(r, "api", prefix=prefix, clock=clock, **limits)
    with anyio.fail_after(30), pytest.raises(error, match=r"^clock must return"):
        async with limiter:
            pytest.fail("the body must not run")
    assert await keys_under(r, prefix) == []
    stats = limiter.statistics()
    assert (stats.held, stats.waiting) == (0, 0)


async def test_store_set_refuses_a_bad_key_or_entry_before_writing(
    r: aredis.Redis, prefix: str
) -> None:
    """Before: ``set(["a"], ...)`` wrote ``...:v:['a']`` to Redis (``get`` of the same
    key then raised ``unhashable type``); ``set("k", "x")`` an ``AttributeError``."""
    store = RedisStore(r, prefix=prefix)
    with pytest.raises(TypeError, match=r"^key must be hashable, got list"):
        await store.set(["a"], entry("v"), ttl=60)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^entry must be a CacheEntry, got str 'x'"):
        await store.set("k", "x", ttl=60)  # type: ignore[arg-type]
    assert await keys_under(r, prefix) == []


@pytest.mark.parametrize("kind", [JSONSerializer, PickleSerializer], ids=["json", "pickle"])
def test_a_serializer_class_instead_of_an_instance_is_refused(kind: type) -> None:
    """Before: accepted (the class has ``dumps``/``loads``), and every ``set`` then
    failed with a ``SerializationError`` blaming the value's type."""
    with pytest.raises(TypeError, match=rf"^serializer must be .*the class {kind.__name__}: pass"):
        RedisStore(aredis.Redis(), serializer=kind)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "types", [None, "Invoice", Invoice, 3], ids=["None", "str", "one class", "int"]
)
def test_json_types_that_are_no_list_of_classes_are_refused_naming_types(types: object) -> None:
    """Before: ``'NoneType' object is not iterable`` / ``'type' object is not
    iterable`` (naming nothing), or ``types=\"Invoice\"`` read letter by letter."""
    with pytest.raises(TypeError, match=r"^types must be an iterable of dataclasses"):
        JSONSerializer(types=types)  # type: ignore[arg-type]


# -- cancelled at every Redis command -------------------------------------------------------
class _Cut:
    """Cancel ``scope`` at the ``at``-th command a guard runs: before it is sent
    (``"before"``), or once Redis answered it, its reply lost (``"after"``)."""

    def __init__(self, at: int, mode: str) -> None:
        self.at, self.mode, self.calls = at, mode, 0
        self.scope = anyio.CancelScope()

    def install(self, guard: Guard) -> Callable[[], None]:
        cut = self

        class Cutting(Guard):  # type: ignore[misc]
            __slots__ = ()

            async def call(self, what: str, command: Awaitable[Any], **kw: Any) -> Any:
                cut.calls += 1
                hit = cut.calls == cut.at
                if hit and cut.mode == "before":
                    cut.scope.cancel()
                result = await Guard.call(self, what, command, **kw)
                if hit and cut.mode == "after":
                    cut.scope.cancel()
                    await anyio.lowlevel.checkpoint()
                return result

        guard.__class__ = Cutting

        def restore() -> None:
            guard.__class__ = Guard

        return restore


LIMITS: list[dict[str, Any]] = [
    {"concurrency": 1},
    {"concurrency": 1, "rate": 1000},
    {"rate": 1000},
    {"concurrency": 2, "rate": 1000, "fail": "closed"},
]


@pytest.mark.parametrize("mode", ["before", "after"])
@pytest.mark.parametrize("limits", LIMITS, ids=[repr(x) for x in LIMITS])
async def test_a_limiter_holder_cancelled_at_any_command_leaks_nothing(
    r: aredis.Redis, prefix: str, limits: dict[str, Any], mode: str
) -> None:
    at = 1
    while True:
        limiter = RedisLimiter(r, f"api{at}", prefix=prefix, lease=60, **limits)
        cut = _Cut(at, mode)
        restore = cut.install(limiter._guard)
        try:
            with cut.scope:
                async with limiter:
                    await anyio.lowlevel.checkpoint()
        finally:
            restore()
        assert await r.zcard(limiter._holders_key) == 0, (at, mode)
        stats = limiter.statistics()
        assert (stats.held, stats.waiting) == (0, 0), (at, mode)
        with anyio.fail_after(30):  # a guard only: the slot and the start are free
            async with limiter:
                pass
        if cut.calls < at:
            break
        at += 1


@pytest.mark.parametrize("mode", ["before", "after"])
async def test_a_lock_holder_cancelled_at_any_command_leaks_nothing(
    r: aredis.Redis, prefix: str, mode: str
) -> None:
    at = 1
    while True:
        lock = RedisLock(r, f"job{at}", prefix=prefix, ttl=60)
        cut = _Cut(at, mode)
        restore = cut.install(lock._guard)
        try:
            with cut.scope:
                async with lock:
                    await anyio.lowlevel.checkpoint()
        finally:
            restore()
        assert await r.exists(lock.key) == 0, (at, mode)
        with anyio.fail_after(30):
            async with RedisLock(r, f"job{at}", prefix=prefix, blocking=False):
                pass
        if cut.calls < at:
            break
        at += 1


# -- a load's lease after one blip -----------------------------------------------------------
WRITE_IF_RELEASE_SHA = hashlib.sha1(WRITE_IF_RELEASE.encode()).hexdigest()


def reset_once(
    conn: aredis.Redis, monkeypatch: pytest.MonkeyPatch, match: Callable[..., bool]
) -> list[bool]:
    """The first command ``match`` accepts fails with a connection reset, unsent."""
    send = conn.execute_command
    done: list[bool] = []

    async def resetting(*args: Any, **options: Any) -> Any:
        if not done and match(*args):
            done.append(True)
            msg = "Connection reset by peer"
            raise redis.exceptions.ConnectionError(msg)
        return await send(*args, **options)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(conn, "execute_command", resetting)
    return done


@pytest.mark.parametrize("blip", ["its own write", "another command"])
async def test_a_load_whose_write_met_a_blip_leaves_its_lease_free(
    r: aredis.Redis, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch, blip: str
) -> None:
    """Before: one connection reset (the load's own write-back, or any other command
    of the store while the load ran) opened the circuit, the lease's give-back was
    skipped as "Redis presumed down", and every other process waited the whole
    ``lease`` for a key nobody was loading (``lease_waits``: 1, 60 s here)."""
    conn = client(redis_url)
    try:
        here = RedisStore(conn, prefix=prefix, lease=60, near_maxsize=None)
        there = RedisStore(r, prefix=prefix, lease=60, near_maxsize=None)
        cache = pk.SWRCache(fresh=30, stale=60, store=here)
        other = pk.SWRCache(fresh=30, stale=60, store=there)
        loading, go_on = anyio.Event(), anyio.Event()

        async def load(key: str) -> str:
            loading.set()
            await go_on.wait()
            return f"value of {key}"

        if blip == "its own write":
            reset = reset_once(
                conn, monkeypatch, lambda *a: a[:2] == ("EVALSHA", WRITE_IF_RELEASE_SHA)
            )
        else:
            reset = reset_once(conn, monkeypatch, lambda *a: a[0] == "GET" and "elsewhere" in a[1])
        async with here, there, cache, other:
            async with anyio.create_task_group() as tg:
                tg.start_soon(cache.get, "k", load)
                await loading.wait()
                assert await r.exists(here._lease_prefix + here._name("k")) == 1
                if blip == "another command":
                    assert await here.get("elsewhere") is None  # the reset: degraded
                go_on.set()
            assert reset == [True]
            assert here.statistics().errors == 1
            assert await r.exists(here._lease_prefix + here._name("k")) == 0

            async def not_called(key: str) -> str:
                return "loaded again"

            with anyio.fail_after(30):  # a guard only: the lease is free at once
                got = await other.get("k", not_called)
            assert got in {"value of k", "loaded again"}
            assert there.statistics().lease_waits == 0
    finally:
        await conn.aclose()


# -- Redis killed and restarted ----------------------------------------------------------------
@pytest.mark.slow
async def test_an_entered_store_outlives_a_redis_restart(server: RedisServer, prefix: str) -> None:
    """Kill and restart (without its data) the Redis under an entered store: its near
    cache is emptied at once, reads degrade (nothing raised), it subscribes again
    and hears the next write of another replica; a held lock is lost (``LockLost``),
    a held limiter slot is counted lost and the next holder gets one."""
    conn, other = client(server.url), client(server.url)
    try:
        store = RedisStore(conn, prefix=prefix, retry_after=0.2)
        writer = RedisStore(other, prefix=prefix)
        async with store:
            await writer.set("k", entry("v1"), ttl=60)
            await eventually(lambda: store.statistics().near_invalidations >= 1, "heard")
            got = await store.get("k")
            assert got is not None
            assert store.peek("k") is not None
            server.kill()
            await eventually(lambda: not store.statistics().listening, "off")
            assert store.peek("k") is None
            assert await store.get("k") is None  # degraded: local memory, nothing raised
            server.start()
            await eventually(lambda: store.statistics().listening, "subscribed again")
            await writer.set("k", entry("v2"), ttl=60)
            with anyio.fail_after(30):
                while (got := await store.get("k")) is None:
                    await anyio.sleep(0.05)  # until the circuit closes again
            assert got.value == "v2"

        lock = RedisLock(conn, "job", prefix=prefix, ttl=0.6)
        with anyio.fail_after(30), pytest.raises(LockLost):
            async with lock:
                server.kill()
                server.start()
                await anyio.sleep_forever()  # cancelled when the loss is noticed

        limiter = RedisLimiter(conn, "api", prefix=prefix, concurrency=1, lease=0.6)
        async with limiter:
            server.kill()
            server.start()
            await eventually(lambda: limiter.statistics().lost_leases == 1, "lost")
        with anyio.fail_after(30):
            async with limiter:
                assert await conn.zcard(limiter._holders_key) == 1
        assert await conn.zcard(limiter._holders_key) == 0
    finally:
        await conn.aclose()
        await other.aclose()


# -- values Redis will not take -------------------------------------------------------------
@pytest.mark.slow
async def test_a_value_past_proto_max_bulk_len_fails_no_load(prefix: str) -> None:
    """docs/redis.md said such a value "counts as an outage". Redis answers it with
    ``ERR Protocol error: invalid bulk length`` and closes the connection: redis-py
    sees the error (no outage: ``set`` raises it, the entry Redis held stays) or, if
    the close wins while the value is still being sent, a reset (an outage: the
    store degrades). Either way a load through the cache returns its value."""
    server = RedisServer("--proto-max-bulk-len", "1mb")
    if server.binary is None:
        pytest.skip("redis-server is not on PATH")
    server.start()
    conn = client(server.url)
    try:
        store = RedisStore(conn, prefix=prefix, lease=60)
        cache = pk.SWRCache(fresh=30, stale=60, store=store)
        huge = "x" * (2 << 20)
        await store.set("k", entry("small"), ttl=60)
        refused: BaseException | None = None
        try:
            await store.set("k", entry(huge), ttl=60)
        except redis.exceptions.ResponseError as exc:
            refused = exc
        if refused is not None:
            assert "invalid bulk length" in str(refused)
            assert store.statistics().errors == 0
            got = await store.get("k")
            assert got is not None
            assert got.value == "small"  # not overwritten
        else:
            assert store.statistics().errors >= 1  # the reset won: an outage

        async def load(key: str) -> str:
            return huge

        with anyio.fail_after(30):
            assert await cache.get("big", load) == huge
    finally:
        await conn.aclose()
        server.kill()
