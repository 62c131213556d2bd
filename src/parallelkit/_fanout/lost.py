"""Keeping a failure that came too late to be raised: :func:`chain` attaches it to the
context chain of the error that is raised (the pool's first failure, an ``imap``
body's error), so its traceback shows both."""

from __future__ import annotations

__all__ = ["chain"]


def chain(exc: BaseException, lost: BaseException) -> None:
    """Attach ``lost`` (an item's failure an ``imap`` body never got, an input's failed
    clean-up) at the end of ``exc``'s context chain, so the traceback of the error that
    escapes shows it too."""
    seen = {id(exc)}
    last = exc
    while last.__context__ is not None and id(last.__context__) not in seen:
        if last.__context__ is lost:
            return
        last = last.__context__
        seen.add(id(last))
    if last is lost:
        return
    # ``lost`` raised while handling ``exc`` (or an error of its chain): its own chain
    # leads back into ``exc``'s. That link is cut (the error it led to shows already),
    # so that attaching ``lost`` makes no cycle.
    link = lost
    while link.__context__ is not None:
        if id(link.__context__) in seen:
            link.__context__ = None
            break
        link = link.__context__
        seen.add(id(link))
    last.__context__ = lost
