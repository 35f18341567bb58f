"""The supervisor's side of a zygote: one connection, one fork at a time (see
:mod:`otp_agents.zygote`)."""

from __future__ import annotations

import array
import os
import socket
import struct

import anyio
import msgspec

from otp_agents.errors import OtpAgentsError
from otp_agents.wire.zygote import MAX_REQUEST, REQUEST_TIMEOUT, ForkReply, ForkRequest

_encode = msgspec.msgpack.Encoder().encode
_decode_reply = msgspec.msgpack.Decoder(ForkReply).decode


class ZygoteUnavailable(OtpAgentsError):
    """The worker cannot be forked now; the message says why (it is started cold instead)."""


class ZygoteClient:
    """One connection to one zygote, used by the supervisor's loop; one fork at a time."""

    def __init__(self, address: str, pid: int) -> None:
        self.address = address
        self.pid = pid
        self._sock: socket.socket | None = None
        self._lock = anyio.Lock()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect("\0" + self.address[1:] if self.address.startswith("@") else self.address)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            if pid != self.pid or uid != os.getuid():
                raise ZygoteUnavailable(f"{self.address} is served by pid {pid} uid {uid}, not the zygote")
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def fork(self, request: ForkRequest, fds: tuple[int, ...]) -> int:
        """Fork a worker; returns its pid (already adopted by this process)."""
        payload = _encode(request)
        if len(payload) > MAX_REQUEST:
            raise ZygoteUnavailable(f"fork request of {len(payload)} bytes (environment too large)")
        async with self._lock:
            try:
                with anyio.fail_after(REQUEST_TIMEOUT):
                    return await self._exchange(payload, fds)
            except TimeoutError:
                self.close()
                raise ZygoteUnavailable(f"no answer within {REQUEST_TIMEOUT}s") from None
            except OSError as exc:
                self.close()
                raise ZygoteUnavailable(f"{exc.strerror or exc}") from None
            except BaseException:  # cancelled mid-request: a late reply must not meet the next one
                self.close()
                raise

    async def _exchange(self, payload: bytes, fds: tuple[int, ...]) -> int:
        if self._sock is None:
            self._sock = self._connect()
        sock = self._sock
        passed = array.array("i", fds)
        while True:
            try:
                sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, passed)])
                break
            except BlockingIOError:
                await anyio.wait_writable(sock)
        while True:
            try:
                data = sock.recv(4096)
                break
            except BlockingIOError:
                await anyio.wait_readable(sock)
        if not data:
            raise ZygoteUnavailable("the zygote closed the connection")
        try:
            reply = _decode_reply(data)
        except msgspec.DecodeError as exc:
            raise ZygoteUnavailable(f"undecodable reply: {exc}") from None
        if reply.error:
            raise ZygoteUnavailable(reply.error)
        return reply.pid

    def close(self) -> None:
        if self._sock is not None:
            anyio.notify_closing(self._sock)
            self._sock.close()
            self._sock = None
