"""Model-based fault injection for SWRCache and BatchLoader.

Hypothesis writes scripts of operations (calls, loads that succeed / fail / hang,
invalidations, time moving across the fresh / stale / expired windows, callers
cancelled, leaving ``async with``); a driver plays each script on a cache whose
clock is moved by hand and whose loaders are gated, settling (every task blocked)
after each step, and checks the invariants of DESIGN.md and docs/cache.md after
each step and at the end. Deterministic: derandomized, no real time involved.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import warnings
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parallelkit as pk

pytestmark = pytest.mark.anyio

FRESH, STALE, MAXSIZE = 10.0, 20.0, 2
KEYS = (("f", "a"), ("f", "b"), ("g", "a"))  # logical keys: (how it is called, name)

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def wait_all_tasks_blocked() -> None:
    """Settle: return once every other task waits (no real time, unlike anyio's
    asyncio version, which polls every 0.1 s). A task that never blocks fails."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio
        import trio.testing

        await trio.testing.wait_all_tasks_blocked()
        return
    this = asyncio.current_task(loop)
    for _ in range(10_000):
        await asyncio.sleep(0)
        if not loop._ready and all(  # type: ignore[attr-defined]  # no callback pending
            t is this or (t._fut_waiter is not None and not t._fut_waiter.done())  # type: ignore[attr-defined]
            for t in asyncio.all_tasks(loop)
        ):
            return
    pytest.fail("a task never blocks (busy loop)")


