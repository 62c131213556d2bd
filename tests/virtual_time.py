"""Virtual time on both backends, for tests that assert exact times.

trio has ``MockClock(autojump_threshold=0)``; :class:`VirtualLoop` is the same for
asyncio: an event loop whose clock, when no task can run and no I/O is ready,
jumps to the next timer instead of sleeping. A loop with nothing to wake it (every
task blocked, no timer) raises instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
import selectors
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import trio.testing

__all__ = ["VirtualLoop", "run_virtual"]

T = TypeVar("T")


class _JumpingSelector(selectors.BaseSelector):
    """A selector that, when nothing is ready, jumps the loop's clock to the next
    timer instead of sleeping (trio's ``autojump_threshold=0`` for asyncio)."""

    def __init__(self, loop: VirtualLoop) -> None:
        self._real = selectors.DefaultSelector()
        self._loop = loop

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # nothing scheduled and no I/O: every task waits forever
            msg = "deadlock: every task is blocked and no timer is set"
            raise RuntimeError(msg)
        self._loop.now += timeout
        return []

    def close(self) -> None:
        self._real.close()

    def get_map(self) -> Any:
        return self._real.get_map()


class VirtualLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual time; records what its exception handler gets."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handled: list[dict[str, Any]] = []
        super().__init__(selector=_JumpingSelector(self))
        self.set_exception_handler(lambda _loop, context: self.handled.append(context))

    def time(self) -> float:
        return self.now


def run_virtual(main: Callable[[], Awaitable[T]], backend: str) -> T:
    """``anyio.run(main)`` on virtual time; fails if a warning or error was logged or
    the loop's exception handler was called."""
    loops: list[VirtualLoop] = []

    def factory() -> VirtualLoop:
        loops.append(VirtualLoop())
        return loops[-1]

    if backend == "trio":
        options: dict[str, Any] = {"clock": trio.testing.MockClock(autojump_threshold=0)}
    else:
        options = {"loop_factory": factory}
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        result = anyio.run(main, backend=backend, backend_options=options)
    finally:
        root.removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    for loop in loops:
        assert loop.handled == []
    return result
