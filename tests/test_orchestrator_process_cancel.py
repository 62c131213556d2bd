"""A process service whose start is cancelled while its watcher tasks begin.

The start of a process service can be cancelled at any moment (a sibling failed, a
signal), also right after the process was spawned, before its watcher tasks (the
exit watcher, the output pumps) took their first step. Its tear-down then runs
shielded (the service host shields the attempt's cancel scope). On trio, a task
that had just seen the cancellation inside ``trio.lowlevel.checkpoint_if_cancelled``
(``Process.wait``'s lock) and is un-cancelled by that shield before it resumes
failed with ``AssertionError: this should never happen``, logged as a tear-down
error. The watchers are now cancelled by the lifetime's stop only.

No clock is involved: the probe itself cancels the start, on its first look.
"""

from __future__ import annotations

import logging

import anyio
import pytest

import parallelkit as pk
from parallelkit._orchestrator.process import ManagedProcess

from .test_process import alive

pytestmark = pytest.mark.anyio

ROUNDS = 8  # the race went the wrong way in about 2 runs of 3 on trio


async def _start_cancelled_by_probe() -> int:
    """Start a process service whose probe cancels the start; its pid."""
    pids: list[int] = []
    with anyio.CancelScope() as outer:

        def check(process: ManagedProcess) -> bool:
            assert process.pid is not None
            pids.append(process.pid)
            outer.cancel()  # the start is cancelled while the process starts
            return False

        orch = pk.Orchestrator(output="logging")
        orch.process("worker", ["sleep", "30"], ready=pk.probes.call(check))
        async with orch.start():
            pytest.fail("the start was cancelled: the body must not run")
    assert outer.cancelled_caught
    return pids[0]


async def test_a_start_cancelled_as_the_process_starts_tears_down_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    for _ in range(ROUNDS):
        pid = await _start_cancelled_by_probe()
        assert not alive(pid)
    assert [(r.getMessage(), r.exc_info and r.exc_info[1]) for r in caplog.records] == []