CURRENT_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar("call", default=None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class LoadError(Exception):
    """A loader's failure; ``load`` is the load that raised it."""

    def __init__(self, load: Load) -> None:
        super().__init__(f"load {load.id} of {load.key!r} failed")
        self.load = load


@dataclass(eq=False)
class Load:
    id: int
    key: Hashable
    start: int  # script sequence number when the loader was entered
    go: anyio.Event = field(default_factory=anyio.Event)
    outcome: str = "ok"  # "ok" | "fail"
    due: float | None = None  # clock time it answers at by itself (None: hangs)
    end: int | None = None
    written_at: float | None = None  # clock when the loader returned
    cancelled: bool = False
    raised: bool = False
    flight: Any = None  # the cache's Flight running this load
    caller: Call | None = None  # the call that started the flight
    flight_led: bool = False  # run by its caller (cache not entered), not the cache


@dataclass(frozen=True)
class Value:
    """What a loader returns (or cache.set stores): traceable to its origin."""

    key: Hashable
    origin: Load | SetOp


@dataclass(eq=False)
class SetOp:
    seq: int
    written_at: float


@dataclass(eq=False)
class Call:
    id: int
    key: Hashable
    start: int
    t0: float
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: bool = False
    cancelled: bool = False  # we cancelled it
    result: Any = None
    error: BaseException | None = None
    got_cancelled: bool = False  # it ended by a cancellation


class SlowStore:
    """A network-like store (no ``peek``): each operation takes a few scheduling
    rounds, so writes of one key overlap reads, invalidations and each other."""

    def __init__(self) -> None:
        self._data: dict[Hashable, Any] = {}
        self.rounds = 0

    async def trip(self) -> None:
        self.rounds += 1
        for _ in range(self.rounds % 4):
            await anyio.lowlevel.checkpoint()

    async def get(self, key: Hashable) -> Any:
        await self.trip()
        return self._data.get(key)

    async def set(self, key: Hashable, entry: Any, *, ttl: float) -> None:
        await self.trip()
        self._data[key] = entry

    async def delete(self, key: Hashable) -> None:
        await self.trip()
        self._data.pop(key, None)

    async def clear(self) -> None:
        await self.trip()
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class CacheModel:
    """Drives one SWRCache and checks it against what the script did."""

    def __init__(
        self, plans: list[tuple[str, int]], *, error_ttl: float | None, slow: bool = False
    ) -> None:
        self.plans = plans  # what each load does, in turn: (outcome, delay)
        self.clock = FakeClock()
        self.reported: list[tuple[Hashable, BaseException]] = []
        self.cache = pk.SWRCache(
            fresh=FRESH,
            stale=STALE,
            maxsize=MAXSIZE,
            clock=self.clock,
            error_ttl=error_ttl,
            backoff=5.0,
            max_backoff=10.0,
            on_error=lambda k, e: self.reported.append((k, e)),
            store=SlowStore() if slow else None,
        )
        self.seq = 0
        self.loads: list[Load] = []
        self.calls: list[Call] = []
        self.supersedes: dict[Hashable, list[int]] = {k: [] for k in KEYS}  # seqs
        self.step_cancels: set[int] = set()  # steps whose action may cancel loads

        @self.cache.cached
        async def fetch(name: str) -> Value:
            return await self.loader(("f", name))

        self.fetch = fetch

    async def get_loader(self, name: str) -> Value:
        return await self.loader(("g", name))

    def store_key(self, key: Hashable) -> Hashable:
        via, name = key  # type: ignore[misc]
        return self.fetch.key(name) if via == "f" else name

    def tick(self) -> int:
        self.seq += 1
        return self.seq

    # ----------------------------------------------------------------- the loader
    async def loader(self, key: Hashable) -> Value:
        # single flight / one refresh per key: no other load of this key, started
        # since the last invalidation, is still running
        last = max(self.supersedes[key], default=-1)
        running = [ld for ld in self.loads if ld.key == key and ld.end is None and ld.start > last]
        assert not running, f"two loads of {key!r} at once: {running}"
        load = Load(len(self.loads), key, self.tick())
        load.flight = self.cache._loads.flights.get(self.store_key(key))
        load.caller = CURRENT_CALL.get()
        load.flight_led = not self.cache._owner.entered
        outcome, delay = self.plans[load.id % len(self.plans)]
        load.outcome = outcome if outcome != "hang" else "ok"
        if outcome != "hang":
            load.due = self.clock.now + (0.0, 3.0, 12.0)[delay % 3]
            if load.due <= self.clock.now:
                load.go.set()
        self.loads.append(load)
        try:
            await anyio.lowlevel.checkpoint()
            await load.go.wait()
        except BaseException:
            load.cancelled = True
            load.end = self.tick()
            raise
        load.end = self.tick()
        load.written_at = self.clock.now
        if load.outcome == "fail":
            load.raised = True
            raise LoadError(load)
        return Value(key, load)

    # ----------------------------------------------------------------- the callers
    async def run_call(self, call: Call) -> None:
        via, name = call.key  # type: ignore[misc]
        CURRENT_CALL.set(call)
        with call.scope:
            try:
                if via == "f":
                    call.result = await self.fetch(name)
                else:
                    call.result = await self.cache.get(name, self.get_loader)
            except anyio.get_cancelled_exc_class():
                call.got_cancelled = True
                call.done = True
                raise
            except Exception as exc:
                call.error = exc
            call.done = True
        if call.scope.cancelled_caught:
            call.got_cancelled = True
            call.done = True

    def entry(self, key: Hashable) -> Any:
        store = self.cache.store
        assert isinstance(store, (pk.MemoryStore, SlowStore))
        return store._data.get(self.store_key(key))  # no LRU effect

    # ----------------------------------------------------------------- invariants
    def origin_ok(self, key: Hashable, value: Value, *, after: int) -> bool:
        """``value`` comes from a load (or set) of ``key`` that began after ``after``."""
        if value.key != key:
            return False
        origin = value.origin
        if isinstance(origin, SetOp):
            return origin.seq >= after  # the set itself supersedes the loads before it
        return origin.start > after

    def last_supersede(self, key: Hashable, before: int) -> int:
        return max((s for s in self.supersedes[key] if s < before), default=-1)

    def check(self) -> None:
        cache, store = self.cache, self.cache.store
        # bounded memory
        assert isinstance(store, SlowStore) or len(store) <= MAXSIZE  # type: ignore[arg-type]
        assert len(cache._loads._failed) <= MAXSIZE
        # invalidation wins, in the store
        for key in KEYS:
            entry = self.entry(key)
            if entry is not None:
                assert self.origin_ok(
                    key, entry.value, after=max(self.supersedes[key], default=-1)
                ), f"store holds {entry.value} for {key!r} after an invalidation"
        for call in self.calls:
            if not call.done:
                continue
            sup = self.last_supersede(call.key, call.start)
            # only the callers we cancelled are cancelled
            assert call.got_cancelled <= call.cancelled, f"call {call.id} cancelled by itself"
            if call.error is not None:
                err = call.error
                assert isinstance(err, LoadError), f"call {call.id} got {err!r}"
                assert err.load.key == call.key
                assert err.load.start > sup, (
                    f"call {call.id} got an error from before an invalidation"
                )
                assert all(err is not e for _, e in self.reported), "error reported twice"
            elif not call.got_cancelled:
                value = call.result
                assert isinstance(value, Value)
                # invalidation wins for the callers
                assert self.origin_ok(call.key, value, after=sup), (
                    f"call {call.id} (at {call.start}) got {value}, invalidated at {sup}"
                )
                # never served past its stale window
                origin = value.origin
                written = origin.written_at
                assert written is not None
                ended = origin.end if isinstance(origin, Load) else origin.seq
                assert call.t0 < written + FRESH + STALE or ended > call.start, (
                    f"call {call.id} at t={call.t0} served {value} written at {written}"
                )
        # a load nobody waits for any more stops; one somebody waits for goes on
        for load in self.loads:
            flight = load.flight
            if load.end is not None or flight is None or flight.refresh or flight.waiters:
                continue
            if self.cache._owner.entered and not load.flight_led:
                raise AssertionError(f"load {load.id} runs on with nobody waiting for it")
            if load.flight_led and load.caller is not None and load.caller.cancelled:
                raise AssertionError(f"load {load.id} runs on for a cancelled leader alone")
        # the counters
        stats = cache.statistics()
        assert stats.hits + stats.stale_hits + stats.misses == len(self.calls), stats
        assert stats.loads + stats.refreshes == len(self.loads), stats
        failed = sum(ld.raised for ld in self.loads)
        assert stats.load_errors + stats.refresh_errors == failed, stats
        assert stats.refresh_errors == len(self.reported), (stats, self.reported)


# one operation: (kind, a, b)
PLANS = st.lists(
    st.tuples(st.sampled_from(["ok", "ok", "ok", "fail", "hang"]), st.integers(0, 2)),
    min_size=1,
    max_size=12,
)
OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["call"] * 6
            + ["ok"] * 3
            + ["fail"] * 2
            + ["time"] * 3
            + ["cancel", "invalidate", "set", "clear", "exit", "enter"]
        ),
        st.integers(0, 5),
        st.integers(0, 5),
    ),
    min_size=20,
    max_size=50,
)


