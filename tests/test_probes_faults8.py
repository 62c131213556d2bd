"""Fault review 8: the HTTP probe and interim (1xx) responses, and IPv6 zones in URLs.

1. A server may send interim responses (``100 Continue``, ``103 Early Hints``: a
   status line and headers each) before the final one (RFC 9110 15.2). The probe
   took the first status line it read for the answer: ``"status 100"``, never ready.
   It now skips them and reads the final status. Real tiny TCP servers in the test
   write the raw bytes; a scripted stream delivers them one byte at a time.
2. An IPv6 address with a zone is written in a URL with ``%25`` for its ``%``
   (RFC 6874: ``http://[fe80::1%25eth0]:8080/``). The probe connected to
   ``fe80::1%25eth0`` (a zone named ``25eth0``); it now decodes the zone, and leaves
   it out of the ``Host`` header (the zone means nothing to the server).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

import parallelkit as pk

pytestmark = pytest.mark.anyio

FINAL_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"


@asynccontextmanager
async def raw_server(chunks: Iterable[bytes], host: str = "127.0.0.1") -> AsyncIterator[Any]:
    """A TCP server on ``host``: reads a request's head, writes ``chunks`` (one send
    each, in order) and closes. Yields its state: ``port``, ``requests`` (the heads)."""
    replies = list(chunks)
    listener = await anyio.create_tcp_listener(local_host=host, local_port=0)
    state: dict[str, Any] = {
        "port": listener.extra(anyio.abc.SocketAttribute.local_port),
        "requests": [],
    }

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
                state["requests"].append(data.decode())
                for chunk in replies:
                    await stream.send(chunk)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass  # the probe gave up mid-request

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield state
        tg.cancel_scope.cancel()


# -- 1. interim responses ------------------------------------------------------------------
@pytest.mark.slow
async def test_100_continue_before_the_final_response_is_skipped() -> None:
    # It was "status 100": the probe never passed against such a server.
    async with raw_server([CONTINUE, FINAL_200]) as server:
        probe = pk.probes.http(f"http://127.0.0.1:{server['port']}/health")
        with anyio.fail_after(30):  # a hang guard
            assert await probe.reason() is None
            await probe.wait(timeout=30)
    assert server["requests"][0].startswith("GET /health HTTP/1.1\r\n")


@pytest.mark.slow
async def test_103_early_hints_with_headers_then_the_final_status_is_the_answer() -> None:
    final = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
    async with raw_server([EARLY_HINTS, final]) as server:
        probe = pk.probes.http(f"http://127.0.0.1:{server['port']}/")
        with anyio.fail_after(30):
            assert await probe.reason() == "status 503"  # was "status 103"


@pytest.mark.slow
async def test_several_interim_responses_in_one_write_then_the_final_one() -> None:
    processing = b"HTTP/1.1 102 Processing\r\n\r\n"
    reply = CONTINUE + processing + EARLY_HINTS + b"HTTP/1.1 204 No Content\r\n\r\n"
    async with raw_server([reply]) as server:
        probe = pk.probes.http(f"http://127.0.0.1:{server['port']}/", status=204)
        with anyio.fail_after(30):
            assert await probe.reason() is None


@pytest.mark.slow
async def test_a_connection_closed_after_an_interim_response_is_not_ready() -> None:
    async with raw_server([CONTINUE]) as server:
        probe = pk.probes.http(f"http://127.0.0.1:{server['port']}/", status=range(100, 600))
        with anyio.fail_after(30):
            reason = await probe.reason()
    assert reason == "the server closed the connection after an interim response (status 100)"


@pytest.mark.slow
async def test_a_server_that_says_nothing_still_says_so() -> None:
    async with raw_server([]) as server:
        with anyio.fail_after(30):
            reason = await pk.probes.http(f"http://127.0.0.1:{server['port']}/").reason()
    assert reason == "the server closed the connection without a response"


class Scripted(anyio.abc.ByteStream):
    """A connection whose server side is ``chunks`` (then the end of the stream)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.sent = b""
        self.received = 0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        chunk = next(self.chunks, None)
        if chunk is None:
            raise anyio.EndOfStream
        self.received += len(chunk)
        return chunk

    async def send(self, item: bytes) -> None:
        self.sent += item

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def connect_to(monkeypatch: pytest.MonkeyPatch, stream: Scripted) -> list[str]:
    """Make ``anyio.connect_tcp`` return ``stream``; the hosts it was asked for."""
    hosts: list[str] = []

    async def connect_tcp(host: str, port: int, **kwargs: object) -> Scripted:
        hosts.append(host)
        return stream

    monkeypatch.setattr(anyio, "connect_tcp", connect_tcp)
    return hosts


