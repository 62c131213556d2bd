"""Task-group ownership: the one way an object owns background work (``async with obj:``).

STYLE rule 5: background work (a cache's refreshes, a loader's batches, an
``imap``'s workers, a lock's renewal) belongs to an object the user enters with
``async with``. Each such object holds an :class:`OwnedTaskGroup` and forwards its
``__aenter__`` / ``__aexit__`` to it::

    self._owner = OwnedTaskGroup("this SWRCache")

    async def __aenter__(self) -> Self:
        await self._owner.enter()
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        return await self._owner.exit(*exc_info, cancel=True)

    ... self._owner.tg.start_soon(work)   # while entered; ``tg`` is None otherwise

Work an owner starts *for* a caller (a miss load the caller waits for) inherits
the caller's context, as any task does. Work that outlives the caller's interest
(a cache's background refresh) is started with :func:`detached`: it keeps the
context (a trace's current span, a logging context) except the variables
registered with :func:`request_scoped`, which are reset (a request's statement
counters: a refresh never counts against the request whose hit started it,
whether its statements are sent before that request ends or after).
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup
from typing_extensions import final

from .backend import is_failure

if sys.version_info < (3, 11):  # pragma: no cover - the backport anyio depends on there
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["OwnedTaskGroup", "detached", "leave", "request_scoped"]

_REQUEST_SCOPED: list[tuple[contextvars.ContextVar[Any], Any]] = []


def request_scoped(var: contextvars.ContextVar[Any], default: Any) -> None:
    """Register ``var`` as belonging to one request: :func:`detached` work starts
    with it set to ``default``."""
    if all(v is not var for v, _ in _REQUEST_SCOPED):
        _REQUEST_SCOPED.append((var, default))


def detached(start: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Call ``start(*args, **kwargs)`` (a ``start_soon``) in a copy of the current
    context with every :func:`request_scoped` variable reset: the task it starts
    inherits that copy (asyncio and trio both copy the context at the start)."""
    if not _REQUEST_SCOPED:
        start(*args, **kwargs)
        return

    def reset_and_start() -> None:
        for var, default in _REQUEST_SCOPED:
            var.set(default)
        start(*args, **kwargs)

    contextvars.copy_context().run(reset_and_start)


async def leave(
    tg: TaskGroup,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
    *,
    cancel: bool,
) -> bool | None:
    """Close ``tg`` from the owner's ``__aexit__``: nothing it started outlives it.

    ``cancel=True`` cancels the work still running; an error in the body always
    does. The owner's tasks never raise (their errors are handed to whoever waits
    for them), so an error from the body (an ``Exception``, and a
    ``KeyboardInterrupt``-like ``BaseException`` too) propagates **unchanged**, not
    wrapped in an ``ExceptionGroup`` by the backend; a cancellation goes through the
    task group as usual. The only errors the owner's tasks let through are
    ``KeyboardInterrupt``-like ones (not ``Exception``s): one such comes out as
    itself too, not in the backend's ``BaseExceptionGroup`` (several stay a group).
    """
    # asked before the cancel: on trio a kept Cancelled the body raised would look like
    # the task group's own cancellation once its scope is cancelled
    failure = exc is None or is_failure(exc)
    if cancel or exc is not None:
        tg.cancel_scope.cancel()
    try:
        if failure:
            await tg.__aexit__(None, None, None)
            return None
        return await tg.__aexit__(exc_type, exc, tb)
    except BaseExceptionGroup as group:
        cancelled = anyio.get_cancelled_exc_class()
        failures = [e for e in _leaves(group) if not isinstance(e, cancelled)]
        if len(failures) != 1:
            raise
        only = failures[0]
    # raised here, not in the handler: the group is not made its context (the body's
    # error, if any, is: it is the one being handled)
    raise only


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@final
class OwnedTaskGroup:
    """The task group of an object entered with ``async with`` (see the module docs).

    Args:
        what: the owner as the error messages name it (``"this SWRCache"``).
    """

    __slots__ = ("_what", "tg")

    def __init__(self, what: str) -> None:
        self._what = what
        self.tg: TaskGroup | None = None

    @property
    def entered(self) -> bool:
        """Whether the owner is inside its ``async with`` block."""
        return self.tg is not None

    async def enter(self) -> TaskGroup:
        """Open the task group (from the owner's ``__aenter__``); once at a time."""
        if self.tg is not None:
            msg = f"{self._what} is already entered; enter it once (async with) and share it"
            raise RuntimeError(msg)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self.tg = tg
        return tg

    async def exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        *,
        cancel: bool,
    ) -> bool | None:
        """Close it (from the owner's ``__aexit__``), see :func:`leave`."""
        tg, self.tg = self.tg, None
        if tg is None:
            msg = f"{self._what} was not entered"
            raise RuntimeError(msg)
        return await leave(tg, exc_type, exc, tb, cancel=cancel)

    def __repr__(self) -> str:
        return f"<OwnedTaskGroup of {self._what} entered={self.entered}>"
