"""The shared inference server's side (see :mod:`otp_agents.voice.inference` for the protocol):
a bounded queue of requests, each with its deadline, served by recogniser processes."""

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

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from otp_agents.voice.inference import (
    DECODER,
    INFER_MAX_FRAME,
    MODEL_GRACE,
    REQUEST_READ_TIMEOUT,
    InferFailed,
    InferMessage,
    InferRequest,
    InferResult,
    read_one,
    sockaddr,
)
from otp_agents.wire.framing import FrameDecoder, FrameError, encode
from otp_agents.wire.peer import peer_credentials

log = logging.getLogger("otp_agents.inference")


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
        decoder: FrameDecoder[InferMessage] = FrameDecoder(INFER_MAX_FRAME, decoder=DECODER)
        try:
            with anyio.fail_after(REQUEST_READ_TIMEOUT):
                msg = await read_one(stream, decoder)
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
        sock.bind(sockaddr(address))
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
