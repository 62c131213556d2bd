"""parallelkit.probes.http with URLs a user writes: non-ASCII, spaces, bad ports."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest

import parallelkit as pk

pytestmark = pytest.mark.anyio


@pytest.fixture
async def requests_seen() -> AsyncIterator[tuple[int, list[str]]]:
    """A real HTTP server on 127.0.0.1 answering 200; yields its port and the requests."""
    seen: list[str] = []
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port: int = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
                seen.append(data.decode("latin-1"))
                await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass  # the probe was cancelled mid-request

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield port, seen
        tg.cancel_scope.cancel()


async def test_a_non_ascii_path_and_a_space_are_sent_percent_encoded(
    requests_seen: tuple[int, list[str]],
) -> None:
    # http() raised UnicodeEncodeError ("'ascii' codec can't encode ...", naming no
    # argument) for a non-ASCII path, and sent a space as is (a malformed request line)
    port, seen = requests_seen
    probe = pk.probes.http(f"http://127.0.0.1:{port}/santé/état?q=a b&x=%20")
    assert await probe.reason() is None
    assert seen[-1].startswith("GET /sant%C3%A9/%C3%A9tat?q=a%20b&x=%20 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{port}\r\n" in seen[-1]


async def test_a_non_ascii_host_is_sent_in_its_idna_form(
    requests_seen: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, seen = requests_seen
    connect_tcp = anyio.connect_tcp
    hosts: list[str] = []

    async def to_the_test_server(host: str, _port: int, **kwargs: object) -> object:
        hosts.append(host)  # the name resolves nowhere: the test server answers
        return await connect_tcp("127.0.0.1", port)

    monkeypatch.setattr(anyio, "connect_tcp", to_the_test_server)
    assert await pk.probes.http("http://bücher.example:8080/").reason() is None
    assert hosts == ["bücher.example"]
    assert "\r\nHost: xn--bcher-kva.example:8080\r\n" in seen[-1]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:99999/", "http://127.0.0.1:abc/", "http://127.0.0.1:0/"],
)
def test_a_bad_port_is_a_value_error_naming_url(url: str) -> None:
    # was "Port out of range 0-65535" (naming no argument); port 0 probed port 80
    with pytest.raises(ValueError, match=r"^url must have a port in 1\.\.65535") as info:
        pk.probes.http(url)
    assert repr(url) in str(info.value)


def test_a_host_that_is_not_a_domain_name_is_a_value_error_naming_url() -> None:
    url = f"http://{'a' * 70}ü.example/"
    with pytest.raises(ValueError, match=r"^url must have a valid host name") as info:
        pk.probes.http(url)
    assert repr(url) in str(info.value)
