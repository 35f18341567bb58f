"""An async, framed, duplex channel over one end of a socketpair (anyio: asyncio or trio)."""

from __future__ import annotations

import socket

import anyio
import anyio.abc

from . import wire
from .messages import MAX_FRAME, Message

_READ_SIZE = 65536


class ChannelClosed(Exception):
    """The peer closed the channel (at a frame boundary)."""


class Channel:
    """Send and receive :data:`~otp_agents.messages.Message` values.

    Sends are serialised by a lock, so several tasks may send. Only one task may receive.
    Receiving raises :class:`ChannelClosed` at a clean end of stream and
    :class:`~otp_agents.wire.FrameError` on anything malformed, oversized or truncated.
    """

    def __init__(self, stream: anyio.abc.SocketStream, max_frame: int = MAX_FRAME) -> None:
        self._stream = stream
        self._decoder = wire.FrameDecoder(max_frame)
        self._pending: list[Message] = []
        self._send_lock = anyio.Lock()

    @classmethod
    async def from_socket(cls, sock: socket.socket, max_frame: int = MAX_FRAME) -> Channel:
        sock.setblocking(False)
        stream = await anyio.abc.SocketStream.from_socket(sock)
        return cls(stream, max_frame)

    async def send(self, msg: Message) -> None:
        data = wire.encode(msg)
        async with self._send_lock:
            await self._stream.send(data)

    async def receive(self) -> Message:
        while not self._pending:
            self._decoder.check()
            try:
                data = await self._stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                self._decoder.close()  # raises FrameError if a frame was cut short
                raise ChannelClosed("peer closed the channel") from None
            self._pending = self._decoder.feed(data)
            self._pending.reverse()
        return self._pending.pop()

    async def aclose(self) -> None:
        await self._stream.aclose()
