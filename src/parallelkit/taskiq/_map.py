"""The distributed ``map`` / ``imap``: kick one Taskiq message per item on the one fan-out loop."""

from __future__ import annotations

import logging
import pickle
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Iterable
from typing import Any, Literal, TypeVar, overload

import anyio
from pydantic import PydanticUserError
from taskiq import AsyncTaskiqDecoratedTask
from taskiq.compat import parse_obj_as
from taskiq.exceptions import NoResultError, SendTaskError
from taskiq.result import TaskiqResult
from taskiq.result_backends.dummy import DummyResultBackend

from .._core.check import number_or_none
from .._core.errors import ParallelkitError
from .._core.limiter import SupportsLimit
from .._core.outcome import Outcome
from .._core.retry import RetryLike
from .._fanout.fanout import map_options, run_items, size_of
from .._fanout.imap import imap as _imap
from ._broker import KICKED, RedeliveringStreamBroker, _ResultBackend
from ._completions import LABEL_DONE, Completions
from ._outage import patiently
from ._rate import SupportsRate, rate_gate
from ._remote_errors import remote_error as _remote_error  # (tests reach it here)
from ._remote_errors import shown as _shown

__all__ = ["SupportsRate", "imap", "map"]

logger = logging.getLogger("parallelkit.taskiq")

T = TypeVar("T")
U = TypeVar("U")

Progress = Callable[[int, "int | None"], object]
Task = AsyncTaskiqDecoratedTask[[U], Coroutine[Any, Any, T]]

#: result polling: first check after this many seconds, then x1.5 up to the cap
_POLL_FIRST = 0.002
_POLL_MAX = 0.05
#: seconds between the checks that an item's message is still in its stream
_CHECK_EVERY = 1.0
#: seconds an item that ends without its result tries to take its message back
_RECALL_WAIT = 1.0