async def play_cache(
    ops: list[tuple[str, int, int]],
    plans: list[tuple[str, int]],
    *,
    entered: bool,
    error_ttl: float | None,
    slow: bool = False,
) -> None:
    model = CacheModel(plans, error_ttl=error_ttl, slow=slow)
    cache = model.cache
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "SWRCache is not entered", RuntimeWarning)
        async with anyio.create_task_group() as tg:
            inside = False
            if entered:
                await cache.__aenter__()
                inside = True
            for kind, a, b in ops:
                if kind == "call":
                    key = KEYS[a % len(KEYS)]
                    call = Call(len(model.calls), key, model.tick(), model.clock.now)
                    model.calls.append(call)
                    tg.start_soon(model.run_call, call)
                elif kind in ("ok", "fail"):
                    pending = [ld for ld in model.loads if ld.end is None and not ld.go.is_set()]
                    if pending:
                        load = pending[a % len(pending)]
                        load.outcome = kind
                        load.go.set()
                elif kind == "cancel":
                    live = [c for c in model.calls if not c.done and not c.cancelled]
                    if live:
                        call = live[a % len(live)]
                        call.cancelled = True
                        call.scope.cancel()
                elif kind == "time":
                    model.clock.now += (1.0, 6.0, 11.0, 15.0, 25.0, 31.0)[a]
                    for ld in model.loads:
                        if ld.due is not None and ld.due <= model.clock.now:
                            ld.go.set()
                elif kind == "invalidate":
                    key = KEYS[a % len(KEYS)]
                    model.supersedes[key].append(model.tick())
                    if b % 2:
                        await cache.invalidate(model.store_key(key))
                    elif key[0] == "f":
                        await model.fetch.invalidate(key[1])
                    else:
                        await cache.invalidate(key[1])
                elif kind == "set":
                    key = KEYS[a % len(KEYS)]
                    op = SetOp(model.tick(), model.clock.now)
                    model.supersedes[key].append(op.seq)
                    await cache.set(model.store_key(key), Value(key, op))
                elif kind == "clear":
                    seq = model.tick()
                    for key in KEYS:
                        model.supersedes[key].append(seq)
                    await cache.clear()
                elif kind == "exit" and inside:
                    await cache.__aexit__(None, None, None)
                    inside = False
                elif kind == "enter" and not inside and entered:
                    await cache.__aenter__()
                    inside = True
                await wait_all_tasks_blocked()
                model.check()
            # the end: every load still gated succeeds; every caller finishes
            for _ in range(200):
                pending = [ld for ld in model.loads if ld.end is None and not ld.go.is_set()]
                if not pending:
                    break
                for ld in pending:
                    ld.go.set()
                await wait_all_tasks_blocked()
            await wait_all_tasks_blocked()
            model.check()
            hung = [c for c in model.calls if not c.done]
            assert not hung, f"callers never answered: {hung}"
            if inside:
                await cache.__aexit__(None, None, None)
        # nothing left running
        assert all(ld.end is not None for ld in model.loads)
        assert not cache._loads.flights
        assert not len(cache._loads.writes)
        model.check()


