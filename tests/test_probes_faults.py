"""parallelkit.probes.http with URLs a user writes: non-ASCII, spaces, bad ports."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import parallelkit as pk

from .test_probes import http_server  # noqa: F401 - the fixture: a real HTTP server

pytestmark = pytest.mark.anyio


async def test_a_non_ascii_path_and_a_space_are_sent_percent_encoded(
    http_server: dict[str, Any],  # noqa: F811 - the imported fixture
) -> None:
    # http() raised UnicodeEncodeError ("'ascii' codec can't encode ...", naming no
    # argument) for a non-ASCII path, and sent a space as is (a malformed request line)
    port = http_server["port"]
    probe = pk.probes.http(f"http://127.0.0.1:{port}/santé/état?q=a b&x=%20")
    assert await probe.reason() is None
    sent = http_server["last"]
    assert sent.startswith("GET /sant%C3%A9/%C3%A9tat?q=a%20b&x=%20 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{port}\r\n" in sent


async def test_a_non_ascii_host_is_sent_in_its_idna_form(
    http_server: dict[str, Any],  # noqa: F811 - the imported fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = http_server["port"]
    connect_tcp = anyio.connect_tcp
    hosts: list[str] = []

    async def to_the_test_server(host: str, _port: int, **kwargs: object) -> object:
        hosts.append(host)  # the name resolves nowhere: the test server answers
        return await connect_tcp("127.0.0.1", port)

    monkeypatch.setattr(anyio, "connect_tcp", to_the_test_server)
    assert await pk.probes.http("http://bücher.example:8080/").reason() is None
    assert hosts == ["bücher.example"]
    assert "\r\nHost: xn--bcher-kva.example:8080\r\n" in http_server["last"]


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
