"""Taskiq plumbing for :mod:`parallelkit.taskiq`: the broker, result store and middlewares.

Kept apart from the ``map``/``imap`` front end: this module is what a worker
process imports to be configured like the producers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from pydantic import ConfigDict
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from taskiq import AckableMessage, TaskiqMiddleware
from taskiq.message import BrokerMessage
from taskiq.result import TaskiqResult
from taskiq_redis import RedisAsyncResultBackend
from taskiq_redis import RedisStreamBroker as _TaskiqRedisStreamBroker
from taskiq_redis.exceptions import ResultIsMissingError

from .._core.check import count, number_at_least, text
from .._core.errors import ParallelkitError
from .._core.retry import Retry
from ._completions import LABEL_DONE
from ._middlewares import TracebackMiddleware, retry_middleware
from ._outage import Outage, patiently
from ._stream import RETRY_KEY_MS, TRIM, WHERE, abandoned, kick_retry, moved, recall, take_over

logger = logging.getLogger("parallelkit.taskiq")

#: set by :meth:`RedeliveringStreamBroker.kick` in the kicking task: the task id, the
#: stream and the id Redis gave the message (``map`` checks it is still there)
KICKED: ContextVar[tuple[str, str, Any] | None] = ContextVar("pk_taskiq_kicked", default=None)


# ---------------------------------------------------------------------------- one client
class _OneClient:
    """One redis-py client over the object's connection pool, made on first use.

    taskiq-redis builds a client (about 0.3 ms of CPU) for every message, ack and
    result; the broker and the result backend both use this one instead.
    """

    _pk_client: Redis | None = None

    def _pk_pool(self) -> Any:  # pragma: no cover - each subclass names its pool
        raise NotImplementedError

    def _client(self) -> Redis:
        if self._pk_client is None:
            self._pk_client = Redis(connection_pool=self._pk_pool())
        return self._pk_client

    async def shutdown(self) -> None:
        """Drop the client, then close the connection pool (as upstream)."""
        self._pk_client = None
        await super().shutdown()  # type: ignore[misc]


# ---------------------------------------------------------------------------- broker
class RedeliveringStreamBroker(_OneClient, _TaskiqRedisStreamBroker):
    """taskiq-redis's ``RedisStreamBroker`` that always reclaims a dead worker's messages.

    The stream broker acknowledges a message only when the worker is done with it;
    a message a dead worker had taken stays *pending* and is taken over by another
    worker (``XPENDING ... IDLE``, then ``XCLAIM``) once it has been idle for
    ``idle_timeout`` ms, wherever it is in the pending list. The
    upstream ``listen`` runs ``XAUTOCLAIM`` only right after it has read *new*
    messages, so when the stream is quiet (the producer waits for exactly those
    lost items, or they were the last ones) nothing is ever reclaimed. This
    subclass reclaims on every pass, at most once per ``xread_block`` interval,
    and claims ``unacknowledged_batch_size`` messages at a time, only when the
    worker asks for a message: a worker never hoards reclaimed messages it has no
    capacity to run.

    It also keeps one Redis client for its kicks and acknowledgements (upstream
    builds a client, about 0.3 ms of CPU, per message and per ack). Built by
    :func:`redis_broker`, its read loop also trims from the stream what every
    consumer group acknowledged once older than the results' TTL (``_pk_trim``).

    It takes the same arguments as ``taskiq_redis.RedisStreamBroker``. Use
    :func:`redis_broker` for a broker configured for :func:`map`.
    """

    _pk_where_script: Any = None
    _pk_trim_script: Any = None
    #: trim acknowledged messages older than this many ms (``redis_broker``: its
    #: ``result_ttl``); ``None``: keep every message, as upstream
    _pk_trim_after: int | None = None

    def _pk_pool(self) -> Any:
        return self.connection_pool

    async def kick(self, message: BrokerMessage) -> None:
        """Append the message to its stream (``XADD``), as upstream does.

        An ``XADD`` Redis fails (a restart, a failover) is tried again for about
        3 s, then its error is raised (Taskiq's kicker wraps it in
        ``SendTaskError``). The message keeps its task id: if Redis did append it
        before the connection broke, it runs twice under one task id (delivery is
        at least once anyway). The id Redis gives the message is kept for the
        kicking task (:data:`KICKED`): :func:`map` checks where it is while it
        waits for its result (``_pk_where``).

        A worker's retry (a message with Taskiq's ``_retries`` label) is appended
        only if its item's caller has not left (see :meth:`_pk_recall`), in the same
        atomic step: a retry nobody waits for is not sent (logged at INFO).
        """
        queue_name = message.labels.get("queue_name") or self.queue_name
        client, cap, approximate = self._client(), self.maxlen, self.approximate
        if "_retries" in message.labels:  # a worker's retry (Taskiq's retry middlewares)
            life = self._pk_trim_after or RETRY_KEY_MS  # (as long as a result)
            msg_id = await patiently(
                kick_retry, client, queue_name, message, cap, approximate, life
            )
            if msg_id is None:  # sent for nobody: its caller has left (_pk_recall)
                logger.info(
                    "%s [%s] not retried: its caller has left", message.task_name, message.task_id
                )
                return
        else:
            data: Any = {b"data": message.message}
            msg_id = await patiently(
                client.xadd, queue_name, data, maxlen=cap, approximate=approximate
            )
        KICKED.set((message.task_id, queue_name, msg_id))

    async def _pk_where(self, stream: str, msg_id: Any) -> str:
        """Where the message ``msg_id`` is for this broker's consumer group.

        ``"gone"``: no longer in ``stream``. A message stays in its stream after it
        is acknowledged (``XACK`` only takes it off the pending list), so it was
        lost by Redis (a restart without its data, a failover to a replica that
        never had it, its key deleted) or trimmed: no worker will run it.
        ``"passed"``: the group's last delivered id is at or past it and no
        consumer holds it: acknowledged, or skipped by a group created after it
        (at ``$``), so no worker of the group will run it again.
        ``"taken"``: pending, a worker holds it. ``"queued"``: not delivered yet
        (or the group does not exist yet). One atomic script, one round trip.
        """
        client = self._client()
        if self._pk_where_script is None:
            self._pk_where_script = client.register_script(WHERE)
        where: Any = await self._pk_where_script(
            keys=[stream], args=[self.consumer_group_name, msg_id], client=client
        )
        return where.decode() if isinstance(where, bytes) else str(where)

    async def _pk_recall(self, stream: str, msg_id: Any = None, task_id: str = "") -> bool:
        """Take back what is left queued of the item of ``task_id`` (its message
        ``msg_id``; ``None``: a kick cut short); if a worker took it, mark the item
        so that no retry of it is sent: see :func:`._stream.recall`."""
        life = self._pk_trim_after or RETRY_KEY_MS  # (as long as a result)
        return await recall(self._client(), stream, msg_id, task_id, life)

    async def _pk_moved(self, stream: str, msg_id: Any, task_id: str) -> Any | None:
        """The id of the newest message after ``msg_id`` in ``stream`` that carries
        ``task_id`` (a worker's retry), or ``None``: see :func:`._stream.moved`."""
        return await moved(self._client(), stream, msg_id, task_id)

    async def _pk_left(self, task_id: str, stream: str | None = None) -> bool:
        """Has the caller of ``task_id`` (on ``stream``, default the broker's) left?"""
        return (await abandoned(self._client(), stream or self.queue_name, [task_id]))[0]

    async def _pk_trim(self, conn: Redis, stream: str) -> None:
        """Trim from ``stream`` the messages every consumer group has acknowledged
        that are older than :attr:`_pk_trim_after` (see :data:`._stream.TRIM`).

        A queued or pending message is never trimmed, whatever its age. Older than
        the results' TTL, an acknowledged message serves nobody: ``map`` waits on a
        message for at most a second after its ack (it reads the result, or
        follows a retry); without trimming, each kept about 300 bytes for ever.
        """
        if self._pk_trim_script is None:
            self._pk_trim_script = conn.register_script(TRIM)
        await self._pk_trim_script(keys=[stream], args=[self._pk_trim_after], client=conn)

    def _ack_generator(self, id: str, queue_name: str) -> Callable[[], Awaitable[None]]:
        async def ack() -> None:
            await self._client().xack(queue_name, self.consumer_group_name, id)

        return ack

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """Yield new messages, and reclaim idle pending ones at least every block.

        Redis going away (a restart, a failover, a network blip) does not end the
        loop: Taskiq's worker would die with every task it runs, and those would
        run again only after ``idle_timeout``. The loop waits for Redis instead
        (logging the first failure of each outage) and goes on; a Redis that came
        back without the consumer group (it lost its data) gets it back, from the
        start of the stream, so what was kicked since is delivered.
        """
        streams: Any = {self.queue_name: ">", **self.additional_streams}
        interval = self.block / 1000
        last_claim = -float("inf")
        outage = Outage()
        async with Redis(connection_pool=self.connection_pool) as conn:
            while True:
                try:
                    fetched: Any = await conn.xreadgroup(
                        self.consumer_group_name,
                        self.consumer_name,
                        streams,
                        block=self.block,
                        noack=False,
                        count=self.count,
                    )
                except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
                    await self._recover(conn, exc, outage)
                    continue
                outage.over()
                for stream, messages in fetched or ():
                    for msg_id, fields in messages:
                        # an entry without "data" (another program's XADD): b"", which
                        # Taskiq's receiver acknowledges unrun, logged (it cannot parse it)
                        yield AckableMessage(
                            data=fields.get(b"data", b""), ack=self._ack_generator(msg_id, stream)
                        )
                if time.monotonic() - last_claim < interval:
                    continue
                last_claim = time.monotonic()
                for stream in streams:
                    async with contextlib.aclosing(self._reclaim(conn, stream)) as reclaimed:
                        while True:
                            try:
                                msg_id, fields = await reclaimed.__anext__()
                            except StopAsyncIteration:
                                break
                            except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
                                await self._recover(conn, exc, outage)
                                break
                            yield AckableMessage(
                                data=fields.get(b"data", b""),  # (as above)
                                ack=self._ack_generator(msg_id, stream),
                            )
                    if self._pk_trim_after is not None:
                        await self._trim_quietly(conn, stream, outage)

    async def _trim_quietly(self, conn: Redis, stream: str, outage: Outage) -> None:
        """:meth:`_pk_trim`, housekeeping that never stops the read loop: an outage
        is waited out as a read's; an error Redis answers (scripts refused by an
        ACL or a proxy) is logged once, and this worker trims no more."""
        try:
            await self._pk_trim(conn, stream)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            await self._recover(conn, exc, outage)
        except ResponseError as exc:
            self._pk_trim_after = None
            logger.warning(
                "cannot trim acknowledged messages from stream %r (%s: %s): keeping them",
                stream,
                type(exc).__name__,
                exc,
            )

    async def _recover(self, conn: Redis, exc: Exception, outage: Outage) -> None:
        """After a failed read: wait out an outage, or put back a lost consumer group.

        Any other error Redis answers (a wrong type at the stream's key, an ACL) is
        raised: waiting would not mend it.
        """
        if isinstance(exc, ResponseError):
            if not str(exc).startswith("NOGROUP"):
                raise exc
            # Redis lost its data (a restart without persistence): the group is gone
            # and the stream holds only what was kicked since; "0" delivers all of it
            # ("$", the default, would skip it). Another worker may have done it first.
            logger.warning(
                "consumer group %r is gone: declaring it again", self.consumer_group_name
            )
            try:
                for stream in (self.queue_name, *self.additional_streams):
                    try:
                        await conn.xgroup_create(
                            stream, self.consumer_group_name, id="0", mkstream=True
                        )
                    except ResponseError as refused:  # noqa: PERF203 - once per outage
                        if not str(refused).startswith("BUSYGROUP"):  # not "it is back"
                            raise
            except (RedisConnectionError, RedisTimeoutError) as again:  # gone again
                await outage.wait(again)
            return
        await outage.wait(exc)

    async def _reclaim(self, conn: Redis, stream: Any) -> AsyncGenerator[tuple[Any, Any], None]:
        """Take over ``stream``'s messages idle for ``idle_timeout``, a batch at a time.

        ``XPENDING ... IDLE`` finds them wherever they are in the group's pending
        list: ``XAUTOCLAIM`` from the start looks at only ``10 * count`` entries per
        call, so behind that many messages live workers are still running, a dead
        worker's messages were never found. ``XCLAIM`` with the same idle time then
        takes each only if no other worker took it meanwhile. Runs only while the
        worker asks for messages (a generator): each is claimed when the worker
        asks for it, so it never takes more than it runs. One whose caller has left
        (:meth:`_pk_recall`) is acknowledged unrun, checked in the claim's atomic
        step (:func:`._stream.take_over`).
        """
        group, idle = self.consumer_group_name, self.idle_timeout
        while True:
            pending: Any = await conn.xpending_range(
                stream, group, min="-", max="+", count=self.unacknowledged_batch_size, idle=idle
            )
            if not pending:
                return
            ids = [entry["message_id"] for entry in pending]
            claims = take_over(conn, stream, group, self.consumer_name, idle, ids, self.formatter)
            async with contextlib.aclosing(claims):
                async for msg_id, fields in claims:
                    yield msg_id, fields
            # every id asked for left the idle ones: taken (here or by another worker,
            # which reset its idle time) or dropped, so the next XPENDING moves on


class _Stored(TaskiqResult[Any]):
    """A result as :class:`_ResultBackend` stores it: a float that is not finite stays
    one (``NaN``, ``Infinity`` in the JSON, as Python's ``json`` writes them).
    pydantic's default writes ``null``: a task that returned ``nan`` gave ``None``."""

    model_config = ConfigDict(arbitrary_types_allowed=True, ser_json_inf_nan="constants")


class _ResultBackend(_OneClient, RedisAsyncResultBackend):  # type: ignore[type-arg]
    """taskiq-redis's result backend with one Redis client instead of one per call,
    and :meth:`fetch`: poll for a result with a single ``GET``."""

    def _pk_pool(self) -> Any:
        return self.redis_pool

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        """Store the result; if the kick asked for it, publish the task id as done
        (pipelined with the ``SET``: one round trip, see ``_completions``)."""
        try:
            stored = _Stored.model_construct(**dict(result))
            value = self.serializer.dumpb(stored.model_dump(mode="json"))
        except Exception as exc:  # a return value the result cannot hold: its caller is told
            msg = (
                f"the task's result could not be stored: {type(exc).__name__}: {exc} "
                f"(return value of type {type(result.return_value).__name__}; return "
                "JSON-serializable values)"
            )
            failed = TaskiqResult[Any](
                is_err=True,
                return_value=None,
                execution_time=result.execution_time,
                labels=result.labels,
                error=TypeError(msg),
            )
            value = self.serializer.dumpb(failed.model_dump(mode="json"))
        channel = result.labels.get(LABEL_DONE)
        # Taskiq's worker logs a failed save and acknowledges the message all the same:
        # the result would be lost for good, its item waiting until its timeout. So a
        # write Redis fails for a moment is tried again (the SET and PUBLISH may repeat).
        await patiently(self._write, task_id, value, channel)

    async def _write(self, task_id: str, value: bytes, channel: object) -> None:
        name, ex, px = self._task_name(task_id), self.result_ex_time, self.result_px_time
        if not isinstance(channel, str):
            await self._client().set(name, value, ex=ex or None, px=px or None)
            return
        async with self._client().pipeline(transaction=False) as pipe:
            pipe.set(name, value, ex=ex or None, px=px or None)
            pipe.publish(channel, task_id)
            await pipe.execute()

    async def is_result_ready(self, task_id: str) -> bool:
        return bool(await self._client().exists(self._task_name(task_id)))

    async def fetch(self, task_id: str) -> TaskiqResult[Any] | None:
        """The result, or ``None`` while there is none yet."""
        client, name = self._client(), self._task_name(task_id)
        raw: Any = await (client.get(name) if self.keep_results else client.getdel(name))
        if raw is None:
            return None
        try:
            return TaskiqResult[Any].model_validate(self.serializer.loadb(raw))
        except Exception as exc:  # (whatever the serializer raises on foreign bytes)
            msg = (
                f"the stored result of Taskiq task [{task_id}] ({name!r}) cannot be read: "
                f"{type(exc).__name__}: {exc}; was it written by a worker with another "
                f"result serializer ({type(self.serializer).__name__} here) or version?"
            )
            raise ParallelkitError(msg) from exc

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[Any]:
        result = await self.fetch(task_id)
        if result is None:
            raise ResultIsMissingError
        if not with_logs:
            result.log = None
        return result


def redis_broker(
    url: str,
    /,
    *,
    queue: str = "parallelkit",
    group: str = "parallelkit",
    consumer: str | None = None,
    idle_timeout: float = 300.0,
    poll: float = 1.0,
    prefetch: int = 1,
    result_ttl: float = 86_400.0,
    retry: Retry | None = None,
) -> RedeliveringStreamBroker:
    """A Taskiq broker on Redis streams, configured for :func:`map`.

    Producers and workers build it the same way (in one module the workers
    import): a :class:`RedeliveringStreamBroker` (acknowledged delivery: a dead
    worker's messages go to another worker), a ``RedisAsyncResultBackend`` whose
    results expire, and the middlewares :class:`TracebackMiddleware` and, with
    ``retry``, :func:`retry_middleware`.

    Args:
        url: the Redis URL, e.g. ``"redis://127.0.0.1:6379/0"``.
        queue: the stream's key; one per kind of work. Results are stored under
            ``"{queue}:result:{task_id}"``.
        group: the consumer group all workers of this queue share.
        consumer: this process's consumer name (default: a random UUID).
        idle_timeout: seconds a taken message may stay unacknowledged before
            another worker takes it over. It must exceed your slowest task
            (including its retry waits), or a slow but live worker's message is
            run a second time; it is also how long a dead worker's items wait.
        poll: seconds a worker blocks reading the stream; idle pending messages
            are reclaimed at least this often, and a retry's backoff checks this
            often whether its item's caller has left (then it ends).
        prefetch: messages a worker reads at once. Read messages count as taken
            (their idle clock runs) even before they start, so keep it small.
        result_ttl: seconds a result is kept in Redis; the workers also trim
            from the stream the messages every consumer group acknowledged
            once they are older than this (queued or pending ones never).
        retry: retry failing tasks in the worker with this policy.

    Returns:
        The broker. Register tasks with ``@broker.task``; the producer calls
        ``await broker.startup()`` once before :func:`map` (it creates the
        consumer group, so what is kicked before the first worker starts goes
        straight through; without it, those items are sent again about a second
        after the worker created the group past them) and
        ``await broker.shutdown()`` at exit.

    Raises:
        TypeError: ``url``, ``queue``, ``group`` or ``consumer`` not a str;
            ``idle_timeout``, ``poll`` or ``result_ttl`` not a number,
            ``prefetch`` not an int, ``retry`` not a :class:`parallelkit.Retry`.
        ValueError: an empty ``url``, ``queue``, ``group`` or ``consumer``; a
            non-finite ``idle_timeout``, ``poll`` or ``result_ttl``, or one below
            its floor (1 ms; ``result_ttl`` 1 s); ``prefetch`` below 1.

    Example:
        ```python
        broker = redis_broker("redis://127.0.0.1:6379/0", queue="crm-detect",
                              idle_timeout=120, retry=pk.Retry(attempts=3))

        @broker.task(task_name="crm.detect")
        async def detect(company_id: int) -> int: ...
        ```
        Workers: ``taskiq worker myapp.tasks:broker --max-async-tasks 20``.
    """
    for name, value in (("url", url), ("queue", queue), ("group", group)):
        text(name, value)
    if consumer is not None:
        text("consumer", consumer)
    # Redis counts these in milliseconds; a result must outlive its trip to the producer
    number_at_least("idle_timeout", idle_timeout, 0.001)
    number_at_least("poll", poll, 0.001)
    number_at_least("result_ttl", result_ttl, 1.0)
    prefetch = count("prefetch", prefetch)
    broker = RedeliveringStreamBroker(
        url,
        queue_name=queue,
        consumer_group_name=group,
        consumer_name=consumer,
        idle_timeout=max(1, round(idle_timeout * 1000)),
        xread_block=max(1, round(poll * 1000)),
        xread_count=prefetch,
        unacknowledged_batch_size=prefetch,
    )
    backend = _ResultBackend(
        url, result_px_time=max(1, round(result_ttl * 1000)), prefix_str=f"{queue}:result"
    )
    middlewares: list[TaskiqMiddleware] = [TracebackMiddleware()]
    if retry is not None:
        middlewares.append(retry_middleware(retry))
    result: RedeliveringStreamBroker = broker.with_result_backend(backend).with_middlewares(
        *middlewares
    )
    result._pk_trim_after = backend.result_px_time  # its workers trim the stream
    return result
