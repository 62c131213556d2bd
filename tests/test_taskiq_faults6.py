"""parallelkit.taskiq against ``pk.map``'s contract, point by point, as a user breaks it.

* Bad arguments: the same input fails with the same error as in ``pk.map`` /
  ``pk.imap``, also when several arguments are wrong at once (``timeout`` and
  ``rate`` used to be checked before ``items``, ``settle``, ``progress``, ``limit``).
* An empty input returns ``[]`` as ``pk.map`` does, without a Redis round trip (it
  used to subscribe first, and failed with Redis away).
* A task annotated with a type pydantic cannot parse into (``-> Company | None``)
  that returned ``None`` or ``[]``: the item succeeds (it failed in the producer
  with pydantic's schema error, the worker's result stored fine).
* An exception group raised in the worker comes back as that group, its members
  rebuilt (it was a plain ``Exception`` whose message held the members as text):
  ``except*`` (``split``) matches as with ``pk.map``.

asyncio only, like the other Taskiq tests (Taskiq's client and redis-py are asyncio
libraries); the worker tests run on their own queue whose keys are deleted
afterwards, every worker process killed in teardown.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_sync

import parallelkit as pk
import parallelkit.taskiq as pkt
from parallelkit.taskiq._middlewares import TracebackMiddleware
from parallelkit.taskiq._remote_errors import remote_error

from .taskiq_helpers.errors import CompanyNotFound
from .taskiq_helpers.failures import afailure, failure
from .taskiq_helpers.processes import Workers, drop_keys, new_queue
from .taskiq_helpers.tasks import Tasks, build
from .taskiq_helpers.tasks6 import Tasks6, group_of
from .taskiq_helpers.tasks6 import build as build6

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import (  # type: ignore[import-not-found,unused-ignore]
        BaseExceptionGroup,
        ExceptionGroup,
    )

GUARD = 60  # seconds: stops a hang, never reached by a passing test
OFFLINE = build("redis://127.0.0.1:1/0", "never-used")  # building connects nothing


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Taskiq's client and redis-py are asyncio libraries


async def local(x: int) -> int:
    return x


# ------------------------------------------------------------------ bad arguments
#: several wrong arguments at once: pk.map reports the first it checks
SEVERAL_BAD: list[tuple[Any, dict[str, Any]]] = [
    (3, {"timeout": 0}),
    (3, {"rate": 0}),
    (None, {"rate": -1, "limit": 0}),
    ([1], {"timeout": 0, "limit": 0}),
    ([1], {"timeout": "1", "limit": 1.5}),
    ([1], {"rate": 0, "settle": 1}),
    ([1], {"timeout": -1, "settle": "yes"}),
    ([1], {"rate": "fast", "progress": 5}),
    ([1], {"timeout": 0, "rate": 0}),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("items", "options"), SEVERAL_BAD, ids=repr)
async def test_several_bad_arguments_fail_as_in_pk_map(items: Any, options: dict[str, Any]) -> None:
    """``timeout`` and ``rate`` were checked first: ``map(task, 3, timeout=0)`` was a
    ValueError naming ``timeout`` where ``pk.map`` gives the TypeError naming ``items``."""
    expected = await afailure(lambda: pk.map(local, items, **options))
    assert await afailure(lambda: pkt.map(OFFLINE.square, items, **options)) == expected


IMAP_BAD: list[tuple[Any, dict[str, Any]]] = [
    *[(items, o) for items, o in SEVERAL_BAD if "progress" not in o],
    ([1], {"timeout": 0, "ordered": 1}),
    ([1], {"rate": 0, "ordered": None}),
]


@pytest.mark.parametrize(("items", "options"), IMAP_BAD, ids=repr)
def test_several_bad_arguments_fail_as_in_pk_imap(items: Any, options: dict[str, Any]) -> None:
    expected = failure(lambda: pk.imap(local, items, **options))
    assert failure(lambda: pkt.imap(OFFLINE.square, items, **options)) == expected


# ------------------------------------------------------------------ an empty input
@pytest.mark.anyio
async def test_an_empty_input_is_an_empty_result_without_redis() -> None:
    """``pk.map(fn, [])`` is ``[]``. The Taskiq ``map`` subscribed to its completion
    channel first: with Redis away it failed (after ~3 s of tries) with redis-py's
    ConnectionError, for a call that sends nothing. (The broker's Redis here is a
    port nothing listens on.)"""
    with anyio.fail_after(GUARD):
        assert await pkt.map(OFFLINE.square, []) == []
        assert await pkt.map(OFFLINE.square, (), limit=4, settle=True) == []
        assert await pkt.map(OFFLINE.square, range(0), progress=lambda d, t: None) == []
        async with pkt.imap(OFFLINE.square, [], limit=2) as results:
            assert [r async for r in results] == []
        async with pkt.imap(OFFLINE.square, {}, ordered=True, settle=True) as results:
            assert [r async for r in results] == []


# ------------------------------------------------------------------ exception groups, in-process
def _failed_in_worker(error: BaseException) -> Any:
    """The result a worker with ``TracebackMiddleware`` stores for ``error``, as the
    producer reads it back (through Taskiq's JSON round trip of the result)."""
    from taskiq.result import TaskiqResult

    result = TaskiqResult[Any](
        is_err=True, return_value=None, execution_time=0.0, error=error, labels={}
    )
    try:
        raise error
    except BaseException as raised:  # (recorded, as the worker does)
        TracebackMiddleware().on_error(None, result, raised)  # type: ignore[arg-type]
    return TaskiqResult[Any].model_validate_json(result.model_dump_json())


def test_a_rebuilt_group_of_base_exceptions_is_not_raised_as_such() -> None:
    """A ``BaseExceptionGroup`` (a worker's task group cancelled at shutdown) is no
    ``Exception``: it must not pass for the producer's own cancellation."""
    group = BaseExceptionGroup("shut down", [asyncio.CancelledError()])
    error = remote_error(_failed_in_worker(group), "id6", "t.name")
    assert type(error) is RuntimeError
    assert "t.name [id6] was interrupted in the worker" in str(error)


def test_a_group_member_of_a_type_the_producer_lacks_is_taskiqs_stand_in() -> None:
    error = remote_error(_failed_in_worker(group_of(4)), "id4", "t.name")
    assert isinstance(error, ExceptionGroup)
    _, _, inner = error.exceptions
    assert isinstance(inner, ExceptionGroup)
    key, stand_in = inner.exceptions
    assert type(key) is KeyError
    assert type(stand_in).__name__ == "Local"
    assert type(stand_in).__module__ == "taskiq.exceptions"
    assert str(stand_in) == "local 4"


# ------------------------------------------------------------------ on workers
@pytest.fixture(scope="module")
def workers6(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    """One worker process with the tasks of ``tasks6``, shared by this module."""
    queue = new_queue()
    try:
        with Workers(
            redis_url,
            queue,
            module="tests.taskiq_helpers.worker6:broker",
            log_dir=tmp_path_factory.mktemp("taskiq6"),
        ) as pool:
            pool.start("w1")
            yield pool
    finally:
        drop_keys(redis_url, queue)


@pytest.fixture
async def tasks6(workers6: Workers) -> AsyncIterator[Tasks6]:
    handles = build6(workers6.url, workers6.queue)
    await handles.base.broker.startup()
    try:
        yield handles
    finally:
        await handles.base.broker.shutdown()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_a_result_whose_annotation_pydantic_cannot_parse_into(tasks6: Tasks6) -> None:
    """``-> Company | None`` returned ``None``, ``-> list[Company]`` returned ``[]``:
    the worker stored both, and the producer failed each item with pydantic's
    PydanticSchemaGenerationError (it only kept the raw value on a ValueError)."""
    with anyio.fail_after(GUARD):
        assert await pkt.map(tasks6.maybe_company, [1, 2]) == [None, None]
        assert await pkt.map(tasks6.companies, [1, 2], limit=1) == [[], []]
        async with pkt.imap(tasks6.maybe_company, [3], settle=True) as results:
            [outcome] = [o async for o in results]
    assert outcome.ok
    assert outcome.value is None


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_an_exception_group_from_the_worker_is_that_group(tasks6: Tasks6) -> None:
    """What ``pk.map`` raises locally for a function that raises ``group_of(x)``,
    the Taskiq ``map`` raises too: the group's type and message, its members' types
    and messages, nested groups included; ``except*`` (``split``) matches the same members. It
    was a plain ``Exception`` whose message held the members as text."""

    async def grouped(x: int) -> int:
        raise group_of(x)

    with pytest.raises(ExceptionGroup) as caught_locally:
        await pk.map(grouped, [7])
    with anyio.fail_after(GUARD), pytest.raises(ExceptionGroup) as caught:
        await pkt.map(tasks6.grouped, [7])
    expected, error = caught_locally.value, caught.value

    def shape(group: BaseException) -> Any:
        """Types by name: another test imports the module of CompanyNotFound again."""
        cls = type(group)
        if isinstance(group, BaseExceptionGroup):
            return (cls, group.message, [shape(e) for e in group.exceptions])
        if cls.__name__ == "Local":  # the type only the worker has
            return ("Local", str(group))
        return (f"{cls.__module__}.{cls.__qualname__}", str(group))

    assert shape(error) == shape(expected)
    assert str(error) == str(expected)
    assert isinstance(error.__cause__, pkt.RemoteTraceback)
    assert "CompanyNotFound" in error.__cause__.text  # the members' worker frames

    # what `except* (ValueError, CompanyNotFound)` and `except* KeyError` take
    company_not_found = sys.modules[CompanyNotFound.__module__].CompanyNotFound  # (the current)
    found, rest = error.split((ValueError, company_not_found))
    keys, rest = rest.split(KeyError) if rest is not None else (None, None)
    assert found is not None
    assert [type(e) for e in found.exceptions] == [ValueError, company_not_found]
    assert keys is not None
    assert rest is not None
    [inner_keys] = keys.exceptions
    assert isinstance(inner_keys, ExceptionGroup)
    assert [type(e) for e in inner_keys.exceptions] == [KeyError]

    with anyio.fail_after(GUARD):
        [outcome] = await pkt.map(tasks6.grouped, [8], settle=True)
    assert outcome.error is not None
    assert type(outcome.error) is ExceptionGroup
    assert shape(outcome.error) == shape(group_of(8))


# ------------------------------------------------------------------ nothing left queued
def _queued(url: str, queue: str) -> int:
    """How many messages of ``queue`` wait for a worker: in the stream, after the
    last one the consumer group delivered (those a worker will still run)."""
    conn = redis_sync.Redis.from_url(url, decode_responses=True)
    try:
        [group] = conn.xinfo_groups(queue)
        waiting: Any = conn.xrange(queue, min=f"({group['last-delivered-id']}", max="+")
        return len(waiting)
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
async def busy(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[Tasks, Workers]]:
    """One worker running one task at a time (the others wait in the stream)."""
    queue = new_queue()
    tasks = build(redis_url, queue)
    await tasks.broker.startup()
    try:
        with Workers(redis_url, queue, max_async_tasks=1, log_dir=tmp_path) as pool:
            pool.start("a")
            yield tasks, pool
    finally:
        await tasks.broker.shutdown()
        drop_keys(redis_url, queue)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_a_cancelled_call_leaves_nothing_queued_to_run_later(
    busy: tuple[Tasks, Workers], redis_url: str
) -> None:
    """The caller is cancelled while one item runs and three wait in the stream:
    those three are taken back. They stayed, and the worker ran each of them later,
    for nobody (``limit`` of them at most: the docs called it what fail-fast
    cannot do across processes)."""
    tasks, _ = busy
    with anyio.fail_after(GUARD), anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_when_queued() -> None:
                while _taken(redis_url, tasks.queue) < 1 or _queued(redis_url, tasks.queue) < 2:
                    await anyio.sleep(0.01)
                scope.cancel()

            tg.start_soon(cancel_when_queued)
            await pkt.map(tasks.sleepy, [3600.0] * 4, limit=4)
    assert scope.cancelled_caught
    assert _queued(redis_url, tasks.queue) == 0  # (they were 2 or more)
    assert _taken(redis_url, tasks.queue) >= 1  # the one running goes on


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_an_item_past_its_timeout_is_not_run_later(
    busy: tuple[Tasks, Workers], redis_url: str
) -> None:
    """Each item fails with TimeoutError, in its own position; the ones no worker
    had taken are taken back: ``retry=`` kicking them again, or the user's own
    retry, no longer runs them twice."""
    tasks, _ = busy
    with anyio.fail_after(GUARD):
        outcomes = await pkt.map(tasks.sleepy, [3600.0] * 3, limit=3, timeout=1, settle=True)
    assert all(type(o.error) is TimeoutError for o in outcomes)
    assert _queued(redis_url, tasks.queue) == 0


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_leaving_imap_early_leaves_nothing_queued(
    busy: tuple[Tasks, Workers], redis_url: str
) -> None:
    tasks, _ = busy
    with anyio.fail_after(GUARD):
        async with pkt.imap(tasks.sleepy, [0.0, 3600.0, 3600.0, 3600.0], limit=4) as results:
            async for value in results:
                assert value == 0.0
                break
    assert _queued(redis_url, tasks.queue) == 0


# ------------------------------------------------------------------ items shown in errors
class Detached:
    """An item whose ``repr`` fails, as a detached ORM object's may."""

    def __repr__(self) -> str:
        msg = "instance is not bound to a session"
        raise RuntimeError(msg)


@pytest.mark.redis
@pytest.mark.anyio
async def test_an_unsendable_item_is_named_whatever_its_repr(redis_url: str) -> None:
    """The item's ``repr`` raised while the TypeError naming it was built: the item
    failed with that RuntimeError instead. A large item was put in the message
    whole. Both are shown bounded and safely now."""
    queue = new_queue()
    tasks = build(redis_url, queue)
    await tasks.broker.startup()
    large = {"notes": "x" * 100_000, "owner": object()}
    try:
        with anyio.fail_after(GUARD):
            outcomes = await pkt.map(tasks.square, [Detached(), large], settle=True)
    finally:
        await tasks.broker.shutdown()
        drop_keys(redis_url, queue)
    detached, big = (o.error for o in outcomes)
    assert type(detached) is TypeError
    assert "<Detached instance at 0x" in str(detached)
    assert "cannot be sent to Taskiq task pk_tests.square" in str(detached)
    assert type(big) is TypeError
    assert "cannot be sent" in str(big)
    assert len(str(big)) < 2_000


# ------------------------------------------------------------------ a result that cannot be read
@pytest.mark.redis
@pytest.mark.anyio
@pytest.mark.parametrize("stored", [b'{"is_err": false}', pickle.dumps({"is_err": "maybe"})])
async def test_a_stored_result_that_cannot_be_read_names_its_task(
    redis_url: str, stored: bytes
) -> None:
    """A result written by a worker with another result serializer or version
    (bytes the producer's serializer cannot load, a value that is no result): the
    item failed with the decoder's bare error (``UnpicklingError: invalid load key``),
    naming nothing. It fails with a ParallelkitError naming its task id and the
    serializer now, the decoder's error as its ``__cause__``; the other items are
    not affected."""
    queue = new_queue()
    tasks = build(redis_url, queue)  # no worker: the test writes the results
    await tasks.broker.startup()
    conn = redis_sync.Redis.from_url(redis_url)
    backend: Any = tasks.broker.result_backend
    unreadable: list[str] = []
    try:
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:

                async def write_results() -> None:
                    while conn.xlen(queue) < 2:
                        await anyio.sleep(0.01)
                    entries: Any = conn.xrange(queue)
                    for _, fields in entries:
                        message = json.loads(fields[b"data"])
                        key = f"{queue}:result:{message['task_id']}"
                        if message["args"] == [1]:
                            unreadable.append(message["task_id"])
                            conn.set(key, stored)
                        else:  # a result as the workers store it
                            value = {"is_err": False, "return_value": 4, "execution_time": 0.0}
                            conn.set(key, backend.serializer.dumpb(value))

                tg.start_soon(write_results)
                outcomes = await pkt.map(tasks.square, [1, 2], settle=True)
    finally:
        conn.close()
        await tasks.broker.shutdown()
        drop_keys(redis_url, queue)
    error = outcomes[0].error
    assert type(error) is pk.ParallelkitError
    assert f"Taskiq task [{unreadable[0]}]" in str(error)
    assert "cannot be read" in str(error)
    assert "PickleSerializer" in str(error)
    assert error.__cause__ is not None
    assert outcomes[1].value == 4


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_kick_cut_short_by_the_cancellation_is_taken_back(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller is cancelled while Redis appends the messages (the ``XADD`` done,
    its reply not read yet): their ids never came back, so they stayed in the stream
    and ran later. They are found by their task ids now. (No worker: every message
    is one a worker would run.)"""
    appended = anyio.Event()
    kicks: list[str] = []
    kick = pkt.RedeliveringStreamBroker.kick

    async def slow_reply(broker: pkt.RedeliveringStreamBroker, message: Any) -> None:
        await kick(broker, message)
        kicks.append(message.task_id)
        if len(kicks) == 3:
            appended.set()
        await anyio.sleep_forever()  # the reply, on its way back

    monkeypatch.setattr(pkt.RedeliveringStreamBroker, "kick", slow_reply)
    queue = new_queue()
    tasks = build(redis_url, queue)
    await tasks.broker.startup()
    try:
        with anyio.fail_after(GUARD), anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_when_appended() -> None:
                    await appended.wait()
                    scope.cancel()

                tg.start_soon(cancel_when_appended)
                await pkt.map(tasks.square, range(3), limit=3)
        assert scope.cancelled_caught
        assert _queued(redis_url, queue) == 0  # (3 before)
    finally:
        await tasks.broker.shutdown()
        drop_keys(redis_url, queue)
