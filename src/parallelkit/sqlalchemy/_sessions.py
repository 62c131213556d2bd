"""parallel(): one AsyncSession per concurrent task; the session guards: catch shared use.

An ``AsyncSession`` (like the database connection under it) serves one task at a
time. ``asyncio.gather`` over one session either fails deep inside SQLAlchemy or
the driver ("concurrent operations are not permitted", "another operation is in
progress") or, as SQLAlchemy 2.1 with aiosqlite and asyncpg does, silently runs
the queries one after another. :func:`parallel` gives each function its own
session from the factory and runs them on :func:`parallelkit.gather`.

Two opt-in guards turn accidental sharing into :class:`SessionInUseError`,
which says what to do:

* :func:`guard_sessions` (off until you call it; the pytest plugin turns it on
  for your test session): class-level ``Session`` event listeners that notice
  when a statement, flush or commit starts in one task while another task's
  call on the same session is still in flight. Every ``AsyncSession`` is
  covered, whatever made it.
* :class:`GuardedAsyncSession` (opt-in, ``class_=`` of the factory): checks at
  every awaitable method, so it also catches ``close()``/``rollback()`` racing a
  query.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar, cast, overload

import anyio
from greenlet import getcurrent, greenlet
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session
from sqlalchemy.orm import ORMExecuteState, Session
from typing_extensions import final

from .._core.check import callable_, flag
from .._core.errors import ParallelkitError
from .._core.limiter import SupportsLimit
from .._core.outcome import Outcome
from .._fanout.fanout import gather
from ._methods import wrap_methods
from ._pool import engine_of, pool_limiter
from ._pool_deadlock import refuse_fanout
from ._surface import note

__all__ = [
    "GuardedAsyncSession",
    "SessionInUseError",
    "default_limit",
    "guard_sessions",
    "parallel",
]

T = TypeVar("T")
S = TypeVar("S", bound=AsyncSession)


@final
class SessionInUseError(ParallelkitError, sa_exc.InvalidRequestError):
    """One ``AsyncSession`` was used by two tasks at the same time.

    Raised in the second task, before its statement, flush or commit starts, so
    the first task's work is not disturbed (see :func:`guard_sessions` and
    :class:`GuardedAsyncSession`). It is also a
    :class:`sqlalchemy.exc.InvalidRequestError`, like SQLAlchemy's own
    "concurrent operations are not permitted" error.

    Attributes:
        method: what the second task started (``"execute"``, ``"flush"``,
            ``"commit"``; with :class:`GuardedAsyncSession`, the method called).
        busy_with: what the first task is still running.
    """

    def __init__(self, method: str, busy_with: str) -> None:
        self.method = method
        self.busy_with = busy_with
        super().__init__(
            f"AsyncSession.{method}() called while another task is still running "
            f"AsyncSession.{busy_with}() on the same session. A session (and its connection) "
            "serves one task at a time: gathering several queries over one session cannot "
            "overlap them. Give each concurrent task its own session: "
            "`await parallelkit.sqlalchemy.parallel(session_factory, fn1, fn2, ...)`, "
            "or await the calls one after another."
        )

    def __reduce__(self) -> tuple[object, ...]:
        # pickle and copy call the class with ``args`` (the message) by default
        return (type(self), (self.method, self.busy_with), self.__dict__)


class GuardedAsyncSession(AsyncSession):
    """An ``AsyncSession`` that raises :class:`SessionInUseError` on concurrent use.

    Every awaitable method marks the session busy for the calling task while it
    runs; a call from *another* task meanwhile raises at once, naming both calls
    and pointing at :func:`parallel`. The check is two attribute reads and a task
    lookup per call, so it is cheap enough to leave on in production; turn it on
    in the factory:

    ```python
    session_factory = async_sessionmaker(engine, class_=GuardedAsyncSession)
    ```

    Limits: it sees calls made through the session's own methods; an
    ``AsyncResult`` from :meth:`stream` that is iterated after the call returned,
    and an ``AsyncConnection`` taken from :meth:`connection`, are not tracked.
    """

    __slots__ = ("_pk_depth", "_pk_method", "_pk_owner")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pk_owner: int | None = None
        self._pk_method = ""
        self._pk_depth = 0

    def _pk_enter(self, method: str) -> None:
        task = anyio.get_current_task().id
        if self._pk_owner is None:
            self._pk_owner, self._pk_method, self._pk_depth = task, method, 1
        elif self._pk_owner == task:
            self._pk_depth += 1
        else:
            raise _in_use(method, self._pk_method)

    def _pk_exit(self) -> None:
        self._pk_depth -= 1
        if self._pk_depth <= 0:
            self._pk_owner, self._pk_method, self._pk_depth = None, "", 0


def _in_use(method: str, busy_with: str) -> SessionInUseError:
    error = SessionInUseError(method, busy_with)
    note(error)  # for RequestGuard, when closing the session buries it
    return error


async def _guarded(
    self: GuardedAsyncSession,
    name: str,
    call: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    self._pk_enter(name)
    try:
        return await call(*args, **kwargs)
    finally:
        self._pk_exit()


wrap_methods(GuardedAsyncSession, _guarded)


# ---------------------------------------------------------------------------- guard_sessions
# Where the guard keeps, on each sync ``Session``, the greenlet of the call in
# flight (weakly) and what it is doing. SQLAlchemy's asyncio extension runs every
# awaitable session method in a greenlet of its own, which is *dead* once the
# method returned; a live greenlet that is not the current one is a call from
# another task that has not finished.
_OWNER = "_parallelkit_in_flight"


def _claim(session: Session, operation: str, *, strict: bool = True) -> None:
    current = getcurrent()
    if not getattr(current, "__sqlalchemy_greenlet_provider__", False):
        return  # plain synchronous use (a sync Session, maybe in threads): not ours
    state = session.__dict__.get(_OWNER)
    if state is not None:
        ref, busy_with = state
        other: greenlet | None = ref()
        if other is current:
            return  # the same call going on (autoflush, lazy load, flush in commit)
        if other is not None and not other.dead:
            if strict:
                raise _in_use(operation, busy_with)
            return
    session.__dict__[_OWNER] = (weakref.ref(current), operation)


def _on_execute(orm_execute_state: ORMExecuteState) -> None:
    _claim(orm_execute_state.session, "execute")


def _on_flush(session: Session, flush_context: object, instances: object) -> None:
    _claim(session, "flush")


def _on_commit(session: Session) -> None:
    _claim(session, "commit")


# each fires in the calling greenlet *before* the operation does any I/O or changes state
_CHECKS: tuple[tuple[str, Callable[..., None]], ...] = (
    ("do_orm_execute", _on_execute),
    ("before_flush", _on_flush),
    ("before_commit", _on_commit),
)
_switch = threading.Lock()
_checking = False  # are the _CHECKS installed? (read on every transaction by the trigger)


def _on_transaction(session: Session, transaction: object) -> None:
    """The trigger: the first transaction begun in an async greenlet arms the checks.

    A ``do_orm_execute`` listener is not free (SQLAlchemy then builds an
    ``ORMExecuteState`` for every statement, about 3 us), so a process that only
    uses sync sessions, which cannot have the bug, never gets one. This listener
    costs a function call per transaction.
    """
    if not _checking and getattr(getcurrent(), "__sqlalchemy_greenlet_provider__", False):
        _install(_CHECKS)
        # this statement's do_orm_execute ran before the checks existed: claim for it
        # (never raise here: SQLAlchemy has already made this transaction current)
        _claim(session, "execute", strict=False)


_TRIGGER: tuple[tuple[str, Callable[..., None]], ...] = (
    ("after_transaction_create", _on_transaction),
)


def _install(listeners: tuple[tuple[str, Callable[..., None]], ...], *, on: bool = True) -> None:
    global _checking  # the process-wide switch is the point
    with _switch:
        for name, listener in listeners:
            installed = event.contains(Session, name, listener)
            if on and not installed:
                event.listen(Session, name, listener)
            elif not on and installed:
                event.remove(Session, name, listener)
        _checking = event.contains(Session, *_CHECKS[0])


def guard_sessions(enabled: bool = True) -> bool:
    """Turn the process-wide shared-``AsyncSession`` check on or off.

    Off until you call it: importing parallelkit changes nothing in SQLAlchemy.
    Call ``guard_sessions()`` once at start-up (or let the pytest plugin turn it
    on for your tests: it does at the start of the test session, and restores
    the previous state at the end). It makes the classic mistake,
    ``asyncio.gather`` of several queries over *one* ``AsyncSession``, fail in
    the second task with :class:`SessionInUseError` (which points at
    :func:`parallel`) instead of a driver error deep inside SQLAlchemy, or, as
    SQLAlchemy 2.1 does with aiosqlite and asyncpg, silently running the
    queries one after another.

    How: class-level ``Session`` event listeners (``do_orm_execute``,
    ``before_flush``, ``before_commit``) note which call is in flight on each
    session; when a statement, flush or commit starts while *another task's*
    call on the same session has not returned, the new one raises before it
    does any I/O, so the first call is not disturbed. Using a session from
    several tasks one after another is fine, and synchronous ``Session`` use is
    never checked. Those listeners are only added when the process first uses
    an ``AsyncSession`` (an ``after_transaction_create`` listener waits for
    that), so sync-only code pays nothing per statement; async code pays about
    3 us per ORM statement (SQLAlchemy's ``ORMExecuteState``), 1-3 % of a
    one-row read in ``python -m benchmarks eager``.

    Limits: it sees statements, flushes and commits. ``close()``/``rollback()``
    racing a query, an ``AsyncResult`` from ``stream()`` iterated while another
    task queries, and an ``AsyncConnection`` from ``connection()`` are not seen;
    :class:`GuardedAsyncSession` catches the first two.

    Args:
        enabled: turn the guard on (``True``) or off (``False``) for every
            session in the process. Idempotent.

    Returns:
        Whether the guard was on before the call.

    Example:
        ```python
        async with session_factory() as session:
            await asyncio.gather(                     # SessionInUseError:
                session.get(Company, 1),              # "Give each concurrent task
                session.scalars(select(Contact)),     #  its own session: parallel(...)"
            )
        ```
    """
    flag("enabled", enabled)
    was_on = event.contains(Session, *_TRIGGER[0])
    _install(_TRIGGER, on=enabled)
    if not enabled:
        _install(_CHECKS, on=False)
    return was_on


def default_limit(target: object, /) -> int | None:
    """How many sessions at once the engine's pool serves: ``pool_limiter(target).concurrency``.

    The pool size of the engine behind ``target`` (an engine, connection,
    session or session factory): ``pool_size`` for a ``QueuePool``, ``1`` for
    single-connection pools (``StaticPool``, used for in-memory SQLite),
    ``None`` (no bound) for ``NullPool``.

    Raises:
        TypeError: no single engine can be found behind ``target``.
    """
    return pool_limiter(target).concurrency


@overload
async def parallel(
    session_factory: Callable[[], S],
    /,
    *fns: Callable[[S], Awaitable[T]],
    limit: int | SupportsLimit | None = ...,
    settle: Literal[False] = ...,
) -> list[T]: ...
@overload
async def parallel(
    session_factory: Callable[[], S],
    /,
    *fns: Callable[[S], Awaitable[T]],
    limit: int | SupportsLimit | None = ...,
    settle: Literal[True],
) -> list[Outcome[T]]: ...
async def parallel(
    session_factory: Callable[[], S],
    /,
    *fns: Callable[[S], Awaitable[T]],
    limit: int | SupportsLimit | None = None,
    settle: bool = False,
) -> list[T] | list[Outcome[T]]:
    """Run each ``fn(session)`` concurrently, each in its own ``AsyncSession``.

    The right way to overlap independent queries: a session serves one task at a
    time, so ``gather`` over *one* session cannot overlap anything (it fails, or
    the driver queues the queries). ``parallel`` opens one session per function
    from ``session_factory`` (``async with session_factory() as session``, so each
    is closed, and an uncommitted transaction rolled back, when its function
    returns), and runs them on :func:`parallelkit.gather`: results in argument
    order, fail-fast (the first error cancels the others and is raised unchanged)
    or ``settle=True`` for one :class:`~parallelkit.Outcome` each. A function that
    writes commits itself (``await session.commit()``). (``gather`` over one
    shared session instead raises :class:`SessionInUseError`; see
    :func:`guard_sessions`.)

    Args:
        session_factory: an ``async_sessionmaker`` (or any callable returning an
            ``AsyncSession``). For an ``async_scoped_session``, the sessions come
            from its ``session_factory``: its scope's session stays the caller's.
        *fns: async functions taking the session.
        limit: most sessions open at once; ``None`` means the engine's
            process-wide :func:`pool_limiter` (shared with every other request
            and ``parallel`` call on that engine), or no bound when the factory
            is not bound to one engine. A caller that holds a slot of that
            limiter (a :class:`LimitedAsyncSession` in a transaction) lends it to
            its functions, one at a time, while it waits: fanning out from a
            request that already used its session cannot deadlock the limiter.
        settle: return outcomes instead of raising the first error.

    Returns:
        The functions' results (or outcomes), in argument order.

    Raises:
        TypeError: ``session_factory`` or a function is not callable (before any
            session is opened); ``session_factory`` returned something that is not
            an ``AsyncSession``, or a function returned something that cannot be
            awaited (the message names it: ``fns[i]``).
        ValueError: a bad ``limit``.
        sqlalchemy.exc.TimeoutError: at the call, before any function runs, when
            the fan-out can only deadlock: the calling task's
            :class:`LimitedAsyncSession` transactions (with those of the callers
            waiting for it) hold every connection the pool can give (``pool_size +
            max_overflow``; what the functions' sessions would wait ``pool_timeout``
            for, then fail with this error), or the caller holds the engine's only
            slot and a ``limit`` that does not lend it makes each function's
            ``LimitedAsyncSession`` wait for a slot of its own (forever). The
            message names the fix: commit first, or give the pool overflow.

    Note:
        SQLAlchemy's asyncio extension runs on asyncio only (not trio).

    Example:
        ```python
        company, open_count, rules = await parallel(
            session_factory,
            lambda s: s.get(Company, company_id),
            lambda s: s.scalar(select(func.count()).where(Conversation.status == "open")),
            lambda s: s.scalars(select(AutomationRule)),
        )
        ```
    """
    callable_("session_factory", session_factory, what="callable (an async_sessionmaker)")
    if isinstance(session_factory, async_scoped_session):
        # calling it gives the scope's one session (the caller's, in use), every time:
        # each function gets a session of its own from the factory behind it
        session_factory = session_factory.session_factory
    for index, fn in enumerate(fns):
        callable_(f"fns[{index}]", fn, what="an async function of the session")
    flag("settle", settle)
    engine = engine_of(session_factory)
    if engine is not None:
        slots = pool_limiter(engine)
        refuse_fanout(engine, slots, session_factory, limit)
        if limit is None:
            limit = slots

    async def run(index: int, fn: Callable[[S], Awaitable[T]]) -> T:
        made: object = session_factory()
        if not isinstance(made, AsyncSession):  # else: "does not support the asynchronous ..."
            msg = (
                "session_factory must return an AsyncSession (an async_sessionmaker), "
                f"got {type(made).__name__} {made!r}"
            )
            raise TypeError(msg)
        session: S = made  # type: ignore[assignment]
        async with session:
            result: object = fn(session)
            if not inspect.isawaitable(result):
                msg = (
                    f"fns[{index}] must be an async function of the session (or return an "
                    f"awaitable), got {fn!r} returning {type(result).__name__} {result!r}"
                )
                raise TypeError(msg)
            return await cast("Awaitable[T]", result)

    calls = [functools.partial(run, index, fn) for index, fn in enumerate(fns)]
    if settle:
        return await gather(*calls, limit=limit, settle=True)
    return await gather(*calls, limit=limit)
