"""RedisLimiter and RedisLock under faults: refused writes, blips, outages, bad input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError

from parallelkit.redis import RedisLimiter, RedisLock

from .redis_helpers import bad_arguments, client, eventually

pytest_plugins = ["tests.redis_helpers.fixtures"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    # redis-py's asyncio client is built on asyncio streams and locks: asyncio only
    return "asyncio"


class Faults:
    """Makes the client's commands fail while a rule says so.

    ``rule(args)`` returns ``None`` (send it), ``"refuse"`` (Redis answers
    ``READONLY``, as a primary demoted by a failover does), ``"reset"`` (the
    connection is reset before the command is sent) or ``"lost"`` (Redis runs the
    command, then the connection is reset before its reply arrives).
    """

    def __init__(self, r: aredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rule: Callable[[tuple[Any, ...]], str | None] = lambda args: None
        self.hits = 0
        send = r.execute_command

        async def faulty(*args: Any, **options: Any) -> Any:
            what = self.rule(args)
            if what is None:
                return await send(*args, **options)
            self.hits += 1
            if what == "refuse":
                msg = "You can't write against a read only replica."
                raise ReadOnlyError(msg)
            if what == "lost":
                await send(*args, **options)
            msg = "Connection reset by peer"
            raise RedisConnectionError(msg)

        monkeypatch.setattr(r, "execute_command", faulty)

    def on(self, what: str, sha: str | None = None, command: str = "EVALSHA") -> None:
        """From now on, ``what`` happens to ``command`` (to the script ``sha`` only)."""

        def rule(args: tuple[Any, ...]) -> str | None:
            hit = args[0] == command and (sha is None or args[1] == sha)
            return what if hit else None

        self.rule = rule

    def off(self) -> None:
        self.rule = lambda args: None


# ------------------------------------------------------------- refused give-backs
async def test_a_release_redis_refuses_does_not_replace_the_body_error(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = RedisLock(r, "job", ttl=30, prefix=prefix)
    faults = Faults(r, monkeypatch)
    boom = KeyError("the body's own error")
    with pytest.raises(KeyError) as info:
        async with lock:
            # a failover demotes the primary: the release is refused (READONLY)
            faults.on("refuse", lock._scripts.release.sha)
            raise boom
    assert info.value is boom  # not the ReadOnlyError of the release
    assert faults.hits == 1
    assert 0 < await r.pttl(lock.key) <= 30_000  # it expires on its own


async def test_a_release_redis_refuses_after_a_successful_body_is_not_raised(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lock = RedisLock(r, "job", ttl=30, prefix=prefix)
    faults = Faults(r, monkeypatch)
    async with lock:
        faults.on("refuse", lock._scripts.release.sha)
    assert faults.hits == 1
    assert "ReadOnlyError" in caplog.text  # logged, as a refused renewal is


async def test_a_slot_release_redis_refuses_does_not_replace_the_body_error(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RedisLimiter(r, "api", concurrency=1, prefix=prefix)
    faults = Faults(r, monkeypatch)
    boom = KeyError("the body's own error")
    with pytest.raises(KeyError) as info:
        async with limiter:
            faults.on("refuse", command="ZREM")
            raise boom
    assert info.value is boom
    assert faults.hits == 1
    assert limiter.statistics().held == 0


async def test_a_rate_waiter_cancelled_while_redis_refuses_writes_is_just_cancelled(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RedisLimiter(r, "api", rate=0.01, prefix=prefix)  # a start every 100 s
    faults = Faults(r, monkeypatch)
    async with limiter:  # takes the first start: the next waits 100 s
        pass
    waiting = anyio.Event()
    reserve = RedisLimiter._reserve

    async def reserved(self: RedisLimiter) -> Any:
        turn = await reserve(self)
        waiting.set()
        return turn

    monkeypatch.setattr(RedisLimiter, "_reserve", reserved)

    async def waiter() -> None:
        async with limiter:
            pytest.fail("its start is 100 s away")

    with anyio.fail_after(10):  # a hang guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await waiting.wait()
            # giving the start back is refused (READONLY): the waiter is still just
            # cancelled, not failed with the ReadOnlyError (its task group would raise it)
            faults.on("refuse", limiter._unreserve_script.sha)
            tg.cancel_scope.cancel()
    assert faults.hits == 1


# --------------------------------------------------- a blip while taking a slot
async def test_a_slot_taken_before_the_rate_reservation_failed_is_given_back(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RedisLimiter(r, "api", concurrency=1, rate=100, lease=30, prefix=prefix)
    holders = f"{prefix}:limiter:{{api}}:holders"
    faults = Faults(r, monkeypatch)
    # one reset connection as the start is reserved: the slot was taken already
    faults.on("reset", limiter._reserve_script.sha)
    async with limiter:  # served by the fallback (fail="local")
        faults.off()
        assert limiter.statistics().fallbacks == 1
    assert faults.hits == 1
    # the slot Redis gave is back: not held by nobody for the 30 s lease
    assert await r.zcard(holders) == 0


async def test_a_slot_whose_reply_was_lost_in_a_blip_is_given_back(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RedisLimiter(r, "api", concurrency=1, lease=30, prefix=prefix)
    holders = f"{prefix}:limiter:{{api}}:holders"
    faults = Faults(r, monkeypatch)
    # Redis runs the acquire, the connection is reset before its reply arrives
    faults.on("lost", limiter._acquire_script.sha)
    async with limiter:  # served by the fallback (fail="local")
        faults.off()
        assert limiter.statistics().fallbacks == 1
    assert faults.hits == 1
    assert await r.zcard(holders) == 0  # every process can take the slot again


async def test_a_start_whose_reply_was_lost_in_a_blip_is_given_back(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RedisLimiter(r, "api", rate=0.01, prefix=prefix)  # a start every 100 s
    rate_key = f"{prefix}:limiter:{{api}}:rate"
    async with limiter:  # the first start
        pass
    one_start = await r.get(rate_key)
    faults = Faults(r, monkeypatch)
    faults.on("lost", limiter._reserve_script.sha)
    async with limiter:  # served by the fallback; Redis reserved it the next start
        faults.off()
    assert faults.hits == 1
    # given back: the next caller of any process waits 100 s, not 200 s
    assert await r.get(rate_key) == one_start


async def test_while_the_circuit_is_open_nothing_is_sent_to_give_back(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RedisLimiter(r, "api", concurrency=1, rate=100, retry_after=60, prefix=prefix)
    faults = Faults(r, monkeypatch)
    faults.rule = lambda args: "reset"  # Redis goes away
    async with limiter:  # the acquire is sent (and what it may have taken given back)
        pass
    sent = faults.hits
    assert sent == 2
    for _ in range(3):  # the circuit is open: served at once, no command (to give back)
        async with limiter:
            pass
    assert faults.hits == sent
    assert limiter.statistics().fallbacks == 4


# ----------------------------------------------------------- fail="local" bound
async def test_fail_local_keeps_the_bound_in_a_process_with_slots_held_in_redis(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RedisLimiter(r, "api", concurrency=2, retry_after=60, prefix=prefix)
    faults = Faults(r, monkeypatch)
    running = peak = 0
    done = anyio.Event()

    async def work() -> None:
        nonlocal running, peak
        async with limiter:
            running += 1
            peak = max(peak, running)
            await done.wait()
            running -= 1

    with anyio.fail_after(30):  # a hang guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(work)
            tg.start_soon(work)
            await eventually(lambda: running == 2, "two holders with slots in Redis")
            faults.rule = lambda args: "reset"  # Redis goes away: every command fails
            tg.start_soon(work)
            tg.start_soon(work)
            # the newcomers fall back to the in-process limiter: they wait for the
            # two holders of this process, as "each process keeps its own bound"
            await eventually(lambda: limiter.statistics().waiting == 2 or peak > 2, "two waiters")
            assert peak == 2
            done.set()
    assert peak == 2
    assert limiter.statistics().fallbacks == 2
    assert limiter.statistics().held == 0


async def test_waiters_beyond_the_process_bound_wait_in_the_process_not_on_redis(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a process never holds more than ``concurrency``: its waiters beyond that queue in
    # the process (first come, first served) instead of polling Redis every ``poll``
    limiter = RedisLimiter(r, "queue", concurrency=1, poll=0.001, prefix=prefix)
    send = r.execute_command
    scripts = 0

    async def counting(*args: Any, **options: Any) -> Any:
        nonlocal scripts
        if args[0] == "EVALSHA":
            scripts += 1
        return await send(*args, **options)

    monkeypatch.setattr(r, "execute_command", counting)
    order: list[int] = []
    go = anyio.Event()

    async def work(i: int) -> None:
        async with limiter:
            order.append(i)
            if i == 0:
                await go.wait()

    with anyio.fail_after(30):  # a hang guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(work, 0)
            await eventually(lambda: order == [0], "the first holder")
            for i in (1, 2, 3):
                tg.start_soon(work, i)
                await eventually(lambda n=i: limiter.statistics().waiting == n, f"waiter {i}")
            before = scripts
            for _ in range(20):  # many poll intervals of the old waiters
                await anyio.sleep(0.005)
            assert scripts == before
            go.set()
    assert order == [0, 1, 2, 3]
    assert limiter.statistics().held == 0


async def test_fail_open_is_not_bound_by_the_slots_held_in_redis(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RedisLimiter(r, "api", concurrency=1, retry_after=60, fail="open", prefix=prefix)
    faults = Faults(r, monkeypatch)
    with anyio.fail_after(30):  # a hang guard
        async with limiter:
            faults.rule = lambda args: "reset"  # Redis goes away
            async with limiter:  # not limited at all
                assert limiter.statistics().held == 2
    assert limiter.statistics().held == 0


# ------------------------------------------------------------------- bad input
BAD_LOCK = [
    ({"ttl": 1e300}, ValueError, r"^ttl must be <= 1e\+09 \(seconds\), got 1e\+300$"),
    ({"ttl": 10**400}, ValueError, r"^ttl must be finite"),
]
BAD_LIMITER = [
    ({"lease": 1e300}, ValueError, r"^lease must be <= 1e\+09 \(seconds\), got 1e\+300$"),
    ({"lease": 2e9}, ValueError, r"^lease must be <= 1e\+09 \(seconds\), got 2000000000.0$"),
]


@bad_arguments(BAD_LOCK)
def test_a_lock_ttl_redis_cannot_store_is_refused_up_front(
    redis_url: str, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        RedisLock(client(redis_url), "x", **kwargs)


@bad_arguments(BAD_LIMITER)
def test_a_lease_redis_cannot_store_is_refused_up_front(
    redis_url: str, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        RedisLimiter(client(redis_url), "x", concurrency=1, **kwargs)


async def test_the_longest_ttl_and_lease_work(r: aredis.Redis, prefix: str) -> None:
    async with RedisLock(r, "job", ttl=1e9, prefix=prefix) as lock:
        assert await r.pttl(lock.key) > 10**11
    async with RedisLimiter(r, "api", concurrency=1, lease=1e9, prefix=prefix):
        assert await r.pttl(f"{prefix}:limiter:{{api}}:holders") > 10**11
