"""A BatchLoader's batches from closing to results: the base class of :class:`BatchLoader`.

:mod:`parallelkit._batch.loader` joins each key to the open batch (the per-key
path); this module holds what happens to a batch once it is open: closing it
(its window ends, or it is full), dispatching it (in the loader's task group, or
led by the caller that opened it when the loader is not entered), the one
``load_many(keys)`` call, reading its result into values, and keeping only
successful values in the memo. It also declares the loader's state (its
``__slots__``), which both halves share.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import anyio

from .._core import instrument
from .._core.backend import is_failure, is_stray_cancellation
from .._core.owned import OwnedTaskGroup, leave
from .batch import MISSING, RUNNING, Batch, read_mapping

__all__ = ["BatchDispatch", "LoadMany"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

LoadMany = Callable[[list[K]], Awaitable[Mapping[K, "V | Exception"] | Sequence["V | Exception"]]]


class BatchDispatch(Generic[K, V]):
    """A loader's state, and the life of its batches once they are open.

    :class:`~parallelkit._batch.loader.BatchLoader` is the only subclass: it sets
    this state in its ``__init__`` and adds the keys to the batches; the methods
    here close, dispatch and run them.
    """

    __slots__ = (
        "_batch",
        "_cache",
        "_calls",
        "_default",
        "_full",
        "_keys",
        "_load_many",
        "_loop",
        "_max_batch",
        "_memo",
        "_owner",
        "_requests",
        "_window",
    )

    _load_many: LoadMany[K, V]
    _max_batch: int
    _window: float
    _cache: bool
    _default: Any
    _memo: dict[Any, Batch]
    _batch: Batch | None
    _full: dict[Any, Batch]  # see BatchLoader.__init__
    _owner: OwnedTaskGroup
    _loop: asyncio.AbstractEventLoop | None
    _requests: int
    _keys: int
    _calls: int

    def _close(self, batch: Batch) -> None:
        """Stop ``batch`` taking keys; count the requests of the loads that joined inline.

        :meth:`load`'s inline join (asyncio) adds a key or a future, nothing more:
        its requests are the batch's entries not yet ``counted``.
        """
        if self._batch is batch:
            self._batch = None
            self._requests += len(batch.keys) + len(batch.extra) - batch.counted
            batch.counted = len(batch.keys) + len(batch.extra)

    def _flush(self, batch: Batch) -> None:
        """Close ``batch`` to new keys and run it now (it is full: a repeat of one of its
        keys until it is sent joins it, see :attr:`_full`)."""
        self._close(batch)
        batch.full = True
        if not self._cache:  # (the memo already joins repeats)
            full = self._full
            for key in batch.keys:
                full[key] = batch
        if batch.scope is not None:
            batch.scope.cancel()

    def _abandon(self, batch: Batch) -> None:
        """Every caller of ``batch`` left before it finished (cancelled, timed out):
        nobody wants its values any more, so it is cancelled (DESIGN principle 5; the
        cache's shared loads do the same). From now on no load joins it: it takes no
        more keys, and a load of one of its keys opens a new batch (memo included).
        """
        batch.abandoned = True
        self._close(batch)
        self._sent(batch)
        if self._cache:
            memo = self._memo
            for key in batch.keys:
                if memo.get(key) is batch:
                    del memo[key]
        if batch.cancel is not None:
            batch.cancel.cancel()

    async def _wait(self, batches: Sequence[Batch]) -> None:
        """Wait, as one caller, for ``batches`` (each counts this caller among its
        ``waiters`` already), running the ones this caller opened on a loader not
        entered (``lead``); then leave them.

        A led batch runs in a task of its own, shielded: it goes on while other
        callers wait for it, whatever cancels this caller (anyio's cancellation or
        asyncio's own ``task.cancel()``, which goes through anyio's shield). The
        caller waits like any other: cancelled, it leaves its batches (the last one
        to leave a batch cancels it, see :meth:`_abandon`), and its cancellation is
        raised once the batches it led have ended.
        """
        led = [batch for batch in batches if batch.lead]
        if not led:
            await _wait_then_leave(batches)
            return
        for batch in led:
            batch.lead = False
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            tg.start_soon(self._run_led, led)
            await _wait_then_leave(batches)
        except BaseException as exc:  # this caller's cancellation, or load_many's interrupt
            # waits for the led batches (each goes on while a caller waits for it); a
            # KeyboardInterrupt-like error of load_many comes out as itself, else this
            await leave(tg, type(exc), exc, exc.__traceback__, cancel=False)
            raise
        else:
            await leave(tg, None, None, None, cancel=False)

    async def _run_led(self, batches: list[Batch]) -> None:
        """Not entered: run the batches a caller opened (see :meth:`_wait`)."""
        with anyio.CancelScope(shield=True):  # cancelled only by _abandon, batch by batch
            await self._dispatch_all(batches)

    async def _dispatch_all(self, batches: list[Batch]) -> None:
        if len(batches) == 1:
            await self._dispatch(batches[0])
        else:
            async with anyio.create_task_group() as tg:
                for batch in batches:
                    tg.start_soon(self._dispatch, batch)

    async def _dispatch(self, batch: Batch) -> None:
        try:
            with anyio.CancelScope() as batch.cancel:  # _abandon cancels it: nobody waits
                if batch.abandoned:  # every caller left before this task started
                    batch.cancel.cancel()
                if batch.full:
                    pass
                elif self._window:
                    with anyio.CancelScope() as batch.scope:  # _flush cancels it when full
                        await anyio.sleep(self._window)
                else:  # one scheduling tick: the loads of this tick join
                    await anyio.lowlevel.checkpoint()
                self._close(batch)
                if not batch.abandoned:  # (a full batch has not checkpointed yet)
                    await self._run(batch)
        finally:
            if not batch.finished:  # cancelled before the call: never leave callers hanging
                self._close(batch)  # no load joins a finished batch
                self._sent(batch)
                batch.error = RuntimeError("BatchLoader was closed before this batch ran")
                if self._cache:  # nor is this error memoized
                    self._forget_failures(list(batch.keys), batch)
                batch.finish(self._default)

    def _sent(self, batch: Batch) -> None:
        """``batch`` is sent (or never will be): a load of its keys opens a new batch."""
        full = self._full
        if batch.full and full:
            for key in batch.keys:
                if full.get(key) is batch:
                    del full[key]

    async def _run(self, batch: Batch) -> None:
        self._sent(batch)
        keys = list(batch.keys)
        self._calls += 1
        self._keys += len(keys)
        hook = instrument.current
        if hook is not None:
            hook.batch(len(keys))
        given = keys.copy()  # load_many's own: sorting it cannot misalign the values
        # a load that load_many makes through this loader, of a key of this batch (the
        # memo), would wait for itself, and one of a batch whose load_many waits for
        # this one would wait for ever too: they raise instead (Batch.awaited)
        running = RUNNING.set((*RUNNING.get(), batch))
        batch.running = True
        try:
            try:
                result = await self._load_many(given)
            finally:
                batch.running = False
                RUNNING.reset(running)
            if _awaits_forgotten(result):
                msg = (
                    "load_many returned coroutines as its values (`[fetch(k) for k in "
                    "keys]`): did you forget to await them (`await pk.gather(...)`)?"
                )
                raise TypeError(msg)
            if (
                batch.plain
                and type(result) is list
                and len(result) == len(keys)
                and (result is given or given == keys)
            ):  # nobody reads batch.values (memo batches are never plain)
                batch.aligned = result
            else:
                batch.values = self._align(keys, result, given)
        except Exception as exc:
            batch.error = _stop_iteration_raised(exc)
            batch.keep_traceback(batch.error)
        except BaseException as exc:
            if not is_stray_cancellation(exc):
                if is_failure(exc):  # KeyboardInterrupt-like: it goes on up; callers learn why
                    msg = f"load_many raised {exc!r}; this batch has no values"
                    batch.error = RuntimeError(msg)
                    batch.error.__cause__ = exc
                else:
                    batch.error = RuntimeError("BatchLoader was closed before this batch finished")
                raise
            # asyncio: load_many awaited a future cancelled elsewhere. Its failure: let
            # through, the task group would cancel the loader's `async with` body
            batch.error = exc
            batch.keep_traceback(exc)
        finally:
            if self._cache:
                self._forget_failures(keys, batch)
            batch.finish(self._default)

    def _align(self, keys: list[Any], result: object, given: list[Any]) -> Mapping[Any, Any]:
        """``result`` as a mapping; ``given`` is the list ``load_many`` got (a copy of ``keys``)."""
        if isinstance(result, Mapping):
            return result if type(result) is dict else read_mapping(result, keys)
        if isinstance(result, (str, bytes, bytearray, memoryview)):  # Sequences of chars/ints
            kind = type(result).__name__
            msg = (
                f"load_many returned a {kind}, not a list aligned with the keys (its items "
                f"are characters or ints, not one value per key): return a list or a mapping"
            )
            raise TypeError(msg)
        if isinstance(result, Sequence):
            if result is not given and given != keys:
                msg = (
                    "load_many changed the list of keys it was given (sorted or edited it in "
                    "place) and returned a list: a list result must be aligned with the keys "
                    "in the order given; sort a copy, or return a mapping"
                )
                raise ValueError(msg)
            if len(result) != len(keys):
                msg = (
                    f"load_many returned {len(result)} values for {len(keys)} keys; a list "
                    f"result must be aligned with the keys (or return a mapping)"
                )
                raise ValueError(msg)
            return dict(zip(keys, result, strict=True))
        kind = type(result).__name__
        msg = f"load_many must return a mapping or a list aligned with the keys, got {kind}"
        if inspect.iscoroutine(result):  # `return query(keys)`: an `await` forgotten
            result.close()  # no "never awaited" warning on top of this error
            msg = f"load_many returned a coroutine ({result!r}): did you forget an `await`?"
        raise TypeError(msg)

    def _forget_failures(self, keys: list[Any], batch: Batch) -> None:
        memo = self._memo
        for key in keys:
            if memo.get(key) is not batch:
                continue
            value = batch.values.get(key, MISSING)
            if batch.error is not None or value is MISSING or isinstance(value, BaseException):
                del memo[key]


def _stop_iteration_raised(error: Exception) -> Exception:
    """``error``, unless it is Python's "coroutine raised StopIteration" (PEP 479: a
    ``load_many`` that raised StopIteration): then the clear error every caller gets
    for a StopIteration (one object for the batch, the original as its cause)."""
    cause = error.__cause__
    if (
        type(error) is RuntimeError
        and isinstance(cause, StopIteration)
        and str(error).endswith("raised StopIteration")
    ):
        wrapped = RuntimeError(f"load_many gave a StopIteration: {cause!r}")
        wrapped.__cause__ = error
        return wrapped
    return error


def _awaits_forgotten(result: object) -> bool:
    """Whether ``load_many``'s list or dict has a coroutine for its first value (an
    ``await`` forgotten in a comprehension: the callers would get coroutine objects).

    One look per batch, not per key: the mistake makes every value one. When it is
    seen, every coroutine among the values is closed, so no "never awaited" warning
    comes on top of the error.
    """
    if type(result) is list:
        if not result or not inspect.iscoroutine(result[0]):
            return False
        values: Iterable[object] = result
    elif type(result) is dict:
        values = result.values()
        if not inspect.iscoroutine(next(iter(values), None)):
            return False
    else:
        return False
    for value in values:
        if inspect.iscoroutine(value):
            value.close()
    return True


async def _wait_then_leave(batches: Sequence[Batch]) -> None:
    """Wait for each batch to finish, then leave each (also when cancelled meanwhile:
    the last caller to leave a batch cancels it, see :meth:`BatchDispatch._abandon`)."""
    try:
        for batch in batches:
            if not batch.finished:
                await batch.wait()
    finally:
        for batch in batches:
            batch.leave()
