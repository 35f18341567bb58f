"""An async, framed, duplex channel over one end of a socketpair (anyio: asyncio or trio).

The channel drives the non-blocking socket itself: it tries the ``send``/``recv`` system call
first and waits for readiness (``anyio.wait_readable`` / ``wait_writable``) only when the call
would block. A round trip therefore costs two system calls and one wake-up per side, with no
stream or transport layer in between (BENCHMARKS.md, "Wire speed").
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import anyio
import anyio.lowlevel

from otp_agents.errors import OtpAgentsError
from otp_agents.wire import framing as wire
from otp_agents.wire.messages import MAX_FRAME, Message

_READ_SIZE = 65536
# A receive or send that never has to wait does not yield to the event loop; after this many in
# a row it yields once anyway, so a busy channel cannot starve the other tasks.
_YIELD_EVERY = 64


class ChannelClosed(OtpAgentsError):
    """The peer closed the channel (at a frame boundary)."""


class Channel:
    """Send and receive :data:`~otp_agents.messages.Message` values.

    Sends are serialised by a lock, so several tasks may send. Only one task may receive.
    Receiving raises :class:`ChannelClosed` at a clean end of stream and
    :class:`~otp_agents.wire.FrameError` on anything malformed, oversized or truncated.
    After :meth:`aclose`, a task waiting in :meth:`receive` or :meth:`send` gets
    ``anyio.ClosedResourceError``; a peer that vanished gives ``anyio.BrokenResourceError``.
    """

    def __init__(self, sock: socket.socket, max_frame: int = MAX_FRAME) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._decoder = wire.FrameDecoder(max_frame)
        self._pending: list[Message] = []
        # One send at a time, so frames never interleave; no lock object on the uncontended path
        # (a lock was 5 % of the supervisor's CPU with 1,000 workers: it looks up the task).
        self._busy = False
        self._waiting = 0
        self._idle = anyio.Event()
        self._closed = False
        self._broken = False  # a send stopped inside a frame
        self._streak = 0

    @classmethod
    async def from_socket(cls, sock: socket.socket, max_frame: int = MAX_FRAME) -> Channel:
        return cls(sock, max_frame)

    async def send(self, msg: Message, timeout: float | None = None) -> None:  # noqa: ASYNC109 - slow path only
        """Send one frame. With ``timeout``, stop waiting for a peer that does not read after
        that long: nothing sent, the call returns; part of the frame sent, it raises
        ``anyio.BrokenResourceError`` and so does every later send. The timer exists only on that
        slow path, not for every send."""
        await self._send([wire.encode(msg)], timeout)

    def send_nowait(self, msg: Message) -> bool:
        """Send one small frame only if the socket takes it now; ``False`` (nothing sent) when
        another send is in progress or the socket is full. For frames that fit one socket buffer
        unit (a ping): a Unix stream socket takes such a frame whole or not at all."""
        if self._broken:
            raise anyio.BrokenResourceError("an earlier send was cut short inside a frame")
        if self._busy or self._closed:
            return False
        frame = wire.encode(msg)
        try:
            sent = self._sock.send(frame)
        except BlockingIOError:
            return False
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise anyio.BrokenResourceError from exc
        if sent != len(frame):
            self._broken = True
            raise anyio.BrokenResourceError("a frame was cut short")
        return True

    async def send_many(self, msgs: Sequence[Message]) -> None:
        """Send several frames with as few system calls as the socket allows (one, usually)."""
        await self._send([wire.encode(m) for m in msgs])

    async def _send(self, frames: list[bytes], timeout: float | None = None) -> None:  # noqa: ASYNC109
        while self._busy:  # another task is in the middle of a send
            self._waiting += 1
            try:
                await self._idle.wait()
            finally:
                self._waiting -= 1
        if self._broken:
            raise anyio.BrokenResourceError("an earlier send was cut short inside a frame")
        self._busy = True
        total = sum(len(f) for f in frames)
        left = total
        try:
            views = [memoryview(f) for f in frames]
            while views:
                if self._closed:
                    raise anyio.ClosedResourceError
                try:
                    sent = self._sock.send(views[0]) if len(views) == 1 else self._sock.sendmsg(views)
                except BlockingIOError:
                    if timeout is None:
                        await anyio.wait_writable(self._sock)
                    else:
                        with anyio.move_on_after(timeout) as scope:
                            await anyio.wait_writable(self._sock)
                        if scope.cancelled_caught:
                            if left != total:
                                raise anyio.BrokenResourceError("send timed out inside a frame") from None
                            return  # nothing of it was sent: the channel is still whole
                    continue
                except (BrokenPipeError, ConnectionResetError) as exc:
                    raise anyio.BrokenResourceError from exc
                left -= sent
                while sent:
                    if sent >= len(views[0]):
                        sent -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][sent:]
                        sent = 0
        except BaseException:
            # Cut short inside a frame (a timeout, a cancellation): whatever follows would be
            # read as the rest of it, so this channel sends nothing more.
            if left not in (0, total):
                self._broken = True
            raise
        finally:
            self._busy = False
            if self._waiting:
                self._idle.set()
                self._idle = anyio.Event()
        await self._maybe_yield()

    async def receive(self) -> Message:
        while not self._pending:
            self._decoder.check()
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                data = self._sock.recv(_READ_SIZE)
            except BlockingIOError:
                self._streak = 0
                await anyio.wait_readable(self._sock)
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                self._decoder.close()  # raises FrameError if a frame was cut short
                raise ChannelClosed("peer closed the channel")
            self._pending = self._decoder.feed(data)
            self._pending.reverse()
            await self._maybe_yield()
        return self._pending.pop()

    async def _maybe_yield(self) -> None:
        self._streak += 1
        if self._streak >= _YIELD_EVERY:
            self._streak = 0
            await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)  # wakes a task waiting on it, with ClosedResourceError
            self._sock.close()
        await anyio.lowlevel.checkpoint()
