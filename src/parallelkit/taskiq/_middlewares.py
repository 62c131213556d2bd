"""Taskiq middlewares for the workers of :mod:`parallelkit.taskiq`: the worker's
traceback kept in a failed task's result, and retries driven by a
:class:`parallelkit.Retry`; and :class:`RemoteTraceback`, what the producer raises it as.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import traceback
from typing import Any

import anyio
import anyio.lowlevel
from redis.exceptions import RedisError
from taskiq import TaskiqMiddleware
from taskiq.kicker import AsyncKicker
from taskiq.message import TaskiqMessage
from taskiq.middlewares import SmartRetryMiddleware
from taskiq.result import TaskiqResult
from taskiq.serialization import ensure_serializable
from typing_extensions import final

from .._core.retry import Retry

if sys.version_info < (3, 11):  # pragma: no cover - the exceptiongroup backport
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "LABEL_ERROR_GROUP",
    "LABEL_ERROR_TYPE",
    "LABEL_TRACEBACK",
    "RemoteTraceback",
    "TracebackMiddleware",
    "retry_middleware",
]

logger = logging.getLogger("parallelkit.taskiq")

LABEL_TRACEBACK = "pk_traceback"
LABEL_ERROR_TYPE = "pk_error_type"
#: an exception group's members, nested: ``{"type": "module:qualname", "args": [...],
#: "group": [...]}`` (Taskiq sends only the group's arguments, its members as text)
LABEL_ERROR_GROUP = "pk_error_group"


# ---------------------------------------------------------------------------- errors
class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a Taskiq worker.

    Set as the ``__cause__`` of the exception that :func:`map` raises (or puts in
    an :class:`~parallelkit.Outcome`), so a printed traceback shows the worker's
    frames first, then "The above exception was the direct cause of…" and the
    producer's frames, as :class:`concurrent.futures.ProcessPoolExecutor` does.
    The text is there only when the worker's broker has
    :class:`TracebackMiddleware` (:func:`redis_broker` adds it).

    Attributes:
        text: the worker's formatted traceback.
        task_id: the Taskiq task id of the failed item.
        task_name: the Taskiq task name.
    """

    def __init__(self, text: str, task_id: str, task_name: str) -> None:
        super().__init__(text)
        self.text = text
        self.task_id = task_id
        self.task_name = task_name

    def __str__(self) -> str:
        return f"\n\n{self.text.rstrip()}\n(in Taskiq task {self.task_name} [{self.task_id}])"


class TracebackMiddleware(TaskiqMiddleware):
    """Worker-side: keep the traceback text of a failed task in its result.

    Taskiq sends a failed task's exception back as its type and arguments only;
    the frames are lost. This middleware stores the formatted traceback and the
    exception's importable type name in the result's labels, which
    :func:`map` turns into a :class:`RemoteTraceback` cause and the original
    exception type. Add it to the broker the workers run (:func:`redis_broker`
    does); it changes nothing for producers.

    Example:
        ```python
        broker = RedisStreamBroker(url).with_middlewares(TracebackMiddleware())
        ```
    """

    def on_error(
        self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException
    ) -> None:
        """Record the traceback text and the type of ``exception`` in ``result``."""
        cls = type(exception)
        labels = {
            **result.labels,
            LABEL_TRACEBACK: "".join(traceback.format_exception(exception)),
            LABEL_ERROR_TYPE: f"{cls.__module__}:{cls.__qualname__}",
        }
        if isinstance(exception, BaseExceptionGroup):
            labels[LABEL_ERROR_GROUP] = _described(exception)
        result.labels = labels


def _described(error: BaseException) -> dict[str, Any]:
    """``error`` as JSON-safe data the producer rebuilds it from: its type's import
    name, its arguments (the JSON-safe ones as they are, the others as their
    ``repr``, as Taskiq does) and, for a group, its members, described the same way."""
    cls = type(error)
    described: dict[str, Any] = {"type": f"{cls.__module__}:{cls.__qualname__}"}
    if isinstance(error, BaseExceptionGroup):
        described["args"] = [error.message]
        described["group"] = [_described(member) for member in error.exceptions]
    else:
        described["args"] = list(ensure_serializable(error.args, json))
    return described


