"""parallelkit.taskiq under more faults, on real ``taskiq worker`` processes and Redis.

Redis losing the messages of items in flight (a restart without its data, the
stream's key deleted) must not leave ``map`` waiting for results no worker will
ever produce: an item whose message is gone from the stream is sent again under
its task id. A message that is still there (queued, running, acknowledged, or
retried by the worker under the same task id) is never sent twice.

asyncio only, like the other Taskiq tests; each run on its own queue whose keys
are deleted afterwards, every worker process killed in teardown.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
import redis as redis_sync
import redis.exceptions
from redis.asyncio import Redis

import parallelkit.taskiq as pkt
from parallelkit.taskiq import _map

from .redis_helpers import RedisServer
from .taskiq_helpers.processes import Workers, drop_keys, new_queue
from .taskiq_helpers.tasks import Tasks, build
from .taskiq_helpers.tasks2 import Rejected, Tasks2
from .taskiq_helpers.tasks2 import build as build2
from .test_engine_docs import run_program
from .test_recipes_startup_faults import running_tasks
from .test_taskiq_faults import subscribed

GUARD = 60  # seconds: stops a hang, never reached by a passing test

pytest_plugins = ["tests.taskiq_helpers.fixtures", "tests.redis_helpers.fixtures"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Taskiq's client and redis-py are asyncio libraries


async def queued_behind_one(url: str, queue: str, count: int) -> None:
    """Wait until ``count`` messages are in the stream and the worker took one:
    the others wait in the stream, where only Redis holds them."""
    conn = Redis.from_url(url)
    try:
        while (await conn.xlen(queue)) < count or (await conn.xpending(queue, "parallelkit"))[
            "pending"
        ] < 1:
            await anyio.sleep(0.01)
    finally:
        await conn.aclose()


@pytest.fixture
async def one_worker(server: RedisServer, tmp_path: Path) -> AsyncIterator[Tasks]:
    """One worker running one task at a time on a private Redis (to restart)."""
    queue = new_queue()
    tasks = build(server.url, queue)
    await tasks.broker.startup()
    try:
        with Workers(server.url, queue, max_async_tasks=1, log_dir=tmp_path) as pool:
            pool.start("a")
            yield tasks
    finally:
        await tasks.broker.shutdown()


# ------------------------------------------------------------------ messages Redis lost
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_items_lost_by_a_redis_restart_are_sent_again(
    server: RedisServer, one_worker: Tasks
) -> None:
    """Redis restarts without its data while three items wait in the stream: their
    messages are gone, no worker will run them, and ``map`` waited for them until
    its ``timeout=`` (forever without one). Each item now finds its message gone
    and is sent again under its task id; every item comes back, nothing is left."""
    tasks = one_worker
    items = [0.3, 0.4, 0.5, 0.6]
    before = running_tasks()

    async def restart() -> None:
        await queued_behind_one(server.url, tasks.queue, len(items))
        await anyio.to_thread.run_sync(server.kill)
        await anyio.sleep(0.2)
        await anyio.to_thread.run_sync(server.start)

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(restart)
            values = await pkt.map(tasks.sleepy, items, limit=len(items))
    assert values == items
    assert running_tasks() == before
    assert subscribed(server.url, tasks.queue) == []


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_items_whose_stream_was_deleted_are_sent_again(
    redis_url: str, tmp_path: Path
) -> None:
    """The stream's key is deleted (by hand, a ``FLUSHDB``, an eviction) while items
    wait in it: the same, on the shared Redis, with ``imap``."""
    queue = new_queue()
    tasks = build(redis_url, queue)
    await tasks.broker.startup()
    items = [0.3, 0.4, 0.5, 0.6]
    try:
        with Workers(redis_url, queue, max_async_tasks=1, log_dir=tmp_path) as pool:
            pool.start("a")

            async def delete() -> None:
                await queued_behind_one(redis_url, queue, len(items))
                conn = Redis.from_url(redis_url)
                try:
                    await conn.delete(queue)
                finally:
                    await conn.aclose()

            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(delete)
                    async with pkt.imap(tasks.sleepy, items, limit=len(items)) as results:
                        values = sorted([value async for value in results])
            assert values == items
            assert subscribed(redis_url, queue) == []
    finally:
        await tasks.broker.shutdown()
        drop_keys(redis_url, queue)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_a_message_still_in_the_stream_is_never_sent_again(
    tasks: Tasks, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check that a message is still there, made on every poll: a message
    queued, running, acknowledged, or retried by the worker (a new message under
    the same task id, the first one acknowledged without a result) is not taken
    for lost: no message is sent again, no item runs twice."""
    monkeypatch.setattr(_map, "_CHECK_EVERY", 0.0)
    conn = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    try:
        with anyio.fail_after(GUARD):
            sent = conn.xlen(tasks.queue)
            doubled = await pkt.map(tasks.logged, range(40), limit=8)
            assert conn.xlen(tasks.queue) - sent == 40  # one message per item
            sent = conn.xlen(tasks.queue)
            attempts = await pkt.map(tasks.flaky, range(100, 110), limit=10)
            assert conn.xlen(tasks.queue) - sent == 30  # and two retries each
        assert doubled == [2 * x for x in range(40)]
        runs = [entry.split(":")[0] for entry in conn.lrange(f"{tasks.queue}:log", 0, -1)]
        assert sorted(runs, key=int) == [str(x) for x in range(40)]  # each exactly once
        assert attempts == [3] * 10
        counts = [int(conn.get(f"{tasks.queue}:flaky:{x}") or 0) for x in range(100, 110)]
        assert counts == [3] * 10  # two failed attempts and the good one, no more
    finally:
        conn.close()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_a_killed_workers_items_are_redelivered_not_sent_again(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL one of two workers mid-run, the check made on every poll: the dead
    worker's messages stay in the stream (pending), so ``map`` does not send them
    again; the other worker takes them over. Every item has its one result."""
    monkeypatch.setattr(_map, "_CHECK_EVERY", 0.0)
    queue = new_queue()
    tasks = build(redis_url, queue)
    await tasks.broker.startup()
    conn = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    try:
        with Workers(redis_url, queue, max_async_tasks=8, log_dir=tmp_path) as pool:
            pool.start("a", "b")
            halfway = anyio.Event()

            def progress(done: int, total: int | None) -> None:
                if done == 40:
                    halfway.set()

            held: list[object] = []

            async def kill_a() -> None:
                await halfway.wait()
                pool.kill("a")
                held.extend(conn.xpending_range(queue, "parallelkit", "-", "+", 100, "a"))

            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(kill_a)
                    results = await pkt.map(tasks.logged, range(120), limit=16, progress=progress)
            assert held, "worker a held no messages when it was killed"
            assert results == [2 * x for x in range(120)]
            assert conn.xlen(queue) == 120  # nothing sent twice
            runs = {int(entry.split(":")[0]) for entry in conn.lrange(f"{queue}:log", 0, -1)}
            assert runs == set(range(120))
    finally:
        conn.close()
        await tasks.broker.shutdown()
        drop_keys(redis_url, queue)


# ------------------------------------------------------------------ errors rebuilt
@pytest.fixture(scope="module")
def workers2(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    """One worker process with the tasks of ``tasks2``, shared by this module."""
    queue = new_queue()
    try:
        with Workers(
            redis_url,
            queue,
            module="tests.taskiq_helpers.worker2:broker",
            log_dir=tmp_path_factory.mktemp("taskiq2"),
        ) as pool:
            pool.start("w1")
            yield pool
    finally:
        drop_keys(redis_url, queue)


@pytest.fixture
async def tasks2(workers2: Workers) -> AsyncIterator[Tasks2]:
    handles = build2(workers2.url, workers2.queue)
    await handles.base.broker.startup()
    try:
        yield handles
    finally:
        await handles.base.broker.shutdown()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_a_type_whose_constructor_refused_its_args_stays_taskiqs_stand_in(
    tasks2: Tasks2,
) -> None:
    """``Rejected(5)`` has ``args == (5, "rejected")``, which its constructor refuses:
    Taskiq falls back to ``Exception("<class ...Rejected>((5, 'rejected'))")``. That
    message was passed to ``Rejected`` as its ``company_id``, a ``Rejected`` with a
    made-up ``company_id``. It stays the stand-in, as the docs say, the worker's
    traceback as its cause."""
    with anyio.fail_after(GUARD):
        [outcome] = await pkt.map(tasks2.reject, [5], settle=True)
    error = outcome.error
    assert type(error) is Exception
    assert not isinstance(error, Rejected)
    assert "Rejected" in str(error)
    assert "(5, 'rejected')" in str(error)
    assert isinstance(error.__cause__, pkt.RemoteTraceback)
    assert "Rejected: (5, 'rejected')" in error.__cause__.text


ONE_FILE = """
import asyncio, os, signal, subprocess, sys
from pathlib import Path

import parallelkit.taskiq as pkt

broker = pkt.redis_broker(os.environ["PK_URL"], queue=os.environ["PK_QUEUE"], result_ttl=60)


class CompanyDeleted(LookupError):
    pass


@broker.task(task_name="onefile.detect")
async def detect(x: int) -> int:
    if x == 2:
        raise CompanyDeleted(f"company {x} was deleted")
    return x


async def main() -> None:
    await broker.startup()
    here = Path(__file__).resolve()
    command = [sys.executable, "-m", "taskiq", "worker", f"{here.stem}:broker"]
    options = ["--app-dir", str(here.parent), "--workers", "1", "--log-level", "ERROR"]
    worker = subprocess.Popen([*command, *options], start_new_session=True)
    try:
        await pkt.map(detect, range(4), timeout=60)
    except CompanyDeleted as exc:
        print(f"caught: {exc}")
    except Exception as exc:
        print(f"not caught: {type(exc).__module__}.{type(exc).__qualname__}")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        await broker.shutdown()
    print(f"imported again: {here.stem in sys.modules}")


if __name__ == "__main__":
    asyncio.run(main())
"""


@pytest.mark.redis
@pytest.mark.slow
def test_an_exception_of_the_producers_own_script_is_its_own_type(
    redis_url: str, tmp_path: Path
) -> None:
    """One file holds the broker, the task, its exception and the producer (as the
    docs' ``detect.py``), run as ``python onefile.py``: the workers import it as
    ``onefile``, the producer runs it as ``__main__``. The exception was rebuilt by
    importing ``onefile`` in the producer, running the script's top level a second
    time, as a class ``except CompanyDeleted`` in ``main`` does not match. It is
    now rebuilt from ``__main__``, the script's own class."""
    queue = new_queue()
    script = tmp_path / "onefile.py"
    script.write_text(ONE_FILE)
    try:
        done = run_program(script, [], {"PK_URL": redis_url, "PK_QUEUE": queue})
        assert done.returncode == 0, done.stderr
        assert "caught: company 2 was deleted" in done.stdout, done.stdout
        assert "imported again: False" in done.stdout
    finally:
        drop_keys(redis_url, queue)


# ------------------------------------------------------------------ results stored as returned
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_floats_that_are_not_finite_come_back_as_returned(tasks2: Tasks2) -> None:
    """A task returned ``[1.0, inf, nan]``: pydantic's JSON dump of the result wrote
    ``null`` for both, so ``map`` gave ``[1.0, None, None]`` where ``pk.map`` gives
    the floats. They are stored as Python's ``json`` writes them now."""
    with anyio.fail_after(GUARD):
        [values] = await pkt.map(tasks2.measure, [1.0])
    one, inf, nan = values
    assert one == 1.0
    assert inf == math.inf
    assert isinstance(nan, float)
    assert math.isnan(nan)


# ------------------------------------------------------------------ a hung Redis
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_a_hung_redis_fails_the_items_with_socket_timeout_in_the_url(
    server: RedisServer, tmp_path: Path
) -> None:
    """Redis stops answering (SIGSTOP) while items wait, and the call has no
    ``timeout=``: with ``socket_timeout`` in the producer's URL, each read fails
    after it, is tried again as in an outage, then fails its item with redis-py's
    ``TimeoutError``; nothing is left running (as the docs' table says)."""
    queue = new_queue()
    tasks = build(f"{server.url}?socket_timeout=0.5", queue)
    await tasks.broker.startup()
    before = running_tasks()
    try:
        with Workers(server.url, queue, log_dir=tmp_path) as pool:
            pool.start("a")
            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:

                    async def pause() -> None:
                        await queued_behind_one(server.url, queue, 2)
                        server.pause()

                    tg.start_soon(pause)
                    outcomes = await pkt.map(tasks.sleepy, [3600.0, 3600.0], limit=2, settle=True)
            server.resume()
        for outcome in outcomes:
            assert isinstance(outcome.error, redis.exceptions.TimeoutError)
        assert running_tasks() == before
    finally:
        server.resume()
        await tasks.broker.shutdown()
