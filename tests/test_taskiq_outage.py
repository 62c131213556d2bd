"""parallelkit.taskiq's producer while Redis is away for a moment, on virtual time.

A result read or a kick that Redis fails is tried again after 50 ms, 100 ms, ...
1.6 s (3.15 s in all, the waits of the worker's result write), then fails with
redis-py's own error; the call's ``timeout=`` still bounds the whole wait and a
cancellation ends it at once. Redis is a scripted stand-in here (the broker's and
the result backend's client), so every time is exact: the loop's clock jumps
(``tests/virtual_time.py``). The same on a real ``redis-server`` that is killed
and restarted: ``tests/test_recipes_startup_faults.py``.

asyncio only, like the other Taskiq tests (Taskiq's client and redis-py are
asyncio libraries).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import pytest
import redis.exceptions
from taskiq.exceptions import SendTaskError
from taskiq.result import TaskiqResult

import parallelkit.taskiq as pkt
from parallelkit.taskiq import _map
from parallelkit.taskiq._outage import WAITS

from .virtual_time import run_virtual

T = TypeVar("T")
ALL_WAITS = sum(WAITS)  # 3.15 s


class Flaky:
    """The Redis client of the broker and the result backend: ``XADD`` and ``GET``
    fail (each with a new error naming its try) until their ``fail_*`` tries are used."""

    def __init__(
        self,
        backend: Any,
        *,
        fail_xadd: int = 0,
        fail_get: int = 0,
        error: type[Exception] = redis.exceptions.ConnectionError,
    ) -> None:
        self.backend = backend
        self.fail_xadd, self.fail_get, self.error = fail_xadd, fail_get, error
        self.items: dict[str, int] = {}
        self.xadds = 0
        self.gets = 0
        self.errors: list[Exception] = []

    def _fail(self, what: str, tries: int) -> None:
        error = self.error(f"{what} try {tries}: Redis is down (injected)")
        self.errors.append(error)
        raise error

    async def xadd(self, name: str, fields: dict[bytes, bytes], **options: Any) -> bytes:
        self.xadds += 1
        if self.xadds <= self.fail_xadd:
            self._fail("XADD", self.xadds)
        message = json.loads(fields[b"data"])
        self.items[message["task_id"]] = message["args"][0]
        return b"0-1"

    async def get(self, name: str) -> bytes | None:
        self.gets += 1
        if self.gets <= self.fail_get:
            self._fail("GET", self.gets)
        item = self.items.get(name.rsplit(":", 1)[1])
        if item is None:
            return None
        result = TaskiqResult[Any](
            is_err=False, return_value=item * item, execution_time=0.0, labels={}
        )
        dumped: bytes = self.backend.serializer.dumpb(result.model_dump(mode="json"))
        return dumped


class Polling:
    """Completions without Pub/Sub: each item polls on its schedule."""

    def __init__(self, client: object, prefix: str) -> None:
        self.channel = f"{prefix}:done:test"

    async def __aenter__(self) -> Polling:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def expect(self, task_id: str) -> None:
        pass

    def forget(self, task_id: str) -> None:
        pass

    async def wait(self, task_id: str, seconds: float) -> None:
        await anyio.sleep(seconds)


def on_flaky_redis(monkeypatch: pytest.MonkeyPatch, **faults: Any) -> tuple[Any, Flaky]:
    """A producer-side task whose Redis is a :class:`Flaky` (never connected)."""
    monkeypatch.setattr(_map, "Completions", Polling)
    broker = pkt.redis_broker("redis://127.0.0.1:1/0", queue="outage")

    @broker.task(task_name="pk_tests.outage_square")
    async def square(x: int) -> int:
        return x * x

    backend: Any = broker.result_backend
    flaky = Flaky(backend, **faults)
    broker._pk_client = flaky  # type: ignore[assignment]
    backend._pk_client = flaky
    return square, flaky


def timed(call: Callable[[], Awaitable[T]]) -> tuple[T, float]:
    """Run ``call`` on virtual time: (its value, the seconds it took)."""

    async def main() -> tuple[T, float]:
        start = anyio.current_time()
        value = await call()
        return value, anyio.current_time() - start

    return run_virtual(main, "asyncio")


BLIPS = [
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,  # a restarted Redis loading its data
]


@pytest.mark.parametrize("error", BLIPS)
def test_a_result_read_waits_out_a_blip(
    monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    """The read fails 6 times: it was the item's error at once; it now waits
    (50 ms doubling) and the 7th read has the result."""
    square, flaky = on_flaky_redis(monkeypatch, fail_get=len(WAITS), error=error)
    values, took = timed(lambda: pkt.map(square, [4], timeout=60))
    assert values == [16]
    assert flaky.gets == len(WAITS) + 1
    assert took == pytest.approx(ALL_WAITS)


def test_a_longer_outage_fails_the_item_with_the_last_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the waits the item fails with redis-py's own error (the last try's),
    in its own outcome; the next item is not affected."""
    square, flaky = on_flaky_redis(monkeypatch, fail_get=len(WAITS) + 1)
    outcomes, took = timed(lambda: pkt.map(square, [2, 3], limit=1, settle=True))
    assert outcomes[0].error is flaky.errors[-1]
    assert "GET try 7" in str(outcomes[0].error)
    assert outcomes[1].value == 9  # Redis is back for the next item
    assert took == pytest.approx(ALL_WAITS)


