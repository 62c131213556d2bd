"""Readiness probes: is a service actually ready, not merely started?

A service whose setup returned is not necessarily *ready*: a server may still be
binding its port, a database may still be replaying its log. Docker Compose's
``depends_on`` waits on nothing by default; the Orchestrator waits on a probe::

    @orch.service(ready=pk.probes.tcp("127.0.0.1", 5432), timeout=30)
    async def postgres(): ...

A probe is polled after the service's setup until it passes or the service's
``timeout`` runs out. Polling is **adaptive**: the first checks come quickly
(1 ms apart, growing by half each time) and then settle at ``max_interval``
(50 ms by default), so a service that becomes ready quickly is detected within a
few milliseconds, and a slow one is not hammered.

Three probes cover almost everything: :func:`tcp` (a TCP connection to
``host:port`` is accepted), :func:`http` (``GET url`` answers with the expected
status; plain sockets, ``https`` too) and :func:`call` (your own sync or async
function, given the service's value if it takes one argument, returns a truthy
value). Any callable passed as ``ready=`` is wrapped with :func:`call` for you.
"""

from __future__ import annotations

import inspect
import ipaddress
import math
import re
import ssl
import sys
from collections.abc import Awaitable, Callable, Collection
from functools import partial
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import anyio
import anyio.abc
import anyio.to_thread
from typing_extensions import final

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

from ._core.backend import is_stray_cancellation
from ._core.check import (
    async_callable,
    callable_,
    count_at_most,
    counts,
    host_name,
    not_a_call,
    number,
    number_or_none,
    text,
    text_or_none,
)

__all__ = ["Probe", "call", "http", "tcp"]

CheckFn = Callable[[Any], Awaitable["str | None"]]

_TARGET_SAFE = "".join(map(chr, range(0x21, 0x7F)))  # kept as is in a target: printable ASCII
_HEAD_END = re.compile(rb"\n\r?\n")  # the empty line that ends a response's head
_MAX_HEAD = 65536  # bytes of interim responses read, at most, before the final one
_CLOSED = "the server closed the connection {}"
_STRAY = "{}, but nothing cancelled the check (a future cancelled elsewhere? one kept?)"
#: an HTTP status code: an int (not bool) in 100..599, as a plain int
_status = partial(count_at_most, "status", maximum=599, minimum=100, what="an HTTP status code")


@final
class Probe:
    """A readiness check plus the adaptive schedule it is polled on.

    Build one with :func:`tcp`, :func:`http` or :func:`call`; pass it as
    ``ready=`` to :meth:`Orchestrator.service <parallelkit.Orchestrator.service>` or
    :meth:`Orchestrator.process <parallelkit.Orchestrator.process>`. You can also
    use it on its own: ``await probe.wait(timeout=5)``.

    Args:
        name: what the probe checks, for messages (``"tcp 127.0.0.1:8080"``).
        check: ``async (value) -> None | str``: ``None`` when ready, else the reason
            it is not.
        initial: the first polling interval in seconds.
        max_interval: the interval the schedule grows to (by 1.5 times per check).

    Example:
        ```python
        probe = pk.probes.tcp("127.0.0.1", 8080)
        await probe.wait(timeout=10)      # TimeoutError naming the last failure
        ok = await probe.check()          # one check: True / False
        ```
    """

    __slots__ = ("_check", "initial", "max_interval", "name")

    def __init__(
        self,
        name: str,
        check: CheckFn,
        *,
        initial: float = 0.001,
        max_interval: float = 0.05,
    ) -> None:
        self.name = text("name", name)
        self._check: CheckFn = async_callable(
            "check", check, what="an async function (value) -> None or the reason"
        )
        self.initial = number("initial", initial)
        self.max_interval = number("max_interval", max_interval)
        if self.max_interval < self.initial:
            msg = f"max_interval ({max_interval!r}) must be >= initial ({initial!r})"
            raise ValueError(msg)

    def __repr__(self) -> str:
        return f"<Probe {self.name}>"

    async def reason(self, value: Any = None) -> str | None:
        """Run the check once: ``None`` when ready, else why it is not.

        Ordinary exceptions raised by the check count as "not ready"
        (``"Type: message"`` is the reason), as does a cancellation nothing caused
        (asyncio: a future cancelled elsewhere; trio: a ``Cancelled`` kept, raised again);
        cancellation and a ``KeyboardInterrupt``-like ``BaseException`` propagate. A
        check answering neither ``None`` nor a ``str`` (``True``) is a ``TypeError``.
        """
        try:
            answer = await self._check(value)
        except Exception as exc:  # a failing check is "not ready", never a crash
            return _explain(exc)
        except BaseException as exc:  # let through, a stray one would end its task quietly
            if is_stray_cancellation(exc):  # (asked before any other await)
                return _STRAY.format(type(exc).__name__)  # CancelledError, Cancelled
            raise
        if answer is not None and not isinstance(answer, str):  # True: "ready"? a bug
            msg = (  # type: ignore[unreachable]
                f"the check of {self.name} returned {answer!r}: a Probe check returns "
                "None when ready, else the reason (a str); for a truth value use probes.call"
            )
            raise TypeError(msg)
        return answer

    async def check(self, value: Any = None) -> bool:
        """Run the check once; ``True`` when ready.

        Args:
            value: the service's value, handed to :func:`call` probes that take it.
        """
        return await self.reason(value) is None

    async def wait(self, value: Any = None, *, timeout: float | None = None) -> None:
        """Poll until the check passes (adaptive schedule), or time out.

        Args:
            value: the service's value, handed to :func:`call` probes that take it.
            timeout: seconds to keep polling; ``None`` polls until cancelled.

        Raises:
            TimeoutError: the probe did not pass in time; the message names the
                probe and the last reason it gave.
        """
        timeout = number_or_none("timeout", timeout)
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        interval = self.initial
        why: str | None = None
        while True:
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())) as scope:
                answer = await self.reason(value)
                if answer is None:
                    return
                why = answer
            if scope.cancelled_caught and why is None:  # not one check answered in time
                why = f"the check did not answer within {timeout:g}s"
            # a check cut short at the deadline keeps the last reason (ConnectionRefused)
            now = anyio.current_time()
            if now < deadline:
                await anyio.sleep(min(interval, deadline - now))
            if anyio.current_time() >= deadline:
                msg = f"{self.name} not ready after {timeout:g}s (last check: {why})"
                raise TimeoutError(msg)
            interval = min(interval * 1.5, self.max_interval)


