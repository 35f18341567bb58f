"""Local audio I/O: a WAV file as the user, WAV files as what the caller hears.

:class:`WavInput` plays a WAV file as if it were a live participant: in real time (paced by the
clock) or as fast as the pipeline takes it, starting at any offset (a resumed conversation
picks up where the caller is by now), followed by a tail of silence so the last turn ends.

:class:`WavSink` is the agent's loudspeaker on a timeline: every 10 ms of conversation time it
writes 10 ms of the agent's queued speech, or silence. With ``user_channel`` it writes a stereo
file, the user on the left and the agent on the right: the whole call, as heard.

:class:`WavWriter` appends to an existing file (a restarted leaf continues its recording) and
keeps the header's sizes right after every write, so a file cut short by SIGKILL still plays.
"""

from __future__ import annotations

import os
import struct
import time
import wave
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import numpy as np
from livekit import rtc

from otp_agents.voice.audio import FRAME_SAMPLES, SAMPLE_RATE, frame_of, pcm, resample

_HEADER = 44


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono int16 samples and rate of a 16-bit PCM WAV file (stereo is mixed down)."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"{path}: {8 * w.getsampwidth()}-bit audio; 16-bit PCM expected")
            raw = w.readframes(w.getnframes())
            channels, rate = w.getnchannels(), w.getframerate()
    except wave.Error as exc:
        raise ValueError(f"{path}: not a PCM WAV file: {exc}") from None
    samples = np.frombuffer(raw, dtype=np.int16)
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return samples, rate


class WavInput:
    """A WAV file as the user's audio, in 10 ms frames at 16 kHz."""

    def __init__(
        self,
        path: str | Path,
        *,
        realtime: bool = True,
        start_at: float = 0.0,
        tail: float = 2.0,
    ) -> None:
        samples, rate = read_wav(path)
        self.samples = resample(samples, rate, SAMPLE_RATE)
        self.duration = len(self.samples) / SAMPLE_RATE
        self.realtime = realtime
        self.start_at = max(0.0, start_at)
        self.tail = tail
        # Real-time mode: how late frames were taken (s). ``late`` is the worst moment; ``lag`` is
        # the latest frame's. A leaf that keeps up has a small lag at the end of the call whatever
        # its hiccups; one that cannot falls further behind every second.
        self.late = 0.0
        self.lag = 0.0

    async def frames(self) -> AsyncIterator[rtc.AudioFrame]:
        first = int(self.start_at * SAMPLE_RATE) // FRAME_SAMPLES * FRAME_SAMPLES
        total = len(self.samples) + int(self.tail * SAMPLE_RATE)
        silence = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        t0 = time.monotonic()
        for n, i in enumerate(range(first, total, FRAME_SAMPLES)):
            if self.realtime:
                due = t0 + n * FRAME_SAMPLES / SAMPLE_RATE
                ahead = due - time.monotonic()
                self.lag = max(0.0, -ahead)
                if ahead > 0:
                    await anyio.sleep(ahead)
                else:
                    self.late = max(self.late, self.lag)
                    await anyio.lowlevel.checkpoint()  # catching up must not starve the replies
            chunk = self.samples[i : i + FRAME_SAMPLES]
            if len(chunk) < FRAME_SAMPLES:
                chunk = np.concatenate((chunk, silence[: FRAME_SAMPLES - len(chunk)]))
            yield frame_of(chunk)

    async def aclose(self) -> None:
        return None


