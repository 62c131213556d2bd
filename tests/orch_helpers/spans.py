"""The ``exporter`` fixture of the orchestrator's span tests (loaded with
``pytest_plugins = ["tests.orch_helpers.spans"]``; its helpers are in the package)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def exporter() -> Iterator[Any]:
    """An in-memory span exporter, parallelkit instrumented into it for the test."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from parallelkit.otel import ParallelkitInstrumentor

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    inst = ParallelkitInstrumentor()
    inst.instrument(tracer_provider=provider)
    try:
        yield memory
    finally:
        inst.uninstrument()
