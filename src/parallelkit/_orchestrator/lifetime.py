"""What a service is: its definition, and its three shapes turned into one lifetime.

A service is registered as one of three shapes, and :func:`open_lifetime` turns
each into the same lifetime (an async context manager):

- an **async generator** function: set-up code, ``yield value``, tear-down code;
- an **async context-manager factory** (``@asynccontextmanager`` or any callable
  returning an object with ``__aenter__``/``__aexit__``);
- an **async function** returning the value (nothing to tear down).

Hosting that lifetime (readiness, retry, tear-down once) is
:class:`~parallelkit._orchestrator.services.ServiceHost`'s. Also here: the errors
that come out of a service's task group, unwrapped (:func:`unwrap`,
:func:`only_failure`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from typing_extensions import final

from .._core.retry import RetryLike
from ..probes import Probe

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "ExitRecorder",
    "LifetimeFactory",
    "ServiceSpec",
    "ServiceState",
    "only_failure",
    "open_lifetime",
    "unwrap",
]

ServiceState = Literal[
    "pending", "starting", "ready", "stopping", "stopped", "failed", "crashed", "skipped"
]
LifetimeFactory = Callable[..., Any]


@final
@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """The definition of one service (validated by the orchestrator at the door)."""

    name: str
    fn: LifetimeFactory
    depends_on: tuple[str, ...] = ()
    ready: Probe | None = None
    timeout: float | None = None
    retry: RetryLike | None = None
    stop_timeout: float = 10.0
    critical: bool = True
    kind: Literal["service", "process"] = "service"
    extra: dict[str, Any] = field(default_factory=dict)


def open_lifetime(name: str, fn: LifetimeFactory, kwargs: dict[str, Any]) -> Any:
    """The async context manager for one run of a service, whatever its shape.

    Raises:
        TypeError: ``fn`` returned neither an awaitable nor an async context
            manager (for example a plain sync function).
    """
    if inspect.isasyncgenfunction(fn):
        return asynccontextmanager(fn)(**kwargs)
    result = fn(**kwargs)
    if hasattr(result, "__aenter__") and hasattr(result, "__aexit__"):
        return result
    if inspect.isawaitable(result):
        return _value_of(result)
    if inspect.isasyncgen(result):
        return asynccontextmanager(lambda: result)()
    msg = (
        f"service {name!r}: {fn!r} returned {type(result).__name__}, not an awaitable or "
        "an async context manager; write it as an async generator (set up, yield, tear "
        "down), an async function, or an async context-manager factory"
    )
    raise TypeError(msg)


@final
class ExitRecorder:
    """A lifetime whose exit keeps what it raised (its tear-down scope may absorb it)."""

    __slots__ = ("cm", "raised")

    def __init__(self, cm: Any) -> None:
        self.cm = cm
        self.raised: BaseException | None = None

    async def __aenter__(self) -> Any:
        return await self.cm.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> Any:
        try:
            return await self.cm.__aexit__(*exc_info)
        except BaseException as exc:
            self.raised = exc
            raise


@asynccontextmanager
async def _value_of(awaitable: Awaitable[Any]) -> AsyncIterator[Any]:
    yield await awaitable


def unwrap(exc: Exception) -> Exception:
    """The one error inside the (nested) single-error groups a service's task group adds."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        inner = exc.exceptions[0]
        if not isinstance(inner, Exception):
            break
        exc = inner
    return exc


def only_failure(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one error in ``group`` besides cancellations, if there is exactly one.

    A ``KeyboardInterrupt``-like error that a service (or a probe) let through comes
    out of the orchestrator's task groups wrapped: it is raised as itself.
    """
    _, rest = group.split(anyio.get_cancelled_exc_class())
    while isinstance(rest, BaseExceptionGroup) and len(rest.exceptions) == 1:
        rest = rest.exceptions[0]
    return None if isinstance(rest, BaseExceptionGroup) else rest