def test_the_calls_timeout_bounds_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    square, _ = on_flaky_redis(monkeypatch, fail_get=100)

    async def call() -> Exception:
        with pytest.raises(TimeoutError, match=r"timeout=1\.0s") as caught:
            await pkt.map(square, [5], timeout=1.0)
        return caught.value

    _, took = timed(call)
    assert took == pytest.approx(1.0)


def test_a_cancellation_ends_the_wait_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    square, flaky = on_flaky_redis(monkeypatch, fail_get=100)

    async def call() -> bool:
        with anyio.move_on_after(0.5) as scope:
            await pkt.map(square, [5])
        return scope.cancelled_caught

    cancelled, took = timed(call)
    assert cancelled
    assert took == pytest.approx(0.5)
    assert flaky.gets == 4  # at 0, 0.05, 0.15 and 0.35 s; the next would be at 0.75 s


def test_a_full_connection_pool_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``MaxConnectionsError`` is a local limit, not an outage: raised at once."""
    square, flaky = on_flaky_redis(
        monkeypatch, fail_get=100, error=redis.exceptions.MaxConnectionsError
    )

    async def call() -> None:
        with pytest.raises(redis.exceptions.MaxConnectionsError):
            await pkt.map(square, [5])

    _, took = timed(call)
    assert took == 0
    assert flaky.gets == 1


def test_a_kick_waits_out_a_blip(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``XADD`` fails 6 times: the item failed with ``SendTaskError`` at once;
    it is now sent on the 7th try, with its one task id."""
    square, flaky = on_flaky_redis(monkeypatch, fail_xadd=len(WAITS))
    values, took = timed(lambda: pkt.map(square, [6]))
    assert values == [36]
    assert flaky.xadds == len(WAITS) + 1
    assert len(flaky.items) == 1
    assert took == pytest.approx(ALL_WAITS)


def test_a_kick_past_the_waits_fails_with_taskiqs_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Taskiq's ``SendTaskError``, as before, its ``__cause__`` redis-py's error of
    the last try; nothing is read for it."""
    square, flaky = on_flaky_redis(monkeypatch, fail_xadd=len(WAITS) + 1)

    async def call() -> BaseException:
        with pytest.raises(SendTaskError) as caught:
            await pkt.map(square, [6])
        return caught.value

    error, took = timed(call)
    assert error.__cause__ is flaky.errors[-1]
    assert flaky.xadds == len(WAITS) + 1
    assert flaky.gets == 0
    assert took == pytest.approx(ALL_WAITS)


def test_another_result_backend_waits_out_a_blip_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker given another result backend (polled through Taskiq's
    ``is_ready``/``get_result``): its reads wait for Redis the same way."""
    from taskiq.abc.result_backend import AsyncResultBackend

    class Backend(AsyncResultBackend[Any]):
        def __init__(self) -> None:
            self.results: dict[str, TaskiqResult[Any]] = {}
            self.tries = 0

        async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
            self.results[task_id] = result

        async def is_result_ready(self, task_id: str) -> bool:
            self.tries += 1
            if self.tries <= len(WAITS):
                msg = f"try {self.tries}: Redis is down (injected)"
                raise redis.exceptions.ConnectionError(msg)
            return True

        async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[Any]:
            return TaskiqResult[Any](is_err=False, return_value=49, execution_time=0.0, labels={})

    backend = Backend()
    broker = pkt.redis_broker("redis://127.0.0.1:1/0", queue="outage").with_result_backend(backend)

    @broker.task(task_name="pk_tests.outage_square")
    async def square(x: int) -> int:
        return x * x

    broker._pk_client = Flaky(backend)  # type: ignore[assignment]
    values, took = timed(lambda: pkt.map(square, [7]))
    assert values == [49]
    assert backend.tries == len(WAITS) + 1
    assert took == pytest.approx(ALL_WAITS)
