"""The instrumentation hook: how a tracer (``parallelkit.otel``) sees the primitives.

:data:`current` is ``None`` until an instrumentor installs itself with
:func:`install`, and ``None`` again after :func:`uninstall`. Each instrumented
place reads it **once per call** and, while it is ``None``, does nothing else:

* ``gather`` / ``map`` / ``imap`` (:mod:`parallelkit._fanout`): :meth:`~Instrumentation.fanout`
  gives a :class:`FanoutTrace`, a context manager around the call whose
  :meth:`~FanoutTrace.wrap` wraps the per-item call (to count items and failures);
* ``Flow.run`` and the Orchestrator's start-up and shutdown (the graph engine's
  callers): :meth:`~Instrumentation.graph` gives a :class:`GraphTrace`, a context
  manager around the run whose :meth:`~GraphTrace.run_node` wraps each node, and
  which reads the run's :class:`~parallelkit.Timeline` as spans are recorded
  (the timeline's ``_on_add``), so the waits are the ones the engine measured;
* ``Limiter`` waits and ``BatchLoader`` batch sizes: plain calls;
* ``SWRCache``: nothing on any path. Every cache adds itself to :data:`caches`
  when it is made (a weak set), and an instrumentor reads their ``statistics()``
  when its metrics are collected.

This module imports nothing beyond the standard library: it is the whole cost of
instrumentation support when nothing is instrumented.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

__all__ = [
    "FanoutTrace",
    "GraphKind",
    "GraphTrace",
    "Instrumentation",
    "caches",
    "current",
    "install",
    "uninstall",
]

Call = Callable[[Any], Awaitable[Any]]
NodeCall = Callable[[Any, dict[str, Any]], Awaitable[Any]]  # the engine's RunNode
GraphKind = Literal["flow", "startup", "shutdown"]


class FanoutTrace(AbstractContextManager[object], Protocol):
    """One ``gather`` / ``map`` / ``imap`` call, entered around its pool's run."""

    def wrap(self, call: Call) -> Call:
        """The per-item call to run instead of ``call``."""
        ...


class GraphTrace(AbstractContextManager[object], Protocol):
    """One run of the graph engine (a flow, a start-up, a shutdown), entered around it."""

    def run_node(self, inner: NodeCall | None) -> NodeCall:
        """The engine's ``run_node`` to use (``inner=None``: ``node.call(**kwargs)``)."""
        ...


class Instrumentation(Protocol):
    """What an installed instrumentor provides (``parallelkit.otel`` implements it)."""

    def fanout(self, kind: str, limit: int | None, settle: bool) -> FanoutTrace:
        """A trace for one fan-out call (``kind``: ``"map"``, ``"gather"``, ``"imap"``)."""
        ...

    def graph(self, kind: GraphKind, timeline: Any, limit: int | None) -> GraphTrace:
        """A trace for one graph run recording into ``timeline``."""
        ...

    def limiter_wait(self, seconds: float, reason: Literal["concurrency", "rate"]) -> None:
        """A :class:`~parallelkit.Limiter` caller waited ``seconds`` for a slot or the rate."""
        ...

    def batch(self, size: int) -> None:
        """A ``BatchLoader`` called its ``load_many`` with ``size`` keys."""
        ...


current: Instrumentation | None = None
"""The installed instrumentation, or ``None`` (the default: nothing is traced)."""

caches: weakref.WeakSet[Any] = weakref.WeakSet()
"""Every live ``SWRCache`` (weakly held), for metrics read at collection time."""


def install(instrumentation: Instrumentation) -> None:
    """Make ``instrumentation`` the current one (replacing any other)."""
    global current
    current = instrumentation


def uninstall(instrumentation: Instrumentation | None = None) -> None:
    """Back to no instrumentation (only if ``instrumentation`` is still the current one)."""
    global current
    if instrumentation is None or current is instrumentation:
        current = None
