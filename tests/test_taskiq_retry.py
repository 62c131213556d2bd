"""``parallelkit.taskiq.map(..., retry=)`` / ``imap(..., retry=)``: the same ``retry=`` as
``pk.map``, from the producer. An item whose result is an error the policy retries is
kicked again, as a new message; what the workers retry themselves
(``retry_middleware``) never comes back to the producer. Real workers on a real Redis."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest

import parallelkit as pk
import parallelkit.taskiq as pkt
from parallelkit.taskiq import _map

from .taskiq_helpers.tasks import Tasks, build

pytest_plugins = ["tests.taskiq_helpers.fixtures"]

GUARD = 60  # seconds: stops a hang, never reached by a passing test

#: `fail_some` raises ValueError for x % 10 == 7, which the workers do not retry
RETRY_VALUE_ERRORS = pk.Retry(attempts=3, backoff=0.01, on=(ValueError,))


@pytest.fixture
def anyio_backend() -> str:  # Taskiq's producer side and redis-py: asyncio only
    return "asyncio"


@pytest.fixture
def kicks(monkeypatch: pytest.MonkeyPatch) -> Counter[Any]:
    """How many times each item was kicked (sent as a message) by the producer."""
    counted: Counter[Any] = Counter()
    kick = _map._Kick._kick

    async def counting(self: Any, item: Any, task_id: str | None = None) -> Any:
        if task_id is None:  # a first send, not the same message sent again
            counted[item] += 1
        return await kick(self, item, task_id)

    monkeypatch.setattr(_map._Kick, "_kick", counting)
    return counted


@pytest.mark.anyio
async def test_retry_is_checked_as_pk_maps_is() -> None:
    offline = build("redis://127.0.0.1:1/0", "never-used")  # building connects nothing
    with pytest.raises(TypeError, match=r"retry must be .*pass retry=parallelkit\.Retry"):
        await pkt.map(offline.square, [1], retry=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"retry must be"):
        pkt.imap(offline.square, [1], retry=3)  # type: ignore[call-overload]


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
class TestRetryFromTheProducer:
    async def test_a_failed_item_is_kicked_again_per_the_policy(
        self, tasks: Tasks, kicks: Counter[Any]
    ) -> None:
        with anyio.fail_after(GUARD):
            outcomes = await pkt.map(
                tasks.fail_some, [7, 1, 17], limit=3, retry=RETRY_VALUE_ERRORS, settle=True
            )
        assert [o.ok for o in outcomes] == [False, True, False]
        assert isinstance(outcomes[0].error, ValueError)
        assert outcomes[1].value == 1
        assert kicks == {7: 3, 1: 1, 17: 3}  # three attempts each for the failing ones

    async def test_fail_fast_raises_the_last_attempts_error(
        self, tasks: Tasks, kicks: Counter[Any]
    ) -> None:
        with anyio.fail_after(GUARD), pytest.raises(ValueError, match="bad item 27"):
            await pkt.map(tasks.fail_some, [27], retry=RETRY_VALUE_ERRORS)
        assert kicks == {27: 3}

    async def test_an_error_the_policy_does_not_retry_is_kicked_once(
        self, tasks: Tasks, kicks: Counter[Any]
    ) -> None:
        only_connections = pk.Retry(attempts=3, backoff=0.01, on=(ConnectionError,))
        with anyio.fail_after(GUARD):
            outcomes = await pkt.map(tasks.fail_some, [37], retry=only_connections, settle=True)
        assert isinstance(outcomes[0].error, ValueError)
        assert kicks == {37: 1}

    async def test_imap_kicks_a_failed_item_again(self, tasks: Tasks, kicks: Counter[Any]) -> None:
        with anyio.fail_after(GUARD):
            async with pkt.imap(
                tasks.fail_some, [47, 2], limit=2, retry=RETRY_VALUE_ERRORS, settle=True
            ) as results:
                outcomes = [o async for o in results]
        assert sorted(o.ok for o in outcomes) == [False, True]
        assert kicks == {47: 3, 2: 1}
