"""ParallelkitInstrumentor: the OpenTelemetry instrumentor, in the ecosystem's convention."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from opentelemetry import metrics, trace
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)
from typing_extensions import final

from .._core import instrument
from .._core.check import flag
from .._core.instrument import GraphKind
from .._graph.timeline import Timeline
from . import _spans
from ._metrics import Instruments, instruments_of
from ._spans import FanoutTrace, GraphTrace, report

__all__ = ["ParallelkitInstrumentor"]

_SCOPE = "parallelkit"

#: the options instrument() reads
_OPTIONS = ("item_spans", "meter_provider", "tracer_provider")
#: options of the ecosystem that a distro or ``opentelemetry-instrument`` may pass to
#: every instrumentor; parallelkit has no use for them, and takes them silently
_ECOSYSTEM = frozenset({"event_logger_provider", "logger_provider"})


def _version() -> str:
    from .. import __version__  # the package root is imported by now

    return __version__


@final
class _Installed:
    """What :data:`parallelkit._core.instrument.current` holds while instrumented."""

    __slots__ = ("_instruments", "_item_spans", "_tracer")

    def __init__(self, tracer: trace.Tracer, instruments: Instruments, item_spans: bool) -> None:
        self._tracer = tracer
        self._instruments = instruments
        self._item_spans = item_spans

    def fanout(self, kind: str, limit: int | None, settle: bool) -> FanoutTrace:
        return FanoutTrace(self._tracer, kind, limit, settle, self._item_spans)

    def graph(self, kind: GraphKind, timeline: Any, limit: int | None) -> GraphTrace:
        if not isinstance(timeline, Timeline):  # pragma: no cover - the engine passes one
            msg = f"expected a Timeline, got {timeline!r}"
            raise TypeError(msg)
        return GraphTrace(self._tracer, kind, timeline, limit)

    def limiter_wait(self, seconds: float, reason: Literal["concurrency", "rate"]) -> None:
        try:
            self._instruments.limiter_wait.record(seconds, {"parallelkit.wait_for": reason})
        except Exception as exc:
            report(exc)

    def batch(self, size: int) -> None:
        try:
            self._instruments.batch_size.record(size)
        except Exception as exc:
            report(exc)


class ParallelkitInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Trace parallelkit's fan-out, flows and start-up; measure its caches, limiters, batches.

    An OpenTelemetry instrumentor in the ecosystem's convention
    (``opentelemetry-instrumentation``'s ``BaseInstrumentor``): one instance per
    process (``ParallelkitInstrumentor()`` always returns it), :meth:`instrument`
    once at start-up (a second call logs a warning and changes nothing),
    :meth:`uninstrument` to stop. ``opentelemetry-instrument`` finds it through
    the ``opentelemetry_instrumentor`` entry point.

    While instrumented:

    * each ``pk.map`` / ``pk.gather`` / ``pk.imap`` call is a span ``pk.map``
      (…) with its item count, limit and failure count, and with
      ``item_spans=True`` a child span per item;
    * each ``Flow.run`` is a span ``flow <name>`` with a child ``step <name>``
      per step, carrying the step's waits on its dependencies and on the limit;
    * an Orchestrator's start-up is a span ``startup`` with a child ``start
      <service>`` per service (and ``ready <service>`` for its readiness wait),
      its shutdown a span ``shutdown`` with ``stop <service>`` children;
    * metrics: ``parallelkit.cache.*`` counters (hits, stale hits, misses,
      refreshes, load and refresh errors), the ``parallelkit.limiter.wait`` and
      ``parallelkit.batch.size`` histograms.

    Spans nest under the span current when the call is made (a request's span),
    and your code's spans nest under the item, step or service span, on asyncio
    and trio alike. A failure is recorded on its span (ERROR status and the
    exception); a failure of the tracing itself never reaches your code.

    Not instrumented (never, or after :meth:`uninstrument`), parallelkit's code
    paths read one module attribute per call and do nothing else.

    Example:
        ```python
        from opentelemetry.sdk.trace import TracerProvider
        from parallelkit.otel import ParallelkitInstrumentor

        ParallelkitInstrumentor().instrument(tracer_provider=TracerProvider())
        ```

    .. versionadded:: 0.1
    """

    _installed: _Installed | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        """Nothing beyond parallelkit itself: it instruments its own code."""
        return ()

    def instrument(self, **kwargs: Any) -> None:
        """Start tracing and measuring parallelkit (idempotent: a second call does nothing).

        Args:
            **kwargs: ``tracer_provider`` and ``meter_provider`` (default: the
                global providers), ``item_spans`` (``True``: a span per fan-out
                item too; default ``False``), and ``BaseInstrumentor``'s own
                options (``skip_dep_check``). Any other option is ignored, as by
                every instrumentor (a distro may pass its own to all of them),
                and, unless it is one of the ecosystem's (``logger_provider``),
                named in a warning on the ``parallelkit.otel`` logger: a
                misspelt ``tracer_provder=`` does not go unseen.

        Raises:
            TypeError: ``item_spans`` is not a bool, or a provider is not one (no
                ``get_tracer`` / ``get_meter``, or the class instead of an
                instance); nothing is instrumented then.
            Exception: what a provider's ``get_tracer`` / ``get_meter`` (or the
                meter's instrument factories) raised, as itself; nothing is
                instrumented then, and a later ``instrument()`` may try again.
        """
        super().instrument(**kwargs)

    def uninstrument(self, **kwargs: Any) -> None:
        """Stop: no more spans or measurements, and no cost left on any code path."""
        super().uninstrument(**kwargs)

    def _instrument(self, **kwargs: Any) -> None:
        item_spans = flag("item_spans", kwargs.get("item_spans", False))
        for option, method in (("tracer_provider", "get_tracer"), ("meter_provider", "get_meter")):
            provider = kwargs.get(option)
            if provider is None:
                continue
            if isinstance(provider, type):  # its get_tracer would take the name as `self`
                msg = f"{option} must be an OpenTelemetry {option.replace('_', ' ')} instance "
                msg += f"or None, got the class {provider.__qualname__}: create one, "
                msg += f"{option}={provider.__name__}(...)"
                raise TypeError(msg)
            if not callable(getattr(provider, method, None)):
                msg = f"{option} must be an OpenTelemetry {option.replace('_', ' ')} (with "
                msg += f"{method}()) or None, got {type(provider).__name__} {provider!r}"
                raise TypeError(msg)
        unknown = sorted(set(kwargs).difference(_OPTIONS, _ECOSYSTEM))
        if unknown:  # a distro's own options, or a typo that would go unseen
            _spans.logger.warning(
                "ParallelkitInstrumentor.instrument() ignores the unknown option(s) %s "
                "(its options: %s)",
                ", ".join(unknown),
                ", ".join(_OPTIONS),
            )
        version = _version()
        tracer = trace.get_tracer(_SCOPE, version, kwargs.get("tracer_provider"))
        meter = metrics.get_meter(_SCOPE, version, kwargs.get("meter_provider"))
        instruments = instruments_of(meter)
        instruments.start()
        installed = _Installed(tracer, instruments, item_spans)
        _spans.failures.clear()  # a new set-up: its first failure of each kind is logged
        self._installed = installed
        instrument.install(installed)

    def _uninstrument(self, **kwargs: Any) -> None:
        installed = self._installed
        if installed is not None:
            instrument.uninstall(installed)
            installed._instruments.stop()
            self._installed = None