class _Kick:
    """``await call(item)``: kick ``task(item)`` and wait for its result.

    With :func:`redis_broker`'s result backend, :attr:`completions` (entered around
    the call's pool) wakes an item as soon as its worker publishes it as done;
    polling stays as the fallback. With a :class:`RedeliveringStreamBroker`, an
    item waiting for its result checks every :data:`_CHECK_EVERY` seconds where its
    message is (:meth:`_check`): one Redis lost (a restart without its data, its key
    deleted), or that the consumer group passed without a result, is sent again
    under the same task id.
    """

    __slots__ = ("_broker", "_gate", "_labels", "_name", "_returns", "_task", "_timeout",
                 "completions")  # fmt: skip

    def __init__(self, task: object) -> None:
        """Check ``task`` (first, as ``pk.map`` checks ``fn``); :meth:`configure` then
        takes ``timeout`` and ``rate``, checked after the options ``pk.map`` checks
        before them (``items``, ``settle``, ``limit``...): the same input fails with
        the same error as in ``pk.map``."""
        if not isinstance(task, AsyncTaskiqDecoratedTask):
            msg = (
                f"task must be a Taskiq task (a function decorated with @broker.task), "
                f"got {type(task).__name__} {task!r}"
            )
            raise TypeError(msg)
        backend = task.broker.result_backend
        if isinstance(backend, DummyResultBackend):  # it says every result is ready: None
            msg = (
                f"task {task.task_name} has no result backend, so its results never come "
                "back: build its broker with parallelkit.taskiq.redis_broker(...), or give "
                "it one with broker.with_result_backend(...)"
            )
            raise TypeError(msg)
        self._timeout: float | None = None
        self._gate: Callable[[], Awaitable[object]] | None = None
        # acknowledged only once its result is saved, whatever the workers' --ack-type:
        # a message the group passed without a result then has none to come (_check)
        labels: dict[str, Any] = {"ack_type": "when_saved"}
        self.completions: Completions | None = None
        if isinstance(backend, _ResultBackend):
            self.completions = Completions(backend._client(), backend.prefix_str or "taskiq")
            labels[LABEL_DONE] = self.completions.channel
        self._task: AsyncTaskiqDecoratedTask[Any, Any] = task
        self._labels = labels
        broker = task.broker
        self._broker = broker if isinstance(broker, RedeliveringStreamBroker) else None
        self._name: str = task.task_name
        self._returns: Any = task.return_type  # what a result is parsed into (or None)

    def configure(self, rate: object, timeout: object) -> Exception | None:
        """Check and keep ``timeout`` and ``rate`` (in ``pk.map``'s order); a bad one's
        error is returned: raised after the checks ``pk.map`` makes before, not ``retry``'s."""
        try:
            self._timeout = number_or_none("timeout", timeout)
            self._gate = rate_gate(rate)
        except (TypeError, ValueError) as exc:
            return exc
        if self._timeout is not None:  # the worker stops the attempt too
            self._labels["timeout"] = self._timeout
        return None

    def _parse(self, value: Any) -> Any:
        """``value`` parsed into the task's return type, as Taskiq does; the raw
        value when it does not fit, or when the type is one pydantic cannot parse
        into (a plain class in ``-> Company | None``, ``-> list[Company]``): the
        task succeeded, and its ``None`` or ``[]`` is its result."""
        returns = self._returns
        if returns is None:
            return value
        try:
            return parse_obj_as(returns, value)
        except PydanticUserError:  # no schema for the type: the same for every result
            self._returns = None
        except ValueError:  # as Taskiq: keep the raw value
            pass
        return value

    async def __call__(self, item: Any) -> Any:
        if self._gate is not None:  # the rate: before the kick, outside its timeout
            await self._gate()
        if self._timeout is None:
            return await self._run(item)
        with anyio.move_on_after(self._timeout):
            return await self._run(item)
        msg = (
            f"Taskiq task {self._name} gave no result for {_shown(item)} within "
            f"timeout={self._timeout}s (the worker may still be running it)"
        )
        raise TimeoutError(msg)

    async def _kick(self, item: Any, task_id: str | None = None) -> Any:
        """Send ``task(item)`` (under ``task_id`` when sending it again); its handle.

        Cut short (the call cancelled while Redis appends the message), the message
        may be in the stream, its id never known: it is taken back by its task id.
        """
        if task_id is None:  # (known before the kick, to take back a kick cut short)
            task_id = self._task.broker.id_generator()
        kicker = self._task.kicker().with_labels(**self._labels).with_task_id(task_id)
        try:
            return await kicker.kiq(item)
        except anyio.get_cancelled_exc_class():
            await self._recall(None, task_id)
            raise
        except SendTaskError as exc:
            cause = exc.__cause__  # the broker's serializer, or the broker (kept as is)
            if not isinstance(cause, (TypeError, ValueError, pickle.PickleError)):
                raise
            msg = (
                f"item {_shown(item)} cannot be sent to Taskiq task {self._name}: its broker's "
                f"serializer failed ({type(cause).__name__}: {cause}); items must be values "
                "the serializer can encode (JSON with the default one)"
            )
            raise TypeError(msg) from cause

    def _sent(self, task_id: str) -> tuple[str, Any, bool] | None:
        """The stream and message id of the kick of ``task_id`` just made, if known
        (and ``False``: not sent again yet)."""
        kicked = KICKED.get()
        if self._broker is None or kicked is None or kicked[0] != task_id:
            return None
        return kicked[1], kicked[2], False

    async def _check(
        self,
        item: Any,
        task_id: str,
        sent: tuple[str, Any, bool],
        read: Callable[[], Awaitable[TaskiqResult[Any] | None]],
    ) -> tuple[tuple[str, Any, bool], TaskiqResult[Any] | None]:
        """Will the result of ``task_id`` still come? Where its message ``sent`` is
        (stream, id, sent again already) says: queued or taken by a worker, wait.

        Gone from the stream (Redis lost it) or passed by the consumer group with
        no worker holding it (acknowledged, or skipped by a group created after
        it), no worker will run it: its result, read *after* that (a worker
        acknowledges only once the result is saved), is there or will never come.
        Then a worker's retry (a later message under the same task id) is followed,
        also for a message trimmed away after its ack; otherwise the item is sent
        again under its task id: each time Redis lost it, but once only for a
        message passed without a result (a result lost, a task no worker knows),
        whose second time fails the item.
        """
        broker = self._broker
        assert broker is not None
        stream, msg_id, again = sent
        where = await patiently(broker._pk_where, stream, msg_id)
        if where not in ("gone", "passed"):
            return sent, None
        if (result := await read()) is not None:
            return sent, result
        moved = await patiently(broker._pk_moved, stream, msg_id, task_id)
        if moved is not None:  # the worker retried it: wait for the retry
            return (stream, moved, again), None
        if where == "passed" and again:
            msg = (
                f"Taskiq task {self._name} [{task_id}] for {_shown(item)}: its message was "
                "acknowledged without a result, again after it was sent a second "
                "time; no worker registers a task of that name (see the workers' "
                "log: 'task ... is not found'), or its result was deleted or expired "
                "before it was read"
            )
            raise ParallelkitError(msg)
        await self._kick(item, task_id)
        again = again or where == "passed"
        resent = self._sent(task_id)
        if resent is None:  # pragma: no cover - the broker sets it on every kick
            return (stream, msg_id, again), None
        return (resent[0], resent[1], again), None

    async def _recall(self, sent: tuple[str, Any, bool] | None, task_id: str) -> None:
        """The item ends without its result (its call cancelled or failed, its
        timeout): take its message ``sent`` back (or, not known, the newest one
        carrying ``task_id``) if no worker has taken it yet, so that nothing runs
        later whose result nobody reads. Best effort, shielded, for at most
        :data:`_RECALL_WAIT` seconds: a message left (Redis away or slow, a worker
        took it) runs, as one a worker took does."""
        broker = self._broker
        if broker is None:
            return
        if sent is None:  # (the stream a kick of this task goes to, as the broker picks it)
            stream, msg_id = self._task.labels.get("queue_name") or broker.queue_name, None
        else:
            stream, msg_id = sent[:2]
        with anyio.CancelScope(shield=True), anyio.move_on_after(_RECALL_WAIT):
            try:
                await broker._pk_recall(stream, msg_id, task_id)
            except Exception:  # never in place of the caller's own error or cancellation
                logger.debug("could not take back task %s from %r", task_id, stream, exc_info=True)

    async def _run(self, item: Any) -> Any:
        handle = await self._kick(item)
        task_id: str = handle.task_id
        sent = self._sent(task_id)
        check_at = anyio.current_time() + _CHECK_EVERY
        backend = handle.result_backend
        direct = isinstance(backend, _ResultBackend)  # one GET a poll

        async def read() -> TaskiqResult[Any] | None:
            # a read Redis fails (a restart, a failover) is tried again for ~3 s: the
            # worker saves the result through the same blip
            if direct:
                return await patiently(backend.fetch, task_id)
            # (the backend directly: the handle's is_ready hides its error in Taskiq's
            # ResultIsReadyError, so neither the wait nor the caller would see it)
            if not await patiently(backend.is_result_ready, task_id):
                return None
            # the backend directly: AsyncTaskiqTask.get_result would log a warning when
            # it fails to parse a failed task's (absent) value into the return type
            result: TaskiqResult[Any] = await patiently(backend.get_result, task_id)
            return result

        delay = _POLL_FIRST
        completions = self.completions if direct else None
        if completions is not None:
            completions.expect(task_id)
        try:
            while (result := await read()) is None:
                if sent is not None and anyio.current_time() >= check_at:
                    sent, result = await self._check(item, task_id, sent, read)
                    if result is not None:
                        break
                    check_at = anyio.current_time() + _CHECK_EVERY
                if completions is not None:
                    await completions.wait(task_id, delay)
                else:
                    await anyio.sleep(delay)
                delay = min(delay * 1.5, _POLL_MAX)
        except BaseException:  # cancelled (the call ended, the timeout) or failed
            if sent is not None:
                await self._recall(sent, task_id)
            raise
        finally:
            if completions is not None:
                completions.forget(task_id)
        error = result.error
        if error is not None and not isinstance(error, NoResultError):
            raise _remote_error(result, task_id, self._name)
        return self._parse(result.return_value)


