"""Readiness probes and the ASGI lifespan, used the way users break them (round 6).

Probes: a host that resolves to several addresses, hosts that are not hosts
(``"127.0.0.1:8080"``, a URL, brackets, spaces), NumPy status codes, a server that
accepts and closes, a probe cancelled at every await (no socket left open), a
check answering ``True``, ``ready=ping()``, a long timeout in messages.
Lifespan: two apps sharing one orchestrator, a shutdown queued while starting, a
server without lifespan state, driven by a bare ASGI driver; a signal while uvicorn
is starting (slow). Events and counters, never elapsed time; ``fail_after`` only
bounds a hang.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from trio.testing import MockClock

import parallelkit as pk
from parallelkit.asgi import lifespan

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup  # type: ignore[import-not-found, unused-ignore]

ROOT = Path(__file__).resolve().parents[1]
Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


# -- helpers ------------------------------------------------------------------------------
@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    """``port = await serve(handler)``: a real TCP server on 127.0.0.1 for the test."""
    async with anyio.create_task_group() as tg:

        async def start(handler: Handler) -> int:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            tg.start_soon(_serve_then_close, listener, handler)
            port: int = listener.extra(anyio.abc.SocketAttribute.local_port)
            return port

        yield start
        tg.cancel_scope.cancel()


async def _serve_then_close(
    listener: anyio.abc.Listener[anyio.abc.SocketStream], handler: Handler
) -> None:
    async with listener:
        await listener.serve(handler)


def answering(payload: bytes) -> Handler:
    """A handler that reads the request, sends ``payload`` and waits for the client."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
                await stream.send(payload)
                await stream.receive()  # until the probe closes
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    return handle


def _refused_port() -> int:
    with socket.socket() as s:  # bound, never listening: a connection is refused
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- probes: several addresses, group errors ----------------------------------------------
@pytest.mark.anyio
async def test_a_host_with_several_addresses_names_each_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # anyio tries every address and raises "All connection attempts failed" from an
    # ExceptionGroup: the reason was "ExceptionGroup: multiple connection attempts
    # failed (2 sub-exceptions)", naming neither the addresses nor the errors
    real = socket.getaddrinfo

    def two_addresses(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("db.test", b"db.test"):
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port))),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", int(port))),
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    port = _refused_port()
    with anyio.fail_after(30):  # a hang guard, not a timing assertion
        for probe in (pk.probes.tcp("db.test", port), pk.probes.http(f"http://db.test:{port}/")):
            why = await probe.reason()
            assert why is not None
            assert "ExceptionGroup" not in why, why
            assert why.count("ConnectionRefusedError: ") == 2, why
            assert "127.0.0.1" in why, why
            assert "127.0.0.2" in why, why


@pytest.mark.anyio
async def test_a_probe_function_raising_a_group_names_what_is_inside() -> None:
    # "ExceptionGroup: unhandled errors in a TaskGroup (1 sub-exception)" hid the error
    async def pings() -> bool:
        async def ping() -> None:
            raise ConnectionError("replica 2 refused")

        async with anyio.create_task_group() as tg:
            tg.start_soon(ping)
        return True  # pragma: no cover

    def grouped() -> bool:
        raise ExceptionGroup("two", [KeyError("a"), ValueError("b")])

    assert await pk.probes.call(pings).reason() == "ConnectionError: replica 2 refused"
    assert await pk.probes.call(grouped).reason() == "KeyError: 'a'; ValueError: b"


# -- probes: bad input ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:8080",  # the port given twice
        "http://localhost",  # a URL
        "localhost/health",
        "[::1]",  # an IPv6 address as a URL writes it
        " localhost",
        "local host",
        "localhost\n",
        "   ",
        "user@db",
    ],
)
def test_a_host_that_is_not_a_host_is_refused_at_once(host: str) -> None:
    # each was taken, then every check failed ("gaierror") until the service's timeout
    with pytest.raises(ValueError, match=r"^host must be a host name or an IP address"):
        pk.probes.tcp(host, 8080)


