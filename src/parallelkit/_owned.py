"""Leaving a task group that an object owns (``async with cache:``, ``imap``, ...)."""

from __future__ import annotations

from types import TracebackType

from anyio.abc import TaskGroup

__all__ = ["leave"]


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
    for them), so an ``Exception`` from the body propagates **unchanged**, not
    wrapped in an ``ExceptionGroup`` by the backend; a ``BaseException`` (such as
    a cancellation) goes through the task group as usual.
    """
    if cancel or exc is not None:
        tg.cancel_scope.cancel()
    if exc is None or isinstance(exc, Exception):
        await tg.__aexit__(None, None, None)
        return None
    return await tg.__aexit__(exc_type, exc, tb)
