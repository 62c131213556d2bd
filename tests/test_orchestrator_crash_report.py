"""A crash is reported once, clearly: its own error, not "during handling of" a cancellation.

A critical service that crashes while the body of ``orch.start()`` (or ``serve()``)
waits ends that body with a cancellation; the crash is then raised from the exit of
the ``async with``. It must come out as the service raised it, without that
cancellation as its ``__context__`` (which Python's traceback prints as "During
handling of the above exception, another exception occurred").
"""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator

import anyio
import pytest

import parallelkit as pk


def chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception its traceback would print before it."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return seen


def is_cancellation(exc: BaseException) -> bool:
    return isinstance(exc, anyio.get_cancelled_exc_class())


@pytest.mark.anyio
async def test_a_crashed_process_is_raised_without_the_bodys_cancellation() -> None:
    orch = pk.Orchestrator(output="logging")
    orch.process("worker", [sys.executable, "-c", "print('bye'); raise SystemExit(3)"])
    with anyio.fail_after(20), pytest.raises(pk.ProcessError) as info:  # a hang guard
        async with orch.start():
            await anyio.sleep_forever()  # ended by the crash
    assert info.value.returncode == 3
    assert not any(is_cancellation(e) for e in chain(info.value)), chain(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["start", "serve"])
async def test_a_crashed_service_is_raised_as_it_was_raised(how: str) -> None:
    orch = pk.Orchestrator()
    died = KeyError("worker died")
    underlying = OSError("connection reset")

    @orch.service
    async def worker() -> AsyncIterator[str]:
        async def die() -> None:
            await anyio.lowlevel.checkpoint()
            try:
                raise underlying
            except OSError:
                raise died from None  # the user's own chain is kept as it was

        async with anyio.create_task_group() as tg:
            tg.start_soon(die)
            yield "worker"

    with anyio.fail_after(20), pytest.raises(KeyError) as info:  # a hang guard
        if how == "start":
            async with orch.start():
                await anyio.sleep_forever()
        else:
            await orch.serve(signals=(signal.SIGTERM,))
    assert info.value is died
    assert died.__suppress_context__
    assert died.__context__ is underlying  # its own context, untouched
    assert chain(died) == [died]