@PROPERTY
@given(ops=OPS, plans=PLANS)
@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
async def test_cache_model(
    ops: list[tuple[str, int, int]], plans: list[tuple[str, int]], entered: bool
) -> None:
    await play_cache(ops, plans, entered=entered, error_ttl=None)


@PROPERTY
@given(ops=OPS, plans=PLANS)
async def test_cache_model_error_ttl(
    ops: list[tuple[str, int, int]], plans: list[tuple[str, int]]
) -> None:
    await play_cache(ops, plans, entered=True, error_ttl=15.0)


@PROPERTY
@given(ops=OPS, plans=PLANS)
@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
async def test_cache_model_slow_store(
    ops: list[tuple[str, int, int]], plans: list[tuple[str, int]], entered: bool
) -> None:
    """The same on a store whose every operation takes a few scheduling rounds."""
    await play_cache(ops, plans, entered=entered, error_ttl=None, slow=True)


# ====================================================================== BatchLoader
BKEYS = (1, 2, 3, 4)


class BatchFailure(Exception):
    """``load_many`` raised: every caller of the batch must get this very object."""


class KeyFailure(Exception):
    """An exception instance ``load_many`` returned as one key's value."""


@dataclass(eq=False)
class ManyCall:
    id: int
    keys: list[Any]
    start: int
    plan: str
    go: anyio.Event = field(default_factory=anyio.Event)
    end: int | None = None
    error: BaseException | None = None  # raised by load_many, or the misaligned error
    values: dict[Any, Any] = field(default_factory=dict)
    cancelled: bool = False  # every caller of its batch left: the batch was cancelled


@dataclass(eq=False)
class BCall:
    id: int
    keys: list[Any]  # one key (load) or several (load_many)
    many: bool
    start: int
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: bool = False
    cancelled: bool = False
    got_cancelled: bool = False
    result: Any = None
    error: BaseException | None = None