class WavWriter:
    """An int16 PCM WAV file that grows in place and can be reopened to append."""

    def __init__(self, path: str | Path, rate: int, channels: int = 1) -> None:
        self.path = Path(path)
        self.rate, self.channels = rate, channels
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = True
        if self.path.exists() and self.path.stat().st_size >= _HEADER:
            with open(self.path, "rb") as f:
                head = f.read(_HEADER)
            ok = head[:4] == b"RIFF" and head[8:12] == b"WAVE" and head[36:40] == b"data"
            fmt = struct.unpack_from("<HHIIHH", head, 20) if ok else None
            if fmt is not None and fmt[0] == 1 and fmt[1] == channels and fmt[2] == rate and fmt[5] == 16:
                fresh = False
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0), 0o644)
        if fresh:
            os.write(self._fd, self._header(0))
        size = os.fstat(self._fd).st_size
        frame_bytes = 2 * channels
        self._data = (size - _HEADER) // frame_bytes * frame_bytes  # drop a torn last frame
        os.lseek(self._fd, _HEADER + self._data, os.SEEK_SET)

    def _header(self, data: int) -> bytes:
        block = 2 * self.channels
        return (
            b"RIFF"
            + struct.pack("<I", 36 + data)
            + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, self.channels, self.rate, self.rate * block, block, 16)
            + b"data"
            + struct.pack("<I", data)
        )

    def write(self, samples: np.ndarray) -> None:
        raw = np.ascontiguousarray(samples, dtype=np.int16).tobytes()
        os.write(self._fd, raw)
        self._data += len(raw)
        os.pwrite(self._fd, struct.pack("<I", 36 + self._data), 4)
        os.pwrite(self._fd, struct.pack("<I", self._data), 40)

    def seek_to(self, seconds: float) -> None:
        """Make the file exactly ``seconds`` long: silence added (a restarted leaf fills the time
        it was down), or the end cut off (a leaf resuming from an earlier point)."""
        frames = max(0, round(seconds * self.rate))
        missing = frames - self._data // (2 * self.channels)
        if missing > 0:
            self.write(np.zeros(missing * self.channels, dtype=np.int16))
        elif missing < 0:
            self._data = frames * 2 * self.channels
            os.ftruncate(self._fd, _HEADER + self._data)
            os.lseek(self._fd, _HEADER + self._data, os.SEEK_SET)
            os.pwrite(self._fd, struct.pack("<I", 36 + self._data), 4)
            os.pwrite(self._fd, struct.pack("<I", self._data), 40)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class WavSink:
    """The agent's voice on the conversation timeline, written to WAV as it plays."""

    def __init__(self, path: str | Path, *, rate: int = SAMPLE_RATE, user_channel: bool = False) -> None:
        self.sample_rate = rate
        self.writer = WavWriter(path, rate, 2 if user_channel else 1)
        self._queue: deque[np.ndarray] = deque()
        self._queued = 0  # samples
        self._user: np.ndarray | None = None
        self.user_channel = user_channel

    def user_frame(self, samples: np.ndarray) -> None:
        """The user's audio for the next ``advance`` (a pipeline tap)."""
        self._user = samples

    async def push(self, frame: rtc.AudioFrame) -> None:
        samples = resample(pcm(frame), frame.sample_rate, self.sample_rate)
        self._queue.append(samples.copy())
        self._queued += len(samples)

    def clear(self) -> float:
        dropped = self._queued / self.sample_rate
        self._queue.clear()
        self._queued = 0
        return dropped

    @property
    def queued(self) -> float:
        return self._queued / self.sample_rate

    def advance(self, seconds: float) -> None:
        n = round(seconds * self.sample_rate)
        out = np.zeros(n, dtype=np.int16)
        filled = 0
        while filled < n and self._queue:
            head = self._queue[0]
            take = min(n - filled, len(head))
            out[filled : filled + take] = head[:take]
            filled += take
            if take == len(head):
                self._queue.popleft()
            else:
                self._queue[0] = head[take:]
        self._queued -= filled
        if self.user_channel:
            user = self._user if self._user is not None else np.zeros(n, dtype=np.int16)
            if len(user) != n:
                user = resample(user, SAMPLE_RATE, self.sample_rate)[:n]
                user = np.pad(user, (0, n - len(user)))
            out = np.column_stack((user, out)).reshape(-1)
            self._user = None
        self.writer.write(out)

    async def aclose(self) -> None:
        self.writer.close()
