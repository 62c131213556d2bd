"""BatchLoader: the DataLoader pattern on anyio.

Every :meth:`BatchLoader.load` issued in the same scheduling tick (or within
``window`` seconds of the first) joins one *batch*; the batch becomes a single
``load_many(keys)`` call, dispatched by a task in the loader's task group.

How a caller waits depends on the backend, and that is the only place the
backends differ (:mod:`parallelkit._batch.batch`: one batch's state, and the futures
of its callers). This module is the loader's public face and the per-key path
(joining a key to the open batch); closing, dispatching and running a batch are
in :mod:`parallelkit._batch.dispatch` (:class:`BatchDispatch`, its base class):

* asyncio, loader entered: ``load(key)`` returns a per-call
  :class:`asyncio.Future` (as aiodataloader does), resolved when the batch
  finishes. ``asyncio.gather(*(loader.load(k) ...))`` then needs no task per key,
  and a caller that is cancelled cancels only its own future (the last one
  cancelled cancels the batch, see :meth:`BatchDispatch._abandon`).
* trio, or a loader that is not entered: ``load(key)`` returns a coroutine that
  waits on the batch's one :class:`anyio.Event` (a caller that is not entered
  may have to run the batch itself, see :meth:`BatchLoader._lead`).
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

from typing_extensions import Self, final

from .._core.check import async_callable, count, flag, number, returns_coroutine
from .._core.owned import OwnedTaskGroup
from .batch import MISSING, RUNNING, Batch, KeyFuture, asyncio_loop
from .dispatch import BatchDispatch, K, LoadMany, V

__all__ = ["BatchLoader", "BatchStats"]


@final
@dataclass(frozen=True, slots=True)
class BatchStats:
    """A snapshot of a :class:`BatchLoader`'s counters (``loader.statistics()``).

    Attributes:
        requests: keys asked for through :meth:`~BatchLoader.load` /
            :meth:`~BatchLoader.load_many` (duplicates and memo hits included).
        keys: distinct keys sent to ``load_many``.
        calls: ``load_many`` calls made (one per batch).
    """

    requests: int
    keys: int
    calls: int


@final
class BatchLoader(BatchDispatch[K, V]):
    """Coalesce many single-key loads into few ``load_many(keys)`` calls.

    The N+1 problem: 500 handlers each ask for "the contact of conversation X"
    and you run 500 queries. With a ``BatchLoader`` each handler still writes
    ``await loader.load(x)``, and all loads issued in the same scheduling tick
    become **one** ``load_many([...500 keys])`` call.

    * A batch holds at most ``max_batch`` distinct keys; more are split into
      further batches (they run concurrently). Duplicate keys are loaded once.
    * ``load_many(keys)`` returns a mapping ``{key: value}`` or a list aligned with
      ``keys``. A key missing from a mapping raises :class:`KeyError` to its
      callers only (or returns ``default``); an :class:`Exception` *instance* as a
      value is raised to that key's callers only (a :class:`BaseException` that is
      not an :class:`Exception` is a :class:`TypeError` for that key: neither
      raised nor returned).
    * If ``load_many`` itself raises, every caller of that batch gets **the same
      exception object**. A list of the wrong length, or a result that is neither
      a mapping nor a sequence, fails that batch's callers with a
      :class:`ValueError` / :class:`TypeError` saying so: no caller hangs (a
      ``str`` / ``bytes`` / ``bytearray`` / ``memoryview`` is not a list). A
      list is aligned with the keys *as given*: ``load_many`` that sorts its
      ``keys`` in place and returns a list fails the same way (sort a copy).
    * ``cache=False`` (default) loads a key again in each new batch;
      ``cache=True`` memoizes successful values for the loader's lifetime (keys
      in flight are shared across batches too), unbounded: one entry per distinct
      key loaded. Use it on a loader per request, or :meth:`clear` it. A
      ``load_many`` that loads through a loader a key whose batch is its own, or
      one whose ``load_many`` waits (directly or through other batches) for its
      own, raises a :class:`RuntimeError` saying so instead of waiting for ever.
    * ``n`` distinct keys at once start ``ceil(n / max_batch)`` calls at once; to
      bound how many run, enter a shared :class:`~parallelkit.Limiter` in
      ``load_many`` (``async with limiter: ...``).

    Enter it (``async with``): the loader owns the tasks that dispatch its
    batches. Leaving waits for the batches in flight; leaving with an error
    cancels them, and their callers get a :class:`RuntimeError`. Not entered, it
    still works: the caller that opens a batch runs it in a task of its own
    (shielded, so the callers that joined are never stranded). A caller that is
    cancelled only stops waiting; when the last caller of a batch leaves, the
    batch is cancelled (a shared load nobody wants any more).

    Args:
        load_many: ``async def load_many(keys: list[K]) -> Mapping | Sequence``
            (a sync function is refused before it is ever called).
        max_batch: the most distinct keys per call (>= 1).
        window: seconds to keep collecting after a batch's first key (``0``: one
            scheduling tick).
        cache: memoize values per loader instance.
        default: returned for keys a mapping result leaves out (instead of
            raising :class:`KeyError`).

    Raises:
        TypeError: ``load_many`` is not an async callable, or an option has the
            wrong type (the message names it).
        ValueError: ``max_batch`` < 1, or ``window`` negative or not finite.

    Counters: :meth:`statistics` returns a frozen :class:`BatchStats`
    (``loader.stats`` is the same, an alias).

    Example:
        ```python
        import anyio
        import parallelkit as pk

        calls = []


        async def contacts_by_id(ids: list[int]) -> dict[int, str]:
            calls.append(ids)  # one query for all ids
            return {i: f"contact {i}" for i in ids}


        async def main() -> None:
            async with pk.BatchLoader(contacts_by_id) as contacts:
                a, b = await pk.gather(contacts.load(1), contacts.load(2))
            assert (a, b, len(calls)) == ("contact 1", "contact 2", 1)  # one call


        anyio.run(main)
        ```
    """

    __slots__ = ()  # the state is declared in BatchDispatch

    def __init__(
        self,
        load_many: LoadMany[K, V],
        /,
        *,
        max_batch: int = 500,
        window: float = 0.0,
        cache: bool = False,
        default: Any = MISSING,
    ) -> None:
        async_callable("load_many", load_many, what="an async callable (keys) -> mapping or list")
        self._load_many = load_many
        self._max_batch = count("max_batch", max_batch)
        self._window = number("window", window, zero=True)
        self._cache = flag("cache", cache)
        self._default = default
        self._memo = {}
        self._batch = None
        # the keys of the batches closed because they were full, until they are sent: a
        # repeat of one of them in the same tick joins that batch, never a second one
        self._full = {}
        self._owner = OwnedTaskGroup("this BatchLoader")
        self._loop = None  # entered on asyncio: futures
        self._requests = self._keys = self._calls = 0

    async def __aenter__(self) -> Self:
        await self._owner.enter()
        self._loop = asyncio_loop()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # From here on a load() waits as on a loader not entered (its caller leads
        # its batch): the task group that would run a batch takes no new task, so a
        # future handed out now would never be resolved.
        self._loop = None
        try:
            if self._batch is not None:
                self._flush(self._batch)  # send what is queued now, do not wait a window
            # batches in flight finish (errors go to their callers), unless the body failed
            return await self._owner.exit(exc_type, exc, tb, cancel=False)
        finally:
            if self._batch is not None:
                self._close(self._batch)

    def statistics(self) -> BatchStats:
        """A frozen snapshot of the counters (see :class:`BatchStats`)."""
        requests = self._requests
        batch = self._batch
        if batch is not None:
            requests += len(batch.keys) + len(batch.extra) - batch.counted
        return BatchStats(requests=requests, keys=self._keys, calls=self._calls)

    @property
    def stats(self) -> BatchStats:
        """The same as :meth:`statistics` (an alias: ``loader.stats``)."""
        return self.statistics()

    def _enqueue(self, key: K, future: KeyFuture[Any] | None = None) -> Batch:
        """Put ``key`` in the open batch (or the memo's) and return that batch.

        ``future``, if given, is resolved with the key's outcome when the batch ends.
        """
        if self._batch is None or self._cache or future is not None:
            _check_hashable(key)  # before any state: a bad key opens no (empty) batch
        self._requests += 1
        if self._cache:
            known = self._memo.get(key)
            if known is not None:
                if future is not None:
                    if not known.finished and (running := RUNNING.get()):
                        try:  # a load_many waiting on its own batch, or a cycle?
                            known.awaited(key, running)
                        except RuntimeError as exc:
                            future.set_exception(exc)
                            future.exception()  # retrieved: no "never retrieved" log
                            return known
                    if known.finished:
                        known.resolve(future, key, self._default)
                    else:
                        known.counted += 1
                        known.extra.append((key, future))
                        future.batch = known
                        known.waiters += 1
                return known
        else:
            full = self._full
            if full and (sent := full.get(key)) is not None:  # its batch filled up
                sent.plain = False
                if future is not None:
                    sent.extra.append((key, future))
                    future.batch = sent
                    sent.waiters += 1
                    if running := RUNNING.get():  # (not running yet: noted, never raises)
                        sent.awaited(key, running)
                return sent
        batch = self._batch
        if batch is None:
            batch = self._batch = Batch(None if self._cache else self._loop, self._abandon)
            tg = self._owner.tg
            if tg is None:
                batch.lead = True
            else:
                tg.start_soon(self._dispatch, batch)
        if future is None:
            batch.plain = False  # a coroutine waiter reads batch.values
        else:
            future.batch = batch
            batch.waiters += 1
            if running := RUNNING.get():  # (an open batch: noted, never raises)
                batch.awaited(key, running)
        keys = batch.keys
        if key not in keys:
            keys[key] = future
            batch.counted += 1
            if self._cache:
                self._memo[key] = batch
            if len(keys) >= self._max_batch:
                self._flush(batch)
        elif future is not None:
            batch.plain = False
            batch.counted += 1
            batch.extra.append((key, future))
        return batch

    @returns_coroutine  # pk.map(loader.load, ids): an async callable, as `async def` was
    def load(self, key: K) -> Coroutine[Any, Any, V]:
        """Load one key, batched with every other load of this tick.

        ``await loader.load(key)``. The key joins the open batch when ``load`` is
        *called* on asyncio with the loader entered: there it returns a future
        (that is also a coroutine, for ``asyncio.create_task`` and, with anyio
        4.14 or later, ``tg.start_soon(loader.load, key)``), so
        ``asyncio.gather(*(loader.load(k) ...))`` costs no task per key.
        Elsewhere (trio, a loader not entered) it returns a coroutine that joins
        when it first runs. Either way, a caller that is cancelled only stops
        waiting: the batch goes on for the others, and is cancelled once its
        last caller has left.

        Raises:
            KeyError: ``load_many`` gave no value for ``key`` (and no ``default``).
            Exception: the exception ``load_many`` returned for ``key``, or raised
                for the whole batch.
            TypeError: ``load_many`` gave ``key`` a value that is a
                :class:`BaseException` but not an :class:`Exception`.
            RuntimeError: the loader was closed before the batch ran, or
                ``load_many`` raised a ``KeyboardInterrupt``-like error (its
                ``__cause__``; it goes on up from the task that ran the batch), or
                gave a ``StopIteration``; or (``cache=True``) this load runs inside
                the ``load_many`` call of the batch ``key`` is in, and would wait
                for itself, or of a batch that ``key``'s batch waits for (directly
                or through other batches), and they would wait on each other.
        """
        batch = self._batch
        if batch is None or batch.loop is None:
            return self._load_other(key)
        # the common case, inlined: join the open batch with a future
        future: KeyFuture[V] = KeyFuture(loop=batch.loop)
        keys = batch.keys  # the request is counted when the batch closes (_close)
        try:
            joined = key in keys
        except TypeError:
            _check_hashable(key)  # the error that names the key
            raise
        if joined:
            batch.plain = False
            batch.extra.append((key, future))
        elif self._full and (sent := self._full.get(key)) is not None:  # its batch filled up
            sent.plain = False
            sent.extra.append((key, future))
            self._requests += 1  # (that batch was counted when it closed)
            batch = sent
        else:
            keys[key] = future
            if len(keys) >= self._max_batch:
                self._flush(batch)
        future.batch = batch  # cancelling the future leaves the batch
        batch.waiters += 1
        return future

    def _load_other(self, key: K) -> Coroutine[Any, Any, V]:
        """:meth:`load` when it opens a batch, memoizes, or waits with a coroutine."""
        loop = self._loop
        if loop is None:
            return self._load(key)
        future: KeyFuture[V] = KeyFuture(loop=loop)
        self._enqueue(key, future)
        return future

    async def _load(self, key: K) -> V:
        """:meth:`load` as a coroutine waiting on the batch's event (trio, not entered)."""
        batch = self._batch
        if batch is None or self._cache:
            batch = self._enqueue(key)
        else:  # the common case, inlined: join the open batch
            keys = batch.keys
            try:
                new = key not in keys
            except TypeError:
                _check_hashable(key)  # the error that names the key, counting nothing
                raise
            self._requests += 1
            if new and self._full and (sent := self._full.get(key)) is not None:
                batch = sent  # its batch filled up: wait for that one
            elif new:
                keys[key] = None
                batch.counted += 1
                if len(keys) >= self._max_batch:
                    self._flush(batch)
            batch.plain = False  # this waiter reads batch.values (see _enqueue)
        if not batch.finished:
            if running := RUNNING.get():  # inside a load_many: its own batch, or a cycle?
                batch.awaited(key, running)
            batch.waiters += 1
            await self._wait((batch,))
        if batch.error is None:
            value = batch.values.get(key, MISSING)
            if value is not MISSING and not isinstance(value, BaseException):
                return cast("V", value)
        return cast("V", batch.result(key, self._default))

    async def load_many(self, keys: Iterable[K]) -> list[V]:
        """Load several keys (joining the current batch); values in the order of ``keys``.

        Raises:
            TypeError: ``keys`` is not an iterable of hashable keys, or is a
                ``str`` / ``bytes`` (checked before any key is queued).
            Exception: the first failing key's error, in the order of ``keys``
                (the errors :meth:`load` raises).
            RuntimeError: (``cache=True``) called inside the ``load_many`` call of
                a batch one of ``keys`` is in: it would wait for itself; or of a
                batch that a batch of one of ``keys`` waits for (its ``load_many``
                loads a key of it, directly or through other batches): they would
                wait on each other.
        """
        given: object = keys
        if not isinstance(given, Iterable):
            msg = f"keys must be an iterable of keys, got {type(given).__name__}"
            raise TypeError(msg)
        if isinstance(given, (str, bytes, bytearray)):  # its characters are no keys
            msg = (
                f"keys must be an iterable of keys, got the {type(given).__name__} "
                f"{given!r}: for one key, use load(key) or load_many([key])"
            )
            raise TypeError(msg)
        keys = list(keys)
        try:
            frozenset(keys)  # hashes every key
        except TypeError:
            for key in keys:
                _check_hashable(key, "keys")
        # each distinct key joins once: a repeat arriving after its batch filled up
        # would open another batch and load the key twice
        batches: dict[Any, Batch] = {}
        for key in keys:
            if key in batches:
                self._requests += 1  # a request all the same (see BatchStats)
            else:
                batches[key] = self._enqueue(key)
        waiting = list({id(b): b for b in batches.values() if not b.finished}.values())
        if waiting:
            for batch in waiting:
                batch.waiters += 1
            if running := RUNNING.get():  # inside a load_many: its own batch, or a cycle?
                try:
                    for batch in waiting:
                        batch.awaited(next(k for k in keys if batches[k] is batch), running)
                except RuntimeError:
                    for joined in waiting:  # this caller leaves them all
                        joined.leave()
                    raise
            await self._wait(waiting)
        default = self._default
        return [cast("V", batches[key].result(key, default)) for key in keys]

    def clear(self, *keys: K) -> None:
        """Forget memoized values (``cache=True``): the given keys, or all.

        Raises:
            TypeError: a key is unhashable (checked before any is forgotten).
        """
        for key in keys:
            _check_hashable(key)
        if not keys:
            self._memo.clear()
        for key in keys:
            self._memo.pop(key, None)

    def __repr__(self) -> str:
        open_keys = len(self._batch.keys) if self._batch is not None else 0
        return (
            f"BatchLoader({getattr(self._load_many, '__qualname__', self._load_many)!r}, "
            f"max_batch={self._max_batch}, window={self._window}, cache={self._cache}, "
            f"entered={self._owner.entered}, queued={open_keys})"
        )


def _check_hashable(key: object, name: str = "key") -> None:
    """Raise a :class:`TypeError` naming ``key`` if it cannot be hashed."""
    try:
        hash(key)
    except TypeError:
        msg = f"{name} must be hashable, got {type(key).__name__} {key!r}"
        raise TypeError(msg) from None
