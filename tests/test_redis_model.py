"""Randomized model-based tests of parallelkit.redis against a real Redis.

Several replicas (each its own client, store with a near cache, and SWRCache) share
one prefix; hypothesis drives random gets (some with loaders held open), sets,
invalidations and clears from random replicas. At each check point every held
loader is released, every task finishes, a barrier message goes through the
invalidation channel, and then:

* "Invalidation wins": Redis never holds the value of a load whose loader was
  called before an invalidation (set / invalidate / clear) of its key began;
* near-cache coherence: once every replica has processed every message, each
  replica's near entry (``peek``) is what Redis holds;
* the near cache stays within ``near_maxsize``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Hashable
from typing import Any

import anyio
import anyio.lowlevel
import pydantic
import pytest
import redis.asyncio as aredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

import parallelkit as pk
from parallelkit.redis import RedisLimiter, RedisLock, RedisStore, SerializationError

from .conftest import REDIS_URL
from .redis_helpers import FakeTimer, client, new_prefix

pytestmark = [pytest.mark.redis]

MODEL = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

REPLICAS = 3
KEYS = ("a", "b", "c")
NEAR_MAX = 2

replica = st.integers(0, REPLICAS - 1)
key = st.sampled_from(KEYS)
op = st.one_of(
    st.tuples(st.just("get"), replica, key, st.booleans()),
    st.tuples(st.just("release"), st.integers(0, 5)),
    st.tuples(st.just("set"), replica, key),
    st.tuples(st.just("invalidate"), replica, key),
    st.tuples(st.just("clear"), replica),
    st.tuples(st.just("store_get"), replica, key),
    st.tuples(st.just("peek"), replica, key),
    st.tuples(
        st.just("check"),
    ),
)
#: one-shot faults: the next command of a replica's client fails before it is sent,
#: or runs in Redis and its reply is lost
fault = st.tuples(st.just("fault"), replica, st.sampled_from(["before", "after"]))
faulty_op = st.one_of(op, fault, fault)
#: hold back (or let through) the invalidation messages a replica's subscription reads
gate = st.tuples(st.sampled_from(["hold", "let"]), replica)
gated_op = st.one_of(op, gate)


class Gate:
    """Wraps a client's ``pubsub()``: while closed, its messages wait in the socket
    (replies to commands, on other connections, overtake them)."""

    def __init__(self, r: aredis.Redis) -> None:
        self.open = anyio.Event()
        self.open.set()
        make = r.pubsub

        def pubsub(**kwargs: Any) -> Any:
            ps = make(**kwargs)
            read = ps.get_message

            async def get_message(*args: Any, **options: Any) -> Any:
                await self.open.wait()
                return await read(*args, **options)

            ps.get_message = get_message
            return ps

        r.pubsub = pubsub  # type: ignore[method-assign]

    def hold(self) -> None:
        if self.open.is_set():
            self.open = anyio.Event()

    def let(self) -> None:
        self.open.set()


class Faults:
    """Arms one-shot failures of a client's next command (its pub/sub is not touched)."""

    def __init__(self, r: aredis.Redis) -> None:
        self.armed: str | None = None
        self.fired = 0
        send = r.execute_command

        async def faulty(*args: Any, **options: Any) -> Any:
            mode, self.armed = self.armed, None
            if mode == "before":
                self.fired += 1
                msg = "injected: connection refused"
                raise RedisConnectionError(msg)
            result = await send(*args, **options)
            if mode == "after":
                self.fired += 1
                msg = "injected: connection reset, the reply is lost"
                raise RedisConnectionError(msg)
            return result

        r.execute_command = faulty  # type: ignore[method-assign]


class Model:
    """What happened, in one global order (``tick``)."""

    def __init__(self) -> None:
        self.ticks = itertools.count()
        self.ids = itertools.count()
        self.loads: dict[str, tuple[Hashable, int]] = {}  # value -> (key, tick called)
        self.invalidations: list[tuple[Hashable | None, int]] = []  # (key or None=all, tick)
        self.origins: dict[str, int] = {}  # a cache.set's value -> tick its set began
        #: finished invalidations: (key or None, tick begun, tick done, replica)
        self.done: list[tuple[Hashable | None, int, int, int]] = []
        self.barrier = -1  # tick of the last check: every replica heard everything before
        self.held: list[anyio.Event] = []
        self.releasing = False  # at a check: loaders no longer hold

    def loader(self, hold: bool) -> Any:
        async def load(k: Hashable) -> str:
            value = f"L{next(self.ids)}"
            self.loads[value] = (k, next(self.ticks))
            if hold and not self.releasing:
                event = anyio.Event()
                self.held.append(event)
                await event.wait()
            return value

        return load

    def origin(self, value: str) -> int:
        """When ``value`` was made: its loader was called, or its set began."""
        return self.loads[value][1] if value in self.loads else self.origins[value]

    def read_ok(self, i: int, k: Hashable, value: Any, started: int) -> bool:
        """A read of ``k`` on replica ``i`` begun at ``started`` gave ``value``: nothing
        invalidated before the read began (on this replica, or on any replica before a
        check had every replica hear it) may come back."""
        if value is None:
            return True
        made = self.origin(value)
        return not any(
            which in (k, None)
            and done < started
            and made < began
            and (where == i or done < self.barrier < started)
            for which, began, done, where in self.done
        )

    def outdated(self, k: Hashable, value: str) -> bool:
        """Whether ``value`` came from a load called before an invalidation of ``k``."""
        if value not in self.loads:
            return False  # a cache.set
        _, called = self.loads[value]
        return any(began > called for which, began in self.invalidations if which in (k, None))


