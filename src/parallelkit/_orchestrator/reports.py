"""How a service's failures are told: the errors and messages of a failed start, a
rollback, a crash and a tear-down, written once for the session and its hosts."""

from __future__ import annotations

import logging
import sys
import traceback

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "add_note",
    "ended_error",
    "log_teardown_errors",
    "rollback_note",
    "startup_message",
    "stray_error",
    "teardown_group",
]

logger = logging.getLogger("parallelkit.orchestrator")


def stray_error(name: str, where: str, exc: BaseException) -> RuntimeError:
    """A cancellation exception that no cancellation caused (asyncio: the service awaited
    a future that something else cancelled; trio: a ``Cancelled`` kept and raised again)
    is the service's error: let through, it would be taken for a cancellation, and lost
    or mistaken for the end of the start."""
    how = (
        "it awaited a future or task that was cancelled elsewhere?"
        if type(exc).__name__ == "CancelledError"
        else "it raised again one it had kept, after its scope ended?"
    )
    kind = type(exc).__name__
    msg = f"service {name!r}: its {where} raised {kind}, but nothing cancelled it ({how})"
    return RuntimeError(msg)


def ended_error(name: str) -> RuntimeError:
    """The crash of a service that ended while running with no error to tell why.

    Its own task group was cancelled, and its lifetime absorbed that: a task in it
    cancelled the group, or ended cancelled. On asyncio, anyio's task group drops a
    task's ``CancelledError`` (one that nothing cancelled too: a future cancelled
    elsewhere), so that error cannot be this one's cause: the message says where to look.
    """
    msg = (
        f"service {name!r} ended while running: its own task group was cancelled and "
        "no error came out of it (a task in it cancelled the group or was cancelled; on "
        "asyncio, one that raised CancelledError, having awaited a future or task "
        "cancelled elsewhere, ends the group so too, its error dropped by the task group)"
    )
    return RuntimeError(msg)


def startup_message(name: str, exc: BaseException) -> str:
    return f"service {name!r} failed to start: {type(exc).__name__}: {exc}"


def rollback_note(name: str, exc: BaseException) -> str:
    """The note that carries a rollback error's traceback in the ``StartupError``.

    Printed as part of the ``StartupError``'s own report (one report, not a second
    "Traceback" of its own): the heading names the service.
    """
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    heading = f"the rollback failed: service {name!r} raised while it stopped"
    if lines and lines[0].startswith("Traceback "):
        lines[0] = f"{heading}; its traceback (most recent call last):\n"
    else:  # no frames (an error made, never raised)
        lines.insert(0, f"{heading}:\n")
    return "".join(lines).rstrip()


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` (Python 3.10: the ``exceptiongroup`` backport prints it)."""
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:  # pragma: no cover
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]  # type: ignore[attr-defined,unused-ignore]


def log_teardown_errors(errors: list[tuple[str, BaseException]]) -> None:
    """Log tear-down errors that are not raised to anyone (an error is reported once)."""
    for name, exc in errors:
        logger.error("service %r failed to stop cleanly", name, exc_info=exc)


def teardown_group(errors: list[tuple[str, BaseException]]) -> ExceptionGroup[Exception]:
    """The ``ExceptionGroup`` raised when services failed to stop after a clean run."""
    names = ", ".join(repr(name) for name, _ in errors)
    excs = [e if isinstance(e, Exception) else RuntimeError(repr(e)) for _, e in errors]
    return ExceptionGroup(f"services failed to stop: {names}", excs)