def tcp(
    host: str,
    port: int,
    *,
    connect_timeout: float = 1.0,
    initial: float = 0.001,
    max_interval: float = 0.05,
) -> Probe:
    """Ready when a TCP connection to ``host:port`` is accepted.

    The connection is closed at once; nothing is sent.

    Args:
        host: the host name or address.
        port: the TCP port (1-65535).
        connect_timeout: how long one connection attempt may take.
        initial: the first polling interval (see :class:`Probe`).
        max_interval: the largest polling interval.

    A host name with several addresses (IPv6 and IPv4) is tried on each; when every
    one fails, the reason names each address's error.

    Raises:
        ValueError: ``host`` is not a host name or an IP address (``"db:5432"``, a
            URL, ``"[::1]"``, spaces), or ``port`` is not in 1..65535.

    Example:
        ```python
        @orch.service(ready=pk.probes.tcp("127.0.0.1", 6379), timeout=10)
        async def redis(): ...
        ```
    """
    host_name("host", host)
    port = count_at_most("port", port, 65535)  # a plain int: getaddrinfo refuses a NumPy one
    limit = number("connect_timeout", connect_timeout)

    async def check(_value: Any) -> str | None:
        try:
            with anyio.fail_after(limit):
                stream = await anyio.connect_tcp(host, port)
        except (OSError, TimeoutError) as exc:
            return _describe(exc, f"no connection within connect_timeout={limit:g}s")
        await stream.aclose()
        return None

    where = f"[{host}]" if ":" in host else host  # an IPv6 address, as in a URL
    return Probe(f"tcp {where}:{port}", check, initial=initial, max_interval=max_interval)