# ---------------------------------------------------------------------------- map / imap
@overload
async def map(
    task: Task[U, T],
    items: Iterable[U] | AsyncIterable[U],
    /,
    *,
    limit: int | SupportsLimit | None = ...,
    rate: float | SupportsRate | SupportsLimit | None = ...,
    timeout: float | None = ...,
    retry: RetryLike | None = ...,
    settle: Literal[False] = ...,
    progress: Progress | None = ...,
) -> list[T]: ...
@overload
async def map(
    task: Task[U, T],
    items: Iterable[U] | AsyncIterable[U],
    /,
    *,
    limit: int | SupportsLimit | None = ...,
    rate: float | SupportsRate | SupportsLimit | None = ...,
    timeout: float | None = ...,
    retry: RetryLike | None = ...,
    settle: Literal[True],
    progress: Progress | None = ...,
) -> list[Outcome[T]]: ...
async def map(
    task: Task[U, T],
    items: Iterable[U] | AsyncIterable[U],
    /,
    *,
    limit: int | SupportsLimit | None = None,
    rate: float | SupportsRate | SupportsLimit | None = None,
    timeout: float | None = None,
    retry: RetryLike | None = None,
    settle: bool = False,
    progress: Progress | None = None,
) -> list[T] | list[Outcome[T]]:
    """Run ``task(item)`` on Taskiq workers for every item; results in input order.

    The same contract as :func:`parallelkit.map`, with the work done by worker
    processes: each item is one Taskiq message (``task.kiq(item)``) and its result
    is polled from the broker's result backend. At most ``limit`` items are in
    flight, items are pulled from ``items`` lazily, results keep input order.

    Start the broker in the producer first (``await broker.startup()``).

    Args:
        task: a Taskiq task of one argument (``@broker.task``). Items and results
            travel through the broker's serializer (JSON by default).
        items: the inputs, an iterable or async iterable, pulled lazily.
        limit: most items in flight at once: an int or a shared limiter (a
            ``RedisLimiter`` bounds several producers together). Set it near the
            workers' total capacity (workers x ``--max-async-tasks``), or twice
            that to keep workers busy while results travel back. ``None`` kicks
            every item at once, reading the whole input first.
        rate: most kicks per second: a number (an in-process
            :class:`~parallelkit.Limiter`), a :class:`SupportsRate` such as a shared
            :class:`~parallelkit.Limiter`, or a shared limiter such as
            ``parallelkit.redis.RedisLimiter(..., rate=25)``, entered once per kick, to
            hold one global rate across all producers. A limiter without a
            rate (``Limiter(concurrency=2)``) is refused, as in ``pk.map``.
        timeout: seconds from kicking an item until its result is back (time
            queued, retries and all; not the wait for ``rate``, before the kick);
            past it the item fails with :class:`TimeoutError`. The worker is told
            the same timeout, so it stops an attempt that runs longer; a message no
            worker has taken by then is taken back, and the workers do not retry it.
        retry: a :class:`~parallelkit.Retry` (or a ``tenacity.AsyncRetrying``), as
            in :func:`parallelkit.map`: an item whose result is an error the policy
            retries is kicked again from here, as a new message, ``timeout`` applying
            to each attempt. Retrying in the worker
            (:func:`~parallelkit.taskiq.retry_middleware`) needs no round trip
            through the producer and is usually the better place; both may be used.
        settle: return an :class:`~parallelkit.Outcome` per item instead of
            raising the first failure.
        progress: called as ``progress(done, total)`` after each item.

    Returns:
        The results in input order (or outcomes, with ``settle=True``).

    Raises:
        Exception: (fail-fast) the first failed item's exception, rebuilt with its
            original type when the producer can import it, the worker's traceback
            as ``__cause__`` (:class:`RemoteTraceback`), an exception group with
            its members; no new item is kicked after it. The messages of the
            others no worker has taken yet are taken back; taken ones still run,
            and are not retried by the workers.
        TimeoutError: an item's result did not come back within ``timeout``.
        parallelkit.ParallelkitError: an item's message was acknowledged without
            a result twice (sent again once after the first): no worker registers
            a task of that name, or its result was lost again; or its stored
            result cannot be read (a worker with another result serializer).
        redis.exceptions.ConnectionError: Redis stayed unreachable while an
            item's result was read, for longer than the read waits for it (about
            3 s: a restart or a failover is waited out); a kick that long fails
            with Taskiq's ``SendTaskError``, redis-py's error as its ``__cause__``.
        TypeError: ``task`` is not a Taskiq task or its broker has no result
            backend, or a bad argument type (before anything is kicked); an item the
            broker's serializer cannot encode (that item, which is not sent).
        ValueError: a bad ``limit``, ``rate`` or ``timeout``.

    Example:
        ```python
        await broker.startup()
        outcomes = await parallelkit.taskiq.map(detect, company_ids, limit=200,
                                                timeout=120, settle=True)
        ```
    """
    call = _Kick(task)
    bad = call.configure(rate, timeout)  # pk.map's order: ..., limit, timeout, rate, retry
    checked = retry if bad is None else None
    options = map_options(call, items, limit, None, None, checked, settle, progress)
    if bad is not None:
        raise bad
    if call.completions is None or size_of(items) == 0:  # (nothing to subscribe for)
        return await run_items(options.call, items, options.workers, settle, progress)
    async with call.completions:
        return await run_items(options.call, items, options.workers, settle, progress)


