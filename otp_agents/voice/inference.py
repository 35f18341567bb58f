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

import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

import anyio
import anyio.abc
import msgspec
import numpy as np
from anyio.streams.buffered import BufferedByteReceiveStream

from otp_agents.voice.providers import ProviderError
from otp_agents.voice.stt import STT
from otp_agents.wire.framing import FrameDecoder, FrameError, encode
from otp_agents.wire.peer import peer_credentials

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
_decoder: msgspec.msgpack.Decoder[InferMessage] = msgspec.msgpack.Decoder(InferMessage)


def abstract_address(tag: str) -> str:
    """A Linux abstract-namespace socket address (``@...``): nothing on disk to clean up."""
    return f"@otp-agents/{tag}/{os.getpid()}"


def _sockaddr(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


async def _connect(address: str) -> anyio.abc.SocketStream:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(_sockaddr(address))  # a Unix socket connects at once, or fails at once
    except BaseException:
        sock.close()
        raise
    return await anyio.abc.SocketStream.from_socket(sock)


async def _read_one(stream: anyio.abc.SocketStream, decoder: FrameDecoder[InferMessage]) -> InferMessage:
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
    stream = await _connect(address)
    async with stream:
        await stream.send(encode(request))
        reply = await _read_one(stream, FrameDecoder(INFER_MAX_FRAME, decoder=_decoder))
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


# -- the server's side -----------------------------------------------------------------------------


@dataclass
class _Job:
    request: InferRequest
    received: float
    gone: anyio.Event  # the client hung up: skip
    done: anyio.Event = field(default_factory=anyio.Event)
    reply: InferResult | InferFailed | None = None


@dataclass
class ServerStats:
    served: int = 0
    busy: int = 0
    expired: int = 0
    abandoned: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of model calls, last 256


Recognizer = Callable[[bytes], Awaitable[str]]


class InferenceServer:
    """Serves STT requests with a pool of recognisers (each a model in memory, each serving one
    request at a time), a queue of at most ``max_queue`` waiting requests, and per-request
    deadlines. See :class:`ProcessRecognizer` for why the recognisers are processes."""

    def __init__(
        self, recognizers: list[Recognizer], max_queue: int = 32, max_connections: int = 256
    ) -> None:
        if not recognizers:
            raise ValueError("the inference server needs at least one recogniser")
        self.max_connections = max_connections
        self._connections = 0
        self._free = list(recognizers)
        self._slots = anyio.Semaphore(len(recognizers))
        self.max_queue = max_queue
        self._queued = 0
        self.stats = ServerStats()

    async def serve(self, listener: anyio.abc.SocketListener) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    await listener.serve(self._client, task_group=tg)
                except OSError as exc:  # EMFILE and friends: wait for descriptors, keep serving
                    log.warning("inference server: accept failed (%s); retrying", exc)
                    await anyio.sleep(0.1)

    async def _client(self, stream: anyio.abc.SocketStream) -> None:
        """One connection, one request. Nothing a client sends or fails to read may reach the
        listener: every error ends this connection only."""
        if self._connections >= self.max_connections:
            self.stats.busy += 1
            await stream.aclose()
            return
        self._connections += 1
        try:
            async with stream:
                raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                if peer_credentials(raw)[1] != os.getuid():  # abstract sockets have no file mode
                    return
                reply = await self._answer(stream)
                if reply is not None:
                    with anyio.move_on_after(5), contextlib.suppress(Exception):
                        await stream.send(encode(reply))
        except Exception as exc:  # a broken client: its connection ends, the server goes on
            log.debug("inference client failed: %r", exc)
        finally:
            self._connections -= 1

    async def _answer(self, stream: anyio.abc.SocketStream) -> InferResult | InferFailed | None:
        decoder: FrameDecoder[InferMessage] = FrameDecoder(INFER_MAX_FRAME, decoder=_decoder)
        try:
            with anyio.fail_after(REQUEST_READ_TIMEOUT):
                msg = await _read_one(stream, decoder)
        except (ConnectionError, FrameError, TimeoutError) as exc:
            return InferFailed(id=0, reason="bad_request", detail=str(exc) or type(exc).__name__)
        if not isinstance(msg, InferRequest):
            return InferFailed(id=0, reason="bad_request", detail=f"expected infer, got {type(msg).__name__}")
        if len(msg.audio) % 2:
            return InferFailed(id=msg.id, reason="bad_request", detail="audio is not whole 16-bit samples")
        if self._queued >= self.max_queue:
            self.stats.busy += 1
            return InferFailed(id=msg.id, reason="busy", detail=f"{self._queued} requests queued")
        job = _Job(msg, time.monotonic(), anyio.Event())
        async with anyio.create_task_group() as tg:

            async def watch_hangup() -> None:
                with contextlib.suppress(Exception):
                    await stream.receive(1)  # EOF (or anything): the client is gone
                job.gone.set()

            tg.start_soon(watch_hangup)
            await self._run(job)
            tg.cancel_scope.cancel()
        return None if job.gone.is_set() else job.reply

    async def _run(self, job: _Job) -> None:
        req = job.request
        deadline = job.received + req.timeout
        acquired = False
        self._queued += 1
        try:
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())) as waited:
                async with anyio.create_task_group() as race:

                    async def on_gone() -> None:
                        await job.gone.wait()  # hung up while queued: leave the queue now
                        race.cancel_scope.cancel()

                    race.start_soon(on_gone)
                    await self._slots.acquire()
                    acquired = True
                    race.cancel_scope.cancel()
        finally:
            self._queued -= 1
        if not acquired:
            if job.gone.is_set():
                self.stats.abandoned += 1
            elif waited.cancelled_caught:
                self.stats.expired += 1
                job.reply = InferFailed(id=req.id, reason="deadline", detail=f"queued {req.timeout:.2f}s")
            return
        try:
            if job.gone.is_set():
                self.stats.abandoned += 1
                return
            recognizer = self._free.pop()
            self.stats.in_flight += 1
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
            started = time.monotonic()
            try:
                # A recogniser that hangs is given up (and replaced on its next use, see
                # ProcessRecognizer) rather than holding its slot for ever.
                with anyio.fail_after(req.timeout + MODEL_GRACE):
                    text = await recognizer(req.audio)
            except Exception as exc:
                job.reply = InferFailed(id=req.id, reason="error", detail=f"{type(exc).__name__}: {exc}")
                return
            finally:
                ended = time.monotonic()
                self._free.append(recognizer)
                self.stats.in_flight -= 1
                self.stats.spans = [*self.stats.spans[-255:], (started, ended)]
            self.stats.served += 1
            job.reply = InferResult(
                id=req.id,
                text=text,
                queued_ms=round(1000 * (started - job.received), 2),
                busy_ms=round(1000 * (ended - started), 2),
            )
        finally:
            self._slots.release()


