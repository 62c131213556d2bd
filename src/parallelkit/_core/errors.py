"""The exception tree of parallelkit.

Every error the library raises on its own account derives from
:class:`ParallelkitError`; errors raised *by your code* inside a primitive are
re-raised unchanged (fail-fast) or handed back as :class:`~parallelkit.Outcome`
(settle mode)::

    ParallelkitError
    ├── DefinitionError        a flow / orchestrator graph is malformed
    │   └── CycleError         the graph has a dependency cycle
    ├── DependencyFailed       (settle mode) a step was skipped: a dependency failed
    ├── StartupError           a service failed to start (original as __cause__)
    ├── ProcessError           an Orchestrator.process exited for good (exit code, last
    │                          output); also a subprocess.CalledProcessError
    └── TooManyQueries         parallelkit.sqlalchemy: a query budget was exceeded

Bad arguments are plain :class:`ValueError` / :class:`TypeError` whose message
names the argument, as in the standard library.

Every error of the tree survives :mod:`pickle` and :mod:`copy` whole (its message,
its attributes), whatever its ``__init__`` takes: it may cross a process boundary (a
worker, ``multiprocessing``) or be copied by a test framework.
"""

from __future__ import annotations

import copyreg
import subprocess
from collections.abc import Sequence

__all__ = [
    "CycleError",
    "DefinitionError",
    "DependencyFailed",
    "ParallelkitError",
    "ProcessError",
    "StartupError",
]


class ParallelkitError(Exception):
    """Root of every exception that parallelkit raises on its own account."""

    def __reduce__(self) -> tuple[object, ...]:
        # rebuilt without calling __init__ (whose parameters are not ``args``: the
        # default reduction would call ``cls(*args)`` and fail, or build a different
        # message), then given back its args and attributes
        return (copyreg.__newobj__, (type(self), *self.args), self.__dict__)  # type: ignore[attr-defined]


class DefinitionError(ParallelkitError, ValueError):
    """A dependency graph (a :class:`~parallelkit.Flow` or an
    :class:`~parallelkit.Orchestrator`) is malformed: an unknown name, a duplicate,
    a missing input, a non-async function.

    Raised before anything starts. It is also a :class:`ValueError`, so code that
    validates input generically catches it.
    """


class CycleError(DefinitionError):
    """The dependency graph has a cycle.

    Attributes:
        cycle: the names along the cycle, first name repeated at the end, e.g.
            ``("a", "b", "c", "a")``.
    """

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle: tuple[str, ...] = tuple(cycle)
        super().__init__(f"dependency cycle: {' -> '.join(self.cycle)}")


class DependencyFailed(ParallelkitError):
    """In settle mode, a step that was not run because a dependency failed.

    Attributes:
        step: the step that was skipped.
        dependency: the failed (or itself skipped) dependency that caused it.
    """

    def __init__(self, step: str, dependency: str) -> None:
        self.step = step
        self.dependency = dependency
        super().__init__(f"{step!r} was not run: its dependency {dependency!r} failed")


class StartupError(ParallelkitError):
    """A service failed to start; everything already started was torn down.

    The original exception is ``__cause__``. Errors raised while rolling back are
    kept in :attr:`teardown_errors`, never instead of the cause.

    Attributes:
        service: the name of the service that failed.
        teardown_errors: ``(service, exception)`` pairs from the rollback.
    """

    def __init__(
        self,
        service: str,
        message: str | None = None,
        *,
        teardown_errors: Sequence[tuple[str, BaseException]] = (),
    ) -> None:
        self.service = service
        self.teardown_errors: tuple[tuple[str, BaseException], ...] = tuple(teardown_errors)
        text = message or f"service {service!r} failed to start"
        if self.teardown_errors:
            extra = "; ".join(f"{name}: {exc!r}" for name, exc in self.teardown_errors)
            text = f"{text} (and rollback failed for {extra})"
        super().__init__(text)


class ProcessError(ParallelkitError, subprocess.CalledProcessError):
    """A process service (``Orchestrator.process``) exited for good.

    Raised (as the ``__cause__`` of :class:`StartupError` when it happens before
    the process is ready) when the process exits with a non-zero code and its
    restart policy does not restart it, or exits (code 0 too) before its ``ready``
    probe passed (after one last check), or runs out of ``max_restarts``. It is a
    :class:`subprocess.CalledProcessError`, so ``returncode``, ``cmd`` and
    ``output`` (its last lines of output) are there too.

    Attributes:
        name: the process service.
        returncode: its exit code (negative: killed by that signal).
        tail: its last lines of output (stdout and stderr, in order).
        restarts: how many times it had been restarted.
    """

    def __init__(
        self,
        name: str,
        returncode: int,
        cmd: str | Sequence[str],
        tail: Sequence[str] = (),
        *,
        restarts: int = 0,
    ) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, cmd, output="\n".join(tail))
        self.name = name
        self.tail: tuple[str, ...] = tuple(tail)
        self.restarts = restarts
        self.args = (self._text(),)

    def _text(self) -> str:
        again = f" after {self.restarts} restart(s)" if self.restarts else ""
        text = f"process {self.name!r} exited with code {self.returncode}{again}"
        if not self.tail:
            return f"{text} (it printed nothing)"
        lines = "\n".join(f"    {line}" for line in self.tail)
        return f"{text}; its last output:\n{lines}"

    def __str__(self) -> str:
        return self._text()
