"""serve() leaves no global state changed, and says so when it cannot run at all."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from types import FrameType

import anyio
import pytest

import parallelkit as pk

BACKENDS = ["asyncio", "trio"]


def sigterm_self() -> None:
    """What ``kill <pid>`` would do; only called while serve()'s handler is installed."""
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture
def own_handlers() -> Iterator[object]:
    """Install a handler of this program's own for SIGINT and SIGTERM (then the old ones)."""

    def handler(signum: int, frame: FrameType | None) -> None:  # pragma: no cover
        pass

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in saved:
        signal.signal(s, handler)
    yield handler
    for s, old in saved.items():
        signal.signal(s, old)


@pytest.mark.anyio
async def test_serve_puts_back_the_signal_handlers_it_found(own_handlers: object) -> None:
    # on asyncio, anyio removes its handlers by installing the defaults: after serve(),
    # SIGTERM killed the program (SIG_DFL) instead of reaching its own handler
    orch, lines = pk.Orchestrator(), []

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        lines.append("db down")

    with anyio.fail_after(20):  # a hang guard
        await orch.serve(on_ready=lambda running: sigterm_self())
    assert lines == ["db down"]
    assert signal.getsignal(signal.SIGTERM) is own_handlers
    assert signal.getsignal(signal.SIGINT) is own_handlers


@pytest.mark.parametrize("backend", BACKENDS)
def test_serve_off_the_main_thread_says_what_to_do_before_anything_starts(backend: str) -> None:
    # asyncio said "set_wakeup_fd only works in main thread of the main interpreter"
    orch, lines = pk.Orchestrator(), []

    @orch.service
    async def db() -> AsyncIterator[str]:
        lines.append("db up")  # pragma: no cover
        yield "db"  # pragma: no cover

    errors: list[BaseException] = []

    def run() -> None:
        try:
            anyio.run(orch.serve, backend=backend)
        except BaseException as exc:  # looked at below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    assert str(errors[0]).startswith("serve() must run in the main thread")
    assert "orch.start()" in str(errors[0])
    assert lines == []  # nothing started
