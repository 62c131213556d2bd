"""``rate=`` of the distributed ``map`` / ``imap``: what may gate each kick."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NoReturn, Protocol, runtime_checkable

from .._core.limiter import Limiter, SupportsLimit, validate_rate

__all__ = ["SupportsRate", "rate_gate"]


@runtime_checkable
class SupportsRate(Protocol):
    """A rate gate for ``rate=``: ``await gate.wait_rate()`` returns when one more
    kick may start.

    :class:`parallelkit.Limiter` has it (an in-process rate shared by every call
    given the same limiter). ``rate=`` also accepts a shared limiter without
    ``wait_rate``, such as ``parallelkit.redis.RedisLimiter``: each kick then enters
    and leaves it once, so its rate spaces the kicks of every producer on the same
    Redis (and, if it has a ``concurrency``, each kick holds a slot only for that
    moment: bound the items in flight with ``limit=``). A limiter whose ``rate`` is
    ``None`` (``Limiter(concurrency=2)``) is refused: it would space nothing.
    """

    async def wait_rate(self) -> None: ...


def rate_gate(rate: object) -> Callable[[], Awaitable[object]] | None:
    """Turn ``rate=`` into "wait until this kick may start" (or ``None``): a number
    (an in-process :class:`~parallelkit.Limiter`), a :class:`SupportsRate`, or a
    shared limiter entered and left once per kick. A limiter whose ``rate`` is
    ``None`` is refused as ``pk.map`` refuses it (a ``TypeError``): it spaces nothing."""
    if rate is None:
        return None
    if getattr(rate, "rate", 0) is None:  # a limiter without a rate: it would space nothing
        _refuse(rate)
    if isinstance(rate, SupportsRate):
        return rate.wait_rate
    if isinstance(rate, SupportsLimit):
        limiter = rate

        async def gate() -> None:
            async with limiter:  # a start under its rate; the slot is given back at once
                pass

        return gate
    return Limiter(rate=validate_rate(rate)).wait_rate


def _refuse(limiter: object) -> NoReturn:
    """Refuse a limiter that has no rate (``Limiter(concurrency=2)``) as ``pk.map``
    refuses it, with its own check and message, and say why here: each kick would
    enter it and leave it at once, and nothing would be spaced or bounded."""
    try:
        validate_rate(limiter)
    except TypeError as exc:
        msg = (
            f"{exc}: as rate= a limiter needs a rate, and this one has no rate, so it "
            "would let every kick through; give it one (rate=...), or bound the items "
            "in flight with limit="
        )
        raise TypeError(msg) from None
    raise AssertionError  # pragma: no cover - validate_rate refuses every limiter
