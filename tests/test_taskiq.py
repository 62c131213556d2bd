"""parallelkit.taskiq: distributed map over real Taskiq worker processes on a real Redis.

The workers are ``taskiq worker`` subprocesses on ``tests/taskiq_helpers``; every
test run uses its own stream (queue) name and deletes its keys afterwards; every
worker process is killed in teardown (see ``taskiq_helpers.processes.Workers``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_sync

import parallelkit as pk
import parallelkit.taskiq as pkt

from .taskiq_helpers.processes import Workers, drop_keys, new_queue
from .taskiq_helpers.tasks import RETRY, Tasks, build
from .test_engine_docs import run_program

DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "distributed.md"
GUARD = 60  # seconds: stops a hang, never reached by a passing test


pytest_plugins = ["tests.taskiq_helpers.fixtures"]


# Taskiq's producer side (kick, result backend) and redis-py are asyncio libraries:
# parallelkit.taskiq runs on asyncio only, so these tests do not run on trio.
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ------------------------------------------------------------------ no Redis needed
NAN, INF = float("nan"), float("inf")

#: (option, value, error, start of the message) for map and imap
BAD = [
    ("limit", 0, ValueError, "limit must be >= 1"),
    ("limit", 1.5, TypeError, "limit must be an int"),
    ("limit", True, TypeError, "limit must be an int"),
    ("limit", "2", TypeError, "limit must be an int"),
    ("timeout", 0, ValueError, "timeout must be > 0"),
    ("timeout", NAN, ValueError, "timeout must be > 0"),
    ("timeout", INF, ValueError, "timeout must be finite"),
    ("timeout", True, TypeError, "timeout must be a number"),
    ("timeout", "1", TypeError, "timeout must be a number"),
    ("rate", -1, ValueError, "rate must be > 0"),
    ("rate", 0, ValueError, "rate must be > 0"),
    ("rate", INF, ValueError, "rate must be finite"),
    ("rate", True, TypeError, "rate must be a number"),
    ("rate", "fast", TypeError, "rate must be a number"),
    ("settle", 1, TypeError, "settle must be a bool"),
    ("settle", "yes", TypeError, "settle must be a bool"),
    ("progress", 5, TypeError, "progress must be a callable"),
]
BAD_BROKER = [
    *[
        case
        for name in ("idle_timeout", "poll", "result_ttl")
        for case in (
            (name, 0, ValueError, f"{name} must be > 0"),
            (name, -1, ValueError, f"{name} must be > 0"),
            (name, NAN, ValueError, f"{name} must be > 0"),
            (name, INF, ValueError, f"{name} must be finite"),
            (name, True, TypeError, f"{name} must be a number"),
            (name, "1", TypeError, f"{name} must be a number"),
        )
    ],
    ("prefetch", 0, ValueError, "prefetch must be >= 1"),
    ("prefetch", 1.5, TypeError, "prefetch must be an int"),
    ("prefetch", True, TypeError, "prefetch must be an int"),
    ("retry", 3, TypeError, r"retry must be a parallelkit\.Retry"),
    ("queue", 5, TypeError, "queue must be a str"),
    ("queue", "", ValueError, "queue must not be empty"),
    ("group", None, TypeError, "group must be a str"),
    ("consumer", 5, TypeError, "consumer must be a str"),
    ("poll", 0.0001, ValueError, r"poll must be >= 0\.001"),
    ("result_ttl", 0.5, ValueError, r"result_ttl must be >= 1\.0"),
]


def option_ids(cases: list[tuple[Any, ...]]) -> list[str]:
    return [f"{case[0]}={case[1]!r}" for case in cases]


BAD_IDS = option_ids(BAD)


class TestArguments:
    """Bad arguments fail at the door, before anything is kicked."""

    tasks = build("redis://127.0.0.1:1/0", "never-used")  # building connects nothing

    @pytest.mark.anyio
    async def test_not_a_task(self) -> None:
        async def plain(x: int) -> int:
            return x

        with pytest.raises(TypeError, match="task must be a Taskiq task"):
            await pkt.map(plain, [1])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="task must be a Taskiq task"):
            pkt.imap(plain, [1])  # type: ignore[arg-type]

    @pytest.mark.anyio
    @pytest.mark.parametrize(("option", "value", "error", "message"), BAD, ids=BAD_IDS)
    async def test_bad_options(
        self, option: str, value: Any, error: type[Exception], message: str
    ) -> None:
        pulled: list[int] = []

        def items() -> Iterator[int]:
            pulled.append(1)
            yield 1

        with pytest.raises(error, match=f"^{message}"):
            await pkt.map(self.tasks.square, items(), **{option: value})
        if option != "progress":
            with pytest.raises(error, match=f"^{message}"):
                pkt.imap(self.tasks.square, items(), **{option: value})
        assert pulled == []  # refused at the door: nothing pulled, nothing kicked

    @pytest.mark.parametrize("ordered", [1, "yes", None])
    def test_imap_ordered_is_a_bool(self, ordered: Any) -> None:
        with pytest.raises(TypeError, match=r"^ordered must be a bool"):
            pkt.imap(self.tasks.square, [1], ordered=ordered)

    @pytest.mark.anyio
    async def test_bad_items(self) -> None:
        with pytest.raises(TypeError, match="items"):
            await pkt.map(self.tasks.square, 3)  # type: ignore[call-overload]

    @pytest.mark.parametrize(
        ("option", "value", "error", "message"), BAD_BROKER, ids=option_ids(BAD_BROKER)
    )
    def test_redis_broker_validation(
        self, option: str, value: Any, error: type[Exception], message: str
    ) -> None:
        with pytest.raises(error, match=f"^{message}"):
            pkt.redis_broker("redis://127.0.0.1:6379/0", **{option: value})

    @pytest.mark.parametrize("url", [None, 5, ""])
    def test_redis_broker_url_is_a_str(self, url: Any) -> None:
        with pytest.raises((TypeError, ValueError), match=r"^url must"):
            pkt.redis_broker(url)

    def test_redis_broker_configuration(self) -> None:
        broker = pkt.redis_broker(
            "redis://127.0.0.1:6379/0", queue="q", idle_timeout=2.5, poll=0.25, retry=RETRY
        )
        assert isinstance(broker, pkt.RedeliveringStreamBroker)
        assert (broker.queue_name, broker.idle_timeout, broker.block, broker.count) == (
            "q",
            2500,
            250,
            1,
        )
        kinds = [type(m).__name__ for m in broker.middlewares]
        assert kinds == ["TracebackMiddleware", "_RetryMiddleware"]
        assert broker.result_backend.prefix_str == "q:result"


class TestRetryMiddleware:
    """pk.Retry maps onto Taskiq's SmartRetryMiddleware, attempt for attempt."""

    def test_policy_mapping(self) -> None:
        middleware: Any = pkt.retry_middleware(
            pk.Retry(attempts=4, backoff=0.5, max_backoff=1.5, on=(KeyError,))
        )
        assert middleware.default_retry_count == 4  # attempts, the first one included
        assert middleware.default_retry_label is True  # every task retried by default
        assert list(middleware.types_of_exceptions) == [KeyError]
        delays = [middleware.make_delay(None, n) for n in (1, 2, 3, 4)]
        assert delays == [0.5, 1.0, 1.5, 1.5]  # doubling, capped at max_backoff
        assert "retry_middleware(Retry(" in repr(middleware)

    def test_jitter(self) -> None:
        middleware: Any = pkt.retry_middleware(pk.Retry(backoff=1.0, jitter=0.5))
        delays = {middleware.make_delay(None, 1) for _ in range(20)}
        assert all(1.0 <= d <= 1.5 for d in delays)
        assert len(delays) > 1

    @pytest.mark.anyio
    async def test_predicate(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from taskiq.middlewares import SmartRetryMiddleware

        seen: list[str] = []

        async def taskiq_retry(self: Any, message: Any, result: Any, exc: BaseException) -> None:
            seen.append(str(exc))

        monkeypatch.setattr(SmartRetryMiddleware, "on_error", taskiq_retry)
        middleware: Any = pkt.retry_middleware(pk.Retry(on=lambda e: "retry" in str(e)))
        assert middleware.types_of_exceptions is None
        await middleware.on_error(None, None, ValueError("please retry"))
        await middleware.on_error(None, None, ValueError("fatal"))
        assert seen == ["please retry"]  # the predicate decides before Taskiq does

    def test_needs_a_retry(self) -> None:
        with pytest.raises(TypeError, match=r"parallelkit\.Retry"):
            pkt.retry_middleware(3)  # type: ignore[arg-type]


def test_remote_traceback_text() -> None:
    tb = pkt.RemoteTraceback("Traceback...\nValueError: x\n", "id1", "t.name")
    assert tb.text.startswith("Traceback")
    assert "t.name [id1]" in str(tb)


def _failed(error: BaseException, **labels: str) -> Any:
    from taskiq.result import TaskiqResult

    return TaskiqResult(
        is_err=True, return_value=None, execution_time=0.0, error=error, labels=labels
    )


def test_worker_cancellation_is_not_raised_as_ours() -> None:
    """A CancelledError from a worker shutting down must not pass for our cancellation."""
    import asyncio

    from parallelkit.taskiq._map import _remote_error

    error = _remote_error(_failed(asyncio.CancelledError()), "id9", "t.name")
    assert type(error) is RuntimeError
    assert "t.name [id9] was interrupted in the worker" in str(error)


def test_error_without_traceback_middleware() -> None:
    from parallelkit.taskiq._map import _remote_error

    error = _remote_error(_failed(KeyError("k")), "id1", "t.name")
    assert type(error) is KeyError
    assert error.__cause__ is None
    if sys.version_info >= (3, 11):
        assert "add parallelkit.taskiq.TracebackMiddleware" in error.__notes__[0]


def recipe_block() -> str:
    """The detection recipe of docs/distributed.md: the page's block that defines it."""
    blocks = re.findall(r"^```python\n(.*?)^```", DOCS_PAGE.read_text(), re.M | re.S)
    [recipe] = [code for code in blocks if "crm.detect_and_enroll" in code]
    return str(recipe)


# ------------------------------------------------------------------ real workers
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
class TestOnWorkers:
    async def test_map_1000_items_exactly_once_in_order(self, tasks: Tasks) -> None:
        reports: list[tuple[int, int | None]] = []
        results = await pkt.map(
            tasks.square,
            range(1000),
            limit=48,
            progress=lambda done, total: reports.append((done, total)),
        )
        assert results == [x * x for x in range(1000)]
        assert [done for done, _ in reports] == list(range(1, 1001))
        assert reports[-1] == (1000, 1000)

    async def test_items_are_pulled_lazily(self, tasks: Tasks) -> None:
        done = 0
        ahead: list[int] = []

        def items() -> Iterator[int]:
            for x in range(120):
                ahead.append(x + 1 - done)  # pulled minus finished, at each pull
                yield x

        def progress(n: int, total: int | None) -> None:
            nonlocal done
            done = n

        results = await pkt.map(tasks.square, items(), limit=5, progress=progress)
        assert results == [x * x for x in range(120)]
        assert max(ahead) <= 5  # never more than `limit` kicked and not back

    async def test_fail_fast_original_type_and_worker_traceback(self, tasks: Tasks) -> None:
        pulled: list[int] = []

        def items() -> Iterator[int]:
            for x in range(1000):
                pulled.append(x)
                yield x

        with pytest.raises(ValueError, match="bad item 7") as caught:
            await pkt.map(tasks.fail_some, items(), limit=2)
        cause = caught.value.__cause__
        assert isinstance(cause, pkt.RemoteTraceback)
        assert "fail_some" in cause.text  # the worker's frames
        assert "raise ValueError(msg)" in cause.text
        assert cause.task_name == "pk_tests.fail_some"
        assert len(pulled) < 20  # kicking stopped at the failure
        if sys.version_info >= (3, 11):
            assert any("Taskiq task pk_tests.fail_some" in n for n in caught.value.__notes__)

    async def test_a_result_that_cannot_be_stored_fails_its_item(self, tasks: Tasks) -> None:
        """The worker cannot serialize the return value: the item fails with a
        TypeError saying so (it used to wait forever: no result was ever stored)."""
        with anyio.fail_after(GUARD):
            outcomes = await pkt.map(tasks.opaque, [1, 2], settle=True)
        for outcome in outcomes:
            assert isinstance(outcome.error, TypeError)
            assert "could not be stored" in str(outcome.error)
            assert "Opaque" in str(outcome.error)

    async def test_the_wait_for_rate_is_not_part_of_timeout(self, tasks: Tasks) -> None:
        """10 kicks at 2 per second take 4.5 s to send; each item's `timeout` (3 s)
        runs from its own kick, so none times out waiting for its turn."""
        with anyio.fail_after(GUARD):
            outcomes = await pkt.map(
                tasks.square, range(10), limit=10, rate=2, timeout=3, settle=True
            )
        assert [o.value for o in outcomes] == [x * x for x in range(10)]

    async def test_exception_type_rebuilt_when_not_yet_imported(self, tasks: Tasks) -> None:
        sys.modules.pop("tests.taskiq_helpers.errors", None)  # the producer never imported it
        with pytest.raises(LookupError) as caught:
            await pkt.map(tasks.fail_some, [13])
        error = caught.value
        assert type(error).__module__ == "tests.taskiq_helpers.errors"
        assert isinstance(error, sys.modules["tests.taskiq_helpers.errors"].CompanyNotFound)
        assert error.company_id == 13
        assert "raise CompanyNotFound(x)" in str(error.__cause__)

    async def test_settle_keeps_every_outcome(self, tasks: Tasks) -> None:
        outcomes = await pkt.map(tasks.fail_some, range(30), limit=8, settle=True)
        assert len(outcomes) == 30
        failed = {i: o.error for i, o in enumerate(outcomes) if not o.ok}
        assert sorted(failed) == [7, 13, 17, 27]
        assert type(failed[7]) is ValueError
        assert type(failed[13]).__name__ == "CompanyNotFound"
        assert all(isinstance(e.__cause__, pkt.RemoteTraceback) for e in failed.values())
        assert [o.value for i, o in enumerate(outcomes) if o.ok] == [
            i for i in range(30) if i not in failed
        ]

    async def test_timeout(self, tasks: Tasks) -> None:
        # the guard only stops a hang; its own TimeoutError would not match
        with anyio.fail_after(GUARD), pytest.raises(TimeoutError, match=r"timeout=0\.5s"):
            await pkt.map(tasks.sleepy, [0.0, 3600.0], timeout=0.5)

        # a timeout far above what the quick items need, however loaded the machine
        outcomes = await pkt.map(tasks.sleepy, [0.0, 3600.0, 0.0], timeout=5, settle=True)
        assert [o.ok for o in outcomes] == [True, False, True]
        assert isinstance(outcomes[1].error, TimeoutError)

    async def test_retry_runs_in_the_worker(self, tasks: Tasks) -> None:
        # `flaky` fails twice with ConnectionError; RETRY (attempts=3) is on the broker
        assert await pkt.map(tasks.flaky, range(6), limit=6) == [3] * 6

    async def test_imap_streams(self, tasks: Tasks) -> None:
        async with pkt.imap(tasks.square, range(200), limit=16, ordered=True) as results:
            ordered = [r async for r in results]
        assert ordered == [x * x for x in range(200)]
        async with pkt.imap(tasks.square, range(100), limit=16) as results:
            unordered = [r async for r in results]
        assert sorted(unordered) == [x * x for x in range(100)]

    async def test_imap_fail_fast_and_settle(self, tasks: Tasks) -> None:
        with pytest.raises(ValueError, match="bad item 7"):
            async with pkt.imap(tasks.fail_some, range(50), limit=4, ordered=True) as results:
                async for _ in results:
                    pass
        async with pkt.imap(tasks.fail_some, range(10), limit=4, settle=True) as results:
            outcomes = [o async for o in results]
        assert sorted(o.ok for o in outcomes) == [False] + [True] * 9

    async def test_rate_number_and_shared_limiter(
        self, tasks: Tasks, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        slots: list[float] = []  # the start each kick reserved, on the limiter's clock
        reserve = pk.Limiter.reserve

        def recording_reserve(self: pk.Limiter) -> float:
            delay = reserve(self)
            slots.append(anyio.current_time() + delay)
            assert self.rate == 20
            return delay

        monkeypatch.setattr(pk.Limiter, "reserve", recording_reserve)
        assert await pkt.map(tasks.square, range(8), limit=8, rate=20) == [x * x for x in range(8)]
        assert len(slots) == 8  # one reservation per kick
        # spaced by the rate (the tolerance covers reading the clock twice, not load)
        assert all(b - a >= 1 / 20 - 1e-3 for a, b in itertools.pairwise(slots)), slots

        calls = 0

        class Gate:
            async def wait_rate(self) -> None:
                nonlocal calls
                calls += 1

        assert await pkt.map(tasks.square, range(5), rate=Gate()) == [x * x for x in range(5)]
        assert calls == 5

    async def test_results_are_pushed_not_waited_for(
        self, tasks: Tasks, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With polling switched off (first poll after an hour), results still come
        back: each worker publishes its finished task ids to the call's channel."""
        from parallelkit.taskiq import _map

        monkeypatch.setattr(_map, "_POLL_FIRST", 3600.0)
        monkeypatch.setattr(_map, "_POLL_MAX", 3600.0)
        with anyio.fail_after(GUARD):
            assert await pkt.map(tasks.square, range(40), limit=8) == [x * x for x in range(40)]
            async with pkt.imap(tasks.square, range(20), limit=4, ordered=True) as results:
                assert [r async for r in results] == [x * x for x in range(20)]

    async def test_polling_covers_lost_notifications(
        self, tasks: Tasks, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Pub/Sub is at most once: with every notification lost, polling finishes."""
        from parallelkit.taskiq._completions import Completions

        async def deaf(self: Completions) -> None:
            return None

        monkeypatch.setattr(Completions, "_listen", deaf)
        with anyio.fail_after(GUARD):
            assert await pkt.map(tasks.square, range(30), limit=8) == [x * x for x in range(30)]

    async def test_rate_with_a_redis_limiter(self, tasks: Tasks, redis_url: str) -> None:
        from redis.asyncio import Redis

        from parallelkit.redis import RedisLimiter

        client = Redis.from_url(redis_url)
        entered = 0
        try:
            limiter = RedisLimiter(client, tasks.queue, rate=25, prefix=tasks.queue)
            enter = RedisLimiter.__aenter__

            async def counting_enter(self: RedisLimiter) -> RedisLimiter:
                nonlocal entered
                entered += 1
                return await enter(self)

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(RedisLimiter, "__aenter__", counting_enter)
                results = await pkt.map(tasks.square, range(6), limit=6, rate=limiter)
            assert results == [x * x for x in range(6)]
            assert entered == 6  # each kick took one start under the shared rate
            assert limiter.statistics().held == 0
        finally:
            await client.aclose()


# ------------------------------------------------------------------ worker deaths
def _pending_items(url: str, queue: str, consumer: str) -> set[int]:
    """The items whose messages ``consumer`` has taken and not acknowledged."""
    client = redis_sync.Redis.from_url(url)
    try:
        pending = client.xpending_range(queue, "parallelkit", "-", "+", 1000, consumer)
        items = set()
        for entry in pending:
            [(_, fields)] = client.xrange(queue, entry["message_id"], entry["message_id"])
            items.add(json.loads(fields[b"data"])["args"][0])
        return items
    finally:
        client.close()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_killed_worker_items_are_redelivered(redis_url: str, tmp_path: Path) -> None:
    """SIGKILL one of two workers mid-run: the other takes over its unacknowledged
    items, every item gets exactly one result, and only those items ran twice."""
    queue = new_queue()
    tasks = build(redis_url, queue)
    await tasks.broker.startup()
    halfway = anyio.Event()
    try:
        with Workers(redis_url, queue, max_async_tasks=8, log_dir=tmp_path) as pool:
            pool.start("a", "b")
            lost: set[int] = set()

            def progress(done: int, total: int | None) -> None:
                if done == 80:
                    halfway.set()

            async def kill_a() -> None:
                await halfway.wait()
                pool.kill("a")
                lost.update(_pending_items(redis_url, queue, "a"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_a)
                with anyio.fail_after(60):
                    results = await pkt.map(tasks.logged, range(300), limit=16, progress=progress)
            assert results == [2 * x for x in range(300)]
            assert lost, "worker a held no messages when it was killed"

            client = redis_sync.Redis.from_url(redis_url)
            try:
                # all acked, eventually: a result is saved before its message is acked,
                # so a message whose result a saved just before the kill is still
                # pending (map already has its result) until b reclaims it after
                # idle_timeout, runs it again and acks it
                with anyio.fail_after(30):
                    while client.xpending(queue, "parallelkit")["pending"]:
                        await anyio.sleep(0.05)
                log = [entry.decode().split(":") for entry in client.lrange(f"{queue}:log", 0, -1)]
            finally:
                client.close()
            runs = Counter(int(item) for item, _ in log)
            assert set(runs) == set(range(300))  # nothing lost
            by_a = {int(item) for item, worker in log if worker == "a"}
            by_b = {int(item) for item, worker in log if worker == "b"}
            assert lost <= by_b  # a's unacknowledged items were redelivered to b
            # at least once: only items a had taken can run twice (the ones it held when
            # killed, or, on a loaded machine, ones it sat on past idle_timeout)
            assert {item for item, n in runs.items() if n > 1} <= lost | by_a
    finally:
        await tasks.broker.shutdown()
        drop_keys(redis_url, queue)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_redelivery_when_the_stream_is_quiet(redis_url: str, tmp_path: Path) -> None:
    """The dead worker held the *last* items: no new message arrives to trigger
    taskiq-redis's reclaim; RedeliveringStreamBroker reclaims them anyway."""
    queue = new_queue()
    tasks = build(redis_url, queue)
    await tasks.broker.startup()
    try:
        with Workers(redis_url, queue, log_dir=tmp_path) as pool:
            pool.start("a")
            async with anyio.create_task_group() as tg:
                items = [1.0, 1.01, 1.02, 1.03]  # each shorter than idle_timeout (1.5 s)

                async def kill_a_then_start_b() -> None:
                    with anyio.fail_after(10):
                        while _pending_items(redis_url, queue, "a") != set(items):
                            await anyio.sleep(0.02)
                    pool.kill("a")
                    pool.start("b")

                tg.start_soon(kill_a_then_start_b)
                with anyio.fail_after(30):
                    results = await pkt.map(tasks.sleepy, items, limit=4)
            assert results == items
    finally:
        await tasks.broker.shutdown()
        drop_keys(redis_url, queue)


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_dead_workers_message_behind_many_live_ones_is_reclaimed(redis_url: str) -> None:
    """XAUTOCLAIM from the start of the pending list looks at only 10 x count entries
    per call: behind 11 messages live workers still run (not idle), a dead worker's
    message was never taken over. The broker finds idle messages wherever they are."""
    from redis.asyncio import Redis

    queue = new_queue()
    broker = pkt.redis_broker(redis_url, queue=queue, idle_timeout=60, poll=0.05)
    client = Redis.from_url(redis_url)
    await broker.startup()  # creates the stream's consumer group
    try:
        for i in range(11):
            await client.xadd(queue, {b"data": f"live {i}".encode()})
        await client.xreadgroup("parallelkit", "live", {queue: ">"}, count=11)
        dead = await client.xadd(queue, {b"data": b"dead"})
        await client.xreadgroup("parallelkit", "dead", {queue: ">"}, count=1)
        # its worker died two minutes ago: the message has been idle since
        await client.xclaim(queue, "parallelkit", "dead", 0, [dead], idle=120_000)
        with anyio.fail_after(10):
            async with contextlib.aclosing(broker.listen()) as messages:
                message = await anext(messages)
        assert message.data == b"dead"
        pending = await client.xpending_range(queue, "parallelkit", "-", "+", 100)
        owners = Counter(entry["consumer"].decode() for entry in pending)
        assert owners == {"live": 11, broker.consumer_name: 1}  # the live ones stay put
    finally:
        await broker.shutdown()
        await client.aclose()
        drop_keys(redis_url, queue)


# ------------------------------------------------------------------ the docs recipe
@pytest.mark.redis
@pytest.mark.slow
def test_docs_recipe_runs(redis_url: str, tmp_path: Path) -> None:
    """docs/distributed.md's recipe as pasted (``detect.py``), for 300 companies on the
    two worker processes it starts; every count checked, each contact enrolled once."""
    queue = new_queue()
    env = {"CRM_REDIS_URL": redis_url, "CRM_QUEUE": queue}
    script = tmp_path / "detect.py"
    script.write_text(recipe_block())
    try:
        done = run_program(script, ["300", "2"], env)
        assert done.returncode == 0, done.stderr
        expected = sum(c % 4 for c in range(300) if c != 42)
        assert f"299 companies done, {expected} contacts enrolled" in done.stdout
        assert "company 42 failed: LookupError('company 42 was deleted')" in done.stdout
        assert "300/300 companies" in done.stdout
        client = redis_sync.Redis.from_url(redis_url)
        try:
            enrolled = list(client.scan_iter(match=f"{queue}:enrolled:*", count=1000))
            retried = list(client.scan_iter(match=f"{queue}:attempts:*", count=1000))
        finally:
            client.close()
        assert len(enrolled) == expected  # each contact enrolled once
        assert len(retried) == len([c for c in range(300) if c % 97 == 13])  # flaky, retried
    finally:
        drop_keys(redis_url, queue)


@pytest.mark.redis
@pytest.mark.anyio
async def test_completions_keep_only_the_ids_of_items_in_flight(redis_url: str) -> None:
    """A publication for an id no item waits on any more (it read its result by
    polling first) is dropped: what is kept stays O(items in flight), not O(items)."""
    from redis.asyncio import Redis

    from parallelkit.taskiq._completions import Completions

    client = Redis.from_url(redis_url)
    try:
        async with Completions(client, f"pk-test-{uuid.uuid4().hex[:10]}") as done:
            done.expect("in-flight")
            for task_id in ("read-already-1", "read-already-2", "in-flight"):
                await client.publish(done.channel, task_id)
            with anyio.fail_after(GUARD):
                await done.wait("in-flight", GUARD)  # published: returns at once
                done.expect("late")
                await client.publish(done.channel, "late")
                while "late" not in done._early:  # in order after the two above
                    await anyio.sleep(0.01)
            assert done._early == {"late"}  # never the ids nobody expects
            done.forget("late")
            assert done._early == set()
    finally:
        await client.aclose()
