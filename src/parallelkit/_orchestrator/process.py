"""Process services: a subprocess with prefixed output, a restart policy and a clean stop.

What ``Orchestrator.process(...)`` runs. Each process is started in a **new
session** (its own process group), so stopping it reaches its children too:
``SIGTERM`` to the whole group, ``SIGKILL`` after ``stop_timeout``. Its stdout
and stderr are read line by line and written with the service's name as a
prefix (coloured on a terminal), like honcho / foreman, or sent to logging.
An unexpected exit restarts it per policy (``"no"``, ``"on-failure"``,
``"always"``, at most ``max_restarts`` times, with a growing pause) or fails
the service, and with it the orchestrator.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Literal

import anyio
import anyio.abc
from typing_extensions import final

from .._core.check import callable_with, choice
from .._core.errors import ProcessError
from ..probes import Probe
from .definitions import signal_to_send

__all__ = ["ManagedProcess", "OutputSink", "RestartPolicy", "process_lifetime", "process_ready"]

RestartPolicy = Literal["no", "on-failure", "always"]
RESTART_POLICIES: tuple[RestartPolicy, ...] = ("no", "on-failure", "always")
TAIL_LINES = 20  # lines of output a ProcessError shows
TAIL_WIDTH = 1000  # characters of each of them kept (a 64 KiB piece of binary output is not)
MAX_LINE = 65536  # bytes: a longer line (a progress bar redrawn with \r) is emitted in pieces
Output = Literal["stdout", "logging"] | Callable[[str, str, str], object]

_COLOURS = ("36", "33", "32", "35", "34", "96", "93", "92", "95", "94")
logger = logging.getLogger("parallelkit.process")


@final
class OutputSink:
    """Where process output lines go: ``name | line`` on stdout, logging, or a callable.

    Args:
        output: ``"stdout"`` (default; coloured when stdout is a terminal and
            ``NO_COLOR`` is unset), ``"logging"`` (logger
            ``parallelkit.process.<name>``, INFO for stdout lines, WARNING for
            stderr lines) or ``fn(name, stream, line)``.
        width: pad names to this width so the lines align.
    """

    __slots__ = ("_colour", "output", "width")

    def __init__(self, output: Output = "stdout", *, width: int = 0) -> None:
        if not callable(output):
            choice("output", output, ("stdout", "logging"))
        else:  # (an async one would lose every line: called, never awaited)
            callable_with("output", output, 3, what="a function (name, stream, line)")
        self.output = output
        self.width = width
        self._colour: dict[str, str] = {}

    def write(self, name: str, stream: str, line: str) -> None:
        """Emit one line of ``name``'s ``stream`` (``"stdout"`` / ``"stderr"``)."""
        output = self.output
        if output == "logging":
            level = logging.WARNING if stream == "stderr" else logging.INFO
            logging.getLogger(f"parallelkit.process.{name}").log(level, "%s", line)
        elif output == "stdout":
            out = sys.stdout
            prefix = f"{name:<{self.width}} | "
            if _use_colour(out):
                code = self._colour.setdefault(name, _COLOURS[len(self._colour) % len(_COLOURS)])
                prefix = f"\x1b[{code}m{prefix}\x1b[0m"
            out.write(f"{prefix}{line}\n")
            out.flush()
        else:
            assert callable(output)
            output(name, stream, line)