class BatchModel:
    def __init__(self, plans: list[tuple[str, bool]], *, max_batch: int, cache: bool) -> None:
        self.plans = plans
        self.max_batch = max_batch
        self.cache = cache
        self.loader: pk.BatchLoader[Any, Any] = pk.BatchLoader(
            self.load_many, max_batch=max_batch, cache=cache
        )
        self.seq = 0
        self.many: list[ManyCall] = []
        self.calls: list[BCall] = []
        self.cleared: dict[Any, int] = {}  # key -> seq of the last loader.clear(key)

    def tick(self) -> int:
        self.seq += 1
        return self.seq

    async def load_many(self, keys: list[Any]) -> Any:
        assert 0 < len(keys) <= self.max_batch, keys
        assert len(set(keys)) == len(keys), f"duplicate keys sent: {keys}"
        plan, hang = self.plans[len(self.many) % len(self.plans)]
        call = ManyCall(len(self.many), list(keys), self.tick(), plan)
        self.many.append(call)
        try:
            await anyio.lowlevel.checkpoint()
            if hang:
                await call.go.wait()
        except anyio.get_cancelled_exc_class():
            call.cancelled = True  # its callers all left: it answers no one
            raise
        finally:
            call.end = self.tick()
        values = {k: ("v", k, call.id) for k in keys}
        if plan == "raise":
            call.error = BatchFailure(f"batch {call.id}")
            raise call.error
        if plan == "key-error":  # the first key fails alone
            values[keys[0]] = KeyFailure(f"key {keys[0]} in batch {call.id}")
        if plan == "missing":  # the last key is left out
            del values[keys[-1]]
        call.values = values
        if plan == "extra":
            return {**values, 99: "extra"}
        if plan == "list":
            return [values[k] for k in keys]
        if plan == "short-list":
            return [values[k] for k in keys][:-1]
        if plan == "tuple":
            return tuple(values[k] for k in keys)
        if plan == "not-a-result":
            return 42
        return values

    async def run_call(self, call: BCall) -> None:
        with call.scope:
            try:
                if call.many:
                    call.result = await self.loader.load_many(call.keys)
                else:
                    call.result = [await self.loader.load(call.keys[0])]
            except anyio.get_cancelled_exc_class():
                call.got_cancelled = call.done = True
                raise
            except Exception as exc:
                call.error = exc
            call.done = True
        if call.scope.cancelled_caught:
            call.got_cancelled = call.done = True

    def served_by(self, call: BCall, key: Any) -> list[ManyCall]:
        """The load_many calls that may have answered ``key`` for ``call``."""
        out = []
        for m in self.many:
            if m.cancelled:
                continue
            if key not in m.keys:
                continue
            if not self.cache and m.start < call.start:
                continue  # cache=False: a key is loaded again in each new batch
            if self.cache and m.start < self.cleared.get(key, -1) < call.start:
                continue
            out.append(m)
        return out

    def expect(self, call: BCall, key: Any) -> tuple[set[int], list[BaseException]]:
        """What ``call`` may get for ``key``: value ids, or errors (exact objects)."""
        values: set[int] = set()
        errors: list[BaseException] = []
        for m in self.served_by(call, key):
            if m.end is None:
                continue
            if m.error is not None:
                errors.append(m.error)
            elif m.plan in ("short-list", "not-a-result"):
                pass  # a ValueError / TypeError made by the loader, checked by type
            elif m.plan == "key-error" and key == m.keys[0]:
                errors.append(m.values[key])
            elif m.plan == "missing" and key == m.keys[-1]:
                pass  # a KeyError made by the loader
            else:
                values.add(m.id)
        return values, errors

    def check(self) -> None:
        # one caller's errors: the same object for every caller of a failed batch
        seen: dict[int, BaseException] = {}
        for call in self.calls:
            if not call.done:
                continue
            assert call.got_cancelled <= call.cancelled, f"call {call.id} cancelled by itself"
            if call.got_cancelled:
                continue
            if call.error is None:
                assert isinstance(call.result, list)
                assert len(call.result) == len(call.keys)
                for key, got in zip(call.keys, call.result, strict=True):
                    assert isinstance(got, tuple), got
                    assert got[:2] == ("v", key), (call, got)
                    ids, _ = self.expect(call, key)
                    assert got[2] in ids, f"call {call.id} got {got} from a batch it was not in"
                continue
            err = call.error
            ok = False
            for key in call.keys:
                _, errors = self.expect(call, key)
                if any(err is e for e in errors):
                    ok = True
                for m in self.served_by(call, key):
                    if m.end is None:
                        continue
                    if m.plan == "short-list" and isinstance(err, ValueError):
                        ok = True
                    if m.plan == "not-a-result" and isinstance(err, TypeError):
                        ok = True
                    if m.plan == "missing" and key == m.keys[-1] and isinstance(err, KeyError):
                        ok = True
            assert ok, f"call {call.id} for {call.keys} got {err!r}; batches {self.many}"
            if isinstance(err, (ValueError, TypeError)) and not call.many:
                bad = [  # one error object per misaligned batch
                    m
                    for m in self.served_by(call, call.keys[0])
                    if m.end is not None and m.plan in ("short-list", "not-a-result")
                ]
                if len(bad) == 1:
                    assert seen.setdefault(bad[0].id, err) is err, "a batch's error differs"
        stats = self.loader.statistics()
        assert stats.calls == len(self.many)
        assert stats.keys == sum(len(m.keys) for m in self.many)
        assert stats.requests == sum(len(c.keys) for c in self.calls), stats
        if self.cache:  # a key loaded once is not loaded again (until cleared)
            for key in BKEYS:
                good = [
                    m
                    for m in self.many
                    if key in m.keys and m.end is not None and self.expect_ok(m, key)
                ]
                for a, b in itertools.pairwise(good):
                    assert self.cleared.get(key, -1) > a.start, f"{key} loaded twice: {a} {b}"

    def expect_ok(self, m: ManyCall, key: Any) -> bool:
        if m.cancelled:
            return False
        if m.error is not None or m.plan in ("short-list", "not-a-result"):
            return False
        if m.plan == "key-error" and key == m.keys[0]:
            return False
        return not (m.plan == "missing" and key == m.keys[-1])


