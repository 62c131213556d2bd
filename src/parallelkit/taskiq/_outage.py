"""A Taskiq worker's read loop while Redis is unreachable: wait, log once, go on."""

from __future__ import annotations

import logging

import anyio
from typing_extensions import final

__all__ = ["Outage"]

logger = logging.getLogger("parallelkit.taskiq")


@final
class Outage:
    """The waits of a read loop while Redis is unreachable: 50 ms doubling to 2 s.

    The first failure of each outage is logged (a warning naming the error), not
    every try; :meth:`over` ends the outage once a read succeeds.
    """

    __slots__ = ("_tries",)

    def __init__(self) -> None:
        self._tries = 0

    async def wait(self, exc: Exception) -> None:
        if self._tries == 0:
            logger.warning(
                "Redis unreachable while reading the queue (%s: %s): waiting for it",
                type(exc).__name__,
                exc,
            )
        await anyio.sleep(min(0.05 * 2**self._tries, 2.0))
        self._tries = min(self._tries + 1, 6)

    def over(self) -> None:
        if self._tries:
            logger.info("Redis reachable again: reading the queue")
        self._tries = 0
