"""Speech to text. A provider opens a stream per user utterance, is fed audio while the user
speaks, and gives the transcript when the turn ends; ``recognize`` does the same on a whole
buffer (used to retry a turn whose stream failed).

The offline default is pocketsphinx with the English acoustic model, language model and
dictionary that ship in its wheel. Decoding runs in a worker thread in ~0.1 s chunks so the
event loop (and with it the heartbeat) keeps turning while it works.

Loading the model takes about a quarter of a second. A zygote calls :func:`preload` once, so
the first recogniser of each process it forks takes that decoder (the fork's own copy) instead
of loading the model again: a restarted call is listening again that much sooner.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import anyio
import numpy as np

from otp_agents.voice.audio import SAMPLE_RATE

CHUNK = SAMPLE_RATE // 10  # samples handed to the decoder at a time


class STTStream(Protocol):
    async def push(self, samples: np.ndarray) -> None: ...

    async def finish(self) -> str: ...

    async def aclose(self) -> None: ...


class STT(Protocol):
    name: str

    def stream(self) -> STTStream: ...

    async def recognize(self, samples: np.ndarray) -> str: ...


_spare: tuple[int, Any, bool] | None = None  # (pid that made it, Decoder, warmed)


def preload(warm: np.ndarray | None = None) -> None:
    """Load one decoder ahead (in a zygote): each process forked from here takes it once.
    ``warm``: 16 kHz speech decoded once, so its running normalisation starts from speech."""
    global _spare
    from pocketsphinx import Decoder

    decoder = Decoder(loglevel="FATAL")
    if warm is not None:
        decoder.start_utt()
        decoder.process_raw(warm.tobytes(), False, True)
        decoder.end_utt()
    _spare = (os.getpid(), decoder, warm is not None)


def _decoder() -> tuple[Any, bool]:
    """A decoder, and whether it has heard speech already."""
    global _spare
    spare, _spare = _spare, None
    if spare is not None and spare[0] != os.getpid():  # a fork's own copy; the zygote keeps none
        return spare[1], spare[2]
    _spare = spare  # the zygote itself (or no spare): keep it for the forks
    from pocketsphinx import Decoder

    return Decoder(loglevel="FATAL"), False


class PocketSphinxSTT:
    """pocketsphinx 5 with its bundled US English model. One decoder per conversation: one
    utterance at a time, every call on one worker thread at a time (the limiter)."""

    name = "pocketsphinx"

    def __init__(self) -> None:
        self._decoder, self.warmed = _decoder()
        self._open = False  # an utterance is in progress
        self._limiter = anyio.CapacityLimiter(1)

    def stream(self) -> _SphinxStream:
        return _SphinxStream(self)

    async def recognize(self, samples: np.ndarray) -> str:
        if self._open:
            raise RuntimeError("recognize() while a stream is open")
        return await anyio.to_thread.run_sync(self._decode_all, samples.tobytes(), limiter=self._limiter)

    # -- in the worker thread -------------------------------------------------------------------

    def _decode_all(self, raw: bytes) -> str:
        self._decoder.start_utt()
        self._decoder.process_raw(raw, False, True)
        self._decoder.end_utt()
        return self._hyp()

    def _start(self) -> None:
        self._open = True
        self._decoder.start_utt()

    def _process(self, raw: bytes) -> None:
        self._decoder.process_raw(raw, False, False)

    def _end(self) -> str:
        try:
            self._decoder.end_utt()
            return self._hyp()
        finally:
            self._open = False

    def _abandon(self) -> None:
        try:
            self._decoder.end_utt()
        finally:
            self._open = False

    def _hyp(self) -> str:
        hyp = self._decoder.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""


class _SphinxStream:
    def __init__(self, stt: PocketSphinxSTT) -> None:
        self._stt = stt
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._started = False
        self._done = False

    async def push(self, samples: np.ndarray) -> None:
        self._pending.append(samples)
        self._pending_len += len(samples)
        if self._pending_len >= CHUNK:
            await self._flush()

    async def _flush(self) -> None:
        raw = np.concatenate(self._pending).tobytes() if self._pending else b""
        self._pending, self._pending_len = [], 0
        stt = self._stt
        if not self._started:
            self._started = True
            await anyio.to_thread.run_sync(stt._start, limiter=stt._limiter)
        if raw:
            await anyio.to_thread.run_sync(stt._process, raw, limiter=stt._limiter)

    async def finish(self) -> str:
        await self._flush()
        self._done = True
        return await anyio.to_thread.run_sync(self._stt._end, limiter=self._stt._limiter)

    async def aclose(self) -> None:
        if self._started and not self._done:
            self._done = True
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._stt._abandon, limiter=self._stt._limiter)
