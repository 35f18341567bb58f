"""Optional noise suppression with WebRTC's audio processing module (rtc.AudioProcessingModule).

The module aborts the *whole process* when handed a frame that is not exactly 10 ms, so this
wrapper checks the length first and raises an ordinary ValueError instead.
"""

from __future__ import annotations

import numpy as np
from livekit import rtc

from otp_agents.voice.audio import FRAME_SAMPLES, SAMPLE_RATE, frame_of, pcm


class NoiseSuppressor:
    def __init__(self) -> None:
        self._apm = rtc.AudioProcessingModule(noise_suppression=True, high_pass_filter=True)

    def process(self, samples: np.ndarray) -> np.ndarray:
        if len(samples) != FRAME_SAMPLES:
            raise ValueError(
                f"noise suppression takes 10 ms frames ({FRAME_SAMPLES} samples at {SAMPLE_RATE} Hz), "
                f"got {len(samples)} samples"
            )
        frame = frame_of(samples)
        self._apm.process_stream(frame)
        return pcm(frame)