@pytest.mark.parametrize(
    "host", ["localhost", "db.internal", "my_db", "::1", "fe80::1%eth0", "10.0.0.1", "bücher.de"]
)
def test_host_names_and_addresses_are_taken(host: str) -> None:
    assert pk.probes.tcp(host, 80).name.startswith("tcp ")


@pytest.mark.parametrize("url", ["http://db x/", "http://db x:8080/health", "https://db%20x/"])
def test_a_url_whose_host_has_a_space_is_refused_at_once(url: str) -> None:
    with pytest.raises(ValueError, match=r"^url must have a valid host"):
        pk.probes.http(url)


def test_an_empty_probe_name_is_refused_not_ignored() -> None:
    # name="" silently became the function's name
    with pytest.raises(ValueError, match=r"^name must not be empty"):
        pk.probes.call(lambda: True, name="")
    assert pk.probes.call(lambda: True, name="db").name == "call db"


@pytest.mark.anyio
async def test_numpy_status_codes(serve: Callable[[Handler], Awaitable[int]]) -> None:
    # an array of codes raised "The truth value of an array ... is ambiguous" (naming
    # no argument); a 0-d array "iteration over a 0-d array"
    np = pytest.importorskip("numpy")
    port = await serve(answering(b"HTTP/1.1 204 No Content\r\n\r\n"))
    url = f"http://127.0.0.1:{port}/"
    assert await pk.probes.http(url, status=np.array([200, 204])).reason() is None
    assert await pk.probes.http(url, status=np.array(204)).reason() is None
    assert await pk.probes.http(url, status=np.int64(204)).reason() is None
    assert await pk.probes.http(url, status=np.array([200])).reason() == "status 204"
    with pytest.raises(ValueError, match=r"^status must be an int or a non-empty collection"):
        pk.probes.http(url, status=np.array([], dtype=int))
    with pytest.raises(ValueError, match=r"^status must be an HTTP status code"):
        pk.probes.http(url, status=np.array([200, 700]))
    with pytest.raises(TypeError, match=r"^status must be an int"):
        pk.probes.http(url, status=np.array([200.0]))


