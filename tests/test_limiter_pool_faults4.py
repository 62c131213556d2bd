"""Limiter and the engine's pool limiter under faults (round 4).

* ``Limiter(rate=...)``: a waiter that leaves its turn (cancelled, timed out) while
  later waiters stand gives it to them, so no turn is lost and the rate still holds;
* cancellation anywhere in ``acquire`` with a bound *and* a rate leaks no slot;
* bad input (a ``burst`` beyond a float's range raised ``OverflowError`` at the first
  start), one limiter on event loops one after the other (one closed with a caller
  still waiting for its turn), re-entry in one task;
* ``pool_limiter``: work running on a caller's slot (a cache load, a chain of them, a
  fan-out's worker) keeps that slot when the caller leaves first, so the engine's
  bound holds until it ends; a task you start yourself gets no lent slot (documented).

Virtual time (``tests/virtual_time.py``, trio's ``MockClock``): nothing here asserts
on real elapsed time.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import random
from collections.abc import Iterator
from fractions import Fraction

import anyio
import anyio.lowlevel
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.pool import QueuePool

import parallelkit as pk
from parallelkit.sqlalchemy import LimitedAsyncSession, PoolLimiter, pool_limiter
from tests.test_cache_pool_slots import at_rest as slots_at_rest
from tests.virtual_time import run_virtual

pytest_plugins = ["tests.sqla_fixtures"]

BACKENDS = ["asyncio", "trio"]


def at_rest(limiter: pk.Limiter) -> None:
    stats = limiter.statistics()
    assert (stats.running, stats.waiting) == (0, 0), limiter
    assert not limiter._line  # nobody in line for a turn
    assert not limiter._head  # nobody waiting for one


# ------------------------------------------------------------------------ rate turns
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_turn_left_in_the_middle_goes_to_the_waiters_behind_it(backend: str, how: str) -> None:
    """Four callers at t=0 on ``rate=1`` have turns 0, 1, 2, 3; the one at 1 leaves at
    t=0.5: the others move up (1, 2), the tail turn (3) is given back, and a newcomer
    at 0.5 starts at 3. Before, the turn at 1 was lost: 0, 2, 3, 4."""
    starts: dict[int, float] = {}

    async def main() -> None:
        limiter = pk.Limiter(rate=1)
        scopes: dict[int, anyio.CancelScope] = {}

        async def caller(i: int, patience: float = math.inf) -> None:
            with anyio.move_on_after(patience) as scope:
                scopes[i] = scope
                async with limiter:
                    starts[i] = anyio.current_time()

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(caller, i, 0.5 if (how == "timeout" and i == 1) else math.inf)
                await anyio.lowlevel.checkpoint()
            await anyio.sleep(0.5)
            if how == "cancel":
                scopes[1].cancel()
            await anyio.lowlevel.checkpoint()
            tg.start_soon(caller, 4)
        at_rest(limiter)

    run_virtual(main, backend)
    assert starts == {0: 0.0, 2: 1.0, 3: 2.0, 4: 3.0}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_callers_giving_up_at_random_lose_no_turn_and_never_exceed_the_rate(
    backend: str, seed: int
) -> None:
    """40 callers at t=0 on ``rate=2``, half of them give up at random times: the
    others start exactly 0.5 s apart from t=0, with no gap where a turn was lost."""
    rng = random.Random(seed)
    # 20 callers give up by t=5.25, when at most 11 can have started, whatever the order
    # the backend starts them in (trio may reverse it)
    patience = [rng.randrange(1, 6) + 0.25 for _ in range(20)]
    patience += [rng.choice([math.inf, rng.randrange(1, 40) + 0.25]) for _ in range(20)]
    rng.shuffle(patience)
    starts: list[float] = []
    left: list[int] = []

    async def main() -> None:
        limiter = pk.Limiter(rate=2)

        async def caller(i: int) -> None:
            with anyio.move_on_after(patience[i]):
                await limiter.wait_rate()
                starts.append(anyio.current_time())
                return
            left.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(caller, i)
        at_rest(limiter)

    run_virtual(main, backend)
    assert left, "some callers must have given up"
    assert len(starts) + len(left) == 40
    assert starts == [k * 0.5 for k in range(len(starts))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_with_a_burst_and_a_bound_a_turn_given_up_is_reused_within_the_rate(
    backend: str, seed: int
) -> None:
    """``Limiter(concurrency=3, rate=4, burst=2)`` with callers arriving over time and
    some giving up: no window of 1 s holds more than ``burst - 1 + rate`` starts, the
    starts are never closer than GCRA allows, and no slot is left held."""
    rng = random.Random(seed)
    rate, burst = 4, 2
    arrivals = sorted(rng.uniform(0, 6) for _ in range(60))
    patience = [rng.choice([math.inf, rng.uniform(0.05, 3)]) for _ in arrivals]
    starts: list[float] = []

    async def main() -> None:
        limiter = pk.Limiter(concurrency=3, rate=rate, burst=burst)

        async def caller(i: int) -> None:
            with anyio.move_on_after(patience[i]):
                async with limiter:
                    starts.append(anyio.current_time())
                    await anyio.sleep(0.3)

        async with anyio.create_task_group() as tg:
            now = 0.0
            for i, at in enumerate(arrivals):
                await anyio.sleep(at - now)
                now = at
                tg.start_soon(caller, i)
        at_rest(limiter)

    run_virtual(main, backend)
    allowed = burst - 1 + rate
    for k, t in enumerate(starts):
        assert sum(1 for u in starts[k:] if u < t + 1.0 - 1e-9) <= allowed, starts
    # GCRA: the k-th start after any start t is at t + (k - burst + 1) / rate at the earliest
    for i, j in itertools.combinations(range(len(starts)), 2):
        assert starts[j] - starts[i] >= (j - i - burst + 1) / rate - 1e-9, starts


# -------------------------------------------------------- cancellation in acquire
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_cancelled_anywhere_in_acquire_with_a_bound_and_a_rate_no_slot_leaks(
    backend: str, seed: int
) -> None:
    """Callers of ``Limiter(concurrency=2, rate=3)`` cancelled at random moments (while
    waiting for a slot, for their turn, or holding the slot): afterwards no slot is
    held, nobody waits, no turn is queued, and both slots are taken at once."""
    rng = random.Random(seed)
    delays = [rng.choice([0.0, rng.uniform(0, 5)]) for _ in range(30)]
    holding = 0
    peak = 0

    async def main() -> None:
        nonlocal holding, peak
        limiter = pk.Limiter(concurrency=2, rate=3)

        async def caller() -> None:
            nonlocal holding, peak
            async with limiter:
                holding += 1
                peak = max(peak, holding)
                try:
                    await anyio.sleep(0.7)
                finally:
                    holding -= 1

        async with anyio.create_task_group() as outer:
            for delay in delays:
                async with anyio.create_task_group() as tg:
                    for _ in range(3):
                        tg.start_soon(caller)
                    await anyio.sleep(delay)
                    tg.cancel_scope.cancel()
            outer.cancel_scope.cancel()
        at_rest(limiter)
        began = anyio.current_time()
        await limiter.acquire_slot()
        await limiter.acquire_slot()
        assert anyio.current_time() == began
        assert limiter.statistics().running == 2
        limiter.release()
        limiter.release()
        at_rest(limiter)

    run_virtual(main, backend)
    assert holding == 0
    assert peak <= 2


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"concurrency": True}, TypeError, r"^concurrency must be an int"),
        ({"concurrency": 2.0}, TypeError, r"^concurrency must be an int"),
        ({"concurrency": "2"}, TypeError, r"^concurrency must be an int"),
        ({"concurrency": (2,)}, TypeError, r"^concurrency must be an int"),
        ({"concurrency": 0}, ValueError, r"^concurrency must be >= 1"),
        ({"concurrency": -(10**100)}, ValueError, r"^concurrency must be >= 1"),
        ({"rate": (5, 1)}, TypeError, r"^rate must be a number"),
        ({"rate": [5]}, TypeError, r"^rate must be a number"),
        ({"rate": False}, TypeError, r"^rate must be a number"),
        ({"rate": -math.inf}, ValueError, r"^rate must be > 0"),
        ({"rate": math.nan}, ValueError, r"^rate must be > 0"),
        ({"rate": math.inf}, ValueError, r"^rate must be finite"),
        ({"rate": 10**400}, ValueError, r"^rate must be finite"),
        ({"rate": 5e-324}, ValueError, r"^rate must be at least"),
        ({"rate": 1, "burst": 1.0}, TypeError, r"^burst must be an int"),
        ({"rate": 1, "burst": None}, TypeError, r"^burst must be an int"),
        ({"rate": 1, "burst": -1}, ValueError, r"^burst must be >= 1"),
    ],
)
def test_bad_limiter_arguments_name_the_argument(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        pk.Limiter(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_counts_and_odd_reals_work(backend: str) -> None:
    """A burst beyond a float's range is an unlimited burst (it raised
    ``OverflowError`` at the first start); a huge bound and a ``Fraction`` rate work."""
    starts: list[float] = []

    async def main() -> None:
        burst = pk.Limiter(rate=1, burst=10**400)
        for _ in range(5):
            async with burst:
                starts.append(anyio.current_time())
        bound = pk.Limiter(concurrency=10**100, rate=Fraction(1, 3))
        assert bound.rate == 1 / 3
        for _ in range(3):
            async with bound:
                starts.append(anyio.current_time())
        at_rest(burst)
        at_rest(bound)

    run_virtual(main, backend)
    assert starts == [0.0] * 5 + [0.0, 3.0, 6.0]


# ------------------------------------------------------------ loops, backends, re-entry
def test_one_limiter_serves_one_event_loop_after_another() -> None:
    """A limiter made at module level, used by asyncio, trio and asyncio again (each
    run's clock starts over): each run gets its own correctly spaced starts, and a run
    that ended with waiters cancelled leaves nothing behind for the next."""
    limiter = pk.Limiter(concurrency=2, rate=2)
    runs: list[list[float]] = []

    async def main() -> None:
        began = anyio.current_time()
        starts: list[float] = []

        async def caller() -> None:
            async with limiter:
                starts.append(anyio.current_time() - began)
                await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(caller)
        async with anyio.create_task_group() as tg:  # some left waiting, then cancelled
            for _ in range(6):
                tg.start_soon(caller)
            await anyio.sleep(0.75)
            tg.cancel_scope.cancel()
        at_rest(limiter)
        runs.append(sorted(starts))

    for backend in ["asyncio", "trio", "asyncio", "trio"]:
        run_virtual(main, backend)
    for starts in runs:
        assert starts[:4] == [0.0, 0.5, 1.0, 1.5], runs
        assert all(b - a >= 0.5 for a, b in itertools.pairwise(starts)), runs


@pytest.mark.parametrize("backend", BACKENDS)
def test_entering_a_limiter_again_in_the_same_task_takes_a_second_slot(backend: str) -> None:
    """A ``Limiter`` is a semaphore, not a lock: ``async with`` inside ``async with`` in
    one task takes two slots; with ``concurrency=1`` the inner one waits (for ever,
    unless cancelled), and a timeout leaves the counts right."""

    async def main() -> None:
        two = pk.Limiter(concurrency=2)
        async with two, two:
            assert two.statistics().running == 2
        at_rest(two)
        one = pk.Limiter(concurrency=1, rate=1)
        async with one:
            with anyio.move_on_after(30) as scope:
                async with one:
                    pytest.fail("a second slot of one")  # pragma: no cover
            assert scope.cancelled_caught
            assert one.statistics().waiting == 0
        at_rest(one)
        async with one:  # and it is usable again
            pass

    run_virtual(main, backend)


class Tracker:
    """How many ``work`` calls run at once (``active``, its ``peak``), and the order
    they came in and out."""

    def __init__(self) -> None:
        self.active = self.peak = 0
        self.order: list[str] = []

    async def work(self, name: str, seconds: float) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.order.append(f"{name} in")
        try:
            await anyio.sleep(seconds)
        finally:
            self.active -= 1
            self.order.append(f"{name} out")


# ---------------------------------------------------------------- the pool's limiter
@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = create_engine("sqlite://", poolclass=QueuePool, pool_size=2, max_overflow=0)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entered", [True, False], ids=["entered", "not-entered"])
def test_a_load_on_a_cancelled_callers_slot_keeps_it_until_it_ends(
    backend: str, engine: Engine, entered: bool
) -> None:
    """Two requests hold both slots of a pool of 2 and wait for a cache miss (with a
    third caller that holds no slot), which runs on one of their slots. Both requests
    are cancelled while it runs, and it goes on for the third caller: it keeps the slot
    it runs on, so newcomers get one slot, not two (the database saw 3 at once before,
    until the load ended)."""
    slots = pool_limiter(engine)
    cache = pk.SWRCache(fresh=30, stale=300)
    go = anyio.Event()
    running = anyio.Event()
    track = Tracker()
    work = track.work

    @cache.cached
    async def lookup(key: int) -> int:
        async with slots:
            running.set()
            await work("load", 10)
            return key

    async def request(scope: anyio.CancelScope) -> None:
        with scope:
            async with slots:  # an open transaction, idle while it waits for the load
                await go.wait()
                await lookup(1)

    async def newcomer(name: str) -> None:
        async with slots:
            await work(name, 1)

    async def requests() -> None:
        with anyio.fail_after(60):
            scopes = [anyio.CancelScope(), anyio.CancelScope()]
            async with anyio.create_task_group() as tg:
                for scope in scopes:
                    tg.start_soon(request, scope)
                while slots.statistics().running < 2:
                    await anyio.sleep(0.1)

                async def patient() -> None:  # holds no slot; not entered: the load's task
                    assert await lookup(1) == 1

                tg.start_soon(patient)
                await anyio.sleep(0.5)
                go.set()
                await running.wait()  # on a waiting request's slot: both are held
                assert slots.statistics().running == 2
                for scope in scopes:
                    scope.cancel()
                await anyio.sleep(1)
                assert track.order == ["load in"]  # the load goes on for the patient caller
                tg.start_soon(newcomer, "a")
                tg.start_soon(newcomer, "b")

    async def main() -> None:
        if entered:
            async with cache:
                await requests()
        else:
            await requests()

    run_virtual(main, backend)
    assert track.peak <= 2, track.order
    assert track.order.count("load in") == 1
    slots_at_rest(slots)


@pytest.fixture
def engine1() -> Iterator[Engine]:
    engine = create_engine("sqlite://", poolclass=QueuePool, pool_size=1, max_overflow=0)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("via", ["cache", "fan-out"])
def test_a_chain_of_borrowed_slots_keeps_the_bound_when_its_first_lender_leaves(
    backend: str, engine1: Engine, via: str
) -> None:
    """Pool of 1. A request holds the slot and waits for ``outer`` (through a fan-out
    on the engine's limiter, or directly); ``outer``'s load runs on that slot and waits
    for ``inner``, whose load runs on ``outer``'s (borrowed) slot. The request is
    cancelled (a patient caller keeps ``outer`` going): a newcomer waits for both loads,
    never running beside one of them."""
    slots = pool_limiter(engine1)
    cache = pk.SWRCache(fresh=30, stale=300)
    go = anyio.Event()
    inner_running = anyio.Event()
    track = Tracker()
    work = track.work

    @cache.cached
    async def inner(key: int) -> int:
        async with slots:
            inner_running.set()
            await work("inner", 5)
            return key

    @cache.cached
    async def outer(key: int) -> int:
        async with slots:
            value = await inner(key)
            await work("outer", 5)
            return value

    async def item(key: int) -> int:
        return await outer(key)

    async def request(scope: anyio.CancelScope) -> None:
        with scope:
            async with slots:  # an open transaction
                await go.wait()
                if via == "fan-out":
                    await pk.gather(functools.partial(item, 1), limit=slots)
                else:
                    await outer(1)

    async def newcomer() -> None:
        async with slots:
            await work("newcomer", 1)

    async def main() -> None:
        async with cache:
            with anyio.fail_after(60):
                scope = anyio.CancelScope()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(request, scope)
                    while slots.statistics().running < 1:
                        await anyio.sleep(0.1)

                    async def patient() -> None:  # holds no slot
                        assert await outer(1) == 1

                    tg.start_soon(patient)
                    await anyio.sleep(0.5)
                    go.set()
                    await inner_running.wait()
                    scope.cancel()
                    await anyio.sleep(1)
                    tg.start_soon(newcomer)

    run_virtual(main, backend)
    assert track.peak <= 1, track.order
    assert track.order == [
        "inner in",
        "inner out",
        "outer in",
        "outer out",
        "newcomer in",
        "newcomer out",
    ]
    slots_at_rest(slots)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_task_you_start_yourself_gets_no_lent_slot_a_fan_out_does(
    backend: str, engine1: Engine
) -> None:
    """What docs/sqlalchemy.md says: inside a block holding the only slot, a task the
    block starts itself (an anyio task group) and waits for needs a slot of its own, and
    waits for ever (here: until a timeout, which leaves the counts right); the same work
    through ``pk.gather(..., limit=pool_limiter(engine))`` runs on the block's slot. With
    a slot free, the own task simply takes it."""
    slots = pool_limiter(engine1)
    done: list[str] = []

    async def child(name: str, limiter: PoolLimiter | None = None) -> None:
        async with limiter or slots:
            await anyio.sleep(1)
            done.append(name)

    async def main() -> None:
        async with slots:
            with anyio.move_on_after(30) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(child, "own task")
            assert scope.cancelled_caught
            assert slots.statistics().waiting == 0
            await pk.gather(functools.partial(child, "fan-out"), limit=slots)
        slots_at_rest(slots)
        engine2 = create_engine("sqlite://", poolclass=QueuePool, pool_size=2)
        try:
            two = pool_limiter(engine2)
            async with two, anyio.create_task_group() as tg:
                tg.start_soon(child, "own task, a slot free", two)
            slots_at_rest(two)
        finally:
            engine2.dispose()

    run_virtual(main, backend)
    assert done == ["fan-out", "own task, a slot free"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_caller_whose_slot_is_given_back_mid_fan_out_leaves_it_to_the_worker_on_it(
    backend: str, engine: Engine
) -> None:
    """Pool of 2, one slot held elsewhere. A caller holding the other fans out on the
    engine's limiter and the worker on its lent slot ends the caller's transaction (one
    session shared with the worker: its commit gives the caller's slot back). That
    worker keeps the slot: a newcomer waits, the fan-out's other items wait for the
    engine instead of the lent slot, and all of them finish."""
    slots = pool_limiter(engine)
    active = peak = 0
    order: list[str] = []

    async def work(name: str, seconds: float) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        order.append(name)
        try:
            await anyio.sleep(seconds)
        finally:
            active -= 1

    async def main() -> None:
        with anyio.fail_after(100):
            async with anyio.create_task_group() as tg:

                async def other() -> None:
                    async with slots:
                        await work("other", 20)

                async def newcomer() -> None:
                    async with slots:
                        await work("newcomer", 1)

                tg.start_soon(other)
                await anyio.sleep(0.1)
                holder = await slots.acquire()  # the caller's transaction

                async def item(i: int) -> int:
                    if i == 0:
                        slots.release(holder)  # the shared session's commit, in the worker
                        tg.start_soon(newcomer)
                    await work(f"item {i}", 1)
                    return i

                items = [functools.partial(item, i) for i in range(4)]
                assert await pk.gather(*items, limit=slots) == [0, 1, 2, 3]
        slots_at_rest(slots)

    run_virtual(main, backend)
    assert peak <= 2, order
    assert sorted(order) == ["item 0", "item 1", "item 2", "item 3", "newcomer", "other"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # SQLAlchemy's asyncio extension
async def test_requests_cancelled_while_a_load_runs_on_one_of_their_sessions_slots(
    anyio_backend: str, small_pool: AsyncEngine
) -> None:
    """The same with real sessions (SQLite file, PostgreSQL): two requests' transactions
    hold both slots while they wait for a cached lookup, whose session runs on one of
    them; the clients go away (both requests cancelled) and the lookup goes on for a
    third caller. Two new requests then get one slot between them until it ends."""
    sessions = async_sessionmaker(small_pool, class_=LimitedAsyncSession)
    slots = pool_limiter(small_pool)
    cache = pk.SWRCache(fresh=30, stale=300)
    running, finish, done = anyio.Event(), anyio.Event(), anyio.Event()
    entered: list[str] = []

    async def one(session: AsyncSession, i: int) -> int:
        return int((await session.execute(text(f"SELECT {i}"))).scalar_one())

    @cache.cached
    async def lookup(key: int) -> int:
        async with sessions() as session:
            value = await one(session, key)
            running.set()
            await finish.wait()
            return value

    async def request(scope: anyio.CancelScope) -> None:
        with scope:
            async with sessions() as session:
                await one(session, 0)  # in a transaction: a slot held
                await lookup(1)

    async def newcomer(name: str) -> None:
        async with sessions() as session:
            await one(session, 2)
            entered.append(name)
            await done.wait()

    async def patient() -> None:
        assert await lookup(1) == 1

    async with cache:
        with anyio.fail_after(30):  # a failure-safe
            scopes = [anyio.CancelScope(), anyio.CancelScope()]
            async with anyio.create_task_group() as tg:
                async with anyio.create_task_group() as requests:
                    for scope in scopes:
                        requests.start_soon(request, scope)
                    while slots.statistics().running < 2:
                        await anyio.lowlevel.checkpoint()
                    tg.start_soon(patient)
                    await running.wait()
                    for scope in scopes:
                        scope.cancel()
                tg.start_soon(newcomer, "a")
                tg.start_soon(newcomer, "b")
                while len(entered) + slots.statistics().waiting < 2:
                    await anyio.sleep(0.01)
                assert len(entered) == 1, entered  # both got in before
                finish.set()
                while len(entered) < 2:
                    await anyio.sleep(0.01)
                done.set()
    stats = slots.statistics()
    assert (stats.running, stats.waiting) == (0, 0), slots
    assert (slots._held, slots._borrowed, slots._lending) == ({}, {}, {})


def test_a_loop_closed_while_a_caller_waited_for_its_turn_blocks_no_later_loop() -> None:
    """An event loop closed with a task still waiting for its turn (never cancelled: a
    loop run by hand, ``run_until_complete`` then ``close``) leaves no turn or place in
    line that the callers of a later loop wait behind."""
    limiter = pk.Limiter(rate=1)
    loop = asyncio.new_event_loop()
    try:

        async def first() -> None:
            await limiter.wait_rate()  # t=0
            waiting = [loop.create_task(limiter.wait_rate()) for _ in range(3)]
            await asyncio.sleep(0)
            assert not any(task.done() for task in waiting)
            for task in waiting:  # dropped with the loop, never resumed
                task._log_destroy_pending = False  # type: ignore[attr-defined]

        loop.run_until_complete(first())
    finally:
        loop.close()
    starts: list[float] = []

    async def main() -> None:
        for _ in range(3):
            await limiter.wait_rate()
            starts.append(anyio.current_time())

    for backend in BACKENDS:
        starts.clear()
        run_virtual(main, backend)
        assert starts == [0.0, 1.0, 2.0]
