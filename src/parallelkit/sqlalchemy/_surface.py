"""Find the parallelkit error behind the error a web framework reports.

Two ways a parallelkit error gets buried in a FastAPI app:

* a :class:`SessionInUseError` makes the handler fail while the other task's
  call is still in flight; the yield dependency's ``async with session`` then
  closes the session and SQLAlchemy raises ``IllegalStateChangeError``, with our
  error only as its ``__context__``;
* a :class:`NotLoadedError` raised while pydantic reads the response model is
  turned by pydantic into a ``get_attribute_error`` (the exception object is
  dropped, its text kept), and FastAPI raises ``ResponseValidationError``.

The errors note themselves when they are built (:func:`note`): their type, and
their text with a copy to raise again. :func:`cause` finds the one behind an
escaping exception: in its ``__cause__`` / ``__context__`` chain (the object
itself), or quoted in its text (a new copy, made from the note: the original
object is gone). No per-request state: :class:`~parallelkit.sqlalchemy.RequestGuard`
changes nothing on a request that fails for no such reason. (An earlier version
set a context variable per request; under uvicorn that alone made the garbage
collector run 30 to 40 times as often on a cached read, see docs/sqlalchemy.md.)
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import SQLAlchemyError

__all__ = ["cause", "note"]

_KEEP = 256  # texts remembered; past that, forgotten all at once (one app has a few)
_TYPES: set[type[BaseException]] = set()
_NOTED: dict[str, BaseException] = {}  # "Type: message" -> a copy, never raised


def note(error: BaseException) -> None:
    """Remember ``error`` (before it is raised) so that :func:`cause` can find it."""
    _TYPES.add(type(error))
    text = f"{type(error).__name__}: {error}"
    if text not in _NOTED:
        if len(_NOTED) >= _KEEP:
            _NOTED.clear()
        _NOTED[text] = _copy(error)


def cause(exc: BaseException) -> BaseException | None:
    """The parallelkit error ``exc`` hides, or ``None`` when ``exc`` is the real one.

    ``exc`` hides a noted error when one is in the ``__cause__`` / ``__context__``
    chain of an error SQLAlchemy raised (returned itself), or when ``exc``'s text
    quotes one (what pydantic keeps of an exception raised while reading an
    attribute: a new copy is returned).
    """
    if not _TYPES or type(exc) in _TYPES:
        return None
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and len(chain) < 32 and all(link is not c for c in chain):
        chain.append(link)
        link = link.__cause__ or link.__context__
    for link in chain[1:]:
        if type(link) in _TYPES:
            # in the chain: buried only if SQLAlchemy raised over it; an error the app
            # raised while handling ours (an ``HTTPException``, its own, Starlette's
            # "response already started") is the app's answer, left alone
            return link if isinstance(exc, SQLAlchemyError) else None
    text = _text(exc)
    for quoted, error in list(_NOTED.items()):
        if quoted in text:
            return _copy(error)
    return None


def _copy(error: BaseException) -> BaseException:
    """A new instance with ``error``'s arguments and attributes (no traceback, no
    ``__init__`` call: its signature need not match ``args``)."""
    copy: Any = BaseException.__new__(type(error), *error.args)
    copy.__dict__.update(vars(error))
    return copy  # type: ignore[no-any-return]


def _text(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    try:
        detail = repr(errors()) if callable(errors) else ""
    except Exception:  # an `errors` that is not pydantic's: the message is enough
        detail = ""
    return f"{exc}\n{detail}"
