"""parallelkit.taskiq against ``pk.map``'s contract, as a user breaks it (round 7).

* ``rate=`` given a limiter that has no rate (``pk.Limiter(concurrency=2)``): it was
  taken as a rate gate that never waits, so it limited nothing; ``pk.map`` refuses
  it. Now a ``TypeError`` with ``pk.map``'s message, and a hint.
* ``retry`` wrong together with ``timeout`` or ``rate``: the error named ``retry``
  where ``pk.map`` names ``timeout`` (or ``rate``): ``retry`` was checked with the
  engine's options, before ``timeout`` and ``rate``.
* A worker's retry of an item whose caller has left (cancelled, failed fast, past its
  timeout) was still sent, and ran for nobody: the take-back of unstarted messages
  (round 6) only knew the item's own message, which a worker had taken. Now the
  take-back marks the item's retry key gone, which the worker's retry kick checks
  atomically, and takes back the retry already queued whose id that key holds.

asyncio only, like the other Taskiq tests (Taskiq's client and redis-py are asyncio
libraries); the worker tests run on their own queue whose keys are deleted
afterwards, every worker process killed in teardown.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_sync
from redis.asyncio import Redis
from taskiq.message import BrokerMessage

import parallelkit as pk
import parallelkit.taskiq as pkt
from parallelkit.redis import RedisLimiter

from .taskiq_helpers.failures import afailure, failure
from .taskiq_helpers.processes import Workers, drop_keys, new_queue
from .taskiq_helpers.tasks import build
from .taskiq_helpers.tasks7 import Tasks7, attempts_key, go_key
from .taskiq_helpers.tasks7 import build as build7

GUARD = 60  # seconds: stops a hang, never reached by a passing test
OFFLINE = build("redis://127.0.0.1:1/0", "never-used")  # building connects nothing


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Taskiq's client and redis-py are asyncio libraries


async def local(x: int) -> int:
    return x


# ------------------------------------------------------------------ a limiter without a rate
def _rateless() -> list[Any]:
    """Limiters that have no rate: a concurrency only, nothing at all, a shared one."""
    client = Redis.from_url("redis://127.0.0.1:1/0")  # (connects nothing)
    return [
        pk.Limiter(concurrency=2),
        pk.Limiter(),
        RedisLimiter(client, "never-used", concurrency=2),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("limiter", _rateless(), ids=["concurrency", "nothing", "redis"])
async def test_a_limiter_without_a_rate_is_refused_as_rate(limiter: Any) -> None:
    """It was taken and gated nothing (its ``wait_rate`` never waits; a shared one
    was entered and left at once), where ``pk.map`` refuses it: the same error."""
    kind, message = await afailure(lambda: pk.map(local, [1], rate=limiter))
    got, text = await afailure(lambda: pkt.map(OFFLINE.square, [1], rate=limiter))
    assert got is kind is TypeError
    assert text.startswith(message)
    assert "no rate" in text
    got, text = failure(lambda: pkt.imap(OFFLINE.square, [1], rate=limiter))
    assert got is TypeError
    assert text.startswith(message)


@pytest.mark.anyio
async def test_a_limiter_with_a_rate_is_still_taken() -> None:
    limiter = pk.Limiter(concurrency=2, rate=5)
    assert await pkt.map(OFFLINE.square, [], rate=limiter) == []
    async with pkt.imap(OFFLINE.square, [], rate=limiter) as results:
        assert [r async for r in results] == []


# ------------------------------------------------------------------ retry with other bad options
#: ``retry`` wrong along with an option ``pk.map`` checks before it (or after)
RETRY_BAD: list[tuple[Any, dict[str, Any]]] = [
    ([1], {"retry": 3, "timeout": 0}),
    ([1], {"retry": 3, "rate": 0}),
    ([1], {"retry": "x", "timeout": "1"}),
    ([1], {"retry": 3, "rate": "fast"}),
    ([1], {"retry": 3, "timeout": 0, "rate": 0}),
    ([1], {"retry": 3, "timeout": 0, "limit": 0}),
    (3, {"retry": 3, "timeout": 0}),
    ([1], {"retry": 3, "settle": 1, "rate": -1}),
    ([1], {"retry": 3}),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("items", "options"), RETRY_BAD, ids=repr)
async def test_a_bad_retry_with_other_bad_options_fails_as_in_pk_map(
    items: Any, options: dict[str, Any]
) -> None:
    """``map(task, [1], retry=3, timeout=0)`` named ``retry``; ``pk.map`` names
    ``timeout``."""
    expected = await afailure(lambda: pk.map(local, items, **options))
    assert await afailure(lambda: pkt.map(OFFLINE.square, items, **options)) == expected


@pytest.mark.parametrize(("items", "options"), RETRY_BAD, ids=repr)
def test_a_bad_retry_with_other_bad_options_fails_as_in_pk_imap(
    items: Any, options: dict[str, Any]
) -> None:
    expected = failure(lambda: pk.imap(local, items, **options))
    assert failure(lambda: pkt.imap(OFFLINE.square, items, **options)) == expected


# ------------------------------------------------------------------ a worker's retry, caller gone
def _stream(url: str, queue: str) -> list[Any]:
    conn = redis_sync.Redis.from_url(url)
    try:
        entries: Any = conn.xrange(queue)
        return list(entries)
    finally:
        conn.close()


def _taken(url: str, queue: str) -> int:
    """How many messages of ``queue`` a worker holds (taken, not acknowledged)."""
    conn = redis_sync.Redis.from_url(url)
    try:
        return int(conn.xpending(queue, "parallelkit")["pending"])
    finally:
        conn.close()


@pytest.fixture
async def held(redis_url: str, tmp_path: Path) -> AsyncIterator[Tasks7]:
    """One worker process with the tasks of ``tasks7``, on a queue of its own."""
    queue = new_queue()
    tasks7 = build7(redis_url, queue)
    await tasks7.base.broker.startup()
    try:
        with Workers(
            redis_url, queue, module="tests.taskiq_helpers.worker7:broker", log_dir=tmp_path
        ) as pool:
            pool.start("w7")
            yield tasks7
    finally:
        await tasks7.base.broker.shutdown()
        drop_keys(redis_url, queue)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_a_worker_does_not_retry_an_item_whose_caller_has_left(
    held: Tasks7, redis_url: str
) -> None:
    """The caller is cancelled while the worker runs the item's first attempt; the
    attempt then fails with an error the workers retry. The worker sent the retry
    anyway (a new message, same task id), and ran it for nobody, twice more."""
    queue = held.base.queue
    client = redis_sync.Redis.from_url(redis_url)
    try:
        with anyio.fail_after(GUARD):
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def cancel_once_running() -> None:
                        while not client.get(attempts_key(queue, 1)):
                            await anyio.sleep(0.01)
                        scope.cancel()

                    tg.start_soon(cancel_once_running)
                    await pkt.map(held.held, [1])
            assert scope.cancelled_caught
            client.set(go_key(queue, 1), 1)  # the attempt fails now, the caller gone
            while _taken(redis_url, queue):  # acknowledged after the retry is sent, if it is
                await anyio.sleep(0.01)
        assert len(_stream(redis_url, queue)) == 1  # the first message only: no retry
        assert int(client.get(attempts_key(queue, 1)) or 0) == 1
    finally:
        client.close()


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_retry_queued_before_the_caller_left_is_taken_back(redis_url: str) -> None:
    """A worker's retry already in the stream, not taken yet, when the item ends
    without its result: the take-back looked only at the item's own message (taken
    by the worker, so left) and the retry ran later. It is taken back now, and a
    retry the worker sends afterwards is not sent at all."""
    queue = new_queue()
    tasks = build(redis_url, queue)
    broker = tasks.broker
    await broker.startup()
    try:
        with anyio.fail_after(GUARD):
            client = broker._client()
            task_id = uuid.uuid4().hex

            def message(retries: int | None) -> BrokerMessage:
                labels = {} if retries is None else {"_retries": retries}
                data = f'{{"task_id": "{task_id}", "labels": {labels}}}'.encode()
                return BrokerMessage(
                    task_id=task_id, task_name="pk_tests.square", message=data, labels=labels
                )

            await broker.kick(message(None))  # the producer's kick
            [(first, _)] = await client.xrange(queue)
            await client.xreadgroup("parallelkit", "w", {queue: ">"}, count=1)  # taken
            await broker.kick(message(1))  # the worker's retry, queued
            assert len(await client.xrange(queue)) == 2

            assert await broker._pk_recall(queue, first, task_id)  # the item ends
            assert [entry_id for entry_id, _ in await client.xrange(queue)] == [first]
            await broker.kick(message(2))  # a later retry of the attempt still running
            assert [entry_id for entry_id, _ in await client.xrange(queue)] == [first]
            await broker.kick(message(None))  # (a producer's kick is never held back)
            assert len(await client.xrange(queue)) == 2
    finally:
        await broker.shutdown()
        drop_keys(redis_url, queue)


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_message_taken_back_whole_leaves_no_retry_key(redis_url: str) -> None:
    """An item whose message no worker had taken is taken back, and nothing is left
    behind: no attempt ran, so no retry can come."""
    queue = new_queue()
    tasks = build(redis_url, queue)
    broker = tasks.broker
    await broker.startup()
    try:
        with anyio.fail_after(GUARD):
            client = broker._client()
            handle = await tasks.square.kicker().kiq(3)
            [(first, _)] = await client.xrange(queue)
            assert await broker._pk_recall(queue, first, handle.task_id)
            assert await client.xrange(queue) == []
            assert [k async for k in client.scan_iter(match=f"{queue}:retry:*")] == []
    finally:
        await broker.shutdown()
        drop_keys(redis_url, queue)


@pytest.mark.redis
@pytest.mark.anyio
@pytest.mark.parametrize("refused", [False, True], ids=["script", "scripts-refused"])
async def test_a_retry_is_sent_within_the_streams_maxlen(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, refused: bool
) -> None:
    """A retry kick is capped at the stream's ``maxlen`` as any kick; where Redis
    refuses the script (an ACL, a proxy: here a script Redis fails), the retry is
    appended unchecked, as before, not lost."""
    from parallelkit.taskiq import _stream

    if refused:
        monkeypatch.setattr(_stream, "KICK_RETRY", "return redis.call('NO_SUCH_COMMAND')")
    queue = new_queue()
    broker = build(redis_url, queue).broker
    broker.maxlen, broker.approximate = 2, False
    try:
        with anyio.fail_after(GUARD):
            for retries in (1, 2, 3):
                task_id = uuid.uuid4().hex
                data = f'{{"task_id": "{task_id}"}}'.encode()
                labels = {"_retries": retries}
                await broker.kick(BrokerMessage(task_id=task_id, task_name="t", message=data,
                                                labels=labels))  # fmt: skip
            assert await broker._client().xlen(queue) == 2
    finally:
        await broker.shutdown()
        drop_keys(redis_url, queue)


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_kick_cut_short_is_taken_back_by_its_task_id(redis_url: str) -> None:
    """The item's message id never came back (its kick cut short): its message is
    found by its task id; taken by a worker, it is left, and its retries are not sent."""
    queue = new_queue()
    tasks = build(redis_url, queue)
    broker = tasks.broker
    await broker.startup()
    try:
        with anyio.fail_after(GUARD):
            client = broker._client()
            queued = await tasks.square.kicker().kiq(4)
            taken = await tasks.square.kicker().kiq(5)
            [_, (second, _)] = await client.xrange(queue)
            assert await broker._pk_recall(queue, None, queued.task_id)
            assert [entry_id for entry_id, _ in await client.xrange(queue)] == [second]
            await client.xreadgroup("parallelkit", "w", {queue: ">"}, count=1)  # taken
            assert not await broker._pk_recall(queue, None, taken.task_id)
            data = f'{{"task_id": "{taken.task_id}"}}'.encode()
            retry = BrokerMessage(
                task_id=taken.task_id, task_name="t", message=data, labels={"_retries": 1}
            )
            await broker.kick(retry)
            assert [entry_id for entry_id, _ in await client.xrange(queue)] == [second]
    finally:
        await broker.shutdown()
        drop_keys(redis_url, queue)