def _use_colour(stream: Any) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@final
class ManagedProcess:
    """The value of a process service: the running process and its history.

    Injected into services that depend on the process (``depends_on``) and
    returned by ``running["name"]``.

    Attributes:
        name: the service name.
        cmd: the command (a shell string or an argument list).
        pid: the current process id (also its process-group id), or ``None``.
        returncode: the exit code of the last run that ended, or ``None``.
        restarts: how many times it was restarted.
        tail: its last lines of output (``[stderr]`` marks the error stream), each
            cut to 1,000 characters.
    """

    __slots__ = (
        "_final",
        "_finished",
        "_forced",
        "_group_gone",
        "_killed",
        "_probing",
        "_process",
        "_pumps",
        "cmd",
        "name",
        "pid",
        "restarts",
        "returncode",
        "tail",
    )

    def __init__(self, name: str, cmd: str | Sequence[str]) -> None:
        self.name = name
        self.cmd = cmd
        self.pid: int | None = None
        self.returncode: int | None = None
        self.restarts = 0
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._process: anyio.abc.Process | None = None
        self._pumps: tuple[anyio.Event, ...] = ()
        # the current process's group was killed after it exited: its id may be reused
        # by an unrelated process group from then on, which must never get a signal
        self._group_gone = False
        # the stop was forced (a second signal): SIGKILL at once, no SIGTERM grace
        self._forced = False
        # its stop ran out of stop_timeout and killed it: cut short (its "stop" span says so)
        self._killed = False
        # the readiness wait in progress (see services.py): an exit for good ends it
        self._probing: anyio.CancelScope | None = None
        # the orchestrator is stopping: an exit from now on is final, never restarted
        self._final = False
        # it exited with code 0 and is not restarted: a one-shot job that is done
        self._finished = False

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else f"returncode={self.returncode}"
        return f"<ManagedProcess {self.name!r} {state} restarts={self.restarts}>"

    @property
    def running(self) -> bool:
        """Whether the process is currently alive."""
        return self._process is not None and self._process.returncode is None

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the process's whole group (no-op once all of it has exited).

        Raises:
            TypeError: ``signum`` is not a signal number (a ``bool`` neither).
            ValueError: no signal has that number.
        """
        signum = signal_to_send("signum", signum)
        if self.pid is None:
            return
        if self.running or (not self._group_gone and _group_alive(self.pid)):
            _killpg(self.pid, signum)


def _killpg(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pgid, signum)


async def _pump(
    stream: anyio.abc.ByteReceiveStream,
    handle: ManagedProcess,
    kind: str,
    sink: OutputSink,
    done: anyio.Event,
) -> None:
    name, tail = handle.name, handle.tail
    marker = "[stderr] " if kind == "stderr" else ""

    def emit(raw: bytes) -> None:
        line = raw.decode("utf-8", "replace")
        tail.append(marker + _tail_line(line))
        sink.write(name, kind, line)

    def emit_long(raw: bytes) -> bytes:
        """Emit ``raw`` in pieces of at most MAX_LINE bytes while it is longer; the rest."""
        while len(raw) > MAX_LINE:
            cut = _utf8_boundary(raw, MAX_LINE)
            emit(raw[:cut])
            raw = raw[cut:]
        return raw

    buffer = b""
    try:
        async for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                emit(emit_long(line.rstrip(b"\r")))
            # a line that never ends (a progress bar redrawn with \r, binary output)
            # goes out in pieces: the buffer, and the work per chunk, stay bounded
            buffer = emit_long(buffer)
    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass
    finally:
        if buffer:
            emit(buffer)
        done.set()


def _tail_line(line: str) -> str:
    """``line`` as the tail keeps it: cut to TAIL_WIDTH characters, saying so.

    The tail is the message of a ProcessError (and of the StartupError it causes):
    a process that dies after printing a progress bar, or binary, must not make it
    megabytes long. The output itself is passed on whole.
    """
    if len(line) <= TAIL_WIDTH:
        return line
    return f"{line[:TAIL_WIDTH]}... [{len(line) - TAIL_WIDTH} more characters]"


def _utf8_boundary(data: bytes, limit: int) -> int:
    """Where to cut ``data`` at most ``limit`` bytes in without splitting a UTF-8 character."""
    cut = limit
    while cut > limit - 3 and data[cut] & 0xC0 == 0x80:  # a continuation byte
        cut -= 1
    return cut


@asynccontextmanager
async def process_lifetime(
    name: str,
    cmd: str | Sequence[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str] | None,
    restart: RestartPolicy,
    max_restarts: int | None,
    stop_timeout: float,
    sink: OutputSink,
) -> AsyncIterator[ManagedProcess]:
    """Run ``cmd`` as a supervised process for as long as the context is open.

    Yields the :class:`ManagedProcess` as soon as the first process is spawned
    (readiness is the orchestrator's probe's job). On exit: ``SIGTERM`` to the
    process group, ``SIGKILL`` after ``stop_timeout``; this part is shielded from
    cancellation, so no child outlives the context.
    """
    handle = ManagedProcess(name, cmd)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    stopping = anyio.Event()
    # a restart's spawn and the stop never overlap: a process spawned while the stop
    # runs would be missed by it and outlive the orchestrator
    spawn_lock = anyio.Lock()

    async def open_() -> anyio.abc.Process:
        process = await anyio.open_process(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        handle._process = process
        handle.pid = process.pid
        handle.returncode = None
        handle._group_gone = False
        return process

    # The watchers (the exit watcher, the output pumps) are cancelled by this
    # lifetime's stop only, never by a cancellation from outside: the service host
    # shields a cancelled start's tear-down by shielding the scope around this
    # lifetime, and on trio a task un-cancelled that way while it checks for the
    # cancellation (``checkpoint_if_cancelled``, in ``Process.wait``'s lock) fails
    # with an AssertionError. It also keeps the output drained until the stop.
    watchers: set[anyio.CancelScope] = set()

    def watch(tg: anyio.abc.TaskGroup, fn: Callable[[], Awaitable[None]]) -> None:
        scope = anyio.CancelScope(shield=True)
        watchers.add(scope)
        tg.start_soon(_watched, scope, watchers, fn)

    def attach(tg: anyio.abc.TaskGroup, process: anyio.abc.Process) -> anyio.abc.Process:
        assert process.stdout is not None
        assert process.stderr is not None
        handle._pumps = (anyio.Event(), anyio.Event())
        watch(tg, partial(_pump, process.stdout, handle, "stdout", sink, handle._pumps[0]))
        watch(tg, partial(_pump, process.stderr, handle, "stderr", sink, handle._pumps[1]))
        logger.debug("process %r started: pid %d", name, process.pid)
        return process

    def restarted(code: int) -> bool:
        """Whether an exit with ``code`` is restarted: per policy, never once stopping began."""
        wanted = restart == "always" or (restart == "on-failure" and code != 0)
        return wanted and not handle._final

    def ended(code: int) -> None:
        """The process exited for good: an exit 0 ends it, any other fails the service."""
        if code != 0:
            raise ProcessError(name, code, cmd, handle.tail, restarts=handle.restarts)
        handle._finished = True
        logger.info("process %r exited with code 0", name)
        if handle._probing is not None:  # not ready yet: stop waiting, look once more
            handle._probing.cancel()

    async def supervise(tg: anyio.abc.TaskGroup, process: anyio.abc.Process) -> None:
        while True:
            code = await process.wait()
            handle.returncode = code
            if stopping.is_set():
                return
            # reap the rest of the group: nothing it started may outlive it
            _killpg(process.pid, signal.SIGKILL)
            handle._group_gone = True
            await _reap(handle, process)
            if not restarted(code):
                ended(code)
                return
            if max_restarts is not None and handle.restarts >= max_restarts:
                # raised to whoever runs the orchestrator: not logged here as well
                raise ProcessError(name, code, cmd, handle.tail, restarts=handle.restarts)
            pause = min(0.05 * 2**handle.restarts, 2.0)
            logger.warning("process %r exited with code %d; restarting in %.2fs", name, code, pause)
            await anyio.sleep(pause)
            async with spawn_lock:
                if stopping.is_set():
                    return
                if not restarted(code):  # the orchestrator began to stop during the pause
                    ended(code)
                    return
                handle.restarts += 1
                with anyio.CancelScope(shield=True):  # once spawned, it is registered
                    process = attach(tg, await open_())

    # spawned before the task group is entered: an OSError (no such command, a cwd
    # that does not exist, not executable) comes out as itself, naming the path,
    # not inside the task group's ExceptionGroup
    first = await open_()
    async with anyio.create_task_group() as tg:
        try:
            watch(tg, partial(supervise, tg, attach(tg, first)))
            yield handle
        finally:
            stopping.set()
            with anyio.CancelScope(shield=True):
                async with spawn_lock:  # a restart being spawned: stop that one
                    await _terminate(handle, stop_timeout)
            for scope in watchers:
                scope.cancel()
            tg.cancel_scope.cancel()


async def _watched(
    scope: anyio.CancelScope, watchers: set[anyio.CancelScope], fn: Callable[[], Awaitable[None]]
) -> None:
    """Run ``fn`` in ``scope`` (shielded; cancelled by the stop), then forget the scope."""
    try:
        with scope:
            await fn()
    finally:
        watchers.discard(scope)


async def _terminate(handle: ManagedProcess, stop_timeout: float) -> None:
    """``SIGTERM`` to the group; ``SIGKILL`` to what is left of it after ``stop_timeout``.

    The whole group has the grace period, not only the process: a shell running a
    command (``cd app && uvicorn ...``) dies at ``SIGTERM`` at once, while its
    child finishes its graceful stop. A forced stop (a second signal to ``serve()``)
    sends ``SIGKILL`` at once instead.
    """
    process = handle._process
    if process is None:
        return
    pgid = process.pid
    if not handle._group_gone:  # else its id may belong to someone else by now
        if process.returncode is None or _group_alive(pgid):
            if handle._forced:  # a second signal: no grace
                _killpg(pgid, signal.SIGKILL)
            else:
                await _term_then_kill(handle, process, stop_timeout)
        handle._group_gone = True
    handle.returncode = await process.wait()
    await _reap(handle, process)


async def _term_then_kill(
    handle: ManagedProcess, process: anyio.abc.Process, stop_timeout: float
) -> None:
    """``SIGTERM`` to the group, ``SIGKILL`` to what is left of it after ``stop_timeout``."""
    pgid = process.pid
    _killpg(pgid, signal.SIGTERM)
    with anyio.move_on_after(stop_timeout):
        await process.wait()
        # the rest of the group has the same grace; polled: no event says
        # when a process that is not our child exits
        while _group_alive(pgid):  # noqa: ASYNC110
            await anyio.sleep(0.05)
    if process.returncode is None or _group_alive(pgid):
        logger.warning(
            "process %r did not exit within stop_timeout=%ss after SIGTERM; sending SIGKILL",
            handle.name,
            stop_timeout,
        )
        handle._killed = True
        _killpg(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which cannot, do not count).

    The process itself must not have been reaped yet, or a member of the group be
    alive: either keeps ``pgid`` from being given to another group.
    """
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc (not Linux): a zombie counts as alive
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


