"""count_queries / max_queries: count the SQL statements one request sends, guard a budget.

A counter counts the statements sent **from the context that entered it**: the
task (or thread) running the ``with`` block and the tasks it starts inside the
block (they inherit its context variables), not other requests sharing the
engine. How: while at least one counter on an engine (or connection) is active,
one ``before_cursor_execute`` listener sits on it; it reads a context variable
holding the counters active in the current context and appends to those. Every
statement sent to the database counts once (an ``executemany`` too);
``BEGIN`` / ``COMMIT`` issued by the driver do not.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from typing_extensions import Self, final

from .._core.check import count
from .._core.errors import ParallelkitError
from .._core.owned import request_scoped

__all__ = ["CapturedQuery", "QueryCounter", "TooManyQueries", "count_queries", "max_queries"]


@final
@dataclass(frozen=True, slots=True)
class CapturedQuery:
    """One statement seen by :func:`count_queries`: its SQL text and parameters."""

    statement: str
    parameters: Any
    executemany: bool = False

    def __str__(self) -> str:
        return self.statement


def _targets(target: object, who: str = "count_queries()") -> Engine | Connection:
    """Resolve what to listen on: the sync Engine (or Connection) behind ``target``.

    ``who`` is the call the user wrote, named by the errors.
    """
    if isinstance(target, (Engine, Connection)):
        return target
    if isinstance(target, AsyncEngine):
        return target.sync_engine
    if isinstance(target, AsyncConnection):
        return target.sync_connection or target.sync_engine
    if isinstance(target, AsyncSession):
        target = target.sync_session
    if isinstance(target, (scoped_session, async_scoped_session)):
        target = target.session_factory  # the factory its sessions come from (no session made)
    if isinstance(target, (sessionmaker, async_sessionmaker)):
        bind = target.kw.get("bind")
        if bind is None:
            msg = (
                f"{who} got {type(target).__name__} {target!r}, which has no bind "
                "(its sessions are bound later or one by one): pass the engine to count"
            )
            raise TypeError(msg)
        return _targets(bind, who)
    if isinstance(target, Session):
        bind = target.bind
        if bind is not None:
            return _targets(bind, who)
        msg = (
            f"{who} needs a session with a single bind (Session(bind=engine)); "
            "for a session with several binds, pass the engine to count"
        )
        raise TypeError(msg)
    msg = (
        f"{who} target must be an Engine, Connection, Session, sessionmaker, scoped_session "
        f"or their async counterparts, got {type(target).__name__} {target!r}"
    )
    raise TypeError(msg)


# the counters active in this context (a task, a thread, and what they start)
_ACTIVE: ContextVar[tuple[QueryCounter, ...]] = ContextVar("parallelkit_counters", default=())
# a cache's background refresh started by a request's hit is not that request's work
request_scoped(_ACTIVE, ())
_listeners: dict[int, tuple[Engine | Connection, Callable[..., None], int]] = {}
_listeners_lock = threading.Lock()


def _listener(target: Engine | Connection) -> Callable[..., None]:
    def on_execute(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        for counter in _ACTIVE.get():
            if counter._target is target and counter._listening:
                counter.queries.append(CapturedQuery(statement, parameters, executemany))

    return on_execute


def _listen(target: Engine | Connection) -> None:
    with _listeners_lock:
        entry = _listeners.get(id(target))
        if entry is None:
            listener = _listener(target)
            event.listen(target, "before_cursor_execute", listener)
            _listeners[id(target)] = (target, listener, 1)
        else:
            _listeners[id(target)] = (target, entry[1], entry[2] + 1)


def _unlisten(target: Engine | Connection) -> None:
    with _listeners_lock:
        _, listener, users = _listeners[id(target)]
        if users > 1:
            _listeners[id(target)] = (target, listener, users - 1)
            return
        del _listeners[id(target)]
        event.remove(target, "before_cursor_execute", listener)


_OTHER_CONTEXT = (
    "count_queries() was left in another context than the one that entered it, so the "
    "statements sent in between were not counted (a count of 0 would pass any budget). "
    "A `def` dependency with `yield`, or a sync streaming body, runs each step in a worker "
    "thread with a copy of the request's context: enter the counter in an `async def` "
    "dependency, in the handler itself, or use RequestGuard(engine=..., max_queries=...)"
)


class QueryCounter:
    """Counts the statements one request (this context) sends while the block runs.

    Use it with ``with`` or ``async with`` (entering does no I/O). It counts the
    statements sent through the engine behind the target by the code running in
    the context that entered it: this task or thread, and the tasks it starts
    inside the block (``pk.gather``, ``parallel``, a task group: they inherit
    the context). Other requests on the same engine are not counted, so a
    counter in a request handler counts that request only.

    Attributes:
        queries: the :class:`CapturedQuery` objects, in order.
    """

    __slots__ = ("_listening", "_target", "queries")

    def __init__(self, target: object) -> None:
        self._target = _targets(target)
        self._listening = False
        self.queries: list[CapturedQuery] = []

    @property
    def count(self) -> int:
        """How many statements were sent so far."""
        return len(self.queries)

    @property
    def statements(self) -> list[str]:
        """The SQL text of each statement, in order."""
        return [q.statement for q in self.queries]

    def repeated(self) -> dict[str, int]:
        """Statements sent more than once with different parameters (the N+1 signature).

        Returns:
            ``{sql: times}`` for each such statement, most repeated first.
        """
        seen: dict[str, set[str]] = {}
        times: Counter[str] = Counter()
        for q in self.queries:
            times[q.statement] += 1
            seen.setdefault(q.statement, set()).add(repr(q.parameters))
        return {sql: n for sql, n in times.most_common() if n > 1 and len(seen[sql]) > 1}

    def __enter__(self) -> Self:
        if self._listening:
            msg = "this counter is already active; use a new count_queries(...) per block"
            raise RuntimeError(msg)
        _listen(self._target)
        self._listening = True
        _ACTIVE.set((*_ACTIVE.get(), self))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._listening:
            self._listening = False
            _unlisten(self._target)
            active = _ACTIVE.get()
            if self in active:
                _ACTIVE.set(tuple(c for c in active if c is not self))
            elif exc is None:  # an error already on its way is the one that escapes
                # entered in a context that is gone: what ran here was never counted
                raise RuntimeError(_OTHER_CONTEXT)

    async def __aenter__(self) -> Self:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        state = "active" if self._listening else "inactive"
        return f"<count_queries {state} count={self.count} on {self._target!r}>"


def count_queries(target: object) -> QueryCounter:
    """Count the SQL statements the current request sends while a block runs.

    Works with sync and async engines, connections, sessions and session
    factories (the engine behind them is what is counted), with ``with`` or
    ``async with``. Only statements sent from this context are counted: the
    task or thread that entered the block and the tasks it starts inside it,
    not concurrent requests on the same engine (see :class:`QueryCounter`).
    A thread started without copying the context (``threading.Thread``) is
    another context; ``anyio.to_thread.run_sync`` copies it.

    Args:
        target: an ``Engine``, ``Connection``, ``Session``, ``sessionmaker`` or
            their async counterparts.

    Returns:
        A :class:`QueryCounter`; ``.count``, ``.statements``, ``.queries`` and
        ``.repeated()`` are live during and after the block.

    Raises:
        TypeError: ``target`` is none of the above.
        RuntimeError: on leaving the block, when it is left in another context than
            the one that entered it (FastAPI runs a ``def`` dependency with ``yield``
            step by step in worker threads, each with a copy of the request's
            context): the statements sent in between were not counted.

    Example:
        ```python
        async with count_queries(engine) as counter:
            await load_webhook_graph(conversation_id)
        assert counter.count <= 2, counter.statements
        ```
    """
    return QueryCounter(target)


class TooManyQueries(ParallelkitError, AssertionError):
    """A block sent more statements than :func:`max_queries` allowed.

    It is an :class:`AssertionError` too, so pytest shows it as a failed check.
    The message lists every statement and marks those sent repeatedly with
    different parameters: that is what an N+1 loop looks like.

    Attributes:
        limit: the budget.
        count: statements actually sent.
        statements: their SQL text, in order.
        repeated: ``{sql: times}`` for statements repeated with different parameters.
    """

    def __init__(
        self, limit: int, statements: Sequence[str], repeated: dict[str, int] | None = None
    ) -> None:
        self.limit = limit
        self.statements = list(statements)
        self.count = len(self.statements)
        self.repeated = dict(repeated or {})
        super().__init__(self._message())

    def __reduce__(self) -> tuple[object, ...]:
        # pickle and copy call the class with ``args`` (the message) by default
        return (type(self), (self.limit, self.statements, self.repeated), self.__dict__)

    def _message(self) -> str:
        lines = [f"expected at most {self.limit} queries, {self.count} were sent:"]
        shown: set[str] = set()
        for index, sql in enumerate(self.statements, 1):
            one_line = " ".join(sql.split())
            if sql in self.repeated:
                if sql in shown:
                    continue
                shown.add(sql)
                lines.append(
                    f"  {index:>3}. [repeated x{self.repeated[sql]} with different parameters:"
                    f" N+1?] {one_line}"
                )
            else:
                lines.append(f"  {index:>3}. {one_line}")
        if self.repeated:
            lines.append(
                "A statement repeated with different parameters is the N+1 signature: load the "
                "relationship up front (parallelkit.sqlalchemy.eager) or batch the lookups "
                "(loader_by_id)."
            )
        return "\n".join(lines)


# the max_queries blocks active in this context: one guard (a module-level
# ``GUARD = max_queries(engine, 5)``) serves concurrent requests, each block its own counter
_BLOCKS: ContextVar[tuple[tuple[max_queries, QueryCounter], ...]] = ContextVar(
    "parallelkit_max_queries_blocks", default=()
)


@final
class max_queries:  # noqa: N801 - used like a function: `with max_queries(engine, 2):`
    """Fail when a block sends more than ``n`` SQL statements.

    The guard that keeps N+1 queries from coming back: wrap a request handler or a
    test body; on leaving the block it raises :class:`TooManyQueries` listing the
    statements, repeated ones marked. It counts what this context sends, like
    :func:`count_queries`. An exception raised inside the block is propagated
    unchanged (the budget is not checked then). One guard can be entered again
    after a block ends, and by concurrent requests (tasks) at once: each block has
    the whole budget (a fresh counter). For every request of an ASGI app at once,
    see :class:`RequestGuard`.

    Args:
        target: what :func:`count_queries` accepts.
        n: the budget, an int >= 0.

    Raises:
        TooManyQueries: on exit, when more than ``n`` statements were sent.
        ValueError, TypeError: a bad ``n`` or ``target``.

    Example:
        ```python
        with max_queries(engine, 2):
            handle_webhook(session, conversation_id)
        ```
    """

    __slots__ = ("_counter", "_open", "limit")

    def __init__(self, target: object, n: int, /) -> None:
        self.limit = count("n", n, minimum=0)
        self._counter = QueryCounter(_targets(target, "max_queries()"))
        self._open: list[QueryCounter] = []  # the blocks entered and not left, any context

    @property
    def counter(self) -> QueryCounter:
        """The :class:`QueryCounter` of this context's current block, else of the last block."""
        return self._block() or self._counter

    def _block(self) -> QueryCounter | None:
        return next((c for guard, c in reversed(_BLOCKS.get()) if guard is self), None)

    def __enter__(self) -> QueryCounter:
        if self._block() is not None:
            msg = (
                "this max_queries guard is already active in this context (a block inside "
                "its own block); use a second max_queries(...) for the inner block"
            )
            raise RuntimeError(msg)
        # a counter per block: concurrent requests sharing one guard count apart
        counter = QueryCounter(self._counter._target).__enter__()
        self._counter = counter
        self._open.append(counter)
        _BLOCKS.set((*_BLOCKS.get(), (self, counter)))
        return counter

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        counter = self._block()
        if counter is None:  # left in another context: nothing of it can be trusted
            # which open block is this? With one open, that one: stop it. With several
            # (concurrent requests sharing the guard) they cannot be told apart here, and
            # stopping the last one entered would stop another request's count: its
            # budget would then pass silently. The RuntimeError says what to change.
            if len(self._open) == 1:
                self._open.pop().__exit__(exc_type, exc, tb)  # stops counting (and raises)
            if exc is None:
                raise RuntimeError(_OTHER_CONTEXT)
            return
        _BLOCKS.set(tuple(b for b in _BLOCKS.get() if b[1] is not counter))
        if any(block is counter for block in self._open):
            self._open.remove(counter)
        counter.__exit__(exc_type, exc, tb)
        if exc is None and counter.count > self.limit:
            raise TooManyQueries(self.limit, counter.statements, counter.repeated())

    async def __aenter__(self) -> QueryCounter:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"<max_queries {self.limit} (so far {self._counter.count})>"
