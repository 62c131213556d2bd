"""OpenTelemetry for parallelkit: traces of fan-out, flows and start-up; cache, limiter
and batch metrics.

``pip install "parallelkit[otel]"``, then once at start-up::

    from parallelkit.otel import ParallelkitInstrumentor

    ParallelkitInstrumentor().instrument(tracer_provider=tp, meter_provider=mp)

See :class:`ParallelkitInstrumentor` for the spans and metrics, and the Tracing
guide for a complete example. The package root never imports this module: without
it, and before ``instrument()``, parallelkit costs what it costs uninstrumented.
"""

from __future__ import annotations

from .._core.public import export
from . import _require as _require  # before the rest: a clear ImportError without it
from ._instrumentor import ParallelkitInstrumentor as ParallelkitInstrumentor

__all__ = ["ParallelkitInstrumentor"]

export(globals())