async def _reap(handle: ManagedProcess, process: anyio.abc.Process) -> None:
    """Let the output pumps drain what the process wrote, then release its pipes."""
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(0.5):
            for done in handle._pumps:
                await done.wait()
        await process.aclose()


async def process_ready(probe: Probe, process: ManagedProcess, deadline: float) -> None:
    """Poll ``probe`` until it passes, unless ``process`` exits for good first.

    A process that exits with code 0 and is not restarted ends the wait (its
    supervisor cancels it): the probe then gets one last look, since a one-shot
    process may have done what the probe checks for. If that fails too, the
    process will never be ready: :class:`~parallelkit.ProcessError`, at once, not
    after the whole ``timeout`` (or never, without one).
    """
    left = deadline - anyio.current_time()
    if left <= 0:  # the time ran out since the caller looked (a real clock moves on)
        msg = f"{probe.name} not ready: the timeout ran out before its first check"
        raise TimeoutError(msg)
    with anyio.CancelScope() as waiting:
        process._probing = waiting
        try:
            await probe.wait(process, timeout=None if math.isinf(deadline) else left)
        finally:
            process._probing = None
    if not waiting.cancelled_caught:
        return
    with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
        if await probe.check(process):
            return
    code = process.returncode if process.returncode is not None else 0
    raise ProcessError(process.name, code, process.cmd, process.tail, restarts=process.restarts)
