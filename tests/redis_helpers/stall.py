"""A TCP proxy in front of Redis that stalls like a network partition, for the tests.

While stalled, what a client sends on an open connection is held (as the network
holds a segment it retransmits later) and delivered when the stall ends, even if
the client closed the connection meanwhile (Redis then runs the command: its
reply goes nowhere); a new connection is closed at once (refused). ``resume()``
delivers what was held, then lets new connections through: a command sent after
the stall reaches Redis after every command held during it. ``let_new_through()``
ends the stall for what is sent from then on but keeps holding what was held
(until ``resume()``): a command sent after the stall, on another connection,
reaches Redis *before* the ones held during it (as when a retransmission comes
late). ``reset_after_next_reply()`` drops the next reply Redis sends and resets
that client's connection: the command ran, the client sees a reset (redis-py
then sends it again on a new connection, as its ``retry`` does);
``reset_after_reply_to(marker)`` does so for the reply to the next request that
holds ``marker`` (a script's sha), whatever replies other commands get first.
``stall_at(marker)`` begins the stall with the next request that holds ``marker``
(that request is held): what was sent before it gets through.
"""

from __future__ import annotations

from types import TracebackType
from urllib.parse import urlparse

import anyio
from anyio.abc import SocketStream, TaskGroup
from typing_extensions import Self

__all__ = ["StallProxy"]


class StallProxy:
    """``async with StallProxy(redis_url) as proxy:`` then a client on ``proxy.url``.

    Attributes:
        refused: connections closed at once because the proxy was stalled.
        held: chunks held during a stall (delivered by ``resume``).
        replies: chunks Redis sent back (counted also when the client is gone).
        resets: connections reset by ``reset_after_next_reply``.
    """

    def __init__(self, redis_url: str) -> None:
        url = urlparse(redis_url)
        self._upstream = (url.hostname or "127.0.0.1", url.port or 6379)
        self._db = url.path or "/0"
        self._tg: TaskGroup | None = None
        self._port = 0
        self._stalled = False
        self._resumed = anyio.Event()
        self._pending = 0  # held chunks not delivered yet
        self._flushed = anyio.Event()
        self._reset_next = False
        self._reset_marker: bytes | None = None
        self._stall_marker: bytes | None = None
        self.refused = self.held = self.replies = self.resets = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._port}{self._db}"

    def stall(self) -> None:
        """Hold what open connections send; refuse new connections."""
        self._stalled = True
        self._resumed = anyio.Event()

    def reset_after_next_reply(self) -> None:
        """Drop the next reply Redis sends, and reset that client's connection."""
        self._reset_next = True

    def reset_after_reply_to(self, marker: bytes) -> None:
        """Drop the reply to the next request holding ``marker``, and reset that
        client's connection (as :meth:`reset_after_next_reply`)."""
        self._reset_marker = marker

    def stall_at(self, marker: bytes) -> None:
        """Begin the stall (as :meth:`stall`) with the next request holding ``marker``
        (a script's sha): that request is the first one held."""
        self._stall_marker = marker

    def let_new_through(self) -> None:
        """Let new connections (and what is sent from now on) through, still holding
        what was held during the stall until :meth:`resume`."""
        self._stalled = False

    async def resume(self) -> None:
        """Deliver what was held (in order), then let new connections through."""
        self._flushed = anyio.Event()
        self._resumed.set()
        if self._pending:
            await self._flushed.wait()
        self._stalled = False

    async def __aenter__(self) -> Self:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self._port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._serve, listener)
        return self

    async def _serve(self, listener: anyio.abc.SocketListener) -> None:
        async with listener:
            await listener.serve(self._handle)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(exc_type, exc, tb)

    async def _handle(self, client: SocketStream) -> None:
        if self._stalled:
            self.refused += 1
            await client.aclose()
            return
        try:
            upstream = await anyio.connect_tcp(*self._upstream)
        except OSError:
            await client.aclose()
            return
        armed = [False]  # this connection's next reply is to be dropped (a marker seen)
        async with client, upstream, anyio.create_task_group() as tg:
            tg.start_soon(self._replies, upstream, client, armed)
            await self._requests(client, upstream, armed)

    async def _requests(
        self, client: SocketStream, upstream: SocketStream, armed: list[bool]
    ) -> None:
        while True:
            try:
                data = await client.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                break
            except anyio.ClosedResourceError:  # reset by ``reset_after_next_reply``
                break
            marker = self._reset_marker
            if marker is not None and marker in data:
                self._reset_marker = None
                armed[0] = True
            stall_at = self._stall_marker
            if stall_at is not None and stall_at in data:
                self._stall_marker = None
                self.stall()
            if self._stalled:
                self.held += 1
                self._pending += 1
                try:
                    await self._resumed.wait()
                    await upstream.send(data)
                finally:
                    self._pending -= 1
                    if not self._pending:
                        self._flushed.set()
                continue
            try:
                await upstream.send(data)
            except (anyio.BrokenResourceError, OSError):
                return
        # the client is gone: Redis reads what was delivered, then the end
        try:
            await upstream.send_eof()
        except (anyio.BrokenResourceError, OSError):
            return

    async def _replies(
        self, upstream: SocketStream, client: SocketStream, armed: list[bool]
    ) -> None:
        while True:
            try:
                data = await upstream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                break
            self.replies += 1
            if self._reset_next or armed[0]:
                self._reset_next = armed[0] = False
                self.resets += 1
                await client.aclose()  # the reply goes nowhere: the client sees a reset
                continue
            try:
                await client.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                continue  # the client gave up: the reply goes nowhere
        await client.aclose()
