"""parallelkit.taskiq: results that will never come, on real ``taskiq worker`` processes.

An item waits for its result while its message is in the stream. Once the
consumer group has passed the message and nobody holds it (acknowledged, or
skipped by a group created after it), no worker of the group will run it again:
if no result is there then, none will come. Such an item is sent again once
under its task id (a worker's retry, a new message under the same task id, is
followed instead), then fails with a clear error. A result that is merely late
(queued, running) never makes an item run twice. Forgetting the producer's
``broker.startup()`` is one such case (the first worker's group skips what was
kicked before it). Workers trim from the stream what every group acknowledged once
it is older than ``result_ttl``, never a queued or pending message.

asyncio only, like the other Taskiq tests; on Redis database 14, each run on its
own queue whose keys are deleted afterwards, every worker process killed in
teardown.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_sync
from redis.asyncio import Redis

import parallelkit as pk
import parallelkit.taskiq as pkt
from parallelkit.taskiq import _map

from .taskiq_helpers.processes import Workers, drop_keys, new_queue
from .taskiq_helpers.tasks3 import Tasks3, build
from .test_recipes_startup_faults import running_tasks, subscribed

pytestmark = [pytest.mark.slow, pytest.mark.redis]

GUARD = 30  # seconds: stops a hang, never reached by a passing test
WORKER = "tests.taskiq_helpers.worker3:broker"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Taskiq's client and redis-py are asyncio libraries


@pytest.fixture(scope="module")
def redis_url(redis_url: str) -> str:
    """The suite's Redis, database 14 (this module's own)."""
    return f"{redis_url.rsplit('/', 1)[0]}/14"


@pytest.fixture
def queue(redis_url: str) -> Iterator[str]:
    name = new_queue()
    try:
        yield name
    finally:
        drop_keys(redis_url, name)


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis_sync.Redis]:
    conn = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
async def producer(redis_url: str, queue: str) -> AsyncIterator[Tasks3]:
    """Producer-side handles, broker started."""
    tasks = build(redis_url, queue)
    await tasks.base.broker.startup()
    try:
        yield tasks
    finally:
        await tasks.base.broker.shutdown()


@pytest.fixture
def worker(redis_url: str, queue: str, tmp_path: Path) -> Iterator[Workers]:
    """One worker process of ``worker3`` (its result backend loses some results)."""
    with Workers(redis_url, queue, module=WORKER, log_dir=tmp_path) as pool:
        pool.start("a")
        yield pool


def runs(conn: redis_sync.Redis, queue: str) -> list[int]:
    """The items the workers ran, one entry per run, sorted."""
    return sorted(int(entry.split(":")[0]) for entry in conn.lrange(f"{queue}:log", 0, -1))


# ------------------------------------------------------------------ results that never come
@pytest.mark.anyio
async def test_a_result_lost_after_the_ack_is_sent_again(
    producer: Tasks3, worker: Workers, sync_redis: redis_sync.Redis
) -> None:
    """The worker ran each item, its result was lost (evicted, deleted, expired
    before it was read), and it acknowledged the message, which stays in the
    stream. ``map`` saw the message there and waited until its ``timeout=``
    (forever without one). The item is now sent again once and completes."""
    before = running_tasks()
    with anyio.fail_after(GUARD):
        values = await pkt.map(producer.lose_first, range(5), limit=5)
    assert values == [3 * x for x in range(5)]
    assert runs(sync_redis, producer.base.queue) == sorted([*range(5), *range(5)])
    assert sync_redis.xlen(producer.base.queue) == 10  # each sent again once
    assert running_tasks() == before
    assert subscribed(worker.url, producer.base.queue) == []


@pytest.mark.anyio
async def test_a_task_no_worker_knows_fails_clearly(
    producer: Tasks3, worker: Workers, sync_redis: redis_sync.Redis
) -> None:
    """A task name no worker registered (a typo, an older worker): Taskiq's worker
    logs "not found" and acknowledges the message, no result is stored, and the
    item waited forever without ``timeout=``. It is sent again once, then fails
    with a ``ParallelkitError`` naming the task, in its own position; the next
    item is not affected."""
    with anyio.fail_after(GUARD):
        [outcome] = await pkt.map(producer.unknown, [7], settle=True)
        squares = await pkt.map(producer.base.square, [3])
    assert squares == [9]
    error = outcome.error
    assert isinstance(error, pk.ParallelkitError)
    assert "pk_tests3.nobody_knows_me" in str(error)
    assert "without a result" in str(error)
    assert sync_redis.xlen(producer.base.queue) == 3  # the unknown one twice, the square once


class Kicks:
    """Count the producer's kicks (first sends and sends again)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        kick = _map._Kick._kick

        async def counted(call: _map._Kick, item: Any, task_id: str | None = None) -> Any:
            self.count += 1
            return await kick(call, item, task_id)

        monkeypatch.setattr(_map._Kick, "_kick", counted)