async def _scenario(ops: list[tuple[Any, ...]]) -> None:
    prefix = new_prefix()
    clients = [client(REDIS_URL) for _ in range(REPLICAS + 1)]
    probe_client = clients[-1]
    stores = [RedisStore(c, prefix=prefix, near_maxsize=NEAR_MAX) for c in clients[:-1]]
    faults = [Faults(c) for c in clients[:-1]]
    gates = [Gate(c) for c in clients[:-1]]
    timers = [FakeTimer() for _ in stores]
    for s, timer in zip(stores, timers, strict=True):
        s._guard.timer = timer  # the circuit stays open until a check moves time on
    caches = [pk.SWRCache(fresh=30, stale=60, store=s) for s in stores]
    probe = RedisStore(probe_client, prefix=prefix)  # not entered: reads Redis only
    channel = f"{prefix}:cache:inv"
    model = Model()
    running = 0
    idle = anyio.Event()
    idle.set()
    barriers = itertools.count()
    heard = 0
    pubsub = probe_client.pubsub()
    await pubsub.subscribe(channel)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for s in stores:
                await stack.enter_async_context(s)
            for c in caches:
                await stack.enter_async_context(c)
            for s in stores:
                assert s.statistics().listening
            async with anyio.create_task_group() as tg:

                async def get(i: int, k: str, hold: bool) -> None:
                    nonlocal running, idle
                    try:
                        started = next(model.ticks)
                        got = await caches[i].get(k, model.loader(hold))
                        assert model.read_ok(i, k, got, started), (i, k, got, model.done)
                    finally:
                        running -= 1
                        if not running:
                            idle.set()

                async def check() -> None:
                    nonlocal heard
                    model.releasing = True
                    for g in gates:
                        g.let()
                    for event in model.held:
                        event.set()
                    model.held.clear()
                    with anyio.fail_after(10):
                        await idle.wait()
                    model.releasing = False
                    # Redis answers again: every replica recovers (and replays)
                    for f in faults:
                        f.armed = None
                    for s, timer in zip(stores, timers, strict=True):
                        timer.now += 10
                        with anyio.fail_after(10):
                            await s.get("__heal__")
                        assert not s._guard.down
                    # the barrier: every replica has processed every message before it
                    mark = f"k__barrier{next(barriers)}__".encode()
                    await probe_client.publish(channel, mark)
                    with anyio.fail_after(10):
                        while True:
                            message = await pubsub.get_message(timeout=1)
                            if message is None or message["type"] != "message":
                                continue
                            heard += 1
                            if message["data"] == mark:
                                break
                        for s in stores:
                            while s.statistics().near_invalidations < heard:
                                await anyio.sleep(0.002)
                    for s in stores:
                        assert s.statistics().near_invalidations == heard
                    model.barrier = next(model.ticks)
                    for k in KEYS:
                        held = await probe.get(k)
                        truth = None if held is None else held.value
                        if truth is not None:
                            assert not model.outdated(k, truth), (k, truth, model.invalidations)
                        for n, s in enumerate(stores):
                            near = s.peek(k)
                            if near is not None:
                                assert near.value == truth, (n, k, near.value, truth)
                    for s in stores:
                        assert s.statistics().near_size <= NEAR_MAX

                for step in [*ops, ("check",)]:
                    kind = step[0]
                    if kind == "get":
                        _, i, k, hold = step
                        running += 1
                        idle = anyio.Event()
                        tg.start_soon(get, i, k, hold)
                        await anyio.lowlevel.checkpoint()  # let it start
                    elif kind == "release":
                        if model.held:
                            model.held.pop(step[1] % len(model.held)).set()
                    elif kind == "set":
                        _, i, k = step
                        began = next(model.ticks)
                        model.invalidations.append((k, began))
                        new = f"S{next(model.ids)}"
                        model.origins[new] = began
                        with anyio.fail_after(10):
                            await caches[i].set(k, new)
                        model.done.append((k, began, next(model.ticks), i))
                    elif kind == "invalidate":
                        _, i, k = step
                        began = next(model.ticks)
                        model.invalidations.append((k, began))
                        with anyio.fail_after(10):
                            await caches[i].invalidate(k)
                        model.done.append((k, began, next(model.ticks), i))
                    elif kind == "clear":
                        began = next(model.ticks)
                        model.invalidations.append((None, began))
                        with anyio.fail_after(10):
                            await caches[step[1]].clear()
                        model.done.append((None, began, next(model.ticks), step[1]))
                    elif kind == "fault":
                        faults[step[1]].armed = step[2]
                    elif kind == "hold":
                        gates[step[1]].hold()
                    elif kind == "let":
                        gates[step[1]].let()
                    elif kind == "peek":
                        _, i, k = step
                        near = stores[i].peek(k)
                        got = None if near is None else near.value
                        assert model.read_ok(i, k, got, next(model.ticks)), (i, k, got, model.done)
                    elif kind == "store_get":
                        _, i, k = step
                        started = next(model.ticks)
                        with anyio.fail_after(10):
                            got_entry = await stores[i].get(k)
                        got = None if got_entry is None else got_entry.value
                        assert model.read_ok(i, k, got, started), (i, k, got, model.done)
                    else:
                        await check()
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
        r: aredis.Redis = probe_client
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*")]
        if keys:
            await r.delete(*keys)
        for c in clients:
            await c.aclose()