def one_byte_at_a_time(data: bytes) -> Iterator[bytes]:
    return (data[i : i + 1] for i in range(len(data)))


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (CONTINUE + EARLY_HINTS + FINAL_200, None),
        # a bare LF ends a line too, as HTTP allows
        (b"HTTP/1.1 100 Continue\n\nHTTP/1.1 103 Early Hints\nLink: <a>\n\n" + FINAL_200, None),
        (CONTINUE + b"HTTP/1.1 500 Oops\r\n\r\n", "status 500"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", "status 101"),  # final
        (CONTINUE + b"garbage\r\n", "not an HTTP response: 'garbage'"),
        (
            b"HTTP/1.1 103 Early Hints\r\nLink: <a>\r\n",  # closed in its headers
            "the server closed the connection after an interim response (status 103)",
        ),
    ],
)
async def test_interim_responses_read_one_byte_at_a_time(
    monkeypatch: pytest.MonkeyPatch, reply: bytes, reason: str | None
) -> None:
    connect_to(monkeypatch, Scripted(one_byte_at_a_time(reply)))
    probe = pk.probes.http("http://db.internal:8080/")
    with anyio.fail_after(30):
        assert await probe.reason() == reason


async def test_an_endless_stream_of_interim_responses_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server that only ever says "100 Continue": the probe stops reading after a bound,
    # in one check (not at request_timeout, not never).
    def forever() -> Iterator[bytes]:
        while True:
            yield CONTINUE * 64

    stream = Scripted(forever())
    connect_to(monkeypatch, stream)
    with anyio.fail_after(30):
        reason = await pk.probes.http("http://db.internal/").reason()
    assert reason == "no final response within 65536 bytes of interim responses"
    assert stream.received < 2 * 65536


# -- 2. IPv6 zones in URLs ------------------------------------------------------------------
def loopback_index() -> int:
    try:
        return socket.if_nametoindex("lo")
    except OSError:  # pragma: no cover - not Linux
        pytest.skip("no interface named lo")


@pytest.mark.slow
async def test_a_zoned_loopback_url_connects_and_the_zone_is_not_sent() -> None:
    # [::1%25<index of lo>]: it connected to "::1%25<n>", a zone that does not exist
    if not socket.has_ipv6:  # pragma: no cover
        pytest.skip("no IPv6")
    index = loopback_index()
    try:
        server_context = raw_server([FINAL_200], host="::1")
        server = await server_context.__aenter__()
    except OSError as exc:  # pragma: no cover - IPv6 loopback off
        pytest.skip(f"cannot listen on ::1: {exc}")
    try:
        port = server["port"]
        probe = pk.probes.http(f"http://[::1%25{index}]:{port}/health")
        with anyio.fail_after(30):
            assert await probe.reason() is None
        assert f"\r\nHost: [::1]:{port}\r\n" in server["requests"][0]
        assert probe.name == f"http http://[::1%25{index}]:{port}/health"  # as written
    finally:
        await server_context.__aexit__(None, None, None)


@pytest.mark.parametrize(
    ("url", "host", "host_header"),
    [
        ("http://[fe80::1%25lo]:8080/", "fe80::1%lo", "[fe80::1]:8080"),
        ("http://[fe80::1%25Eth0]/", "fe80::1%Eth0", "[fe80::1]"),  # its case kept
        ("http://[fe80::1%25en-1]/", "fe80::1%en-1", "[fe80::1]"),
        ("https://user@[fe80::1%2512]:8443/", "fe80::1%12", "[fe80::1]:8443"),
        ("http://[fe80::1%eth0]/", "fe80::1%eth0", "[fe80::1]"),  # not RFC 6874: as is
        ("http://[::1]:8080/", "::1", "[::1]:8080"),  # no zone: as before
    ],
)
async def test_the_zone_is_decoded_for_the_connection(
    monkeypatch: pytest.MonkeyPatch, url: str, host: str, host_header: str
) -> None:
    stream = Scripted(iter([FINAL_200]))
    hosts = connect_to(monkeypatch, stream)
    with anyio.fail_after(30):
        assert await pk.probes.http(url).reason() is None
    assert hosts == [host]
    assert f"\r\nHost: {host_header}\r\n" in stream.sent.decode()


def test_a_decoded_zone_resolves_to_its_interface() -> None:
    # what getaddrinfo makes of the host the probe now connects to (no fe80::1 to reach)
    index = loopback_index()
    try:
        infos = socket.getaddrinfo("fe80::1%lo", 8080, socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as exc:  # pragma: no cover - a resolver without named zones
        pytest.skip(f"named zones do not resolve here: {exc}")
    assert infos[0][4][-1] == index  # the scope id (the last of an IPv6 address): lo


@pytest.mark.parametrize("url", ["http://[fe80::1%25]/", "http://[fe80::1%25%25]/"])
def test_an_empty_or_bad_zone_is_a_value_error_naming_url(url: str) -> None:
    with pytest.raises(ValueError, match=r"^url must") as info:
        pk.probes.http(url)
    assert repr(url) in str(info.value)
