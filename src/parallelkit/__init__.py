"""parallelkit: composable, structured concurrency for I/O-bound Python services.

Bounded fan-out (:func:`gather`, :func:`map`, :func:`imap`, :class:`Limiter`,
:class:`Retry`, :class:`Outcome`), dependency-aware fan-out (:class:`Flow`), a
stale-while-revalidate cache (:class:`SWRCache`), request batching
(:class:`BatchLoader`) and start-up orchestration (:class:`Orchestrator`), all on
anyio: they run on asyncio and on trio.

The optional integrations live in submodules that this package never imports:
``parallelkit.sqlalchemy``, ``parallelkit.redis``, ``parallelkit.asgi``,
``parallelkit.taskiq``.
"""

from __future__ import annotations

import contextlib

from ._errors import CycleError as CycleError
from ._errors import DefinitionError as DefinitionError
from ._errors import DependencyFailed as DependencyFailed
from ._errors import ParallelkitError as ParallelkitError
from ._errors import StartupError as StartupError
from ._fanout import gather as gather
from ._fanout import map as map
from ._imap import imap as imap
from ._limits import Limiter as Limiter
from ._limits import LimiterStatistics as LimiterStatistics
from ._outcome import Outcome as Outcome
from ._retry import Retry as Retry

# >>> helpers add their re-exports below this line (one block per module) <<<

__all__ = [
    "CycleError",
    "DefinitionError",
    "DependencyFailed",
    "Limiter",
    "LimiterStatistics",
    "Outcome",
    "ParallelkitError",
    "Retry",
    "StartupError",
    "gather",
    "imap",
    "map",
]

__version__ = "0.1.0.dev0"


def _set_public_module() -> None:
    """Show public names as ``parallelkit.X`` in reprs, tracebacks and docs."""
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("parallelkit._"):
            with contextlib.suppress(AttributeError, TypeError):
                obj.__module__ = __name__


_set_public_module()
