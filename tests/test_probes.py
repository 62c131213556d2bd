"""parallelkit.probes: tcp / http / call against real sockets, adaptive polling."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import pytest
from trio.testing import MockClock

import parallelkit as pk
from parallelkit.probes import Probe, as_probe

pytestmark = pytest.mark.anyio


async def _free_port() -> int:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port: int = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    return port


@pytest.fixture
async def http_server() -> AsyncIterator[dict[str, Any]]:
    """A tiny real HTTP server on 127.0.0.1: answers with state['status']."""
    state: dict[str, Any] = {"status": 200, "requests": 0}
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    state["port"] = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
                state["requests"] += 1
                state["last"] = data.decode()
                code = state["status"]
                await stream.send(f"HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n".encode())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass  # the probe was cancelled mid-request

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield state
        tg.cancel_scope.cancel()


async def test_tcp_probe_open_and_closed_port() -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        probe = pk.probes.tcp("127.0.0.1", port)
        assert await probe.check()
        await probe.wait(timeout=5)
    assert not await probe.check()
    with pytest.raises(TimeoutError, match=rf"tcp 127.0.0.1:{port} not ready .*ConnectionRefused"):
        await probe.wait(timeout=1)


async def test_tcp_probe_detects_a_late_listener_quickly() -> None:
    port = await _free_port()
    probe = pk.probes.tcp("127.0.0.1", port)
    opened_at: list[float] = []

    async def open_later() -> None:
        await anyio.sleep(0.1)
        async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port):
            opened_at.append(anyio.current_time())
            await anyio.sleep(5)

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_later)
        await probe.wait(timeout=30)
        assert opened_at  # it passed because the listener opened, not before
        tg.cancel_scope.cancel()
    # how soon it notices (at most max_interval): test_polling_is_adaptive, on a virtual clock


async def test_http_probe_status(http_server: dict[str, Any]) -> None:
    url = f"http://127.0.0.1:{http_server['port']}/health?x=1"
    assert await pk.probes.http(url).check()
    assert http_server["last"].startswith("GET /health?x=1 HTTP/1.1\r\n")
    http_server["status"] = 503
    probe = pk.probes.http(url)
    assert not await probe.check()
    assert await probe.reason() == "status 503"
    assert await pk.probes.http(url, status=range(500, 600)).check()
    with pytest.raises(TimeoutError, match="status 503"):
        await probe.wait(timeout=1)


async def test_http_probe_connection_refused_and_garbage() -> None:
    port = await _free_port()
    assert not await pk.probes.http(f"http://127.0.0.1:{port}/").check()

    async def garbage(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.send(b"SSH-2.0-OpenSSH\r\n")

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, garbage)
        why = await pk.probes.http(f"http://127.0.0.1:{port}/").reason()
        tg.cancel_scope.cancel()
    assert why is not None
    assert "not an HTTP response" in why


async def test_a_check_that_times_out_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # the reason was "TimeoutError: " (fail_after's bare error): it now names the bound
    async def silent(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, silent)
        probe = pk.probes.http(f"http://127.0.0.1:{port}/", request_timeout=0.05)
        why = await probe.reason()
        tg.cancel_scope.cancel()
    assert why == "TimeoutError: no answer within request_timeout=0.05s"

    async def never_connects(*args: object, **kwargs: object) -> None:
        await anyio.sleep_forever()

    monkeypatch.setattr(anyio, "connect_tcp", never_connects)
    why = await pk.probes.tcp("127.0.0.1", 5432, connect_timeout=0.05).reason()
    assert why == "TimeoutError: no connection within connect_timeout=0.05s"


async def test_call_probe_sync_async_value_and_errors() -> None:
    assert await pk.probes.call(lambda: True).check()
    assert not await pk.probes.call(lambda: 0).check()

    async def ping(value: dict[str, bool]) -> bool:
        return value["up"]

    probe = pk.probes.call(ping)
    assert await probe.check({"up": True})
    assert not await probe.check({"up": False})

    def broken() -> bool:
        raise ConnectionError("nope")

    assert await pk.probes.call(broken).reason() == "ConnectionError: nope"
    with pytest.raises(TimeoutError, match=r"call .*broken.*ConnectionError: nope"):
        await pk.probes.call(broken).wait(timeout=0.05)


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="mock")]
)
async def test_polling_is_adaptive() -> None:
    """Fast first checks, then backoff to max_interval: on a virtual clock, exactly."""
    times: list[float] = []

    def never() -> bool:
        times.append(anyio.current_time())
        return False

    with pytest.raises(TimeoutError):
        await pk.probes.call(never, initial=0.001, max_interval=0.05).wait(timeout=0.5)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
    expected = [round(min(0.001 * 1.5**i, 0.05), 6) for i in range(len(gaps))]
    assert gaps[:-1] == expected[:-1]  # the last gap is cut by the deadline
    assert gaps[-1] <= expected[-1]
    assert max(gaps) == 0.05  # a late service is noticed at most 50 ms after it is up
    assert len(times) == 18  # 1 ms polling would be ~500 checks
    assert times[-1] - times[0] <= 0.5


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="mock")]
)
async def test_a_check_cut_short_at_the_deadline_keeps_the_last_reason() -> None:
    """A slow last attempt (a loaded machine) must not hide why the service was not ready."""
    calls = 0

    async def refused_then_slow() -> bool:
        nonlocal calls
        calls += 1
        if calls > 1:
            await anyio.sleep(10)  # outlives the deadline: cut short
        return False

    with pytest.raises(TimeoutError, match=r"not ready after 1s \(last check: returned False\)"):
        await pk.probes.call(refused_then_slow).wait(timeout=1)
    assert calls == 2

    async def hangs() -> bool:
        await anyio.sleep(10)
        return True

    with pytest.raises(TimeoutError, match=r"last check: the check did not answer within 1s"):
        await pk.probes.call(hangs).wait(timeout=1)


async def test_cancellation_is_not_swallowed_by_a_check() -> None:
    async def slow() -> bool:
        await anyio.sleep(10)
        return True

    with anyio.move_on_after(0.05) as scope:
        await pk.probes.call(slow).wait()
    assert scope.cancelled_caught


def test_validation() -> None:
    with pytest.raises(ValueError, match="port"):
        pk.probes.tcp("127.0.0.1", 0)
    with pytest.raises(ValueError, match="host must not be empty"):
        pk.probes.tcp("", 80)
    with pytest.raises(TypeError, match="host must be a str"):
        pk.probes.tcp(None, 80)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty collection"):
        pk.probes.http("http://x/", status=[])
    with pytest.raises(TypeError, match="check must be an async function"):
        Probe("x", 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="check must be an async function"):
        Probe("x", lambda value: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="name must be a str"):
        Probe(5, pk.probes.call(lambda: True)._check)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="url"):
        pk.probes.http("ftp://x/")
    with pytest.raises(TypeError, match="status"):
        pk.probes.http("http://x/", status="200")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fn must be callable"):
        pk.probes.call(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no argument or one"):
        pk.probes.call(lambda a, b: True)
    with pytest.raises(ValueError, match="max_interval"):
        pk.probes.call(lambda: True, initial=1.0, max_interval=0.1)
    with pytest.raises(ValueError, match="connect_timeout"):
        pk.probes.tcp("h", 1, connect_timeout=0)
    with pytest.raises(TypeError, match="ready must be"):
        as_probe(42)
    probe = pk.probes.tcp("h", 1)
    assert as_probe(probe) is probe
    assert isinstance(as_probe(lambda: True), Probe)
    assert repr(probe) == "<Probe tcp h:1>"