@MODEL
@given(st.lists(op, max_size=25))
def test_replicas_stay_coherent_and_invalidation_wins(redis_url: str, ops: list[Any]) -> None:
    anyio.run(_scenario, ops, backend="asyncio")


@MODEL
@given(st.lists(gated_op, max_size=30))
def test_coherent_and_invalidation_wins_when_messages_come_late(
    redis_url: str, ops: list[Any]
) -> None:
    anyio.run(_scenario, ops, backend="asyncio")


@MODEL
@given(st.lists(faulty_op, max_size=25))
def test_coherent_and_invalidation_wins_when_commands_fail(redis_url: str, ops: list[Any]) -> None:
    anyio.run(_scenario, ops, backend="asyncio")


# ---------------------------------------------------------------- RedisLimiter, RedisLock
#: one task: (which object, checkpoints before it is cancelled or None, checkpoints held)
task = st.tuples(st.integers(0, REPLICAS - 1), st.none() | st.integers(0, 40), st.integers(0, 5))


async def _cancel_after(scope: anyio.CancelScope, checkpoints: int | None) -> None:
    if checkpoints is None:
        return
    for _ in range(checkpoints):
        await anyio.lowlevel.checkpoint()
    scope.cancel()


async def _contend(objects: list[Any], tasks: list[tuple[int, int | None, int]], bound: int) -> int:
    """Run ``tasks`` through ``objects`` (each makes an async context manager);
    return the peak."""
    running = peak = 0

    async def one(i: int, cancel: int | None, hold: int) -> None:
        nonlocal running, peak
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_after, scope, cancel)
                async with objects[i]():
                    running += 1
                    peak = max(peak, running)
                    assert running <= bound
                    try:
                        for _ in range(hold):
                            await anyio.lowlevel.checkpoint()
                    finally:
                        running -= 1

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i, cancel, hold in tasks:
                tg.start_soon(one, i, cancel, hold)
    return peak


async def _limiter_scenario(tasks: list[tuple[int, int | None, int]], rate: bool) -> None:
    prefix = new_prefix()
    clients = [client(REDIS_URL) for _ in range(REPLICAS)]
    limiters = [
        RedisLimiter(
            c, "api", concurrency=2, rate=2000.0 if rate else None, poll=0.002, prefix=prefix
        )
        for c in clients
    ]
    try:
        await _contend([lambda x=x: x for x in limiters], tasks, 2)
        for limiter in limiters:
            stats = limiter.statistics()
            assert (stats.held, stats.waiting, stats.fallbacks, stats.redis_errors) == (0, 0, 0, 0)
        # no slot leaked: the holders' sorted set is empty (or gone)
        assert await clients[0].zcard(f"{prefix}:limiter:{{api}}:holders") == 0
    finally:
        keys = [k async for k in clients[0].scan_iter(match=f"{prefix}:*")]
        if keys:
            await clients[0].delete(*keys)
        for c in clients:
            await c.aclose()


