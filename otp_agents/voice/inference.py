"""Shared inference: one process holds the speech models, every voice leaf of the machine uses them.

Leaves find the server through their supervisor (``Worker.lookup("inference")``; the server
``publish``-es its socket) and then talk to it directly over a Unix socket with the project's
framing (4-byte length + MessagePack), so no request passes through the supervisor's loop.

One request per connection: the leaf connects, sends an :class:`InferRequest`, reads one
:class:`InferResult` or :class:`InferFailed`, and hangs up. Hanging up early *is* the
cancellation: the server skips a queued request whose client is gone. Each request carries its
own deadline; the server refuses at once with ``busy`` when its queue is full (back-pressure)
and with ``deadline`` when a request waited longer than its caller wanted.

On the leaf's side :class:`RemoteSTT` is an ordinary STT provider: it retries across a restart of
the server (looking the address up again, since a restarted server has a new one) until the
request's deadline, then falls back to a local recogniser if one is configured.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal

import anyio
import anyio.abc
import msgspec
import numpy as np

from otp_agents.voice.providers import ProviderError
from otp_agents.voice.stt import STT
from otp_agents.wire.framing import FrameDecoder, FrameError, encode

log = logging.getLogger("otp_agents.inference")

MAX_AUDIO = 60 * 16_000 * 2  # one minute of 16 kHz int16 audio
REQUEST_READ_TIMEOUT = 5.0  # a client must have sent its whole request by then
MODEL_GRACE = 30.0  # a decode running this long past its request's deadline is given up
INFER_MAX_FRAME = MAX_AUDIO + 4096


class _Infer(msgspec.Struct, tag_field="type", forbid_unknown_fields=False, omit_defaults=True):
    pass


class InferRequest(_Infer, tag="infer"):
    id: int
    kind: Literal["stt"]
    audio: Annotated[bytes, msgspec.Meta(max_length=MAX_AUDIO)]  # int16 mono 16 kHz
    timeout: Annotated[float, msgspec.Meta(gt=0, le=300)]  # seconds the caller will wait


class InferResult(_Infer, tag="result"):
    id: int
    text: str
    queued_ms: float  # waited in the server's queue
    busy_ms: float  # model time


class InferFailed(_Infer, tag="failed"):
    id: int
    reason: Literal["busy", "deadline", "bad_request", "error"]
    detail: str = ""


InferMessage = InferRequest | InferResult | InferFailed
DECODER: msgspec.msgpack.Decoder[InferMessage] = msgspec.msgpack.Decoder(InferMessage)


def abstract_address(tag: str) -> str:
    """A Linux abstract-namespace socket address (``@...``): nothing on disk to clean up."""
    return f"@otp-agents/{tag}/{os.getpid()}"


def sockaddr(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


async def connect(address: str) -> anyio.abc.SocketStream:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(sockaddr(address))  # a Unix socket connects at once, or fails at once
    except BaseException:
        sock.close()
        raise
    return await anyio.abc.SocketStream.from_socket(sock)


async def read_one(stream: anyio.abc.SocketStream, decoder: FrameDecoder[InferMessage]) -> InferMessage:
    while True:
        try:
            data = await stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
            raise ConnectionError("the inference server hung up") from None
        got = decoder.feed(data)
        if got:
            return got[0]


# -- the leaf's side -------------------------------------------------------------------------------


class RemoteSTT:
    """STT served by the shared inference process, with local fallback.

    ``locate`` returns the server's current address (``Worker.lookup``); ``fallback`` builds a
    local recogniser, on first need only (it costs a model's memory)."""

    name = "inference"

    def __init__(
        self,
        locate: Callable[[], Awaitable[str | None]],
        *,
        timeout: float = 5.0,
        fallback: Callable[[], STT] | None = None,
        retry_every: float = 0.1,
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        self.locate = locate
        self.timeout = timeout
        self._fallback_factory = fallback
        self._fallback: STT | None = None
        self.retry_every = retry_every
        self.on_fallback = on_fallback
        self._seq = 0
        self.address: str | None = None
        self.fell_back = 0  # requests answered locally

    def stream(self) -> _BufferedStream:
        return _BufferedStream(self)

    async def recognize(self, samples: np.ndarray) -> str:
        deadline = time.monotonic() + self.timeout
        problem = "no inference server published"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                with anyio.fail_after(left):
                    text = await self._ask(samples, left)
                return text
            except TimeoutError:
                problem = f"no answer within {self.timeout}s"
                break
            except _Refused as exc:
                if exc.reason in ("bad_request",):
                    raise ProviderError(self.name, exc.reason, exc.detail, retryable=False) from None
                problem = f"{exc.reason}: {exc.detail}"
            except (OSError, ConnectionError, FrameError) as exc:
                self.address = None  # look it up again: a restarted server has a new address
                problem = str(exc) or type(exc).__name__
            await anyio.sleep(min(self.retry_every, max(0.0, deadline - time.monotonic())))
        if self._fallback_factory is not None:
            if self._fallback is None:
                self._fallback = self._fallback_factory()
            if self.on_fallback is not None:
                self.on_fallback(problem)
            self.fell_back += 1
            return await self._fallback.recognize(samples)
        raise ProviderError(self.name, "unavailable", problem, retryable=True)

    async def _ask(self, samples: np.ndarray, budget: float) -> str:
        if self.address is None:
            self.address = await self.locate()
            if self.address is None:
                raise ConnectionError("no inference server published")
        self._seq += 1
        reply = await request_stt(self.address, samples, budget, self._seq)
        if isinstance(reply, InferResult):
            return reply.text
        raise _Refused(reply.reason, reply.detail)


async def request_stt(
    address: str,
    samples: np.ndarray,
    timeout: float,  # noqa: ASYNC109 - sent to the server as the request's deadline
    ident: int = 1,
) -> InferResult | InferFailed:
    """One request on its own connection. The caller bounds the wait; leaving early hangs up,
    which cancels the request on the server."""
    request = InferRequest(id=ident, kind="stt", audio=samples.astype(np.int16).tobytes(), timeout=timeout)
    stream = await connect(address)
    async with stream:
        await stream.send(encode(request))
        reply = await read_one(stream, FrameDecoder(INFER_MAX_FRAME, decoder=DECODER))
    if isinstance(reply, InferResult | InferFailed):
        return reply
    raise ConnectionError(f"unexpected {type(reply).__name__} from the inference server")


class _Refused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class _BufferedStream:
    """The utterance is sent whole at the end (one request per turn, not one per frame)."""

    def __init__(self, stt: RemoteSTT) -> None:
        self._stt = stt
        self._parts: list[np.ndarray] = []

    async def push(self, samples: np.ndarray) -> None:
        self._parts.append(samples)

    async def finish(self) -> str:
        audio = np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.int16)
        return await self._stt.recognize(audio)

    async def aclose(self) -> None:
        self._parts.clear()
