"""A clear ImportError when OpenTelemetry is missing: it is an extra, not a core dependency."""

from __future__ import annotations

try:
    import opentelemetry.instrumentation.instrumentor
    import opentelemetry.metrics
    import opentelemetry.trace  # noqa: F401
except ImportError as exc:
    msg = (
        "parallelkit.otel needs opentelemetry-api and opentelemetry-instrumentation: "
        "install the extra, `pip install 'parallelkit[otel]'`"
    )
    raise ImportError(msg, name=exc.name) from exc

__all__: list[str] = []
