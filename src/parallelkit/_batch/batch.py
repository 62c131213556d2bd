"""One batch of a :class:`~parallelkit.BatchLoader`, and how its callers wait for it.

A :class:`Batch` holds the keys of one ``load_many`` call, the futures of the
callers waiting on it and, once the call returned, its outcome, which
:meth:`Batch.finish` hands to every caller. How a caller waits is the only
place where the backends differ (see :mod:`parallelkit._batch.loader`):

* asyncio, loader entered: one :class:`KeyFuture` per caller (an
  :class:`asyncio.Future` that is also a coroutine), resolved by ``finish``;
* otherwise: :meth:`Batch.wait`, one :class:`anyio.Event` for the batch.

Either way a batch counts the callers waiting for it (``waiters``); the last one
to leave before it finished cancels it (:meth:`Batch.leave`).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, NoReturn, TypeVar, cast

import anyio
from typing_extensions import final

__all__ = ["MISSING", "RUNNING", "Batch", "KeyFuture", "asyncio_loop", "read_mapping"]

V = TypeVar("V")

MISSING: Any = object()
"""No value: a key ``load_many`` did not return, or no ``default=``."""

RUNNING: contextvars.ContextVar[tuple[Batch, ...]] = contextvars.ContextVar(
    "parallelkit_batches_running", default=()
)
"""The batches whose ``load_many`` call this task/context is inside (set per batch by
:meth:`BatchDispatch._run`, inherited by the tasks ``load_many`` starts): a load that
would wait for one of them waits for itself, and the waits of these calls are noted to
see two batches waiting on each other (see :meth:`Batch.awaited`)."""


def asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop if the current task runs on asyncio, else ``None``."""
    try:
        import sniffio
    except ModuleNotFoundError:  # pragma: no cover - trio needs sniffio: this is asyncio
        pass
    else:
        try:
            if sniffio.current_async_library() != "asyncio":
                return None
        except sniffio.AsyncLibraryNotFoundError:  # pragma: no cover - not in a task
            return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # pragma: no cover - not in a task
        return None


def read_mapping(result: Mapping[Any, Any], keys: Iterable[Any]) -> dict[Any, Any]:
    """A mapping result that is not a ``dict``, read once per key into one.

    Its lookups run the user's code (a lazy, remote or decoding mapping): a lookup
    that raises is that key's error, raised to its callers only, instead of an error
    inside the batch's bookkeeping that left the other callers waiting. A key the
    mapping does not have stays out (``KeyError`` or ``default=``).
    """
    values: dict[Any, Any] = {}
    for key in keys:
        try:
            value = result.get(key, MISSING)
        except Exception as exc:
            value = exc
        if value is not MISSING:
            values[key] = value
    return values


@final
class KeyFuture(asyncio.Future[V], Coroutine[Any, Any, V]):
    """What :meth:`BatchLoader.load` returns on asyncio: one caller's future.

    A plain :class:`asyncio.Future` to ``asyncio.gather`` / ``await`` (no task
    per key), and a coroutine to whoever asks for one (``tg.start_soon(loader.load,
    key)``, ``asyncio.create_task(loader.load(key))``), as ``load`` was when it
    was an ``async def``: ``send`` / ``throw`` step the future's own iterator.

    Cancelling it (the caller's task cancelled while it waits, ``asyncio.gather`` or
    ``wait_for`` giving up, a task of it cancelled before its first step) is that
    caller leaving its batch (:meth:`Batch.leave`).
    """

    __slots__ = ("batch",)

    batch: Batch  # set as soon as the future joins a batch

    def send(self, value: Any, /) -> Any:
        return self.__await__().send(value)

    def throw(self, *exc_info: Any) -> Any:
        try:
            return self.__await__().throw(*exc_info)
        except BaseException:
            self.cancel()  # its caller stopped waiting (nothing, once it has its outcome)
            raise

    def cancel(self, msg: Any = None) -> bool:
        """Give up waiting: the batch no longer resolves this future, and once every
        caller of that batch has left, the batch is cancelled."""
        if not super().cancel(msg):
            return False
        batch: Batch | None = getattr(self, "batch", None)
        if batch is not None:
            batch.leave()
        return True

    def close(self) -> None:
        """Give up: the batch no longer resolves this future."""
        self.cancel()


def _stop_iteration(error: StopIteration) -> RuntimeError:
    """A StopIteration ``load_many`` gave, as the error its callers get: a future cannot
    hold one, and a coroutine cannot raise one (Python would turn it into an unclear
    "coroutine raised StopIteration"), so every path raises this instead."""
    wrapped = RuntimeError(f"load_many gave a StopIteration: {error!r}")
    wrapped.__cause__ = error
    return wrapped