# -- probes: servers that misbehave ------------------------------------------------------
@pytest.mark.anyio
async def test_a_server_that_accepts_then_closes_is_named_as_such(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    # was "not an HTTP response: ''": nothing came, not a garbled answer
    async def close_at_once(stream: anyio.abc.SocketStream) -> None:
        await stream.aclose()

    async def close_after_reading(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                await stream.receive()

    for handler in (close_at_once, close_after_reading):
        port = await serve(handler)
        why = await pk.probes.http(f"http://127.0.0.1:{port}/").reason()
        assert why is not None
        assert why.startswith(
            ("the server closed the connection without a response", "ConnectionResetError")
        ), why
        assert await pk.probes.tcp("127.0.0.1", port).reason() is None  # it accepts


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.anyio
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
async def test_a_probe_cancelled_at_any_await_leaves_no_socket_open(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    """Cancel each probe after 0, 1, 2, ... scheduler passes (every await it makes)
    until it finishes uncancelled: no file descriptor is left open."""

    async def not_tls(stream: anyio.abc.SocketStream) -> None:  # the handshake fails
        async with stream:
            try:
                await stream.receive()
                await stream.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    port = await serve(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    plain = await serve(not_tls)
    probes = [
        pk.probes.tcp("127.0.0.1", port),
        pk.probes.http(f"http://127.0.0.1:{port}/"),
        pk.probes.http(f"https://127.0.0.1:{plain}/"),
    ]
    for probe in probes:
        await probe.reason()  # the https probe's CA store is loaded before counting
    await anyio.sleep(0.05)  # the server closes its side of those
    before = _open_fds()
    with anyio.fail_after(60):  # a hang guard, not a timing assertion
        for probe in probes:
            finished = 0
            for passes in range(10_000):
                with anyio.CancelScope() as scope:

                    async def cancel_after(n: int, scope: anyio.CancelScope = scope) -> None:
                        for _ in range(n):
                            await anyio.lowlevel.checkpoint()
                        scope.cancel()

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(cancel_after, passes)
                        await probe.reason()
                        tg.cancel_scope.cancel()
                if not scope.cancelled_caught:
                    finished += 1
                    if finished == 3:
                        break
    # the server notices the probes' closes (at once, but maybe a few passes later on a
    # busy machine): a leak never gets back under ``before``, and fails at the guard
    with anyio.fail_after(30):  # a hang guard, not a timing assertion
        while _open_fds() > before:
            await anyio.sleep(0.01)
    assert _open_fds() <= before


# -- lifespan: a bare ASGI driver -----------------------------------------------------------
class Driver:
    """The lifespan half of an ASGI server, driven by hand."""

    def __init__(self, app: Any, scope: dict[str, Any]) -> None:
        self.app = app
        self.scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, **scope}
        self.inbox, self._receive = anyio.create_memory_object_stream[dict[str, Any]](10)
        self.sent: list[str] = []
        self.failures: list[str] = []
        self.done = anyio.Event()

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message["type"])
        if "message" in message:
            self.failures.append(message["message"])

    async def run(self) -> None:
        try:
            with self.inbox, self._receive:
                await self.app(self.scope, self._receive.receive, self._send)
        finally:
            self.done.set()


def _orchestrator(log: list[str], gate: anyio.Event | None = None) -> pk.Orchestrator:
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        log.append("db up")
        yield "db"
        log.append("db down")

    @orch.service
    async def cache(db: str) -> AsyncIterator[str]:
        log.append("cache starting")
        if gate is not None:
            await gate.wait()
        yield "cache"
        log.append("cache down")

    return orch


@pytest.mark.anyio
async def test_a_shutdown_queued_while_starting_stops_after_the_start() -> None:
    log: list[str] = []
    gate = anyio.Event()
    driver = Driver(Starlette(lifespan=lifespan(_orchestrator(log, gate))), {"state": {}})
    with anyio.fail_after(30):  # a hang guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.run)
            await driver.inbox.send({"type": "lifespan.startup"})
            await driver.inbox.send({"type": "lifespan.shutdown"})  # while cache starts
            while "cache starting" not in log:
                await anyio.lowlevel.checkpoint()
            gate.set()
            await driver.done.wait()
    assert driver.sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert log == ["db up", "cache starting", "cache down", "db down"]


@pytest.mark.anyio
async def test_a_server_without_lifespan_state_fails_the_start_and_rolls_back() -> None:
    log: list[str] = []
    driver = Driver(Starlette(lifespan=lifespan(_orchestrator(log))), {})  # no "state"
    driver.inbox.send_nowait({"type": "lifespan.startup"})
    with anyio.fail_after(30), pytest.raises(RuntimeError, match='support "state"'):
        await driver.run()
    assert driver.sent == ["lifespan.startup.failed"]
    assert log == ["db up", "cache starting", "cache down", "db down"]


@pytest.mark.anyio
async def test_two_apps_sharing_one_orchestrator_the_second_is_refused() -> None:
    """The second app's start fails, naming the cause; the first keeps its services."""
    log: list[str] = []
    orch = _orchestrator(log)
    first = Driver(Starlette(lifespan=lifespan(orch)), {"state": {}})
    second = Driver(Starlette(lifespan=lifespan(orch)), {"state": {}})
    with anyio.fail_after(30):  # a hang guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(first.run)
            await first.inbox.send({"type": "lifespan.startup"})
            while first.sent != ["lifespan.startup.complete"]:
                await anyio.lowlevel.checkpoint()
            second.inbox.send_nowait({"type": "lifespan.startup"})
            with pytest.raises(RuntimeError, match="already started"):
                await second.run()
            assert second.sent == ["lifespan.startup.failed"]
            assert "build a second Orchestrator" in second.failures[0]
            assert log == ["db up", "cache starting"]  # not stopped by the refusal
            assert first.scope["state"]["running"]["db"] == "db"
            await first.inbox.send({"type": "lifespan.shutdown"})
    assert first.sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert log == ["db up", "cache starting", "cache down", "db down"]


# -- lifespan: a signal while uvicorn starts -------------------------------------------
SLOW_APP = """
from pathlib import Path

import anyio
from starlette.applications import Starlette

import parallelkit as pk
from parallelkit.asgi import lifespan

orch = pk.Orchestrator()


@orch.service
async def db():
    print("db up", flush=True)
    yield "db"
    print("db down", flush=True)


@orch.service
async def slow(db):
    print("slow starting", flush=True)
    while not Path("go").exists():
        await anyio.sleep(0.01)
    yield "slow"
    print("slow down", flush=True)


app = Starlette(lifespan=lifespan(orch))
"""


@pytest.mark.slow
def test_sigterm_while_uvicorn_starts_stops_every_service_after_the_start(
    tmp_path: Path,
) -> None:
    """uvicorn does not interrupt a lifespan start-up: a SIGTERM that comes while the
    services start takes effect once they have started; they stop in reverse order."""
    import signal
    import subprocess

    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "slowapp:app", "--host", "127.0.0.1", "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": f"{ROOT / 'src'}:{tmp_path}", "PATH": "/usr/bin:/bin"},
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(2)]
        assert lines == ["db up", "slow starting"]
        process.send_signal(signal.SIGTERM)  # pending at once; handled before "go" is seen
        (tmp_path / "go").touch()
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # pragma: no cover - a hang
            process.kill()
            process.communicate()
    assert process.returncode in (0, -signal.SIGTERM), err  # uvicorn re-raises the signal
    assert out.splitlines() == ["slow down", "db down"]
    assert "Application startup complete" in err
    assert "Application shutdown complete" in err


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="mock")]
)
@pytest.mark.anyio
async def test_a_long_timeout_is_written_as_the_user_wrote_it() -> None:
    # timeout=1000 said "not ready after 1e+03s"
    async def hangs() -> bool:
        await anyio.sleep_forever()
        return True  # pragma: no cover

    with pytest.raises(TimeoutError, match=r"not ready after 1000s \(last check: returned 0\)$"):
        await pk.probes.call(lambda: 0, max_interval=60).wait(timeout=1000)
    with pytest.raises(TimeoutError, match=r"last check: the check did not answer within 3600s"):
        await pk.probes.call(hangs).wait(timeout=3600)


