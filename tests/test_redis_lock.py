"""RedisLock: one holder across processes, renewal, fencing, release by token."""

from __future__ import annotations

import math
import signal
import subprocess
from typing import Any

import anyio
import pytest
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError

from parallelkit.redis import LockLost, LockNotAcquired, RedisLock, RedisUnavailable, _lease

from .redis_helpers import (
    LostReply,
    Refused,
    bad_arguments,
    client,
    free_port,
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


async def test_acquire_release_and_increasing_fencing_tokens(r: aredis.Redis, prefix: str) -> None:
    lock = RedisLock(r, "job", ttl=5, prefix=prefix)
    assert lock.fencing_token is None
    assert not lock.held
    async with lock as held:
        assert held is lock
        assert lock.held
        assert await r.get(lock.key) is not None
        assert 0 < await r.pttl(lock.key) <= 5000
        first = lock.fencing_token
    assert not lock.held
    assert await r.exists(lock.key) == 0
    async with RedisLock(r, "job", ttl=5, prefix=prefix) as other:
        assert other.fencing_token is not None
        assert first is not None
        assert other.fencing_token > first


async def test_at_most_one_holder_among_tasks(r: aredis.Redis, prefix: str) -> None:
    holding = peak = entered = 0

    async def contender() -> None:
        nonlocal holding, peak, entered
        async with RedisLock(r, "one", ttl=2, poll=0.01, prefix=prefix):
            holding += 1
            entered += 1
            peak = max(peak, holding)
            await anyio.sleep(0.01)
            holding -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(contender)
    assert entered == 10
    assert peak == 1


async def test_blocking_false_skips_the_body_when_held_elsewhere(
    r: aredis.Redis, prefix: str
) -> None:
    ran = False
    async with RedisLock(r, "nightly", prefix=prefix):
        with pytest.raises(LockNotAcquired, match="held by another holder") as info:
            async with RedisLock(r, "nightly", blocking=False, prefix=prefix):
                ran = True
    assert not ran
    assert info.value.name == "nightly"
    async with RedisLock(r, "nightly", blocking=False, prefix=prefix) as lock:
        assert lock.held  # free now: acquired on the first attempt


async def test_timeout_gives_up_waiting(r: aredis.Redis, prefix: str) -> None:
    async with RedisLock(r, "slow", prefix=prefix) as holder:
        with pytest.raises(LockNotAcquired, match="within timeout") as info:
            async with RedisLock(r, "slow", timeout=0.2, poll=0.05, prefix=prefix):
                pytest.fail("must not run")
        assert info.value.name == "slow"
        assert holder.held


async def test_lock_is_renewed_while_held(r: aredis.Redis, prefix: str) -> None:
    async with RedisLock(r, "renewed", ttl=1.5, prefix=prefix) as lock:
        await renewals(r, lock.key, 4)  # > 1 ttl: only renewal keeps it
        assert await r.pttl(lock.key) > 0
        with pytest.raises(LockNotAcquired):
            async with RedisLock(r, "renewed", blocking=False, prefix=prefix):
                pass
        assert lock.held


async def test_a_waiter_gets_the_lock_when_it_is_released(r: aredis.Redis, prefix: str) -> None:
    order: list[str] = []

    async def second() -> None:
        async with RedisLock(r, "handoff", poll=0.02, prefix=prefix):
            order.append("second")

    async with anyio.create_task_group() as tg, RedisLock(r, "handoff", prefix=prefix):
        tg.start_soon(second)
        await anyio.sleep(0.1)
        order.append("first")
    assert order == ["first", "second"]


async def test_lost_lock_cancels_the_body_and_raises_lock_lost(
    r: aredis.Redis, prefix: str
) -> None:
    reached_end = False
    lock = RedisLock(r, "fragile", ttl=0.3, prefix=prefix)
    with pytest.raises(LockLost, match="lost") as info, anyio.fail_after(60):
        async with lock:
            await r.delete(lock.key)  # an operator (or an expiry) took it away
            await anyio.sleep_forever()  # the next renewal notices, and cancels this
            reached_end = True
    assert not reached_end
    assert info.value.fencing_token == lock.fencing_token
    assert not lock.held


async def test_body_error_passes_through_unchanged_and_releases(
    r: aredis.Redis, prefix: str
) -> None:
    lock = RedisLock(r, "err", prefix=prefix)
    boom = ValueError("boom")
    with pytest.raises(ValueError, match="boom") as info:
        async with lock:
            raise boom
    assert info.value is boom  # not wrapped in an ExceptionGroup
    assert await r.exists(lock.key) == 0


async def test_cancelled_holder_releases_at_once(r: aredis.Redis, prefix: str) -> None:
    lock = RedisLock(r, "cancel", ttl=30, prefix=prefix)
    with anyio.move_on_after(0.1) as scope:
        async with lock:
            await anyio.sleep(10)
    assert scope.cancelled_caught
    assert await r.exists(lock.key) == 0


async def test_an_acquire_cancelled_with_its_reply_on_the_way_gives_the_lock_back(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = RedisLock(r, "job", ttl=30, prefix=prefix)
    lost = LostReply(r, monkeypatch)

    async def acquire() -> None:
        async with lock:
            pytest.fail("the reply never came: not acquired")

    async with anyio.create_task_group() as tg:
        tg.start_soon(acquire)
        await lost.ran.wait()
        assert await r.exists(lock.key) == 1  # Redis gave it the lock
        tg.cancel_scope.cancel()
    assert await r.exists(lock.key) == 0  # not held for 30 s by nobody
    with anyio.fail_after(5):
        async with RedisLock(r, "job", ttl=30, blocking=False, prefix=prefix):
            pass


async def test_renewals_redis_refuses_lose_the_lock_at_its_ttl_with_the_error_as_cause(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = LeaseTime()  # the lease's deadlines on a virtual clock: no real waits
    monkeypatch.setattr(_lease, "anyio", clock)
    lock = RedisLock(r, "job", ttl=3, prefix=prefix)
    refused = Refused(r, monkeypatch, lock._scripts.renew.sha)
    with pytest.raises(LockLost) as info:
        async with lock:
            await anyio.sleep_forever()  # cancelled once the lock is lost
    assert refused.refused >= 2  # tried again until the ttl ran out, not raised at once
    assert clock.now == pytest.approx(3.0)  # lost when its ttl ended, not later
    assert type(info.value.__cause__).__name__ == "ReadOnlyError"


class LeaseTime:
    """``anyio`` as ``parallelkit.redis._lease`` sees it, on a clock that moves only when
    that module sleeps or a test moves it: the lease's deadlines without real waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def current_time(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += max(delay, 0.0)
        await anyio.lowlevel.checkpoint()

    def __getattr__(self, name: str) -> Any:
        return getattr(anyio, name)


async def test_a_lock_redis_cannot_renew_is_lost_when_its_ttl_ends_not_later(
    r: aredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = LeaseTime()
    monkeypatch.setattr(_lease, "anyio", clock)
    lock = RedisLock(r, "job", ttl=3, prefix=prefix)
    send = r.execute_command
    tries: list[float] = []

    async def partitioned(*args: Any, **options: Any) -> Any:
        if args[0] == "EVALSHA" and args[1] == lock._scripts.renew.sha:
            tries.append(clock.now)
            clock.now += 0.4  # each renewal fails after 0.4 s (a timeout, a partition)
            msg = "Connection reset by peer"
            raise RedisConnectionError(msg)
        return await send(*args, **options)

    monkeypatch.setattr(r, "execute_command", partitioned)
    with pytest.raises(LockLost) as info:
        async with lock:
            await anyio.sleep_forever()  # cancelled once the lock is lost
    # Redis drops the key at the latest 3 s after the acquire was sent (at 0): from
    # then on another process may hold the lock, so this body must be over by then
    assert clock.now == pytest.approx(3.0)
    assert tries == pytest.approx([1.0, 2.4])  # each try before the end; none after it
    assert isinstance(info.value.__cause__, RedisConnectionError)
    assert await r.get(lock.key) is not None  # (the test's partition: Redis still has it)


async def test_release_only_by_the_holder(r: aredis.Redis, prefix: str) -> None:
    lock = RedisLock(r, "mine", ttl=30, prefix=prefix)
    async with lock:
        await r.set(lock.key, "someone-else")  # our tenure ended; another took it
    assert await r.get(lock.key) == b"someone-else"


async def test_not_reentrant(r: aredis.Redis, prefix: str) -> None:
    lock = RedisLock(r, "re", prefix=prefix)
    async with lock:
        with pytest.raises(RuntimeError, match="not re-entrant"):
            async with lock:
                pass
    async with lock:  # sequential re-use is fine
        assert lock.held


async def test_redis_down_while_acquiring_raises_redis_unavailable() -> None:
    dead = client(f"redis://127.0.0.1:{free_port()}/0", retry=None)
    try:
        with pytest.raises(RedisUnavailable) as info:
            async with RedisLock(dead, "x"):
                pass
        assert info.value.__cause__ is not None
    finally:
        await dead.aclose()


BAD_ARGUMENTS = [
    ({"ttl": 0}, ValueError, r"^ttl must be > 0 \(seconds\), got 0$"),
    ({"ttl": 0.001}, ValueError, r"^ttl must be >= 0.01 \(seconds\), got 0.001$"),
    ({"ttl": "30"}, TypeError, r"^ttl must be a number \(seconds\), got '30'$"),
    ({"ttl": math.inf}, ValueError, r"^ttl must be finite"),
    ({"blocking": "no"}, TypeError, r"^blocking must be a bool \(True or False\), got 'no'$"),
    ({"blocking": 0}, TypeError, r"^blocking must be a bool"),
    ({"timeout": -1}, ValueError, r"^timeout must be > 0 \(seconds\), got -1$"),
    ({"timeout": math.nan}, ValueError, r"^timeout must be > 0"),
    ({"poll": 0}, ValueError, r"^poll must be > 0 \(seconds\), got 0$"),
    ({"poll": None}, TypeError, r"^poll must be a number \(seconds\), got None$"),
    ({"prefix": 1}, TypeError, r"^prefix must be a str, got 1$"),
    ({"command_timeout": -1}, ValueError, r"^command_timeout must be > 0"),
    ({"command_timeout": "1"}, TypeError, r"^command_timeout must be a number"),
    (
        {"blocking": False, "timeout": 5},
        ValueError,
        r"^timeout applies to blocking=True only, got blocking=False and timeout=5$",
    ),
]


@bad_arguments(BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument(
    redis_url: str, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        RedisLock(client(redis_url), "x", **kwargs)


def test_arguments_are_validated(redis_url: str) -> None:
    conn = client(redis_url)
    with pytest.raises(ValueError, match=r"^name must not be empty"):
        RedisLock(conn, "")
    with pytest.raises(TypeError, match=r"^name must be a str"):
        RedisLock(conn, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="redis"):
        RedisLock(object(), "x")  # type: ignore[arg-type]
    lock = RedisLock(conn, "scheduler", ttl=30)
    assert repr(lock) == (
        "RedisLock('scheduler', ttl=30.0, blocking=True, free, fencing_token=None)"
    )
    assert lock.name == "scheduler"
    assert lock.ttl == 30.0


# ------------------------------------------------------------------ processes
@pytest.mark.slow
async def test_sigkilled_holder_frees_the_lock_after_ttl(
    r: aredis.Redis, redis_url: str, prefix: str
) -> None:
    fences = f"{prefix}:fences"
    key = f"{prefix}:lock:{{leader}}"
    (holder,) = start_workers("lock", redis_url, prefix, 1, "--ttl", "2", "--hold")
    waiters: list[subprocess.Popen[str]] = []
    try:
        with anyio.fail_after(30):
            while await r.llen(fences) < 1:
                await anyio.sleep(0.02)
        waiters = start_workers("lock", redis_url, prefix, 1, "--ttl", "2")
        await renewals(r, key, 4)  # > 1 ttl while the live holder keeps renewing
        assert await r.llen(fences) == 1, "the waiter got the lock while the holder was alive"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        # nobody renews it now: Redis drops it within its ttl, and the waiter takes it
        assert await r.pttl(key) <= 2000
        with anyio.fail_after(30):
            while await r.llen(fences) < 2:
                await anyio.sleep(0.02)
        first, second = (int(f) for f in await r.lrange(fences, 0, -1))
        assert second > first  # the fencing token grew
        (result,) = wait_workers(waiters)
        assert result["fence"] == second
    finally:
        stop_workers([holder, *waiters])