async def listen(address: str) -> anyio.abc.SocketListener:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(_sockaddr(address))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return await anyio.abc.SocketListener.from_socket(sock)


class ProcessRecognizer:
    """A pocketsphinx recogniser in a child process (``recognizer_proc``). pocketsphinx holds the
    GIL while it decodes: on threads, recognisers would run one at a time and freeze the
    server's event loop (heartbeats, accepts) for the length of every decode. As processes they
    run in parallel and the server's loop only moves bytes. A recogniser that dies, or is left
    mid-request by a cancellation, is replaced on its next use."""

    def __init__(self) -> None:
        self._proc: anyio.abc.Process | None = None
        self._out: BufferedByteReceiveStream | None = None
        self._dirty = False

    async def start(self) -> None:
        await self.aclose()
        argv = [sys.executable, "-m", "otp_agents.voice.recognizer_proc", str(os.getpid())]
        proc = await anyio.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        assert proc.stdout is not None
        self._proc, self._out = proc, BufferedByteReceiveStream(proc.stdout)
        await self._out.receive_exactly(4)  # models loaded

    async def __call__(self, raw: bytes) -> str:
        if self._proc is None or self._proc.returncode is not None or self._dirty:
            self._dirty = True  # stays set if the start is cut short: the next use starts again
            await self.start()
            self._dirty = False
        assert self._proc is not None and self._proc.stdin is not None and self._out is not None
        self._dirty = True
        try:
            await self._proc.stdin.send(struct.pack(">I", len(raw)) + raw)
            (size,) = struct.unpack(">I", await self._out.receive_exactly(4))
            text = (await self._out.receive_exactly(size)).decode()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError) as exc:
            raise RuntimeError(f"recogniser process failed: {type(exc).__name__}") from None
        self._dirty = False
        if text.startswith("\0error: "):
            raise RuntimeError(text[1:])
        return text

    async def aclose(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()
                await proc.aclose()