# ---------------------------------------------------------------------------- retry
@final
class _RetryMiddleware(SmartRetryMiddleware):
    """SmartRetryMiddleware driven by a :class:`parallelkit.Retry`."""

    def __init__(self, retry: Retry) -> None:
        on = retry.on
        types: tuple[type[BaseException], ...] | None = None
        if isinstance(on, type):
            types = (on,)
        elif isinstance(on, tuple):
            types = on
        super().__init__(
            default_retry_count=retry.attempts,
            default_retry_label=True,
            no_result_on_retry=True,
            default_delay=retry.backoff,
            max_delay_exponent=retry.max_backoff,
            types_of_exceptions=types,
        )
        self.retry = retry

    def __repr__(self) -> str:
        return f"retry_middleware({self.retry!r})"

    async def on_error(
        self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException
    ) -> None:
        on = self.retry.on
        if not isinstance(on, (type, tuple)) and not on(exception):
            return
        await super().on_error(message, result, exception)

    def make_delay(self, message: TaskiqMessage, retries: int) -> float:
        """Exponential backoff as in :class:`parallelkit.Retry`, plus jitter."""
        retry = self.retry
        delay = min(retry.backoff * 2 ** (retries - 1), retry.max_backoff)
        if retry.jitter:
            delay += random.uniform(0, retry.jitter)
        return float(delay)

    async def on_send(
        self, kicker: AsyncKicker[Any, Any], message: TaskiqMessage, delay: float
    ) -> None:
        # Redis streams have no delayed delivery: wait here, in the worker, with the
        # failed message still unacknowledged (a crash during the wait redelivers it).
        # Not for an item whose caller has left: its retry would not be sent anyway.
        if delay > 0 and not await _backoff(kicker, message, delay):
            logger.info(
                "%s [%s] not retried: its caller has left", message.task_name, message.task_id
            )
            return
        await kicker.kiq(*message.args, **message.kwargs)


async def _backoff(kicker: AsyncKicker[Any, Any], message: TaskiqMessage, delay: float) -> bool:
    """Wait ``delay`` seconds before a retry of ``message``: ``True``; ``False`` (at
    once) when its item's caller has left (:func:`_left`), checked before the wait
    and, on a :class:`~parallelkit.taskiq.RedeliveringStreamBroker`, every ``poll``
    during it: the wait holds one of the worker's ``--max-async-tasks`` slots."""
    if await _left(kicker, message):
        return False
    broker = kicker.broker
    block = getattr(broker, "block", None)  # the broker's poll, in ms
    if getattr(broker, "_pk_left", None) is None or not isinstance(block, int) or block <= 0:
        await anyio.sleep(delay)
        return True
    left = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal left
            await anyio.lowlevel.checkpoint_if_cancelled()  # (the wait may be over already)
            while True:
                await anyio.sleep(block / 1000)
                if await _left(kicker, message):
                    left = True
                    tg.cancel_scope.cancel()  # the wait ends now
                    return

        tg.start_soon(watch, name="parallelkit.taskiq retry backoff")
        await anyio.sleep(delay)
        tg.cancel_scope.cancel()
    return not left


async def _left(kicker: AsyncKicker[Any, Any], message: TaskiqMessage) -> bool:
    """Has the caller of ``message``'s item left (its broker's ``_pk_left``)? Not
    known (another broker, Redis failing: the retry's kick waits for it) is no."""
    left = getattr(kicker.broker, "_pk_left", None)  # (a RedeliveringStreamBroker's)
    if left is None:
        return False
    try:
        return bool(await left(message.task_id, message.labels.get("queue_name") or None))
    except RedisError:
        return False


def retry_middleware(retry: Retry) -> TaskiqMiddleware:
    """Build Taskiq's retry middleware from a :class:`parallelkit.Retry`.

    Retrying a distributed item happens in the **worker**: the failed attempt's
    message is kicked again with the same task id (so the producer, waiting for
    that id, sees only the final outcome). The policy maps one to one:

    * ``attempts`` → total attempts, first one included (Taskiq's ``max_retries``);
    * ``backoff``, ``max_backoff``, ``jitter`` → the wait before each retry,
      ``backoff * 2 ** (n - 1)`` capped at ``max_backoff``, plus up to ``jitter``
      random seconds; the worker waits before kicking the retry (with
      :func:`~parallelkit.taskiq.redis_broker`, it stops waiting, and sends
      nothing, within ``poll`` seconds of the item's caller leaving);
    * ``on`` → which exceptions are retried (types or a predicate).

    Every task of the broker is retried; a task opts out with the label
    ``retry_on_error=False`` and may set its own ``max_retries=N``
    (``@broker.task(retry_on_error=False)``). The middleware is a
    :class:`taskiq.middlewares.SmartRetryMiddleware`.

    Args:
        retry: the policy.

    Returns:
        The middleware, for ``broker.with_middlewares(...)`` on the workers' broker.

    Raises:
        TypeError: ``retry`` is not a :class:`parallelkit.Retry`.

    Example:
        ```python
        broker = RedisStreamBroker(url).with_middlewares(
            retry_middleware(pk.Retry(attempts=4, backoff=0.5, on=(ConnectionError,)))
        )
        ```
    """
    given: object = retry  # checked at runtime too: callers may not run mypy
    if not isinstance(given, Retry):
        msg = f"retry must be a parallelkit.Retry, got {retry!r}"
        raise TypeError(msg)
    return _RetryMiddleware(given)
