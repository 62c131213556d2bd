"""Find the parallelkit error behind the error a web framework reports.

Two ways a parallelkit error gets buried in a FastAPI app:

* a :class:`SessionInUseError` makes the handler fail while the other task's
  call is still in flight; the yield dependency's ``async with session`` then
  closes the session and SQLAlchemy raises ``IllegalStateChangeError``, with our
  error only as its ``__context__``;
* a :class:`NotLoadedError` raised while pydantic reads the response model is
  turned by pydantic into a ``get_attribute_error`` (the exception object is
  dropped), and FastAPI raises ``ResponseValidationError``.

:func:`watch` opens a per-request record (a context variable holding a list,
so child tasks append to the same one); the errors note themselves in it when
raised (:func:`note`, a no-op outside a request); :func:`cause` finds the one
behind an escaping exception. :class:`~parallelkit.sqlalchemy.RequestGuard`
uses them.
"""

from __future__ import annotations

from contextvars import ContextVar, Token

__all__ = ["cause", "note", "unwatch", "watch"]

_RAISED: ContextVar[list[BaseException] | None] = ContextVar("parallelkit_raised", default=None)


def watch() -> tuple[list[BaseException], Token[list[BaseException] | None]]:
    """Start recording the parallelkit errors raised in this context (one request)."""
    record: list[BaseException] = []
    return record, _RAISED.set(record)


def unwatch(token: Token[list[BaseException] | None]) -> None:
    """Stop recording (in the context :func:`watch` was called in)."""
    _RAISED.reset(token)


def note(error: BaseException) -> None:
    """Record ``error`` for the current request, if one is watched."""
    record = _RAISED.get()
    if record is not None and len(record) < 16:
        record.append(error)


def cause(exc: BaseException, record: list[BaseException]) -> BaseException | None:
    """The parallelkit error ``exc`` hides, or ``None`` when ``exc`` is the real one.

    ``exc`` hides an error of ``record`` when that error is in ``exc``'s
    ``__context__`` / ``__cause__`` chain, or when ``exc``'s text quotes it (what
    pydantic keeps of an exception raised while reading an attribute).
    """
    if any(exc is seen for seen in record):
        return None
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and len(chain) < 32 and all(link is not c for c in chain):
        chain.append(link)
        link = link.__cause__ or link.__context__
    for seen in reversed(record):
        if any(seen is c for c in chain[1:]):
            return seen
    text = _text(exc)
    for seen in reversed(record):
        if f"{type(seen).__name__}: {seen}" in text:
            return seen
    return None


def _text(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    try:
        detail = repr(errors()) if callable(errors) else ""
    except Exception:  # an `errors` that is not pydantic's: the message is enough
        detail = ""
    return f"{exc}\n{detail}"
