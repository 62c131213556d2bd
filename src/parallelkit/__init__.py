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

from . import probes as probes
from ._batch import BatchLoader as BatchLoader
from ._batch import BatchStats as BatchStats
from ._cache import CacheStats as CacheStats
from ._cache import SWRCache as SWRCache
from ._cached import CachedFunction as CachedFunction
from ._errors import CycleError as CycleError
from ._errors import DefinitionError as DefinitionError
from ._errors import DependencyFailed as DependencyFailed
from ._errors import ParallelkitError as ParallelkitError
from ._errors import StartupError as StartupError
from ._fanout import gather as gather
from ._fanout import map as map
from ._flow import Flow as Flow
from ._flow import FlowOutcomes as FlowOutcomes
from ._flow import FlowResult as FlowResult
from ._imap import imap as imap
from ._limits import Limiter as Limiter
from ._limits import LimiterStatistics as LimiterStatistics
from ._orchestrator import Orchestrator as Orchestrator
from ._outcome import Outcome as Outcome
from ._process import ManagedProcess as ManagedProcess
from ._retry import Retry as Retry
from ._running import Health as Health
from ._running import Running as Running
from ._running import ServiceHealth as ServiceHealth
from ._store import CacheEntry as CacheEntry
from ._store import MemoryStore as MemoryStore
from ._store import Store as Store
from ._timeline import Span as Span
from ._timeline import Timeline as Timeline

__all__ = [
    "BatchLoader",
    "BatchStats",
    "CacheEntry",
    "CacheStats",
    "CachedFunction",
    "CycleError",
    "DefinitionError",
    "DependencyFailed",
    "Flow",
    "FlowOutcomes",
    "FlowResult",
    "Health",
    "Limiter",
    "LimiterStatistics",
    "ManagedProcess",
    "MemoryStore",
    "Orchestrator",
    "Outcome",
    "ParallelkitError",
    "Retry",
    "Running",
    "SWRCache",
    "ServiceHealth",
    "Span",
    "StartupError",
    "Store",
    "Timeline",
    "gather",
    "imap",
    "map",
    "probes",
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