BPLANS = st.lists(
    st.tuples(
        st.sampled_from(
            ["ok"] * 4
            + [
                "list",
                "tuple",
                "extra",
                "raise",
                "key-error",
                "missing",
                "short-list",
                "not-a-result",
            ]
        ),
        st.booleans(),
    ),
    min_size=1,
    max_size=10,
)
BOPS = st.lists(
    st.tuples(
        st.sampled_from(["load"] * 4 + ["many"] * 2 + ["release"] * 3 + ["cancel", "clear"]),
        st.lists(st.sampled_from(BKEYS), min_size=1, max_size=5),
        st.integers(0, 9),
    ),
    min_size=10,
    max_size=40,
)


async def play_batch(
    ops: list[tuple[str, list[int], int]],
    plans: list[tuple[str, bool]],
    *,
    entered: bool,
    max_batch: int,
    cache: bool,
    exit_at: int,
) -> None:
    model = BatchModel(plans, max_batch=max_batch, cache=cache)
    loader = model.loader
    leave = anyio.Event()
    left = anyio.Event()

    async def own() -> None:
        async with loader:
            await leave.wait()
        left.set()

    async with anyio.create_task_group() as tg:
        if entered:
            tg.start_soon(own)
            await wait_all_tasks_blocked()
        for i, (kind, keys, n) in enumerate(ops):
            if i == exit_at:
                leave.set()
            if kind in ("load", "many"):
                call = BCall(
                    len(model.calls),
                    keys if kind == "many" else keys[:1],
                    kind == "many",
                    model.tick(),
                )
                model.calls.append(call)
                tg.start_soon(model.run_call, call)
            elif kind == "release":
                waiting = [m for m in model.many if m.end is None and not m.go.is_set()]
                if waiting:
                    waiting[n % len(waiting)].go.set()
            elif kind == "cancel":
                live = [c for c in model.calls if not c.done and not c.cancelled]
                if live:
                    call = live[n % len(live)]
                    call.cancelled = True
                    call.scope.cancel()
            elif kind == "clear" and cache:
                model.cleared[keys[0]] = model.tick()
                loader.clear(keys[0])
            await wait_all_tasks_blocked()
            model.check()
        leave.set()
        for m in model.many:
            m.go.set()
        for _ in range(100):
            await wait_all_tasks_blocked()
            waiting = [m for m in model.many if m.end is None and not m.go.is_set()]
            if not waiting:
                break
            for m in waiting:
                m.go.set()
        model.check()
        hung = [c for c in model.calls if not c.done]
        assert not hung, f"callers never answered: {hung}"
        if entered:
            await left.wait()
    assert all(m.end is not None for m in model.many)
    model.check()


@PROPERTY
@given(
    ops=BOPS, plans=BPLANS, max_batch=st.sampled_from([1, 2, 3, 500]), exit_at=st.integers(0, 60)
)
@pytest.mark.parametrize("cache", [False, True], ids=["nocache", "cache"])
@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
async def test_batch_model(
    ops: list[tuple[str, list[int], int]],
    plans: list[tuple[str, bool]],
    max_batch: int,
    exit_at: int,
    cache: bool,
    entered: bool,
) -> None:
    await play_batch(ops, plans, entered=entered, max_batch=max_batch, cache=cache, exit_at=exit_at)