def test_a_probe_given_a_call_instead_of_its_function_says_so() -> None:
    # ready=ping() was "must be callable, got coroutine", then a "coroutine 'ping' was
    # never awaited" warning when it was collected (an error under -W error)
    async def ping() -> bool:
        return True  # pragma: no cover

    from parallelkit.probes import as_probe

    with pytest.raises(TypeError, match=r"^fn must be a function, not its call: pass .*ping"):
        pk.probes.call(ping())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^ready must be a function, not its call"):
        as_probe(ping())
    orch = pk.Orchestrator()
    with pytest.raises(TypeError, match=r"^ready must be a function, not its call"):
        orch.service(ready=ping())  # type: ignore[call-overload]
    gc.collect()  # a coroutine left unclosed warns here: an error in this suite


@pytest.mark.anyio
async def test_a_custom_check_answering_a_bool_is_a_type_error_at_once() -> None:
    # a check answering True ("ready!") was "not ready" until the timeout:
    # "not ready after 5s (last check: True)"
    async def says_true(value: object) -> Any:
        return True

    probe = pk.probes.Probe("db", says_true)
    with anyio.fail_after(30), pytest.raises(TypeError, match=r"^the check of db returned True"):
        await probe.wait(timeout=5)
    with pytest.raises(TypeError, match=r"None when ready, else the reason"):
        await probe.check()