@overload
def imap(
    task: Task[U, T],
    items: Iterable[U] | AsyncIterable[U],
    /,
    *,
    limit: int | SupportsLimit | None = ...,
    ordered: bool = ...,
    rate: float | SupportsRate | SupportsLimit | None = ...,
    timeout: float | None = ...,
    retry: RetryLike | None = ...,
    settle: Literal[False] = ...,
) -> _imap[T]: ...
@overload
def imap(
    task: Task[U, T],
    items: Iterable[U] | AsyncIterable[U],
    /,
    *,
    limit: int | SupportsLimit | None = ...,
    ordered: bool = ...,
    rate: float | SupportsRate | SupportsLimit | None = ...,
    timeout: float | None = ...,
    retry: RetryLike | None = ...,
    settle: Literal[True],
) -> _imap[Outcome[T]]: ...
def imap(
    task: Task[U, T],
    items: Iterable[U] | AsyncIterable[U],
    /,
    *,
    limit: int | SupportsLimit | None = None,
    ordered: bool = False,
    rate: float | SupportsRate | SupportsLimit | None = None,
    timeout: float | None = None,
    retry: RetryLike | None = None,
    settle: bool = False,
) -> _imap[T] | _imap[Outcome[T]]:
    """Stream the results of ``task(item)`` on Taskiq workers as they come back.

    :func:`map` for inputs too large to hold all results of, or to act on each
    result at once: an ``async with`` block like :class:`parallelkit.imap`, with
    memory O(``limit``). Results come in completion order, or input order with
    ``ordered=True``. Leaving the block stops kicking and stops waiting; the
    messages no worker has taken yet are taken back (taken ones still run, and
    are not retried by the workers).

    Args:
        task: the Taskiq task, as in :func:`map`.
        items: the inputs, pulled lazily, as in :func:`map`.
        limit: most items in flight, as in :func:`map`.
        ordered: yield in input order instead of completion order.
        rate: most kicks per second, as in :func:`map`.
        timeout: seconds per item, as in :func:`map`.
        retry: kicks a failed item again from here, as in :func:`map`.
        settle: yield outcomes, as in :func:`map`.

    Returns:
        An async context manager whose value is an async iterator of results.

    Example:
        ```python
        async with parallelkit.taskiq.imap(detect, company_ids, limit=200) as found:
            async for count in found:
                total += count
        ```
    """
    call = _Kick(task)
    bad = call.configure(rate, timeout)  # pk.imap's order, as in map
    checked = retry if bad is None else None
    stream: _imap[Any] = _imap(
        call, items, limit=limit, ordered=ordered, retry=checked, settle=settle
    )  # type: ignore[call-overload]
    if bad is not None:
        raise bad
    if size_of(items) != 0:  # (an empty input subscribes to nothing)
        stream.around = call.completions  # subscribed while the stream is open
    return stream
