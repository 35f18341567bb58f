"""Audio plumbing shared by every stage: the pipeline's internal format, exact-size framing,
resampling, and the two ends of a conversation (:class:`AudioInput`, :class:`AudioSink`).

Inside the pipeline audio is 16 kHz, mono, signed 16-bit, in 10 ms frames (160 samples): the rate
VAD and STT models want, and the only frame length the noise suppressor accepts. Everything that
comes in is resampled and reframed to that once, at the edge.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import numpy as np
from livekit import rtc

SAMPLE_RATE = 16_000
FRAME_MS = 10
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 160
FRAME_SECONDS = FRAME_MS / 1000


class AudioInput(Protocol):
    """The user's side: frames of any rate and length, mono, as they arrive."""

    def frames(self) -> AsyncIterator[rtc.AudioFrame]: ...

    async def aclose(self) -> None: ...


class AudioSink(Protocol):
    """The agent's side: where synthesized speech is queued for playout.

    ``push`` queues audio and returns at once (it never waits for playout); ``clear`` drops what
    is queued (barge-in) and returns the seconds dropped; ``queued`` is the audio not yet played;
    ``advance`` tells the sink the conversation clock moved on by that many seconds (a sink that
    plays on a timeline, like a WAV file, plays that much; a live sink ignores it).
    """

    sample_rate: int

    async def push(self, frame: rtc.AudioFrame) -> None: ...

    def clear(self) -> float: ...

    @property
    def queued(self) -> float: ...

    def advance(self, seconds: float) -> None: ...

    async def aclose(self) -> None: ...


def pcm(frame: rtc.AudioFrame) -> np.ndarray:
    """The frame's samples as int16 (a view, no copy)."""
    return np.frombuffer(frame.data, dtype=np.int16)


def frame_of(samples: np.ndarray, rate: int = SAMPLE_RATE) -> rtc.AudioFrame:
    data = np.ascontiguousarray(samples, dtype=np.int16)
    return rtc.AudioFrame(data.tobytes(), rate, 1, len(data))


def rms_dbfs(samples: np.ndarray) -> float:
    """Loudness of int16 samples in dB relative to full scale (-inf for digital silence)."""
    if len(samples) == 0:
        return float("-inf")
    power = float(np.mean(np.square(samples.astype(np.float64))))
    if power <= 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(power / (32768.0**2)))


class Reframer:
    """Cuts a stream of int16 chunks of any length into frames of exactly ``size`` samples."""

    def __init__(self, size: int = FRAME_SAMPLES) -> None:
        if size <= 0:
            raise ValueError(f"frame size must be positive, got {size}")
        self.size = size
        self._rest = np.zeros(0, dtype=np.int16)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        buf = np.concatenate((self._rest, samples)) if len(self._rest) else samples
        whole = len(buf) // self.size * self.size
        self._rest = buf[whole:].copy()
        return [buf[i : i + self.size] for i in range(0, whole, self.size)]

    def flush(self) -> list[np.ndarray]:
        """The tail, padded with silence to a whole frame (nothing if there is no tail)."""
        if not len(self._rest):
            return []
        tail = np.zeros(self.size, dtype=np.int16)
        tail[: len(self._rest)] = self._rest
        self._rest = np.zeros(0, dtype=np.int16)
        return [tail]


class ToPipeline:
    """Any mono frame -> 16 kHz 10 ms int16 frames (rtc.AudioResampler when the rate differs)."""

    def __init__(self) -> None:
        self._rate: int | None = None
        self._resampler: rtc.AudioResampler | None = None
        self._reframer = Reframer(FRAME_SAMPLES)

    def push(self, frame: rtc.AudioFrame) -> list[np.ndarray]:
        if frame.num_channels != 1:
            raise ValueError(f"expected mono audio, got {frame.num_channels} channels")
        if frame.sample_rate != self._rate:
            # A new rate mid-stream (a track renegotiated): start a fresh resampler.
            self._rate = frame.sample_rate
            self._resampler = (
                None
                if frame.sample_rate == SAMPLE_RATE
                else rtc.AudioResampler(frame.sample_rate, SAMPLE_RATE, num_channels=1)
            )
        if self._resampler is None:
            return self._reframer.push(pcm(frame))
        out: list[np.ndarray] = []
        for resampled in self._resampler.push(frame):
            out.extend(self._reframer.push(pcm(resampled)))
        return out


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample a whole int16 buffer at once (used for synthesized speech)."""
    if from_rate == to_rate or len(samples) == 0:
        return samples
    resampler = rtc.AudioResampler(from_rate, to_rate, num_channels=1)
    parts = [pcm(f) for f in resampler.push(frame_of(samples, from_rate))]
    parts += [pcm(f) for f in resampler.flush()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
