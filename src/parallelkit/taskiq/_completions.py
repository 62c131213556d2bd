"""Finished tasks pushed to the producer: no polling delay on top of the task's own time.

Polling a result every few milliseconds adds up to one interval to each item (and
load on Redis); Taskiq's own ``wait_result`` polls every 0.2 s by default. With
:func:`~parallelkit.taskiq.redis_broker`, each kick of one ``map``/``imap`` call
carries the label ``pk_done``: a Pub/Sub channel of that call. The worker's result
backend publishes the task id there right after storing the result (one round
trip: the ``SET`` and the ``PUBLISH`` are pipelined), and the producer's one
subscription wakes the item waiting for it, which then reads its result.

Pub/Sub delivery is at most once: the producer still polls on its schedule (a
worker of an older version, a lost connection), so a lost message costs a poll
interval, never a result.

A lost connection (Redis restarted, a failover) does not end the subscription:
it is taken again, with the waits of a result read (about 3 s, see
``_outage.patiently``), and every item in flight then polls once, for what was
published while it was away. Only when Redis stays away longer do the items go on
by polling alone.

The subscription holds its connection for the whole call, so it does not take it
from the client's pool: that pool is bounded (taskiq-redis: a blocking pool of 100)
and the result reads need it. With the subscriptions of 100 calls at once holding
every connection of it, each read waited for a free one for 20 s, then failed.
"""

from __future__ import annotations

import uuid
from types import TracebackType
from typing import Any

import anyio
from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from typing_extensions import Self, final

from .._core.owned import OwnedTaskGroup
from ._outage import is_blip, patiently

__all__ = ["LABEL_DONE", "Completions"]

#: the kick label naming the channel the worker publishes the finished task id on
LABEL_DONE = "pk_done"


@final
class Completions:
    """One producer call's subscription to its finished task ids (``async with``)."""

    __slots__ = ("_client", "_early", "_expected", "_owner", "_pool", "_pubsub", "_waiting",
                 "channel", "listening")  # fmt: skip

    def __init__(self, client: Any, prefix: str) -> None:
        self._client = client
        self._pool: ConnectionPool | None = None  # the subscription's own, while entered
        self.channel = f"{prefix}:done:{uuid.uuid4().hex}"
        self._pubsub: Any = None
        self._waiting: dict[str, anyio.Event] = {}
        # the task ids of the items in flight (kicked, result not read yet): a
        # publication is kept only for them, so what is kept stays O(in flight)
        self._expected: set[str] = set()
        self._early: set[str] = set()  # published while their item was not waiting
        self._owner = OwnedTaskGroup("these Taskiq completions")
        self.listening = False

    def __repr__(self) -> str:
        return f"<Completions {self.channel!r} waiting={len(self._waiting)}>"

    async def __aenter__(self) -> Self:
        shared = self._client.connection_pool  # the same server and options, not its slots
        self._pool = ConnectionPool(
            connection_class=shared.connection_class, max_connections=1, **shared.connection_kwargs
        )
        self._pubsub = Redis(connection_pool=self._pool).pubsub()
        try:
            await patiently(self._pubsub.subscribe, self.channel)
            tg = await self._owner.enter()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._close()
            raise
        self.listening = True
        tg.start_soon(self._listen, name="parallelkit.taskiq completions")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            return await self._owner.exit(exc_type, exc, tb, cancel=True)
        finally:
            self.listening = False
            with anyio.CancelScope(shield=True):
                await self._close()

    async def _close(self) -> None:
        pool, self._pool = self._pool, None
        try:
            await self._pubsub.aclose()
        finally:
            if pool is not None:
                await pool.aclose()  # its one connection: nothing else uses it

    async def _listen(self) -> None:
        pubsub, waiting, early, expected = self._pubsub, self._waiting, self._early, self._expected
        try:
            while True:
                try:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    if not is_blip(exc) or not await self._subscribe_again():
                        raise
                    continue
                if message is None or message.get("type") != "message":
                    continue
                data = message["data"]
                # (bytes that are no UTF-8 are no task id either: they match nothing)
                task_id = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
                event = waiting.pop(task_id, None)
                if event is not None:
                    event.set()
                elif task_id in expected:  # (else: its item has read its result already)
                    early.add(task_id)
        except Exception:  # the connection broke for good: the items go on polling
            self.listening = False
            for event in waiting.values():
                event.set()

    async def _subscribe_again(self) -> bool:
        """After a lost connection: connect and subscribe again (redis-py's pubsub
        subscribes its channels again on connect), tried as a result read is
        (:func:`~parallelkit.taskiq._outage.patiently`). Then every item in flight
        polls once: what was published while the connection was down is lost."""
        try:
            await patiently(self._pubsub.connect)
        except (RedisConnectionError, RedisTimeoutError):  # gone for longer: poll
            return False
        for task_id in self._expected:
            event = self._waiting.pop(task_id, None)
            if event is not None:
                event.set()
            else:  # reading its result now, or about to wait: it reads once more
                self._early.add(task_id)
        return True

    def expect(self, task_id: str) -> None:
        """An item kicked ``task_id``: keep its publication until it reads its result.

        (A publication that arrives before this call is dropped: the result is then
        already stored, and the item's first read finds it.)"""
        self._expected.add(task_id)

    def forget(self, task_id: str) -> None:
        """The item of ``task_id`` has its result (or gave up): keep nothing for it."""
        self._expected.discard(task_id)
        self._early.discard(task_id)

    async def wait(self, task_id: str, seconds: float) -> None:
        """Return when ``task_id`` is published as finished, or after ``seconds``."""
        if task_id in self._early:
            self._early.discard(task_id)
            return
        if not self.listening:
            await anyio.sleep(seconds)
            return
        event = anyio.Event()
        self._waiting[task_id] = event
        try:
            with anyio.move_on_after(seconds):
                await event.wait()
        finally:
            self._waiting.pop(task_id, None)