def _not_raised(key: Any, value: BaseException) -> TypeError:
    """The error for a key whose value is a BaseException but not an Exception (a
    ``CancelledError`` kept by ``gather(return_exceptions=True)``): only an Exception
    value is raised for its key, and this one must not pass for a value either."""
    msg = (
        f"load_many returned {type(value).__name__} {value!r} as the value of key {key!r}: "
        f"it is not raised for that key (only an Exception value is), nor returned as a "
        f"value; return an Exception for the key, or raise from load_many"
    )
    error = TypeError(msg)
    error.__cause__ = value
    return error


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    """Fail one caller's future (unless it gave up), marking the error retrieved.

    Marking it retrieved keeps asyncio from logging "Future exception was never
    retrieved" for a ``load()`` nobody awaited (e.g. the rest of a failed
    ``gather``); a caller that awaits it still gets the error raised.
    """
    if future.done():
        return
    if isinstance(error, StopIteration):  # a future cannot hold one (nor raise it from a coro)
        error = _stop_iteration(error)
    future.set_exception(error)
    future.exception()


@final
class Batch:
    """The keys of one ``load_many`` call, their callers' futures, and its outcome."""

    __slots__ = (
        "abandon",
        "abandoned",
        "aligned",
        "cancel",
        "counted",
        "done",
        "error",
        "extra",
        "finished",
        "full",
        "keys",
        "lead",
        "loop",
        "plain",
        "running",
        "scope",
        "tracebacks",
        "values",
        "waiters",
        "waits_for",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop | None, abandon: Callable[[Batch], None]
    ) -> None:
        self.loop = loop  # asyncio, entered, no memo: load() joins with a future, inline
        self.lead = False  # no task group: the caller that opened the batch runs it
        # the callers waiting for it: a future each, a coroutine caller once per batch
        self.waiters = 0
        self.abandon = abandon  # called when the last of them leaves before it finished
        self.abandoned = False  # every caller left: it is cancelled, nobody joins it
        self.cancel: anyio.CancelScope | None = None  # its dispatch, cancelled when abandoned
        # ordered, deduplicated keys -> the first asyncio caller's future (or None)
        self.keys: dict[Any, asyncio.Future[Any] | None] = {}
        self.extra: list[tuple[Any, asyncio.Future[Any]]] = []  # more futures per key
        self.counted = 0  # entries of keys + extra already in the loader's request count
        self.plain = loop is not None  # one future per key, nothing else waits (see _run)
        self.aligned: list[Any] | None = None  # a plain batch's list result, as returned
        self.done: anyio.Event | None = None  # made for coroutine waiters (see wait)
        self.scope: anyio.CancelScope | None = None  # the dispatch wait, cancelled when full
        self.full = False
        self.running = False  # inside its load_many call (see RUNNING)
        # while running: the unfinished batches its load_many call waits for (see awaited)
        self.waits_for: set[Batch] | None = None
        self.finished = False
        self.values: Mapping[Any, Any] = {}
        self.error: BaseException | None = None  # the whole call failed
        # each error's traceback as the batch got it, by id(error) (made on first use)
        self.tracebacks: dict[int, TracebackType | None] | None = None

    def keep_traceback(self, error: BaseException) -> None:
        """Remember ``error``'s traceback as it is now (before any caller raises it)."""
        kept = self.tracebacks
        if kept is None:
            kept = self.tracebacks = {}
        kept.setdefault(id(error), error.__traceback__)

    def _raise(self, error: BaseException) -> NoReturn:
        """Raise ``error`` (shared by every caller of the batch) with the traceback it had
        when the batch got it: each caller's raise does not add to the next one's."""
        if isinstance(error, StopIteration):  # from a coroutine: Python's unclear error
            raise _stop_iteration(error)
        self.keep_traceback(error)
        assert self.tracebacks is not None
        raise error.with_traceback(self.tracebacks[id(error)])

    def result(self, key: Any, default: Any) -> Any:
        error = self.error
        if error is not None:
            self._raise(error)
        value = self.values.get(key, MISSING)
        if value is MISSING:
            if default is not MISSING:
                return default
            msg = f"load_many returned no value for key {key!r}"
            raise KeyError(msg)
        if isinstance(value, BaseException):
            if isinstance(value, Exception):
                self._raise(value)
            raise _not_raised(key, value)
        return value

    def awaited(self, key: Any, running: tuple[Batch, ...]) -> None:
        """A load of ``key`` is about to wait for this unfinished batch, in a task/context
        that runs the ``load_many`` calls of the batches ``running`` (:data:`RUNNING`,
        not empty: a load outside any ``load_many`` cannot close a cycle, and pays
        nothing here).

        Raise a :class:`RuntimeError` if that wait would never end: this batch is one of
        ``running`` (its own batch), or its ``load_many`` waits, directly or through
        other batches, for one of them (two batches waiting on each other). Else note
        that the innermost of ``running`` waits for this batch, so that a later load
        closing a cycle through it is seen. Only a batch that is running can close a
        cycle (a wait is noted only from a ``load_many`` call in progress), so the
        search runs only then; a batch forgets what it waited for when it finishes.
        """
        if self.running:
            if self in running:
                msg = (
                    f"BatchLoader: load_many is waiting on its own batch: key {key!r} is "
                    f"in the batch this load_many call is loading (cache=True joins a key "
                    f"to its batch in flight), so it would wait for itself forever; load "
                    f"that key without the loader (or with another loader)"
                )
                raise RuntimeError(msg)
            if self._waits_for_any(running):
                msg = (
                    f"BatchLoader: load_many calls are waiting on each other: key {key!r} "
                    f"is in a batch whose load_many waits (directly or through other "
                    f"batches) for a key of the batch this load_many call is loading, so "
                    f"both would wait forever (cache=True joins a key to its batch in "
                    f"flight); load one of them without the loader (or with another loader)"
                )
                raise RuntimeError(msg)
        waiter = running[-1]
        if waiter.finished:  # a task its load_many started, outliving it: waits for nothing
            return
        waits = waiter.waits_for
        if waits is None:
            waiter.waits_for = {self}
        else:
            waits.add(self)

    def _waits_for_any(self, batches: tuple[Batch, ...]) -> bool:
        """Whether this batch's ``load_many`` waits, directly or through the batches
        their ``load_many`` calls wait for, for one of ``batches``."""
        seen: set[Batch] = {self}
        stack = [self]
        while stack:
            for other in stack.pop().waits_for or ():
                if other.finished or other in seen:
                    continue
                if other in batches:
                    return True
                seen.add(other)
                stack.append(other)
        return False

    def leave(self) -> None:
        """One caller stopped waiting: the last one to leave before the batch finished
        cancels it (nobody wants its values any more)."""
        self.waiters -= 1
        if not self.waiters and not self.finished and not self.abandoned:
            self.abandon(self)

    async def wait(self) -> None:
        """Wait for the batch to finish (the coroutine waiters: trio, load_many, not entered)."""
        if not self.finished:
            done = self.done
            if done is None:
                done = self.done = anyio.Event()
            await done.wait()

    def resolve(self, future: asyncio.Future[Any], key: Any, default: Any) -> None:
        """Give one caller's future its outcome (the batch has finished)."""
        if future.done():  # the caller was cancelled
            return
        try:
            value = self.result(key, default)
        except Exception as exc:
            _fail(future, exc)
        else:
            future.set_result(value)

    def finish(self, default: Any) -> None:
        """Mark the batch finished and wake every caller."""
        self.finished = True
        self.waits_for = None
        if self.done is not None:
            self.done.set()
        keys = self.keys
        error = self.error
        aligned = self.aligned
        if aligned is not None:  # plain: every key has a future, no values dict needed
            futures = cast("Iterable[asyncio.Future[Any]]", keys.values())
            for plain_future, value in zip(futures, aligned, strict=True):
                if isinstance(value, BaseException):
                    if not isinstance(value, Exception):  # the key, looked up only here
                        key = next(k for k, f in keys.items() if f is plain_future)
                        value = _not_raised(key, value)
                    _fail(plain_future, value)
                    continue
                try:
                    plain_future.set_result(value)
                except asyncio.InvalidStateError:  # the caller was cancelled
                    continue
            return
        if error is not None:
            for future in keys.values():
                if future is not None:
                    _fail(future, error)
            for _, future in self.extra:
                _fail(future, error)
            return
        get = self.values.get
        for key, future in keys.items():
            if future is not None:
                value = get(key, MISSING)
                if value is MISSING or isinstance(value, BaseException):
                    self.resolve(future, key, default)
                else:  # the common case, inlined
                    try:
                        future.set_result(value)
                    except asyncio.InvalidStateError:  # the caller was cancelled
                        continue
        for key, future in self.extra:
            self.resolve(future, key, default)