def http(
    url: str,
    *,
    status: int | Collection[int] = 200,
    request_timeout: float = 2.0,
    initial: float = 0.001,
    max_interval: float = 0.05,
) -> Probe:
    """Ready when ``GET url`` answers with the expected status code.

    Speaks just enough HTTP/1.1 over a plain (or TLS) socket to read the status
    line, so it needs no HTTP client library. Redirects are not followed: a ``307``
    is ``"status 307"`` unless ``status`` lists it (FastAPI redirects
    ``/health/`` to ``/health``: probe the path the route has). A server that
    accepts and closes without answering is ``"the server closed the connection
    without a response"``. Interim responses (``100 Continue``, ``103 Early Hints``)
    are skipped: the status is the final response's.

    Args:
        url: an ``http://`` or ``https://`` URL. An IPv6 address with a zone is
            written as RFC 6874 has it, ``%25`` for its ``%``:
            ``http://[fe80::1%25eth0]:8080/`` connects to ``fe80::1%eth0``; the
            zone is not sent in the ``Host`` header.
        status: the status code that means ready, or a collection of them
            (``range(200, 400)``).
        request_timeout: how long one request may take.
        initial: the first polling interval (see :class:`Probe`).
        max_interval: the largest polling interval.

    Raises:
        ValueError: ``url`` is not an ``http(s)://`` URL with a valid host and
            port, or ``status`` is empty or not in 100..599.

    Example:
        ```python
        @orch.service(ready=pk.probes.http("http://127.0.0.1:8000/health"), timeout=30)
        async def api(): ...
        ```
    """
    text("url", url)
    try:
        parts = urlsplit(url)
        if "[" in parts.netloc:  # Python < 3.11.4 takes any text in brackets
            ipaddress.ip_address(parts.hostname or "")
    except ValueError as exc:  # "Invalid IPv6 URL", naming no argument
        msg = f"url must be an http:// or https:// URL ({exc}), got {url!r}"
        raise ValueError(msg) from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        msg = f"url must be an http:// or https:// URL with a host, got {url!r}"
        raise ValueError(msg)
    host, host_header = parts.hostname, parts.netloc.rpartition("@")[2]
    if host_header.startswith("[") and "%" in host_header:  # an IPv6 zone (RFC 6874)
        inside, _, after = host_header[1:].partition("]")
        address, _, zone = inside.partition("%")  # "%25" is how a URL writes its "%"
        host = f"{address}%{unquote(zone[2:]) if zone.startswith('25') else zone}"
        host_header = f"[{address}]{after}"  # local to this machine: not sent (RFC 6874)
    try:  # "http://db x/": every check would fail to resolve it
        host_name("url's host", host)
    except ValueError:
        msg = f"url must have a valid host name, got {url!r}"
        raise ValueError(msg) from None
    accepted = counts("status", status, _status)
    limit = number("request_timeout", request_timeout)
    tls = parts.scheme == "https"
    try:
        explicit_port = parts.port
    except ValueError as exc:  # "Port out of range 0-65535", naming no argument
        msg = f"url must have a port in 1..65535 ({exc}), got {url!r}"
        raise ValueError(msg) from None
    if explicit_port == 0:  # else taken for "no port": the scheme's default
        msg = f"url must have a port in 1..65535, got {url!r}"
        raise ValueError(msg)
    port = explicit_port or (443 if tls else 80)
    # a path or query with spaces or non-ASCII text is sent %-encoded (UTF-8), as
    # browsers and HTTP clients do; a non-ASCII host name in its IDNA form
    target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), _TARGET_SAFE)
    if not host_header.isascii():
        try:
            host_header = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            msg = f"url must have a valid host name ({exc}), got {url!r}"
            raise ValueError(msg) from None
        if explicit_port is not None:
            host_header += f":{explicit_port}"
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n"
        "User-Agent: parallelkit-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")

    context: ssl.SSLContext | None = None

    async def check(_value: Any) -> str | None:
        nonlocal context
        try:
            with anyio.fail_after(limit):
                stream: anyio.abc.ByteStream
                if tls:
                    if context is None:  # reads the CA store (tens of ms): once, in a thread
                        context = await anyio.to_thread.run_sync(ssl.create_default_context)
                    stream = await anyio.connect_tcp(
                        host, port, ssl_context=context, tls_standard_compatible=False
                    )
                else:
                    stream = await anyio.connect_tcp(host, port)
                async with stream:
                    await stream.send(request)
                    code = await _final_status(stream)
        except (OSError, TimeoutError, anyio.BrokenResourceError, ssl.SSLError) as exc:
            return _describe(exc, f"no answer within request_timeout={limit:g}s")
        if isinstance(code, str):  # no final status: why
            return code
        return None if code in accepted else f"status {code}"

    return Probe(f"http {url}", check, initial=initial, max_interval=max_interval)