@MODEL
@given(st.lists(task, max_size=12), st.booleans())
def test_limiters_bound_concurrency_and_cancellation_leaks_no_slot(
    redis_url: str, tasks: list[Any], rate: bool
) -> None:
    anyio.run(_limiter_scenario, tasks, rate, backend="asyncio")


async def _lock_scenario(tasks: list[tuple[int, int | None, int]]) -> None:
    prefix = new_prefix()
    clients = [client(REDIS_URL) for _ in range(REPLICAS)]
    fences: list[int] = []

    @contextlib.asynccontextmanager
    async def holder(r: aredis.Redis) -> Any:
        # one RedisLock object per acquisition (they are not re-entrant)
        async with RedisLock(r, "job", ttl=5, poll=0.002, prefix=prefix) as lock:
            fences.append(lock.fencing_token)
            yield

    try:
        await _contend([lambda c=c: holder(c) for c in clients], tasks, 1)
        assert fences == sorted(fences)  # fencing tokens only grow, in holding order
        assert len(set(fences)) == len(fences)
        # nothing left held: the lock's key is gone
        assert not await clients[0].exists(f"{prefix}:lock:{{job}}")
    finally:
        keys = [k async for k in clients[0].scan_iter(match=f"{prefix}:*")]
        if keys:
            await clients[0].delete(*keys)
        for c in clients:
            await c.aclose()


@MODEL
@given(st.lists(task, max_size=10))
def test_locks_exclude_each_other_and_cancelled_acquirers_leave_nothing_held(
    redis_url: str, tasks: list[Any]
) -> None:
    anyio.run(_lock_scenario, tasks, backend="asyncio")


# ---------------------------------------------------------------- serialization


@dataclasses.dataclass
class Point:
    x: Any
    label: str = "p"


class Record(pydantic.BaseModel):
    a: Any
    b: int = 0


def _expected(value: Any) -> Any:
    """What the JSON serializer gives back for ``value`` (not listed in ``types=``)."""
    if isinstance(value, (list, tuple)):
        return [_expected(v) for v in value]
    if isinstance(value, dict):
        return {k: _expected(v) for k, v in value.items()}
    if isinstance(value, Point):
        return {"x": _expected(value.x), "label": value.label}
    if isinstance(value, Record):
        return {"a": _expected(value.a), "b": value.b}
    return value


scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.datetimes(timezones=st.none() | st.timezones()),
    st.dates(),
    st.times(),
    st.uuids(),
    st.decimals(allow_nan=False),
)
tag_keys = st.sampled_from(["$datetime", "$date", "$time", "$uuid", "$decimal", "$dict", "$type"])
value = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=3) | tag_keys, inner, max_size=3),
        st.builds(Point, inner, st.text(max_size=3)),
        st.builds(Record, a=inner, b=st.integers(-5, 5)),
    ),
    max_leaves=8,
)
bad = st.sampled_from([{1, 2}, b"raw", object(), {1: "a"}, {None: 1}, {(1, 2): 1}, 1j])


async def _round_trip(values: list[Any], wrap: int, bad_value: Any) -> None:
    prefix = new_prefix()
    r = client(REDIS_URL)
    store = RedisStore(r, prefix=prefix, namespace="ser")
    cache = pk.SWRCache(fresh=30, stale=60, store=store)
    try:
        async with cache:
            for n, v in enumerate(values):

                async def load(k: Hashable, v: Any = v) -> Any:
                    return v

                assert await cache.get(("k", n), load) == v  # the loader's own value
                got = await store.get(("k", n))  # read back from Redis
                assert got is not None
                assert got.value == _expected(v), (v, got.value)
            # what JSON cannot keep: a clear error naming store, key and type, nothing
            # written, and no lease left behind
            nested: Any = bad_value
            for _ in range(wrap):
                nested = {"x": [nested]}

            async def load_bad(k: Hashable) -> Any:
                return nested

            for attempt in (cache.set("bad", nested), cache.get("bad", load_bad)):
                with pytest.raises(SerializationError) as info:
                    with anyio.fail_after(5):
                        await attempt
                message = str(info.value)
                assert "'ser'" in message, message
                assert "'bad'" in message, message
                assert type(bad_value).__qualname__ in message, message
                assert info.value.key == "bad"
            assert await store.get("bad") is None  # (a load's placeholder at most)
            assert [k async for k in r.scan_iter(match=f"{prefix}:ser:l:*")] == []
    finally:
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


@MODEL
@given(st.lists(value, max_size=4), st.integers(0, 2), bad)
def test_json_round_trips_documented_types_and_names_what_it_cannot(
    redis_url: str, values: list[Any], wrap: int, bad_value: Any
) -> None:
    anyio.run(_round_trip, values, wrap, bad_value, backend="asyncio")
