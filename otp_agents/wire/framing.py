"""Framing: a 4-byte big-endian body length, then a MessagePack body (a tagged ``Message``).

Pure and synchronous: :class:`FrameDecoder` is fed bytes and yields messages; it never raises
anything but :class:`FrameError`, whatever it is fed (checked by a hypothesis test). The async
channel (``channel.py``) and the worker library both use it.
"""

from __future__ import annotations

import struct
from typing import Any, Generic, TypeVar, overload

import msgspec

from otp_agents.errors import OtpAgentsError
from otp_agents.wire.messages import MAX_FRAME, Message

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size


class FrameError(OtpAgentsError):
    """A frame that cannot be accepted. ``kind`` is one of: oversized, truncated, malformed."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind} frame: {detail}")


_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(msg: msgspec.Struct) -> bytes:
    """One complete frame (header + body)."""
    buf = bytearray(HEADER_SIZE)
    _encoder.encode_into(msg, buf, HEADER_SIZE)
    _HEADER.pack_into(buf, 0, len(buf) - HEADER_SIZE)
    return bytes(buf)


def decode_body(
    body: bytes | bytearray | memoryview, decoder: msgspec.msgpack.Decoder[Any] = _decoder
) -> Any:
    """Decode one frame body, mapping every failure to a ``malformed`` :class:`FrameError`."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise FrameError("malformed", _describe(body, str(exc))) from None
    except msgspec.DecodeError as exc:
        raise FrameError("malformed", f"not MessagePack: {exc}") from None
    except UnicodeDecodeError as exc:
        raise FrameError("malformed", f"a string is not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise FrameError("malformed", "nested too deeply") from None


def _describe(body: bytes | bytearray | memoryview, problem: str) -> str:
    """Name the frame type when the body at least carries a readable tag."""
    try:
        raw = msgspec.msgpack.decode(body)
    except Exception:  # only used to enrich a message: never let it raise
        return problem
    tag = raw.get("type") if isinstance(raw, dict) else None
    return f"{problem} (frame type {tag!r})" if isinstance(tag, str) else problem


M = TypeVar("M")


class FrameDecoder(Generic[M]):
    """Incremental decoder. Feed it bytes in any chunking; it returns whole messages.

    By default it decodes the worker protocol's :data:`Message`; the control socket passes its
    own ``decoder`` for its own message types (same framing).
    """

    @overload
    def __init__(self: FrameDecoder[Message], max_frame: int = MAX_FRAME) -> None: ...

    @overload
    def __init__(self, max_frame: int = MAX_FRAME, *, decoder: msgspec.msgpack.Decoder[M]) -> None: ...

    def __init__(
        self, max_frame: int = MAX_FRAME, *, decoder: msgspec.msgpack.Decoder[Any] | None = None
    ) -> None:
        self.max_frame = max_frame
        self._decoder = decoder if decoder is not None else _decoder
        self._buf = bytearray()
        self._error: FrameError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[M]:
        """Messages completed by ``data``. A bad frame raises :class:`FrameError`; if good
        frames preceded it in the same chunk they are returned first and the error is raised
        by the next call (so a Ready followed by garbage still counts as Ready)."""
        self.check()
        self._buf += data
        out: list[M] = []
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= HEADER_SIZE:
                (size,) = _HEADER.unpack_from(buf, pos)
                if size > self.max_frame:
                    raise FrameError(
                        "oversized", f"declared body of {size} bytes exceeds the {self.max_frame} limit"
                    )
                end = pos + HEADER_SIZE + size
                if len(buf) < end:
                    break
                out.append(decode_body(buf[pos + HEADER_SIZE : end], self._decoder))
                pos = end
        except FrameError as exc:
            self._error = exc
            buf.clear()
            if not out:
                raise
            return out
        if pos:
            del buf[:pos]
        return out

    def check(self) -> None:
        """Raise the error a previous :meth:`feed` deferred, if any."""
        if self._error is not None:
            raise self._error

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def close(self) -> None:
        """End of stream: a partial frame left over is a ``truncated`` error."""
        if self._buf:
            n = len(self._buf)
            self._buf.clear()
            raise FrameError("truncated", f"stream ended inside a frame ({n} bytes pending)")