def call(
    fn: Callable[..., Any],
    /,
    *,
    name: str | None = None,
    initial: float = 0.001,
    max_interval: float = 0.05,
) -> Probe:
    """Ready when ``fn`` returns a truthy value (sync or async).

    ``fn`` takes no argument, or one: the service's value (what its setup
    yielded), so a probe can ask the service itself. An exception raised by
    ``fn`` counts as "not ready" and becomes the reason reported on timeout (a
    ``KeyboardInterrupt``-like ``BaseException`` is not caught: it propagates).

    ``fn`` runs in the event loop, sync or async; if it returns an awaitable
    (``lambda engine: engine.ping()``), that is awaited. A sync ``fn`` must not
    block: nothing can interrupt it, so it stalls every task and outlives the
    timeout. Give a blocking check to a worker thread yourself, where the timeout
    can leave it behind:
    ``pk.probes.call(lambda: anyio.to_thread.run_sync(ping, abandon_on_cancel=True))``.

    Args:
        fn: the check; may be a coroutine function.
        name: what to call the probe in messages (default: ``fn``'s name).
        initial: the first polling interval (see :class:`Probe`).
        max_interval: the largest polling interval.

    Example:
        ```python
        @orch.service(ready=pk.probes.call(lambda engine: engine.ping()))
        async def search_engine(): ...
        ```
    """
    not_a_call("fn", fn)
    callable_("fn", fn, what="callable")
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        # its generator object is truthy: the probe would pass without checking
        msg = f"fn must return a truth value (or an awaitable of one), not be a generator: {fn!r}"
        raise TypeError(msg)
    if text_or_none("name", name) == "":  # was ignored: the probe took fn's name
        msg = "name must not be empty (None: fn's name), got ''"
        raise ValueError(msg)
    takes_value = _takes_one_argument(fn)

    async def check(value: Any) -> str | None:
        result = fn(value) if takes_value else fn()
        if inspect.isawaitable(result):
            result = await result
        return None if result else f"returned {result!r}"

    label = name or getattr(fn, "__qualname__", None) or repr(fn)
    return Probe(f"call {label}", check, initial=initial, max_interval=max_interval)


def _is_status(code: str) -> bool:
    """Three ASCII digits, as HTTP has it (``str.isdigit`` takes a superscript two too)."""
    return len(code) == 3 and code.isascii() and code.isdigit()


async def _final_status(stream: anyio.abc.ByteReceiveStream) -> int | str:
    """The final response's status code, past any interim (1xx) ones; else why none came.

    An interim response (``100 Continue``, ``103 Early Hints``) is a status line and
    header lines up to an empty line, and the response follows it on the connection
    (RFC 9110 15.2); ``101 Switching Protocols`` is final. A line ends with CRLF or a
    bare LF, as HTTP allows; what comes before the final status line is bounded.
    """
    data, at, interim = b"", 0, 0  # at: where the response being read begins
    while True:
        eol = data.find(b"\n", at)
        if eol < 0 and len(data) - at < 8192 and (chunk := await _receive(stream)):
            data += chunk
            continue
        if eol < 0 and at == len(data):  # closed, nothing (more) said
            return _CLOSED.format(f"after an interim response (status {interim})" if interim
                                  else "without a response")  # fmt: skip
        line = data[at : len(data) if eol < 0 else eol].removesuffix(b"\r").decode("latin-1")
        fields = line.split(" ", 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/") or not _is_status(fields[1]):
            return f"not an HTTP response: {line[:80]!r}"
        if not 100 <= (interim := int(fields[1])) < 200 or interim == 101:
            return interim
        # its headers, to the empty line; a server that only ever says "100 Continue": bounded
        while (end := _HEAD_END.search(data, max(eol, at))) is None and len(data) <= _MAX_HEAD:
            if not (chunk := await _receive(stream)):
                return _CLOSED.format(f"after an interim response (status {interim})")
            data += chunk
        if end is None or (at := end.end()) > _MAX_HEAD:
            return f"no final response within {_MAX_HEAD} bytes of interim responses"


async def _receive(stream: anyio.abc.ByteReceiveStream) -> bytes:
    """The next bytes from ``stream``; ``b""`` once it ended."""
    try:
        return await stream.receive()
    except anyio.EndOfStream:
        return b""


def _describe(exc: BaseException, silent: str) -> str:
    """``Type: message``, looking through anyio's "All connection attempts failed".

    ``silent`` stands in for an empty message (``fail_after``'s bare ``TimeoutError``).
    A host with several addresses fails with a group: each address's error is named.
    """
    while exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(error, silent) for error in exc.exceptions)
    return f"{type(exc).__name__}: {str(exc) or silent}"


def _explain(exc: BaseException) -> str:
    """``Type: message`` of a failed check; a group names each error in it, not itself."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_explain(error) for error in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def _takes_one_argument(fn: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: call with none
        return False
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(positional) > 1:
        msg = f"a probe function takes no argument or one (the service value), got {fn!r}"
        raise TypeError(msg)
    required = [
        p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    ]
    if required:  # every check would fail with a TypeError until the timeout
        msg = f"a probe function is called with no keyword argument, {fn!r} requires {required}"
        raise TypeError(msg)
    return len(positional) == 1 or any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())


def as_probe(ready: object) -> Probe | None:
    """Accept what ``ready=`` accepts: ``None``, a :class:`Probe` or a callable."""
    if ready is None or isinstance(ready, Probe):
        return ready
    not_a_call("ready", ready)
    if callable(ready):
        return call(ready)
    msg = f"ready must be a parallelkit.probes.Probe, a callable or None, got {ready!r}"
    raise TypeError(msg)