@pytest.mark.anyio
async def test_a_late_result_is_never_sent_again(
    producer: Tasks3, redis_url: str, queue: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items queued behind one another on a worker running one task at a time, the
    check made on every poll, acknowledged messages trimmed at once: queued,
    taken, running, their results merely late, not one is sent again or run
    twice; nor are the worker's retries (a new message under the same task id, the
    old one acknowledged without a result, then trimmed)."""
    monkeypatch.setattr(_map, "_CHECK_EVERY", 0.0)
    kicks = Kicks(monkeypatch)
    conn = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    env = {"PK_TASKIQ_TRIM_AFTER": "1"}
    try:
        with Workers(
            redis_url, queue, module=WORKER, max_async_tasks=1, log_dir=tmp_path, extra_env=env
        ) as pool:
            pool.start("a")
            with anyio.fail_after(GUARD):
                values = await pkt.map(producer.base.logged, range(6), limit=6)
                attempts = await pkt.map(producer.base.flaky, range(100, 104), limit=4)
        assert values == [2 * x for x in range(6)]
        assert runs(conn, queue) == list(range(6))
        assert attempts == [3] * 4
        counts = [int(conn.get(f"{queue}:flaky:{x}") or 0) for x in range(100, 104)]
        assert counts == [3] * 4  # two failed attempts and the good one, no more
        assert kicks.count == 6 + 4  # nothing sent again
    finally:
        conn.close()


class AckOnReceipt(Workers):
    """Workers started with ``--ack-type when_received``."""

    def start(self, *names: str, timeout: float = 30.0, wait: bool = True) -> None:
        real = subprocess.Popen

        def popen(args: list[str], **options: Any) -> subprocess.Popen[bytes]:
            return real([*args, "--ack-type", "when_received"], **options)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(subprocess, "Popen", popen)
            super().start(*names, timeout=timeout, wait=False)
        if wait:
            self.wait_ready(names, timeout)


@pytest.mark.anyio
async def test_workers_that_ack_on_receipt_do_not_make_items_run_twice(
    producer: Tasks3, redis_url: str, queue: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers run with ``--ack-type when_received`` acknowledge a message before
    they run it: the group passed it with no result yet, though one will come.
    ``map`` asks for the acknowledgement after the result is saved (the task
    label ``ack_type``), so no item is sent again."""
    monkeypatch.setattr(_map, "_CHECK_EVERY", 0.0)
    kicks = Kicks(monkeypatch)
    conn = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    try:
        with AckOnReceipt(
            redis_url, queue, module=WORKER, max_async_tasks=1, log_dir=tmp_path
        ) as pool:
            pool.start("a")
            with anyio.fail_after(GUARD):
                values = await pkt.map(producer.base.logged, range(6), limit=6)
        assert values == [2 * x for x in range(6)]
        assert runs(conn, queue) == list(range(6))
        assert kicks.count == 6
    finally:
        conn.close()


