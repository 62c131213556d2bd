"""Wrap every awaitable ``AsyncSession`` method of a subclass with one hook.

:class:`GuardedAsyncSession` (who is using the session) and
:class:`LimitedAsyncSession` (a pool slot while a connection is held) both need
"around every call that uses the session's state or connection". The wrappers
call the next class in the MRO, so the two compose:
``class MySession(GuardedAsyncSession, LimitedAsyncSession): ...``.

A wrapper is a plain function that returns the awaitable ``around`` returns: a
hook with nothing to do for a call (a session already holding its pool slot)
returns the next method's own coroutine, and the call costs no coroutine frame
of ours (each would be resumed at every ``await`` inside the method).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["RELEASING", "wrap_methods"]

# the awaitable AsyncSession methods that use the session's state or connection
_METHODS = (
    "close",
    "commit",
    "connection",
    "delete",
    "delete_all",
    "execute",
    "flush",
    "get",
    "get_one",
    "invalidate",
    "merge",
    "merge_all",
    "refresh",
    "reset",
    "rollback",
    "run_sync",
    "scalar",
    "scalars",
    "stream",
    "stream_scalars",
)
RELEASING = frozenset(("close", "invalidate", "reset"))  # give the connection back

#: ``around(self, name, next_method, args, kwargs)``: called (not awaited) by the
#: wrapper; returns what the caller awaits.
Around = Callable[
    [Any, str, Callable[..., Awaitable[Any]], tuple[Any, ...], dict[str, Any]], Awaitable[Any]
]


def wrap_methods(cls: type[AsyncSession], around: Around) -> None:
    """Make each method of ``cls`` call ``around(self, name, next_method, args, kwargs)``."""
    for name in _METHODS:
        method = getattr(AsyncSession, name, None)
        if callable(method):  # some exist only in SQLAlchemy 2.1
            setattr(cls, name, _wrapper(cls, name, method, around))


def _wrapper(
    cls: type[AsyncSession], name: str, method: Callable[..., Any], around: Around
) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    def wrapped(self: AsyncSession, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return around(self, name, getattr(super(cls, self), name), args, kwargs)

    return wrapped
