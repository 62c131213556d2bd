"""Scenario 2 - the dev workflow (dev server + watchers) as an Orchestrator of processes.

The seed starts four workflows with ``Promise.all`` over "run config" calls:
nothing waits for the dev server's port, the outputs interleave anonymously, and
stopping the editor leaves the watchers running. With
:meth:`parallelkit.Orchestrator.process` each is a managed subprocess:

* the dev server is *ready* when its port accepts connections (a TCP probe);
  the watchers that need it start after it (``depends_on``);
* every output line is prefixed with the process name, like ``honcho``;
* each process runs in its own process group, and stopping (Ctrl-C, or leaving
  ``async with``) sends ``SIGTERM`` to each group in reverse order, ``SIGKILL``
  after ``stop_timeout``: nothing outlives the workflow.

The commands here are small Python stand-ins (``python -m http.server`` for the
dev server, loops for the watchers) so the example runs anywhere; put
``npm run dev`` and friends in their place.

Example:
    ```python
    orch = build_devflow(port=3000)
    async with orch.start() as running:     # or: await orch.serve()  (until Ctrl-C)
        running["dev_server"].pid
    ```
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Literal

import parallelkit as pk

__all__ = ["WATCHERS", "build_devflow"]

_LOOP = (
    "import sys, time\n"
    "for i in range(10**6):\n"
    "    print(sys.argv[1].format(i=i), flush=True)\n"
    "    time.sleep(float(sys.argv[2]))\n"
)

#: The seed's watchers: (name, message each cycle, seconds between cycles).
WATCHERS = (
    ("test_runner", "watching tests: run {i}, 12 passed", 0.5),
    ("build_watcher", "build {i}: compiled successfully", 0.7),
    ("lint_watcher", "lint {i}: no problems", 0.9),
)


def build_devflow(
    port: int = 3000,
    *,
    host: str = "127.0.0.1",
    directory: str = ".",
    output: Literal["stdout", "logging"] | Callable[[str, str, str], object] = "stdout",
) -> pk.Orchestrator:
    """The seed's four workflows: a dev server on ``host:port`` and three watchers.

    Args:
        port: the dev server's port (its readiness probe connects to it).
        host: the interface it binds.
        directory: what the stand-in dev server serves.
        output: where process lines go (``"stdout"``, ``"logging"`` or
            ``fn(name, stream, line)``).
    """
    orch = pk.Orchestrator(name="dev workflow", output=output)
    orch.process(
        "dev_server",
        [
            sys.executable,
            "-u",
            "-m",
            "http.server",
            str(port),
            "--bind",
            host,
            "--directory",
            directory,
        ],
        ready=pk.probes.tcp(host, port),
        timeout=20,
        stop_timeout=5,
    )
    for name, message, every in WATCHERS:
        orch.process(
            name,
            [sys.executable, "-u", "-c", _LOOP, message, str(every)],
            depends_on=("dev_server",),
            restart="on-failure",
            stop_timeout=5,
        )
    return orch