# ------------------------------------------------------------------ trimming the stream
async def stream_ids(url: str, queue: str) -> list[str]:
    conn = Redis.from_url(url, decode_responses=True)
    try:
        return [str(entry_id) for entry_id, _ in await conn.xrange(queue)]
    finally:
        await conn.aclose()


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    while not await check():
        await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_acknowledged_messages_are_trimmed_never_queued_or_taken_ones(
    producer: Tasks3, redis_url: str, queue: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each message stayed in the stream for ever (about 300 bytes an item). A
    worker of ``redis_broker`` now trims what every consumer group acknowledged
    once it is older than ``result_ttl`` (1 ms here): the stream of a finished run
    empties, while a message a worker runs and those queued behind it stay, long
    past that age, and complete, each sent once."""
    kicks = Kicks(monkeypatch)
    env = {"PK_TASKIQ_TRIM_AFTER": "1"}
    conn = Redis.from_url(redis_url)
    try:
        with Workers(
            redis_url, queue, module=WORKER, max_async_tasks=1, log_dir=tmp_path, extra_env=env
        ) as pool:
            pool.start("a")
            with anyio.fail_after(GUARD):
                assert await pkt.map(producer.base.square, range(20)) == [x * x for x in range(20)]
                await until(lambda: _empty(redis_url, queue))  # all 20 trimmed

                async with anyio.create_task_group() as tg:
                    done: list[list[int]] = []

                    async def run() -> None:
                        done.append(await pkt.map(producer.gate, range(3), limit=3))

                    tg.start_soon(run)

                    async def one_taken() -> bool:
                        pending = (await conn.xpending(queue, "parallelkit"))["pending"]
                        return bool(await conn.xlen(queue) == 3 and pending == 1)

                    await until(one_taken)  # gate 0 runs, 1 and 2 are queued behind it
                    kept = await stream_ids(redis_url, queue)
                    await anyio.sleep(1.0)  # several trim passes (every poll, 0.2 s)
                    assert await stream_ids(redis_url, queue) == kept
                    for x in range(3):
                        await conn.rpush(f"{queue}:gate:{x}", 1)
                assert done == [[0, 1, 2]]
                await until(lambda: _empty(redis_url, queue))
        assert kicks.count == 20 + 3
    finally:
        await conn.aclose()


@pytest.mark.anyio
async def test_a_retried_message_trimmed_before_the_check_is_not_sent_again(
    producer: Tasks3, redis_url: str, queue: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt failed, the worker kicked the retry (a new message, same
    task id) and acknowledged the first message, which was trimmed before
    ``map`` looked: gone from the stream, no result yet. That is not a message
    Redis lost: ``map`` follows the retry instead of sending the item again."""
    monkeypatch.setattr(_map, "_CHECK_EVERY", 0.0)
    kicks = Kicks(monkeypatch)
    trimmed, checked = anyio.Event(), anyio.Event()
    check = _map._Kick._check

    async def check_once_trimmed(call: _map._Kick, *args: Any) -> Any:
        await trimmed.wait()
        try:
            return await check(call, *args)
        finally:
            checked.set()

    monkeypatch.setattr(_map._Kick, "_check", check_once_trimmed)
    env = {"PK_TASKIQ_TRIM_AFTER": "1"}
    conn = Redis.from_url(redis_url)
    try:
        with Workers(redis_url, queue, module=WORKER, log_dir=tmp_path, extra_env=env) as pool:
            pool.start("a")
            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    done: list[list[int]] = []

                    async def run() -> None:
                        done.append(await pkt.map(producer.retried_gate, [5]))

                    tg.start_soon(run)

                    async def retry_running_first_trimmed() -> bool:
                        attempts = int(await conn.get(f"{queue}:attempts:5") or 0)
                        pending = (await conn.xpending(queue, "parallelkit"))["pending"]
                        return attempts == 2 and await conn.xlen(queue) == 1 and pending == 1

                    await until(retry_running_first_trimmed)
                    trimmed.set()
                    await checked.wait()
                    await conn.rpush(f"{queue}:gate:5", 1)
        assert done == [[2]]
        assert kicks.count == 1
        assert int(await conn.get(f"{queue}:attempts:5") or 0) == 2
    finally:
        await conn.aclose()


async def _empty(url: str, queue: str) -> bool:
    return not await stream_ids(url, queue)


# ------------------------------------------------------------------ no broker.startup()
@pytest.mark.anyio
async def test_items_kicked_before_startup_and_before_any_worker_complete(
    redis_url: str, queue: str, tmp_path: Path, sync_redis: redis_sync.Redis
) -> None:
    """The producer forgot ``await broker.startup()`` and kicked before the first
    worker started: the worker created the consumer group at the stream's end
    ("$"), past the messages, which no worker then ran; ``map`` waited forever.
    The items are sent again once the group has passed them, each run once."""
    tasks = build(redis_url, queue)  # no startup
    try:
        with Workers(redis_url, queue, module=WORKER, log_dir=tmp_path) as pool:

            async def start_worker_once_kicked() -> None:
                while sync_redis.xlen(queue) < 4:
                    await anyio.sleep(0.01)
                await anyio.to_thread.run_sync(pool.start, "a")

            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(start_worker_once_kicked)
                    values = await pkt.map(tasks.base.logged, range(4), limit=4)
        assert values == [2 * x for x in range(4)]
        assert runs(sync_redis, queue) == list(range(4))  # each run once
    finally:
        await tasks.base.broker.shutdown()
