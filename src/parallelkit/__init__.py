"""parallelkit: composable, structured concurrency for I/O-bound Python services.

Bounded fan-out (:func:`gather`, :func:`map`, :func:`imap`, :class:`Limiter`,
:class:`Retry`, :class:`Outcome`), dependency-aware fan-out (:class:`Flow`), a
stale-while-revalidate cache (:class:`SWRCache`), request batching
(:class:`BatchLoader`) and start-up orchestration (:class:`Orchestrator`), all on
anyio: they run on asyncio and on trio.

The optional integrations live in submodules that this package never imports:
``parallelkit.sqlalchemy``, ``parallelkit.redis``, ``parallelkit.asgi``,
``parallelkit.taskiq``, ``parallelkit.otel``.
"""

from __future__ import annotations

from . import probes as probes
from ._batch.loader import BatchLoader as BatchLoader
from ._batch.loader import BatchStats as BatchStats
from ._cache.cache import CacheStats as CacheStats
from ._cache.cache import SWRCache as SWRCache
from ._cache.cached import CachedFunction as CachedFunction
from ._cache.store import CacheEntry as CacheEntry
from ._cache.store import MemoryStore as MemoryStore
from ._cache.store import Store as Store
from ._core.errors import CycleError as CycleError
from ._core.errors import DefinitionError as DefinitionError
from ._core.errors import DependencyFailed as DependencyFailed
from ._core.errors import ParallelkitError as ParallelkitError
from ._core.errors import ProcessError as ProcessError
from ._core.errors import StartupError as StartupError
from ._core.limiter import Limiter as Limiter
from ._core.limiter import LimiterStatistics as LimiterStatistics
from ._core.outcome import Outcome as Outcome
from ._core.public import export
from ._core.retry import Retry as Retry
from ._fanout.fanout import gather as gather
from ._fanout.fanout import map as map
from ._fanout.imap import imap as imap
from ._flow.flow import Flow as Flow
from ._flow.flow import FlowOutcomes as FlowOutcomes
from ._flow.flow import FlowResult as FlowResult
from ._graph.timeline import Span as Span
from ._graph.timeline import Timeline as Timeline
from ._orchestrator.orchestrator import Orchestrator as Orchestrator
from ._orchestrator.process import ManagedProcess as ManagedProcess
from ._orchestrator.running import Health as Health
from ._orchestrator.running import NotServed as NotServed
from ._orchestrator.running import Running as Running
from ._orchestrator.running import ServiceHealth as ServiceHealth

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
    "NotServed",
    "Orchestrator",
    "Outcome",
    "ParallelkitError",
    "ProcessError",
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


export(globals())
