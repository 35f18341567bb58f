"""Voice activity detection: a model that scores short windows, and the detector that turns
scores into speech start / end with hysteresis and minimum durations.

The default model is Silero VAD run natively by ``livekit-local-inference`` (its weights ship in
the wheel; about 20 µs per 32 ms window, and it releases the GIL). Any object with ``window`` and
``probability`` plugs in instead.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from otp_agents.voice.audio import SAMPLE_RATE


class VADModel(Protocol):
    """Scores windows of exactly ``window`` int16 samples at 16 kHz: P(speech) in [0, 1]."""

    window: int

    def probability(self, samples: np.ndarray) -> float: ...

    def reset(self) -> None: ...


class SileroVAD:
    """Silero VAD (native, from livekit-local-inference). One instance per conversation: it
    keeps recurrent state between windows."""

    name = "silero"

    def __init__(self) -> None:
        from livekit.local_inference import VAD, VAD_WINDOW_SAMPLES

        self._vad = VAD()
        self.window = int(VAD_WINDOW_SAMPLES)

    def probability(self, samples: np.ndarray) -> float:
        return float(self._vad.predict(samples))

    def reset(self) -> None:
        self._vad.reset()


@dataclass(frozen=True)
class VADSettings:
    activation: float = 0.5  # P(speech) at which speech starts
    deactivation: float = 0.35  # P(speech) under which silence counts (hysteresis)
    min_speech: float = 0.1  # seconds of speech before it counts as speech at all
    min_silence: float = 0.3  # seconds of silence that end a stretch of speech
    prefix_padding: float = 0.3  # audio kept from before the detected start, for STT

    def check(self) -> None:
        if not 0.0 < self.deactivation <= self.activation < 1.0:
            raise ValueError("VAD thresholds need 0 < deactivation <= activation < 1")
        for name in ("min_speech", "min_silence", "prefix_padding"):
            if getattr(self, name) < 0:
                raise ValueError(f"VAD {name} must be >= 0")


class Edge(enum.Enum):
    START = "start"
    END = "end"


@dataclass(frozen=True)
class SpeechEdge:
    edge: Edge
    at: float  # conversation time (s) where the speech started / the last speech ended


class SpeechDetector:
    """Window scores -> speech edges. Speech starts once ``min_speech`` seconds score above
    ``activation`` and ends once ``min_silence`` seconds score below ``deactivation``; the
    reported times are where the speech really began and really stopped, not where the
    detector became sure."""

    def __init__(self, model: VADModel, settings: VADSettings | None = None) -> None:
        self.model = model
        self.settings = settings or VADSettings()
        self.settings.check()
        self.window_seconds = model.window / SAMPLE_RATE
        self._buf = np.zeros(0, dtype=np.int16)
        self._t = 0.0  # conversation time at the end of the buffered audio
        self.speaking = False
        self._run_start: float | None = None  # first window of a candidate change
        self._last_speech_end = 0.0

    def push(self, samples: np.ndarray, end_time: float) -> list[SpeechEdge]:
        """Feed audio ending at ``end_time`` seconds; returns the edges it completed."""
        self._buf = np.concatenate((self._buf, samples)) if len(self._buf) else samples
        self._t = end_time
        edges: list[SpeechEdge] = []
        w = self.model.window
        while len(self._buf) >= w:
            window, self._buf = self._buf[:w], self._buf[w:]
            end = self._t - len(self._buf) / SAMPLE_RATE
            edge = self._score(self.model.probability(window), end - self.window_seconds, end)
            if edge is not None:
                edges.append(edge)
        return edges

    def _score(self, p: float, start: float, end: float) -> SpeechEdge | None:
        s = self.settings
        if not self.speaking:
            if p >= s.activation:
                if self._run_start is None:
                    self._run_start = start
                if end - self._run_start >= s.min_speech:
                    self.speaking, began, self._run_start = True, self._run_start, None
                    return SpeechEdge(Edge.START, began)
            else:
                self._run_start = None
            return None
        if p < s.deactivation:
            if self._run_start is None:
                self._run_start = start
            if end - self._run_start >= s.min_silence:
                self.speaking, stopped, self._run_start = False, self._run_start, None
                return SpeechEdge(Edge.END, stopped)
        else:
            self._run_start = None
        return None
